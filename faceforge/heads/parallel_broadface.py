"""BroadFace over a class-sharded head (``head.shard: true`` with ``head.name: broadface``).

:class:`ShardedBroadFace` wraps a :class:`faceforge.heads.parallel.ShardedHead` (rank r holds the class rows
[c0, c1)) with BroadFace's queue (``heads/broadface.py``, Eq. 7-9). Where each part of the queue lives:

- **the embeddings e-, labels and sample ids: on every rank, the whole queue**, each batch in the epoch
  sampler's order (rank r's row b at b W + r, ``parallel.interleave``) when the ranks hold equal batches, as the
  trainer's do, so the queue is row for row that of one process with the whole batch (rank order otherwise). The sharded head all-gathers each
  batch anyway (B_g x D per step), so enqueueing the global batch costs no communication, and every rank needs
  every queued embedding to compute its rows' logits of it. Splitting them over ranks would save Q x D (1 - 1/W)
  per rank but cost an all-gather of them each step (Q x D, the queue is many batches long).
- **the stored class rows W-_y: on the rank that owns class y only** (``queue_owned_slots`` and
  ``queue_owned_weights``, ~Q / W rows per rank; written at enqueue from the rank's own rows, no communication).
- **the logits of the queue: against each rank's own rows**, combined with the same distributed logsumexp as
  the batch (``ShardedHead.global_loss``: the queue is the same on every rank, so it is not gathered again).
- **compensation (Eq. 7): by the owner**, from its own W change: the shift (|e-| / |W-_y|)(W_y - W-_y) of each
  entry it owns. Every rank needs every e* (its rows' logits of it), so the owners' shifts are all-gathered,
  Q x D per step (with ``compensate=False``: nothing; the queue side then needs no communication at all).

The encoder loss (Eq. 8) and the batch's part of Eq. 9 are the sharded head's on the gathered batch; the
classifier's gradient is its own rows', block by block as in BroadFace. A checkpoint holds the queue's
embeddings and labels in the head's state (the same on every rank) and the W-_y rows as one logical (Q, D)
tensor in ``extra_state`` (gathered when a checkpoint is written; Q x D, as large as the queue itself), which a
run at another world size splits by its own class ranges.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor, nn

from faceforge.heads.base import HEADS, SHARDED_HEADS, RowShard, check_kwarg_ranges, chunks, class_row_of
from faceforge.heads.broadface import DEFAULT_ROW_CHUNK, BroadFace, QueueEntries, compensation
from faceforge.heads.parallel import ShardedHead, _row_counts, all_gather_rows, interleave

__all__ = ["ShardedBroadFace", "build_sharded_broadface"]


class ShardedBroadFace(BroadFace):
    """BroadFace (Eq. 7-9) around a class-sharded head: the queue's W rows with the shard that owns them.

    Args:
        head: a :class:`ShardedHead` (any of its heads; ``sample_rate`` 1).
        queue_size, compensate, row_chunk, diagnostic_samples, buffers: as :class:`BroadFace` (the queue is always
            the global one: every rank's batch is enqueued, in rank order).
    Call: ``loss = head(embeddings (B_r, D), labels (B_r,))`` on every rank -> Eq. 8 + Eq. 9 over the global batch
    and the queue, the same scalar on every rank.
    """

    stores_class_rows = False

    def __init__(
        self,
        head: nn.Module,
        queue_size: int,
        compensate: bool = True,
        row_chunk: int = DEFAULT_ROW_CHUNK,
        diagnostic_samples: int = 1024,
        buffers: str = "auto",
    ) -> None:
        if not isinstance(head, ShardedHead):
            raise TypeError(f"ShardedBroadFace wraps a ShardedHead; got {type(head).__name__}")
        if head.sample_rate < 1.0:
            raise ValueError(
                f"sample_rate={head.sample_rate} (Partial FC) with broadface: each block of the queue would sample "
                "other rows; expected 1"
            )
        super().__init__(head, queue_size, compensate, True, row_chunk, diagnostic_samples, buffers)
        self.num_classes = head.num_classes
        dtype = self.queue_embeddings.dtype
        # the W-_y rows live with their class's shard (stores_class_rows = False: no queue_weights buffer)
        self.register_buffer("queue_owned_slots", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("queue_owned_weights", torch.zeros(0, self.embedding_size, dtype=dtype), persistent=False)

    # --- the loss ---

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Scalar L_encoder (Eq. 8) + L_classifier (Eq. 9) over the global batch and the queue."""
        sample_ids = self.take_pending_ids()
        if sample_ids is None:
            sample_ids = torch.full((embeddings.shape[0],), -1, dtype=torch.long, device=embeddings.device)
        x, y = self.head.gather(embeddings, labels)  # the global batch (B_g, D), differentiable, rank order
        sample_ids = all_gather_rows(sample_ids.detach().long(), self.head.group)
        if self._equal_batches(embeddings.shape[0]):  # the sampler's order: one process's queue, row for row
            x, y, sample_ids = (interleave(t, self.head.world_size) for t in (x, y, sample_ids))
        self.head.observe_batch(x, y, sample_ids=sample_ids)  # the global batch, once, before any of its losses
        loss_encoder = self.head.global_loss(x, y, classifier_grad=False, sample_ids=sample_ids).mean()  # Eq. 8
        with torch.autocast(device_type=x.device.type, enabled=False):
            batch = x.detach().to(self.queue_embeddings.dtype)
            rows = batch.shape[0] + int(self.queue_count)
            blocks = itertools.chain([(batch, y, sample_ids)], self.queue_blocks())
            loss_classifier = self.classifier_loss(blocks, rows)  # Eq. 9
            if self.training:
                self._enqueue_global(batch, y, sample_ids)
        return loss_encoder + loss_classifier

    def _equal_batches(self, rows: int) -> bool:
        """Whether every rank holds ``rows`` embeddings (more than one rank); a collective of one integer."""
        sizes = _row_counts(rows, self.queue_labels.device, self.head.group)
        return len(sizes) > 1 and len(set(sizes)) == 1

    def block_loss(self, rows: Tensor, labels: Tensor, sample_ids: Tensor | None = None) -> Tensor:
        # the same rows (and ids) on every rank: no gather
        return self.head.global_loss(rows, labels, classifier_grad=True, sample_ids=sample_ids)

    def queue_blocks(self):
        """The valid queue rows, ``row_chunk`` at a time: (e* (Eq. 7) or e-, labels, sample ids (-1 unknown))."""
        count = int(self.queue_count)
        shift = self._compensations(count) if self.compensate and count else None
        for r0, r1 in chunks(count, self.row_chunk):
            past, labels = self.queue_embeddings[r0:r1], self.queue_labels[r0:r1]
            yield (past if shift is None else past + shift[r0:r1]), labels, self.queue_sample_ids[r0:r1]

    @torch.no_grad()
    def _compensations(self, count: int) -> Tensor:
        """(count, D): Eq. 7's shift of every valid entry, each computed by the rank that owns its class from its own
        rows, then all-gathered (rows in slot order)."""
        slots, past_weights = self.queue_owned_slots, self.queue_owned_weights
        rows = self.head.local_labels(self.queue_labels[slots])
        weights = class_row_of(self.head.weight.detach()[rows], past_weights).to(past_weights.dtype)
        shift = compensation(self.queue_embeddings[slots], past_weights, weights)
        group = self.head.group
        out = shift.new_zeros((count, self.embedding_size))
        out[all_gather_rows(slots, group)] = all_gather_rows(shift, group)
        return out

    # --- the queue ---

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor, class_weights: Tensor, sample_ids: Tensor | None = None):
        raise NotImplementedError("ShardedBroadFace enqueues the global batch in forward; its W rows stay on their shard")

    @torch.no_grad()
    def _enqueue_global(self, batch: Tensor, labels: Tensor, sample_ids: Tensor) -> None:
        """FIFO append of the global batch (B_g, D), labels and ids on every rank; this rank keeps W-_y of its classes."""
        positions = self.advance(batch.shape[0])
        keep = positions.numel()
        if keep == 0:
            return
        batch, labels, sample_ids = batch[-keep:], labels[-keep:].long(), sample_ids[-keep:]
        self.queue_embeddings[positions] = batch
        self.queue_labels[positions] = labels
        self.queue_sample_ids[positions] = sample_ids
        rows = self.head.local_labels(labels)
        mine = rows >= 0
        kept = ~torch.isin(self.queue_owned_slots, positions)  # the overwritten entries go
        dtype = self.queue_owned_weights.dtype
        self.queue_owned_slots = torch.cat([self.queue_owned_slots[kept], positions[mine]])
        self.queue_owned_weights = torch.cat(
            [self.queue_owned_weights[kept], class_row_of(self.head.weight.detach()[rows[mine]], batch[mine]).to(dtype)]
        )

    def queued(self) -> QueueEntries:
        """The valid queue rows, oldest first (copies); class_weights NaN for the classes of other ranks."""
        order = self.fifo_order()
        stored = self._stored_weights()
        return QueueEntries(
            self.queue_embeddings[order], self.queue_labels[order], stored[order], self.queue_sample_ids[order]
        )

    def _stored_weights(self) -> Tensor:
        """(Q, D) W-_y of this rank's entries in slot order, NaN elsewhere."""
        full = self.queue_owned_weights.new_full((self.queue_size, self.embedding_size), float("nan"))
        full[self.queue_owned_slots] = self.queue_owned_weights
        return full

    # --- Fig. 5a: rank 0 alone (no communication), on the entries of the classes it holds ---

    def diagnosable(self, positions: Tensor) -> Tensor:
        return super().diagnosable(positions) & (self.head.local_labels(self.queue_labels[positions]) >= 0)

    def past_and_current_rows(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        stored = self._stored_weights()[positions]
        rows = self.head.local_labels(self.queue_labels[positions])
        return stored, class_row_of(self.head.weight.detach()[rows], stored)

    # --- what the trainer asks (TrainHooks) ---

    def row_shards(self) -> dict[str, RowShard]:
        return {f"head.{name}": shard for name, shard in self.head.row_shards().items()}

    def use_optimizer(self, optimizer: Any) -> None:
        self.head.use_optimizer(optimizer)

    def after_optimizer_step(self, step: int) -> None:
        self.head.after_optimizer_step(step)

    @torch.no_grad()
    def extra_state(self) -> dict[str, Any]:
        """{"queue_weights": (Q, D)}: the W-_y rows of every entry in slot order, gathered from their owners (every
        rank calls this; zeros past the valid entries)."""
        full = self.queue_owned_weights.new_zeros((self.queue_size, self.embedding_size))
        if int(self.queue_count):
            group = self.head.group
            full[all_gather_rows(self.queue_owned_slots, group)] = all_gather_rows(self.queue_owned_weights, group)
        return {"queue_weights": full}

    @torch.no_grad()
    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Keep the W-_y rows of this rank's classes (after the queue's labels were loaded with the state dict)."""
        full = state["queue_weights"]
        if tuple(full.shape) != (self.queue_size, self.embedding_size):
            raise ValueError(f"queue_weights of shape {tuple(full.shape)}; expected ({self.queue_size}, "
                             f"{self.embedding_size}), this queue's")
        slots = torch.arange(int(self.queue_count), device=self.queue_labels.device)
        slots = slots[self.head.local_labels(self.queue_labels[slots]) >= 0]
        self.queue_owned_slots = slots
        self.queue_owned_weights = full.to(self.queue_owned_weights)[slots]


@SHARDED_HEADS.register("broadface")
def build_sharded_broadface(
    num_classes: int,
    embedding_size: int,
    *,
    queue_size: int,
    head: str = "arcface",
    head_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    group: Any = None,
    sample_rate: float = 1.0,
    **kwargs: Any,
) -> ShardedBroadFace:
    """``build_sharded("broadface", C, D, queue_size=Q, head="arcface", head_kwargs={...}, seed=..., group=...,
    compensate=True, row_chunk=1024)``: the inner head is ``ShardedHead(head, C, D, **head_kwargs)``."""
    if "gather" in kwargs:
        raise ValueError("gather: a sharded BroadFace always keeps the global queue; expected no gather")
    check_kwarg_ranges(HEADS.get(head), head_kwargs or {}, prefix="head_kwargs.")
    inner = ShardedHead(head, num_classes, embedding_size, seed=seed, group=group, sample_rate=sample_rate,
                        **(head_kwargs or {}))
    return ShardedBroadFace(inner, queue_size, **kwargs)
