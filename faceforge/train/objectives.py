"""Objectives: what the trainer minimises, as named loss terms of a batch.

An objective is an ``nn.Module`` (subclass :class:`Objective`) called as ``objective(batch) -> {name: loss}``
with scalar tensors; the trainer sums the terms, logs each under its name (``train/<name>`` in TensorBoard
when there is more than one) and stops, naming the term, when one is not finite. It is built by name from
:data:`OBJECTIVES` (config section ``objective: {name, kwargs}``; ``"package.module:callable"`` works too)
as ``factory(backbone=..., head=..., amp_dtype=..., **kwargs)``.

What the trainer does with an objective's parts:

- ``backbone`` and ``head``: trained by the optimiser (their parameter groups); the backbone runs under
  DDP (:meth:`Objective.embed` calls the wrapper the trainer hands over with :meth:`Objective.set_encoder`),
  the head's replicated gradients are all-reduced explicitly (``TrainHooks.row_shards`` opt out).
- ``owned``: an ``nn.ModuleDict`` of modules the objective keeps for itself (a distillation teacher, a
  momentum class encoder). The optimiser never sees them and DDP does not wrap them; their state is saved
  in checkpoints (key ``"objective"``) when they have any, and restored on resume.
- ``learned``: an ``nn.ModuleDict`` of modules the objective adds and the optimiser trains (in the head's
  parameter group), replicated like the head (broadcast once, gradients all-reduced); saved with ``owned``
  under ``learned.*`` (a distillation projection from the student's width to the teacher's).
- ``bind(context)``: called once with the trainer's ``SamplerContext`` (training set, seed, augmentation),
  for an objective that keys something by the data (a teacher-embedding cache).
- ``uses_unlabelled``: True for an objective that reads unlabelled images (``data.unlabelled``): they come
  in the batch with label -1 (``faceforge.data.samplers``); the trainer refuses them for any other objective.
- an objective may also opt into ``faceforge.heads.base.TrainHooks`` (``on_batch``,
  ``after_optimizer_step(step)``, ``diagnostics``, ``extra_state``); the trainer calls it like a head's.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from faceforge.data.samplers import CLASS_IMAGES, Batch, SamplerContext
from faceforge.heads.attfc import AttFC
from faceforge.heads.base import ClassifierHead, missing_classifier_member, unopted_hooks
from faceforge.core.registry import Registry, unknown_kwargs
from faceforge.core.config import ConfigError

__all__ = ["OBJECTIVES", "AttFCObjective", "Classification", "Objective", "build_objective"]


class Objective(nn.Module):
    """The base of every objective: a backbone, a head, modules of its own, and the backbone's runner.

    Args:
        backbone: images (B, 3, H, W) -> embeddings (B, D); trained.
        head: the classification head (``faceforge.heads.base.ClassifierHead`` for the margin heads); trained.
        amp_dtype: run the backbone under autocast with this dtype (None = float32); the head sees float32.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, amp_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.amp_dtype = amp_dtype
        self.owned = nn.ModuleDict()  # not trained by the optimiser, kept out of DDP, checkpointed
        self.learned = nn.ModuleDict()  # trained with the head's group, replicated over ranks, checkpointed
        self._encoder: Callable[[Tensor], Tensor] | None = None

    uses_unlabelled: ClassVar[bool] = False
    # the head this objective drives (checked by build_objective): a ClassifierHead, called head(embeddings, labels)
    head_contract: ClassVar[type] = ClassifierHead
    # the Batch.extras keys it reads (the sampler must give them: data.samplers.build_sampler checks)
    needs_extras: ClassVar[tuple[str, ...]] = ()

    def bind(self, context: SamplerContext) -> None:
        """Learn the training set, seed and augmentation the run uses (called once; default: nothing)."""
        return None

    def set_encoder(self, encoder: Callable[[Tensor], Tensor] | None) -> None:
        """What :meth:`embed` runs instead of ``backbone`` (the trainer's DDP wrapper of it); None = the backbone.
        Kept out of the module tree, so that it is neither a submodule nor in ``state_dict``."""
        self.__dict__["_encoder"] = encoder

    def embed(self, images: Tensor, *, synced: bool = True) -> Tensor:
        """The trained backbone's embeddings (B, D) of images (B, 3, H, W), under autocast when ``amp_dtype``
        is set (so possibly bfloat16/float16: callers convert). ``synced=False`` runs the bare backbone, not
        its DDP wrapper: for one rank's own forward passes (diagnostics), which must not communicate."""
        encoder = self._encoder if (synced and self._encoder is not None) else self.backbone
        with torch.autocast(images.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            return encoder(images)

    def forward(self, batch: Batch) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.forward(batch) -> dict[str, Tensor]")

    def owned_state_dict(self) -> dict[str, Any]:
        """The state of the ``owned`` modules and, under ``learned.*``, of the ``learned`` ones (empty when
        they have none)."""
        return {**self.owned.state_dict(), **{f"learned.{k}": v for k, v in self.learned.state_dict().items()}}

    def load_owned_state_dict(self, state: dict[str, Any]) -> None:
        self.learned.load_state_dict({k.removeprefix("learned."): v for k, v in state.items() if k.startswith("learned.")})
        self.owned.load_state_dict({k: v for k, v in state.items() if not k.startswith("learned.")})


def for_head(embeddings: Tensor) -> Tensor:
    """Embeddings (B, D) as a head takes them: half precision (autocast) up-cast to float32; float64 kept
    (a float64 backbone, as the equivalence tests train, keeps its precision through the head)."""
    return embeddings if embeddings.dtype == torch.float64 else embeddings.float()


OBJECTIVES: Registry[Objective] = Registry("objective")


@OBJECTIVES.register("classification")
class Classification(Objective):
    """The plain objective: ``{"classification": head(backbone(images), labels)}``."""

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return {"classification": self.head(for_head(self.embed(batch.images)), batch.labels)}


@OBJECTIVES.register("attfc")
class AttFCObjective(Objective):
    """AttFC: ``{"attfc": head(backbone(images), labels, K)}`` with K (B, k, D) the class features of the k class
    images per sample (``batch.extras["class_images"]`` (B, k, 3, H, W), the ``attfc`` sampler) encoded by a
    momentum copy of the backbone (``owned["momentum"]``, :class:`faceforge.train.momentum.MomentumEncoder`).

    Per forward, as the official code: Eq. 12 first, then the class encoder (train mode, no grad) on the
    k B class images at once, then the head (which enqueues the batch's generated centres after its loss).
    The class encoder is checkpointed under ``objective`` (``momentum.encoder.*``); ``faceforge eval
    --encoder momentum`` embeds with it.

    Args:
        backbone, head, amp_dtype: as :class:`Objective`; head is ``faceforge.heads.AttFC``.
        momentum: gamma of Eq. 12 (default 0.999).
    """

    head_contract = AttFC  # called head(embeddings, labels, class_features)
    needs_extras = (CLASS_IMAGES,)  # the attfc sampler's class images

    def __init__(self, backbone: nn.Module, head: nn.Module, amp_dtype: torch.dtype | None = None,
                 momentum: float = 0.999) -> None:
        super().__init__(backbone, head, amp_dtype)
        from faceforge.train.momentum import MomentumEncoder

        self.owned["momentum"] = MomentumEncoder(backbone, momentum)

    def class_features(self, class_images: Tensor) -> Tensor:
        """(B, k, D) float32 (float64 for a float64 backbone): Eq. 12, then the class encoder on (B, k, 3, H, W) class images."""
        encoder = self.owned["momentum"]
        encoder.update(self.backbone)  # before each encoding
        b, k = class_images.shape[:2]
        return for_head(encoder.encode(class_images.flatten(0, 1), self.amp_dtype)).view(b, k, -1)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        if CLASS_IMAGES not in batch.extras:
            raise ValueError(
                f"objective attfc: the batch has no extras[{CLASS_IMAGES!r}] (class images); expected "
                "data.sampler: attfc"
            )
        f = for_head(self.embed(batch.images))
        K = self.class_features(batch.extras[CLASS_IMAGES])
        return {"attfc": self.head(f, batch.labels, K)}


def build_objective(name: str, kwargs: dict[str, Any], *, backbone: nn.Module, head: nn.Module,
                    amp_dtype: torch.dtype | None) -> Objective:
    """``OBJECTIVES.build(name, backbone=..., head=..., amp_dtype=..., **kwargs)``, checked when it is built, each a
    one-line ``ConfigError``: ``objective.kwargs`` against the factory's signature (``objective.kwargs.<key>``); the
    head against the objective's ``head_contract`` (``head.name``: the ClassifierHead member it lacks); an objective
    that defines a ``TrainHooks`` member without opting in (``objective.name``)."""
    factory = OBJECTIVES.get(name)
    unknown = unknown_kwargs(factory, kwargs, fixed=("backbone", "head", "amp_dtype"))
    if unknown:
        raise ConfigError(f"objective.kwargs.{unknown[0]}: objective {name!r} does not take it; expected the keyword "
                          f"arguments of {getattr(factory, '__qualname__', name)}")
    objective = factory(backbone=backbone, head=head, amp_dtype=amp_dtype, **kwargs)
    contract = objective.head_contract
    if not isinstance(head, contract):
        missing = missing_classifier_member(head) if contract is ClassifierHead else None
        what = f"lacks the ClassifierHead member {missing!r}" if missing else f"is not a {contract.__name__}"
        raise ConfigError(f"head.name: {type(head).__name__} {what}, which objective {name!r} needs; expected a head "
                          f"that subclasses {contract.__module__}.{contract.__name__}")
    members = unopted_hooks(objective)
    if members:
        raise ConfigError(f"objective.name: {name!r}: {type(objective).__name__}.{members[0]} is a TrainHooks member, "
                          f"but the objective does not subclass faceforge.heads.base.TrainHooks, so the trainer would "
                          f"never call it; expected class {type(objective).__name__}(Objective, TrainHooks)")
    return objective
