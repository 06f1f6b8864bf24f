"""What every head shares: the `HEADS` registry, the written contract between the trainer and a head,
and the helpers of the chunked kernels.

A head is an `nn.Module` called as ``loss = head(embeddings (B, D), labels (B,))`` that owns its class
proxies (pytorch-metric-learning's convention). `heads.build(name, **kwargs)` makes a registered one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, NamedTuple, Protocol, runtime_checkable

from torch import Tensor, nn

from faceforge.registry import Registry

if TYPE_CHECKING:  # a type only: heads/ imports nothing of data/ or train/ at run time
    from faceforge.data.samplers import Batch

HEADS: Registry[nn.Module] = Registry("head")


# ----------------------------------------------------------------------------------------------------------
# The contract between the trainer and a head (protocols)


@runtime_checkable
class ClassifierHead(Protocol):
    """What every classification head is (pytorch-metric-learning's base loss, in our words).

    - ``weight``: the class proxies W, (C, D) like ``nn.Linear`` (a property is fine);
    - ``head(embeddings (B, D), labels (B,) int64) -> loss``, a scalar: the mean over the batch of
      ``per_sample_loss`` plus any batch-level term of the head;
    - ``per_sample_loss(embeddings, labels, *, classifier_grad=True) -> (B,)``: each sample's loss; with
      ``classifier_grad=False`` the class side (W, a bias) is held fixed, so only the embeddings get a
      gradient (what a wrapper such as BroadFace needs for its Eq. 8).

    - ``batch_level_loss``: True when the loss adds a batch-level term to that mean (ArcFace's Eq. 6
      inter-class regulariser); a wrapper that recombines per-sample losses (BroadFace) refuses such a head.

    Checked with ``isinstance(head, ClassifierHead)`` (member names only: Python cannot check signatures).
    A head may subclass it (after ``nn.Module``) to inherit ``batch_level_loss = False``.
    """

    weight: Tensor
    batch_level_loss: bool = False

    def __call__(self, embeddings: Tensor, labels: Tensor) -> Tensor: ...

    def per_sample_loss(self, embeddings: Tensor, labels: Tensor, *, classifier_grad: bool = True) -> Tensor: ...


class RowShard(NamedTuple):
    """This rank's rows [start, stop) of a logical tensor of ``total`` rows (a class-sharded head's W, parallel.py).

    A checkpoint writes each rank's rows of such a tensor into one logical (total, ...) tensor, and a run with
    another world size reads back the rows it holds (``faceforge.train.checkpoint``)."""

    start: int
    stop: int
    total: int


@runtime_checkable
class TrainHooks(Protocol):
    """What a part (a head, an objective) may ask of the training loop. Opt in by subclassing::

        class MyHead(nn.Module, TrainHooks):
            def after_optimizer_step(self, step: int) -> None: ...

    and override only what the part needs; the others are the no-ops below. The trainer checks
    ``isinstance(part, TrainHooks)`` once, when it is built, and then calls, on every rank:

    - ``on_batch(batch)`` before each micro-batch's forward (``faceforge.data.samplers.Batch``: images,
      labels, sample ids, flip mask, extras);
    - ``after_optimizer_step(step)`` after each optimiser update; ``step`` = updates done (1 after the first);
    - ``diagnostics(embed_fn) -> {name: float}`` every ``train.diagnostics_every`` steps, on rank 0 only,
      when ``provides_diagnostics`` is True; ``embed_fn(view_ids (K,)) -> (K, D)`` embeds training images
      by :meth:`Batch.view_ids` with the current backbone;
    - ``extra_state() -> dict`` when a checkpoint is written (on every rank, so it may communicate; rank 0's
      result is saved) and ``load_extra_state(state)`` when one is read: state a part keeps outside its
      ``state_dict`` (tensors and plain containers only: checkpoints load with ``weights_only=True``);
    - ``verification_threshold() -> float | None``: a learned decision boundary in cosine terms
      (SphereFace2's bias), saved in the checkpoint for ``faceforge eval``; None = none;
    - ``row_shards() -> {state_dict key: RowShard}``: the part's tensors of which each rank holds its own rows
      (a class-sharded head's W). The trainer neither all-reduces their gradients nor counts them as replicated
      in the gradient norm (their squared norm is summed over ranks), and a checkpoint holds each as one logical
      tensor, with its optimiser state, written by the ranks that hold its rows. Default: none (a head's
      gradients are all-reduced (averaged) explicitly, as DDP does for the backbone).

    Attributes:
        provides_diagnostics: the part's ``diagnostics`` means something (``train.diagnostics_every`` needs one).
    """

    provides_diagnostics: ClassVar[bool] = False

    def on_batch(self, batch: Batch) -> None:
        return None

    def after_optimizer_step(self, step: int) -> None:
        return None

    def diagnostics(self, embed_fn: Callable[[Tensor], Tensor]) -> dict[str, float]:
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None

    def verification_threshold(self) -> float | None:
        return None

    def row_shards(self) -> dict[str, RowShard]:
        return {}


@runtime_checkable
class HeadWrapper(Protocol):
    """A head that wraps another (BroadFace): ``head`` is the wrapped head, which holds the class weights;
    the wrapper's ``state_dict`` holds the wrapped head's entries as ``head.*`` beside its own. Starting a
    run from another run's class weights (``model.init_from``) loads into the wrapped head."""

    head: nn.Module


def train_hooks(*parts: object) -> list[TrainHooks]:
    """The parts that opted into :class:`TrainHooks`, in the order given (duplicates once)."""
    seen: set[int] = set()
    hooked: list[TrainHooks] = []
    for part in parts:
        if isinstance(part, TrainHooks) and id(part) not in seen:
            seen.add(id(part))
            hooked.append(part)
    return hooked


# ----------------------------------------------------------------------------------------------------------
# End of the contract.
#
# Below: helpers shared by the chunked kernels (softmax.py, sphereface2.py, broadface.py).
#


# ----------------------------------------------------------------------------------------------------------
# Chunked-kernel helpers
