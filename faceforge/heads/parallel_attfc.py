"""AttFC's dynamic class container sharded over torch.distributed (``head.shard: true`` with ``head.name: attfc``).

The container of S generated centres (``heads/attfc.py``) is split by slot like a class-sharded W
(``heads/parallel.py``): rank r holds the entries [s0, s1) = ``shard_range(S, W, r)`` and their labels, S / W
each. Each step:

1. the batch's unit embeddings f (differentiable), labels and generated centres w+ (AttFC Eq. 9, no gradient)
   are all-gathered into the global batch, in the epoch sampler's order (sample b of rank r at b W + r,
   ``attfc.gather_global_batch``);
2. each rank runs the chunked negative pass (``attfc.container_lse``) over its own entries only, with the
   conflict mask of Alg. 1 (container label == sample label -> left out, exactly);
3. the ranks' log-sum-exps are combined by the distributed logsumexp (all-reduce MAX, then SUM), and
   ``loss_b = softplus(LSE(lse_0b, lse_1b, ...) - t_b)`` (AttFC Eq. 10, exact at tiny losses), the positive
   logit t_b = s psi(cos(f_b, w+_b)) computed on every rank and differentiated on rank 0 only, so its gradient
   is counted once;
4. the FIFO enqueue of the global batch's centres (every rank knows the global pointer) writes only the
   positions that fall in the rank's slots, so the union over ranks is the unsharded container exactly.

Communication per step: the (B_g, D) embeddings gathered (and their gradient all-reduced), the (B_g, D) centres
gathered, and (B_g,) vectors; nothing of size S. Memory per rank: S / W x D for the container (plus one
(B_g, chunk) block of the negative pass). Checkpoints hold the container and its labels as logical (S, D) and
(S,) tensors written by their ranks (``row_shards``), so a run resumes at any world size.

S is a multiple of the global batch, itself W x the per-rank batch, so the slots divide evenly; the layout is
``shard_range``'s all the same. Initial entries are a function of (seed, slot) only (``parallel.seeded_rows``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from faceforge.heads.attfc import DEFAULT_CHUNK_SIZE, AttFC, container_capacity, container_lse
from faceforge.heads.base import SHARDED_HEADS, RowShard, TrainHooks, softplus
from faceforge.heads.parallel import (
    _world,
    all_gather_rows,
    distributed_logsumexp,
    interleave,
    seeded_rows,
    shard_range,
)

__all__ = ["ShardedAttFC"]


def _unit_normal(rows: Tensor, generator: torch.Generator) -> None:
    rows.normal_(0.0, 1.0, generator=generator)
    rows.div_(torch.linalg.vector_norm(rows, dim=1, keepdim=True))


class ShardedAttFC(AttFC, TrainHooks):
    """AttFC with its container sharded by slot over the ranks of ``group`` (module docstring).

    Args:
        num_classes, embedding_size, ratio, batch_size (the GLOBAL batch), container_size, s, m1, m2, m3,
            margin_grad, weighting, chunk_size: as :class:`faceforge.heads.AttFC`.
        seed: the initial entries are a function of (seed, slot). Default 0.
        group: the process group (default: the world; none: one process holding every slot).
    Call: ``loss = head(embeddings (B_r, D), labels (B_r,), class_features (B_r, k, D))`` on every rank, equal B_r
    -> the mean over the global batch, the same scalar on every rank; the gradient handed back to this rank's
    embeddings is ``world_size x`` its share (the trainer averages the backbone's gradients over ranks).
    Buffers: ``container`` (s1 - s0, D) and ``container_labels`` (s1 - s0,), this rank's slots ``slots``;
    ``container_ptr``, the global FIFO pointer (the same on every rank). ``logits`` (for checks) gives the
    positive and this rank's entries only.
    """

    def __init__(
        self, num_classes: int, embedding_size: int, /, *, seed: int = 0, group: Any = None, ratio: float = 0.3,
        batch_size: int | None = None, container_size: int | None = None, s: float = 64.0, m1: float = 1.0,
        m2: float = 0.5, m3: float = 0.0, margin_grad: str = "exact", weighting: str = "attention",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if batch_size is None:
            raise ValueError("AttFC: batch_size is required: the global batch (per-rank data.batch_size x world size)")
        rank, world = _world(group)
        size = container_capacity(int(num_classes), ratio, int(batch_size), container_size)
        super().__init__(
            num_classes, embedding_size, ratio, batch_size, size, s=s, m1=m1, m2=m2, m3=m3, margin_grad=margin_grad,
            weighting=weighting, chunk_size=chunk_size, slots=shard_range(size, world, rank),
        )  # fmt: skip
        self.group, self.rank, self.world_size, self.seed = group, rank, world, int(seed)
        seeded_rows(self.container, self.slots, self.seed, _unit_normal)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, slots={self.slots}, rank={self.rank}, world_size={self.world_size}"

    def _global_batch(self, embeddings: Tensor, labels: Tensor, class_features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(unit f (B_g, D) differentiable, labels (B_g,), centres (B_g, D)) of the global batch, sampler order."""
        f, labels, centres = self._inputs(embeddings, labels, class_features)
        if self.world_size == 1:
            return f, labels, centres
        f = interleave(all_gather_rows(f, self.group), self.world_size)
        labels = interleave(all_gather_rows(labels, self.group), self.world_size)
        centres = interleave(all_gather_rows(centres, self.group), self.world_size)
        return f, labels, centres

    def _loss(self, f: Tensor, labels: Tensor, centres: Tensor) -> Tensor:
        """(B_g,) AttFC Eq. 10 over the whole container: this rank's entries + the others' (module docstring)."""
        t = self._positive(f, centres)
        if self.rank != 0:
            t = t.detach()  # the value on every rank, the gradient from rank 0 only
        lse = container_lse(f, self.container, self.container_labels, labels, self.s, self.chunk_size)
        return softplus(distributed_logsumexp(lse, self.group) - t)  # AttFC Eq. 10

    def per_sample_loss(self, embeddings: Tensor, labels: Tensor, class_features: Tensor) -> Tensor:
        """(B_g,) the loss of every sample of the GLOBAL batch (sampler order), the same on every rank; no enqueue."""
        return self._loss(*self._global_batch(embeddings, labels, class_features))

    def forward(self, embeddings: Tensor, labels: Tensor, class_features: Tensor) -> Tensor:
        f, labels, centres = self._global_batch(embeddings, labels, class_features)
        loss = self._loss(f, labels, centres).mean()
        if self.training:  # after the loss: this batch's centres are negatives from the next step on
            self._enqueue_global(centres, labels)
        return loss

    @torch.no_grad()
    def enqueue(self, centres: Tensor, labels: Tensor) -> None:
        """All-gather the ranks' centres (B_r, D) and labels (B_r,), then :meth:`_enqueue_global` them."""
        if self.world_size > 1:
            centres = interleave(all_gather_rows(centres.detach(), self.group), self.world_size)
            labels = interleave(all_gather_rows(labels.long(), self.group), self.world_size)
        self._enqueue_global(centres, labels)

    @torch.no_grad()
    def _enqueue_global(self, centres: Tensor, labels: Tensor) -> None:
        """FIFO: the global batch's centres (B_g, D) go to positions (ptr + i) mod S; this rank writes its slots."""
        if centres.shape[0] != self.batch_size:
            raise ValueError(
                f"AttFC: the global batch is {centres.shape[0]} but head batch_size is {self.batch_size}; expected "
                f"head.kwargs.batch_size = data.batch_size x world size (the container is a multiple of it)"
            )
        s0, s1 = self.slots
        pointer = int(self.container_ptr)
        positions = (pointer + torch.arange(centres.shape[0], device=centres.device)) % self.total_size
        mine = (positions >= s0) & (positions < s1)
        self.container[positions[mine] - s0] = centres[mine].to(self.container.dtype)
        self.container_labels[positions[mine] - s0] = labels[mine].long()
        self.container_ptr.fill_((pointer + centres.shape[0]) % self.total_size)

    # --- what the trainer asks (TrainHooks) ---

    def row_shards(self) -> dict[str, RowShard]:
        """The container and its labels: this rank's entries of logical (S, D) and (S,) tensors."""
        s0, s1 = self.slots
        return {name: RowShard(s0, s1, self.total_size) for name in ("container", "container_labels")}


@SHARDED_HEADS.register("attfc")
def build_sharded_attfc(num_classes: int, embedding_size: int, *, sample_rate: float = 1.0, **kwargs: Any) -> ShardedAttFC:
    """``build_sharded("attfc", C, D, seed=..., group=..., **AttFC kwargs)``; Partial FC (``sample_rate`` < 1) is
    refused: AttFC has no class rows to sample."""
    if sample_rate != 1.0:
        raise ValueError("sample_rate < 1 (Partial FC) samples class rows; AttFC has none; expected 1")
    return ShardedAttFC(num_classes, embedding_size, **kwargs)
