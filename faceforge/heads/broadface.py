"""BroadFace (Kim, Park and Shin, ECCV 2020): the classifier learns from the batch plus a queue of past embeddings.

`BroadFace(head, queue_size)` wraps any head with ``per_sample_loss(embeddings, labels, *, classifier_grad)``
(the margin heads of softmax.py, SphereFace2) and keeps, in fixed-size FIFO ring buffers:

- ``queue_embeddings`` (Q, D): the raw (unnormalised) embeddings e- of past batches;
- ``queue_labels`` (Q,), and ``queue_weights`` (Q, D): the rows W-_y of the class weights *as they were in
  the forward that produced e-*;
- ``queue_sample_ids`` (Q,): who the rows came from (-1 = unknown), for the Fig. 5a diagnostics;
- ``queue_count`` and ``queue_pointer``: how many rows are valid and where the next one goes.

They are registered buffers (float32, or float64 when the head is: autocast never changes them), so a
checkpoint holds them and a partly filled queue resumes exactly. Each training forward:

    e* = e- + (|e-| / |W-_y|) (W_y - W-_y)                                    # BroadFace Eq. 7
    L_encoder    = mean_{i in X} l(e_i)              with W held fixed        # Eq. 8
    L_classifier = mean_{i in X u E} l(e_i or e*_i)  with embeddings fixed    # Eq. 9
    return L_encoder + L_classifier

then enqueues the batch (after the losses, as the official code does). e* is recomputed every step from the
stored originals with the current W (no gradient), never accumulated.

Memory: the classifier loss runs over row blocks (the batch, then ``row_chunk`` queue rows at a time; the
inner head chunks over classes), and the gradient of the head's parameters is computed block by block in
the forward (``torch.autograd.grad``) and summed, so no block's buffers outlive it. A small autograd
function hands the sum to autograd in the backward, scaled by the incoming gradient. The peak is then one
block's (rows, C) logits + the block's gradient of W + the running sum, instead of an (N + B) x C graph.

DDP: one queue per rank by default (the engine keeps DDP from broadcasting head buffers); ``gather=True``
all-gathers each batch's rows (embeddings, labels, W- rows, sample ids) before enqueueing, so every rank
holds the same global queue.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from faceforge.heads.base import (
    HEADS,
    ClassifierHead,
    ClassRows,
    TrainHooks,
    check_buffer_policy,
    check_inputs,
    check_kwarg_ranges,
    check_size,
    chunks,
    class_row_of,
)
from faceforge.heads.buffers import ReusableBuffer

if TYPE_CHECKING:
    from faceforge.data.samplers import Batch

__all__ = ["BroadFace", "QueueEntries", "build_broadface", "compensate", "compensation"]

DEFAULT_ROW_CHUNK = 1024  # queue rows per block: a (1024, C) float32 logit buffer, 351 MB at C = 85,742


def compensate(past_embeddings: Tensor, past_weights: Tensor, weights: Tensor) -> Tensor:
    """BroadFace Eq. 7: e* = e- + (|e-| / |W-_y|) (W_y - W-_y).

    past_embeddings e- (M, D), past_weights W-_y (M, D) and the current rows weights W_y (M, D) -> e* (M, D).
    """
    return past_embeddings + compensation(past_embeddings, past_weights, weights)


def compensation(past_embeddings: Tensor, past_weights: Tensor, weights: Tensor) -> Tensor:
    """The shift of BroadFace Eq. 7, (|e-| / |W-_y|) (W_y - W-_y) (M, D): e* = e- + this (shapes as ``compensate``)."""
    past_norms = torch.linalg.vector_norm(past_weights, dim=1, keepdim=True)
    ratio = torch.linalg.vector_norm(past_embeddings, dim=1, keepdim=True) / past_norms.clamp_min(
        torch.finfo(past_weights.dtype).tiny
    )
    return ratio * (weights - past_weights)


def cosine_error(a: Tensor, b: Tensor) -> Tensor:
    """Mean over rows of 1 - cos(a_i, b_i), for (M, D) tensors (BroadFace Fig. 5a's error)."""
    return (1.0 - F.cosine_similarity(a, b, dim=1)).mean()


def check_sample_ids(sample_ids: Tensor, rows: int) -> None:
    """ValueError unless ``sample_ids`` is (rows,), one per embedding."""
    if sample_ids.shape != (rows,):
        raise ValueError(f"sample ids of shape {tuple(sample_ids.shape)}; expected ({rows},), one per embedding")


class QueueEntries(NamedTuple):
    """The valid queue rows, oldest first: embeddings e- (M, D), labels (M,), class_weights W-_y (M, D) and
    sample_ids (M,)."""

    embeddings: Tensor
    labels: Tensor
    class_weights: Tensor
    sample_ids: Tensor


class _HandOverGrads(torch.autograd.Function):
    """Returns `value`; its backward gives `params` the gradients computed eagerly in the forward, times grad_output."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, value: Tensor, grads: list[Tensor | None], *params: Tensor
    ) -> Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):  # type: ignore[override]
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("BroadFace: backward twice through one classifier loss; its gradient was handed over")
        return (None, None, *(None if g is None else g.mul_(grad_output) for g in grads))


def _all_gather_rows(tensors: list[Tensor]) -> list[Tensor]:
    """Each (n_r, ...) tensor concatenated over the ranks in rank order (ranks may hold different n_r)."""
    world = dist.get_world_size()
    device = tensors[0].device
    count = torch.tensor([tensors[0].shape[0]], device=device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    gathered = []
    for t in tensors:
        padded = t.new_zeros((max(sizes), *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([p[:n] for p, n in zip(parts, sizes)]))
    return gathered


class BroadFace(nn.Module, ClassifierHead, TrainHooks):
    """Wrap `head` (a `ClassifierHead`: `per_sample_loss` and `weight` (C, D)) with BroadFace's queue, Eq. 7-9.

    A head of K sub-centres a class (`weight` (C, K, D), Sub-center ArcFace) queues as W-_y the sub-centre of y
    nearest the sample's embedding (its sub-class-wise max), and compensates with the current sub-centre nearest
    that stored row (the one it has become; ``heads.base.class_row_of``).

    Args:
        head: the classifier, e.g. `ArcFace(C, D)`; `weight` here is its `weight`.
        queue_size: Q, rows kept (>= 0; 0 gives the head's own gradients, split into Eq. 8 and Eq. 9).
        compensate: apply Eq. 7 to the queued embeddings (default True).
        gather: under torch.distributed, all-gather each batch before enqueueing (one global queue on every
            rank); default False (one queue per rank).
        row_chunk: queue rows per block of the classifier loss (default 1024).
        diagnostic_samples: queue rows `diagnostics` looks at (default 1024).
        buffers: "auto" (default), "reuse" or "release": whether the running sum of the classifier gradient
            is kept between steps (heads/buffers.py).
    Call: `loss = broadface(embeddings (B, D), labels (B,))` -> scalar Eq. 8 + Eq. 9. A training-mode call
    enqueues the batch; `observe_sample_ids(ids (B,))` before it names the batch's rows for `diagnostics`.
    """

    def __init__(
        self,
        head: nn.Module,
        queue_size: int,
        compensate: bool = True,
        gather: bool = False,
        row_chunk: int = DEFAULT_ROW_CHUNK,
        diagnostic_samples: int = 1024,
        buffers: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(head, ClassifierHead) or not isinstance(head.weight, Tensor):
            raise TypeError(
                f"BroadFace wraps a head with per_sample_loss(embeddings, labels, *, classifier_grad) and a (C, D) "
                f"or (C, K, D) weight; got {type(head).__name__}"
            )
        if head.batch_level_loss:
            raise ValueError(
                f"BroadFace does not apply the inner head's batch-level Eq. 6 regulariser; got "
                f"{type(head).__name__}({head.extra_repr()}); expected a head without one (inter_loss_weight=0)"
            )
        if isinstance(queue_size, bool) or int(queue_size) != queue_size or queue_size < 0:
            raise ValueError(f"queue_size={queue_size!r} must be an integer >= 0")
        self.head = head
        self.queue_size = int(queue_size)
        self.compensate = bool(compensate)
        self.gather = bool(gather)
        self.row_chunk = check_size("row_chunk", row_chunk)
        self.diagnostic_samples = check_size("diagnostic_samples", diagnostic_samples)
        num_classes, embedding_size = head.weight.shape[0], head.weight.shape[-1]  # (C, D) or (C, K, D)
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        dtype = torch.promote_types(torch.float32, head.weight.dtype)
        device = head.weight.device
        q, d = self.queue_size, self.embedding_size
        self.register_buffer("queue_embeddings", torch.zeros(q, d, dtype=dtype, device=device))
        self.register_buffer("queue_labels", torch.zeros(q, dtype=torch.long, device=device))
        if self.stores_class_rows:  # W-_y here; a class-sharded queue keeps them with their shard
            self.register_buffer("queue_weights", torch.zeros(q, d, dtype=dtype, device=device))
        self.register_buffer("queue_sample_ids", torch.full((q,), -1, dtype=torch.long, device=device))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long, device=device))
        self._pending_ids: Tensor | None = None
        self.buffers = check_buffer_policy(buffers)
        self._grad_buffers: list[ReusableBuffer] = []  # the running sum of the classifier gradient

    # Where the queue's W-_y rows live: in the ``queue_weights`` buffer (one process, or replicated heads); a
    # queue around a class-sharded head keeps each with the shard that owns its class (ShardedBroadFace: False).
    # Its public extension points: block_loss, queue_blocks, classifier_loss, advance, fifo_order, queued,
    # diagnosable, past_and_current_rows, take_pending_ids.
    stores_class_rows: ClassVar[bool] = True

    @property
    def weight(self) -> Tensor:
        """The inner head's class weights (C, D)."""
        return self.head.weight

    # ClassifierHead: the loss adds Eq. 9's queue term to the batch's per-sample mean, so it is batch-level
    batch_level_loss = True

    def per_sample_loss(self, embeddings: Tensor, labels: Tensor, *, classifier_grad: bool = True) -> Tensor:
        """(B,) the inner head's per-sample loss of the batch (Eq. 8's rows; the queue's Eq. 9 is batch-level)."""
        return self.head.per_sample_loss(embeddings, labels, classifier_grad=classifier_grad)

    def extra_repr(self) -> str:
        return (
            f"queue_size={self.queue_size}, compensate={self.compensate}, gather={self.gather}, "
            f"row_chunk={self.row_chunk}"
        )

    # --- the loss ---

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Scalar L_encoder (Eq. 8) + L_classifier (Eq. 9). embeddings (B, D) raw, labels (B,) int64."""
        sample_ids = self.take_pending_ids()
        if sample_ids is not None:
            check_sample_ids(sample_ids, embeddings.shape[0])
        self.observe_rows(embeddings, labels, sample_ids)  # the batch, once, before any of its losses
        loss_encoder = self.rows_loss(embeddings, labels, sample_ids, classifier_grad=False).mean()  # Eq. 8
        labels = labels.long()
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            batch = embeddings.detach().to(self.queue_embeddings.dtype)
            rows = batch.shape[0] + int(self.queue_count)
            blocks = itertools.chain([(batch, labels, sample_ids)], self.queue_blocks())
            loss_classifier = self.classifier_loss(blocks, rows)  # Eq. 9
            if self.training:
                self.enqueue(batch, labels, class_row_of(self.head.weight.detach()[labels], batch), sample_ids)
        return loss_encoder + loss_classifier

    def queue_blocks(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The valid queue rows, `row_chunk` at a time: (e* (Eq. 7) or e-, labels, sample ids (-1 unknown)), e* from
        the current W."""
        weight = self.head.weight.detach()
        for r0, r1 in chunks(int(self.queue_count), self.row_chunk):
            past, labels = self.queue_embeddings[r0:r1], self.queue_labels[r0:r1]
            if self.compensate:
                stored = self.queue_weights[r0:r1]
                now = class_row_of(weight[labels], stored).to(past.dtype)
                past = past + compensation(past, stored, now)  # Eq. 7
            yield past, labels, self.queue_sample_ids[r0:r1]

    def classifier_loss(self, blocks: Iterable[tuple[Tensor, Tensor, Tensor | None]], rows: int) -> Tensor:
        """Mean over `rows` of the per-sample loss of each block (rows, labels, sample ids or None) with
        classifier_grad=True: BroadFace Eq. 9 with the embeddings fixed.

        The gradient of the head's parameters is taken block by block here and handed to autograd at the end.
        """
        params = [p for p in self.head.parameters() if p.requires_grad]
        need_grad = torch.is_grad_enabled() and bool(params)
        total: Tensor | None = None
        grads: list[Tensor | None] = [None] * len(params)
        for block_rows, block_labels, block_ids in blocks:
            with torch.set_grad_enabled(need_grad):
                block = self.block_loss(block_rows, block_labels, block_ids).sum()
            if need_grad:
                self._accumulate(grads, torch.autograd.grad(block, params, allow_unused=True))
            total = block.detach() if total is None else total + block.detach()
        assert total is not None  # the batch block always comes first
        value = total / rows
        if not need_grad:
            return value
        return _HandOverGrads.apply(value, [None if g is None else g.div_(rows) for g in grads], *params)

    def block_loss(self, rows: Tensor, labels: Tensor, sample_ids: Tensor | None = None) -> Tensor:
        """(n,) the head's per-sample loss of one block of Eq. 9, its class side trained, the rows held fixed;
        sample_ids (n,) name the rows (-1 or None: unknown) for a margin drawn per sample."""
        return self.rows_loss(rows, labels, sample_ids, classifier_grad=True)

    def rows_loss(self, rows: Tensor, labels: Tensor, sample_ids: Tensor | None, *, classifier_grad: bool) -> Tensor:
        """(n,) the inner head's per-sample loss of rows (n, D): ``class_loss`` with their sample ids for a head
        with class rows (``heads.base.ClassRows``), else its ``per_sample_loss`` (no ids to hand)."""
        if isinstance(self.head, ClassRows):
            labels = check_inputs(rows, labels, self.num_classes, self.embedding_size)
            return self.head.class_loss(rows, labels, classifier_grad=classifier_grad, sample_ids=sample_ids)
        return self.head.per_sample_loss(rows, labels, classifier_grad=classifier_grad)

    def observe_rows(self, embeddings: Tensor, labels: Tensor, sample_ids: Tensor | None) -> None:
        """The inner head's ``observe_batch`` of the batch, with its sample ids where it takes them (``ClassRows``)."""
        if isinstance(self.head, ClassRows):
            self.head.observe_batch(embeddings, labels.long(), sample_ids=sample_ids)
        else:
            self.head.observe_batch(embeddings, labels)

    def _accumulate(self, total: list[Tensor | None], grads: tuple[Tensor | None, ...]) -> None:
        """total[i] += grads[i], in place; the first gradient is copied into memory kept across steps."""
        while len(self._grad_buffers) < len(grads):
            self._grad_buffers.append(ReusableBuffer(self.buffers))
        for i, g in enumerate(grads):
            if g is None:
                continue
            if total[i] is None:
                total[i] = self._grad_buffers[i].get(g.shape, g).copy_(g)
            else:
                total[i].add_(g)

    # --- what the trainer calls (TrainHooks) ---

    provides_diagnostics = True  # Fig. 5a, `diagnostics`

    def on_batch(self, batch: Batch) -> None:
        """Name the next forward's rows by the batch's view ids (image index and flip) for `diagnostics`."""
        self.observe_sample_ids(batch.view_ids())

    def verification_threshold(self) -> float | None:
        """The wrapped head's learned threshold (SphereFace2's), if it has one."""
        return self.head.verification_threshold() if isinstance(self.head, TrainHooks) else None

    def after_optimizer_step(self, step: int) -> None:
        """Passed on to a wrapped head that keeps the step itself (ElasticFace's draw key), as the sharded form does."""
        if isinstance(self.head, TrainHooks):
            self.head.after_optimizer_step(step)

    # --- the queue ---

    def take_pending_ids(self) -> Tensor | None:
        """The sample ids named for this forward (``observe_sample_ids``), once; None if none were."""
        ids, self._pending_ids = self._pending_ids, None
        return ids

    def observe_sample_ids(self, sample_ids: Tensor) -> None:
        """Name the rows of the next forward: (B,) int64 ids >= 0 that the caller maps back to images (-1 = unknown)."""
        self._pending_ids = sample_ids.detach().long()

    @torch.no_grad()
    def enqueue(
        self, embeddings: Tensor, labels: Tensor, class_weights: Tensor, sample_ids: Tensor | None = None
    ) -> None:
        """Append rows to the FIFO, dropping the oldest when full: raw embeddings (n, D), labels (n,), W rows (n, D).

        With `gather` under torch.distributed every rank's rows are appended, in rank order.
        """
        n = embeddings.shape[0]
        if sample_ids is None:
            sample_ids = torch.full((n,), -1, dtype=torch.long, device=embeddings.device)
        check_sample_ids(sample_ids, n)
        dtype = self.queue_embeddings.dtype
        rows = torch.cat([embeddings.to(dtype), class_weights.to(dtype)], dim=1)
        ids = torch.stack([labels.long(), sample_ids.to(labels.device).long()], dim=1)
        if self.gather and dist.is_available() and dist.is_initialized():
            rows, ids = _all_gather_rows([rows, ids])
        positions = self.advance(rows.shape[0])
        rows, ids = rows[rows.shape[0] - positions.numel() :], ids[ids.shape[0] - positions.numel() :]
        self.queue_embeddings[positions] = rows[:, : self.embedding_size]
        self.queue_weights[positions] = rows[:, self.embedding_size :]
        self.queue_labels[positions] = ids[:, 0]
        self.queue_sample_ids[positions] = ids[:, 1]

    def advance(self, n: int) -> Tensor:
        """Make room for n new rows, oldest first: the buffer positions (keep,) of the last keep = min(n, Q) of them
        (the earlier ones would be overwritten at once); the pointer and count move on (not for keep = 0)."""
        keep = min(n, self.queue_size)
        pointer = int(self.queue_pointer)
        positions = (pointer + n - keep + torch.arange(keep, device=self.queue_labels.device)) % max(self.queue_size, 1)
        if keep:
            self.queue_pointer.fill_((pointer + n) % self.queue_size)
            self.queue_count.fill_(min(int(self.queue_count) + n, self.queue_size))
        return positions

    def fifo_order(self) -> Tensor:
        """Buffer positions of the valid rows, oldest first."""
        count = int(self.queue_count)
        start = int(self.queue_pointer) if count == self.queue_size else 0
        return (start + torch.arange(count, device=self.queue_labels.device)) % max(self.queue_size, 1)

    def queued(self) -> QueueEntries:
        """The valid queue rows, oldest first (copies)."""
        order = self.fifo_order()
        return QueueEntries(
            self.queue_embeddings[order], self.queue_labels[order], self.queue_weights[order],
            self.queue_sample_ids[order],
        )

    # --- Fig. 5a ---

    def diagnosable(self, positions: Tensor) -> Tensor:
        """(n,) bool: which queue positions the diagnostics may look at (a known sample id)."""
        return self.queue_sample_ids[positions] >= 0

    def past_and_current_rows(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(W-_y, W_y), each (n, D): the stored and the current class rows of the queue positions."""
        stored = self.queue_weights[positions]
        return stored, class_row_of(self.head.weight.detach()[self.queue_labels[positions]], stored)

    @torch.no_grad()
    def diagnostics(self, embed_fn: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """BroadFace Fig. 5a: how far the queued embeddings are from the same samples' current embeddings.

        embed_fn maps sample ids (K,) to current embeddings (K, D). Up to `diagnostic_samples` queue rows with
        known ids, evenly spaced from oldest to newest, give the mean cosine error 1 - cos of e- (`cos_error`)
        and of e* (Eq. 7 with the current W, `cos_error_compensated`), and `samples` = K. {} when no row has an id.
        """
        order = self.fifo_order()
        order = order[self.diagnosable(order)]
        if order.numel() == 0:
            return {}
        k = min(self.diagnostic_samples, order.numel())
        order = order[torch.arange(k, device=order.device) * (order.numel() - 1) // max(k - 1, 1)]
        past = self.queue_embeddings[order]
        past_weights, weights = self.past_and_current_rows(order)
        now = embed_fn(self.queue_sample_ids[order]).to(past)
        compensated = compensate(past, past_weights.to(past), weights.to(past))
        return {
            "cos_error": float(cosine_error(past, now)),
            "cos_error_compensated": float(cosine_error(compensated, now)),
            "samples": float(k),
        }


@HEADS.register("broadface")
def build_broadface(
    num_classes: int,
    embedding_size: int,
    *,
    queue_size: int,
    head: str = "arcface",
    head_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> BroadFace:
    """`heads.build("broadface", num_classes=C, embedding_size=D, queue_size=Q, head="arcface", head_kwargs={...},
    compensate=True, gather=False, row_chunk=1024)`: the inner head is built by name from the same registry."""
    check_kwarg_ranges(HEADS.get(head), head_kwargs or {}, prefix="head_kwargs.")
    inner = HEADS.build(head, num_classes=num_classes, embedding_size=embedding_size, **(head_kwargs or {}))
    return BroadFace(inner, queue_size, **kwargs)
