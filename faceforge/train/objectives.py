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
- an objective may also opt into ``faceforge.heads.base.TrainHooks`` (``on_batch``,
  ``after_optimizer_step(step)``, ``diagnostics``, ``extra_state``); the trainer calls it like a head's.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from faceforge.data.samplers import CLASS_IMAGES, Batch
from faceforge.registry import Registry

__all__ = ["OBJECTIVES", "AttFCObjective", "Classification", "Objective"]


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
        self._encoder: Callable[[Tensor], Tensor] | None = None

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
        """The state of the ``owned`` modules (empty when they have none)."""
        return self.owned.state_dict()

    def load_owned_state_dict(self, state: dict[str, Any]) -> None:
        self.owned.load_state_dict(state)


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
