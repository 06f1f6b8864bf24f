"""Class-sharded heads over torch.distributed: ArcFace's centre-parallel FC (ArcFace appendix 5.1, Fig. 11).

Rank r of W holds the rows [c0, c1) of the class weights (``shard_range``: C // W rows, one more on the first
C % W ranks). Each step:

1. the embeddings (and labels) of every rank are all-gathered into the global batch (B_g, D) ("Get feature x");
   the gather is differentiable: its backward sums the ranks' gradients of the global batch (an all-reduce of
   (B_g, D)) and hands each rank its own rows;
2. each rank calls the head's public ``class_loss`` (``heads.base.ClassRows``: the margin hook of
   ``heads.softmax.MarginHead``, or SphereFace2's binary family) on its rows only ("score = xW" on the centre
   sub-matrix), with label -1 for the samples whose class lives on another rank, and a :class:`RankReduction`;
   no head type is named here: any head with that interface shards, its own margin included;
3. the head's per-sample terms are combined across ranks by that reduction, on (B_g,) vectors only:

   - margin softmax (ArcFace Eq. 4, every preset, and plain softmax): the distributed logsumexp
     ``LSE_b = M_b + log sum_r exp(lse_rb - M_b)`` with ``M_b = max_r lse_rb`` (all-reduce MAX, then SUM);
     each rank's lse_rb runs over its NON-target logits, the target logit t_b and the Eq. 5 term come from the
     rank that owns y_b (all-reduce SUM), and ``loss_b = softplus(LSE_b - t_b) + penalty_b``
     (= log1p(sum_{j != y} exp(z_j - t)), exact at tiny losses, where LSE - t would cancel two numbers near s);
   - SphereFace2 (Eq. 6) is a sum of per-class terms: ``loss_b = sum_r loss_rb`` (all-reduce SUM). No
     communication for W at all (SphereFace2 Sec. 3.4); only the embeddings are gathered.

The loss every rank returns is the mean over the GLOBAL batch, the same number on every rank, and every rank
calls backward on it. So the backward of each collective above is local: d LSE_b / d lse_rb =
exp(lse_rb - LSE_b) (the share of the softmax mass on rank r) and the sums pass their gradient through.
Gradients:

- the class rows: each rank's own, complete (no all-reduce; the trainer leaves them alone, ``row_shards``);
- the embeddings: ``world_size x`` d loss / d (this rank's rows), because the trainer (DDP) AVERAGES the
  backbone's gradients over ranks (insightface's AllGatherFunc does the same);
- a replicated parameter (SphereFace2's bias b): its gradient is summed over ranks in the backward, so every
  rank holds the true gradient (the trainer's average over ranks leaves it unchanged).

Ranks may hold different numbers of embeddings (the gather pads) and of classes (C % W != 0).
Nothing assumes CUDA: the collectives are torch.distributed's, on gloo (CPU) or NCCL (GPU).
Without a process group (one process) the head is the plain head on all C classes.

Initial rows are a function of (seed, row) only (blocks of ``INIT_BLOCK`` rows, each from its own generator),
so a run starts from the same W at any world size.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from faceforge.heads.base import (
    HEADS,
    SHARDED_HEADS,
    ClassifierHead,
    ClassRows,
    LazyRows,
    RowShard,
    TrainHooks,
    check_inputs,
    check_size,
)

__all__ = [
    "INIT_BLOCK",
    "RankReduction",
    "ShardedHead",
    "all_gather_rows",
    "build_sharded",
    "distributed_logsumexp",
    "interleave",
    "sample_rows",
    "seed_class_rows",
    "seeded_rows",
    "shard_range",
    "sum_over_ranks",
]

INIT_BLOCK = 4096  # rows per initialisation block: row j's initial value depends on (seed, j // INIT_BLOCK) only


# ----------------------------------------------------------------------------------------------------------
# the layout


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows [c0, c1) of rank ``rank``: C // W each, one more on the first C % W ranks (insightface's layout)."""
    base, extra = divmod(num_classes, world_size)
    c0 = rank * base + min(rank, extra)
    return c0, c0 + base + (1 if rank < extra else 0)


def interleave(rows: Tensor, world: int) -> Tensor:
    """(W B, ...) in rank order (rank r's B rows together) -> the epoch sampler's order: row b W + r is rank r's
    row b (``data.samplers.rank_positions``), the order of one process with the whole batch."""
    return rows.unflatten(0, (world, -1)).transpose(0, 1).flatten(0, 1)


def _world(group: Any) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


# ----------------------------------------------------------------------------------------------------------
# the collectives, with their gradients


class _GatherRows(torch.autograd.Function):
    """(n_r, ...) on each rank -> (sum_r n_r, ...) in rank order; backward: sum over ranks, own rows, x grad_scale."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor, group: Any, sizes: list[int], grad_scale: float) -> Tensor:  # type: ignore[override]
        rank, world = _world(group)
        ctx.group, ctx.sizes, ctx.rank, ctx.grad_scale = group, sizes, rank, grad_scale
        if world == 1:
            return rows.clone()
        padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        if len(ctx.sizes) > 1:
            dist.all_reduce(grad, group=ctx.group)  # every rank's d loss / d (global batch), summed
        start = sum(ctx.sizes[: ctx.rank])
        own = grad[start : start + ctx.sizes[ctx.rank]]
        return (own * ctx.grad_scale if ctx.grad_scale != 1.0 else own.clone()), None, None, None


def _row_counts(n: int, device: torch.device, group: Any) -> list[int]:
    rank, world = _world(group)
    if world == 1:
        return [n]
    count = torch.tensor([n], device=device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    return [int(c) for c in counts]


def all_gather_rows(rows: Tensor, group: Any = None, grad_scale: float | None = None) -> Tensor:
    """Every rank's rows (n_r, ...) concatenated in rank order (ranks may hold different n_r), differentiable.

    grad_scale: multiplies the gradient handed back to this rank's rows; default the world size, because the
    trainer (DDP) averages the backbone's gradients over ranks. Without a process group: ``rows``.
    """
    sizes = _row_counts(rows.shape[0], rows.device, group)
    scale = float(len(sizes)) if grad_scale is None else float(grad_scale)
    if not rows.requires_grad:
        with torch.no_grad():
            return _GatherRows.apply(rows, group, sizes, scale)
    return _GatherRows.apply(rows, group, sizes, scale)


class _DistLogSumExp(torch.autograd.Function):
    """lse_r (B,) on each rank -> LSE (B,) = log sum_r exp(lse_r): all-reduce MAX, then SUM of exp(lse_r - max)."""

    @staticmethod
    def forward(ctx: Any, lse: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        top = lse.detach().clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        total = torch.exp(lse.detach() - top)
        dist.all_reduce(total, group=group)
        result = total.log_().add_(top)
        ctx.save_for_backward(lse, result)
        return result

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        lse, result = ctx.saved_tensors
        share = torch.exp(lse - result)  # the share of the softmax mass on this rank
        return grad * torch.where(torch.isfinite(result), share, torch.zeros_like(share)), None  # 0 if all -inf


def distributed_logsumexp(lse: Tensor, group: Any = None) -> Tensor:
    """log sum_r exp(lse_r) over the ranks, elementwise (B,); every rank must backpropagate the same gradient."""
    return lse if _world(group)[1] == 1 else _DistLogSumExp.apply(lse, group)


class _SumOverRanks(torch.autograd.Function):
    """sum_r v_r (all-reduce SUM); backward: the gradient as it is (every rank backpropagates the same loss)."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        total = values.detach().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        return grad, None


def sum_over_ranks(values: Tensor, group: Any = None) -> Tensor:
    """The elementwise sum over the ranks of ``values``, differentiable (each rank gets d loss / d total)."""
    return values if _world(group)[1] == 1 else _SumOverRanks.apply(values, group)


class _SumGradOverRanks(torch.autograd.Function):
    """Identity; backward sums the gradient over the ranks: a replicated parameter's true gradient on every rank."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class RankReduction:
    """The class-sharded :class:`faceforge.heads.base.Reduction`: each rank's per-sample terms combined over the
    ranks of ``group`` (the distributed logsumexp, all-reduce sums, a replicated parameter's summed gradient)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group

    def logsumexp(self, lse: Tensor) -> Tensor:
        return distributed_logsumexp(lse, self.group)

    def sum(self, values: Tensor) -> Tensor:
        return sum_over_ranks(values, self.group)

    def replicated(self, param: Tensor) -> Tensor:
        if _world(self.group)[1] == 1 or not param.requires_grad:
            return param
        return _SumGradOverRanks.apply(param, self.group)


@torch.no_grad()
def seeded_rows(
    tensor: Tensor, rows: tuple[int, int], seed: int, fill: Callable[[Tensor, torch.Generator], None]
) -> None:
    """Fill ``tensor`` (c1 - c0, ...), the rows [c0, c1) of a logical tensor, in place: row j from the generator of
    (seed, j // INIT_BLOCK), so the logical tensor is the same at any world size. ``fill(block, generator)``
    fills one (INIT_BLOCK, ...) block in place."""
    c0, c1 = rows
    for block in range(c0 // INIT_BLOCK, (c1 - 1) // INIT_BLOCK + 1):
        b0, b1 = block * INIT_BLOCK, (block + 1) * INIT_BLOCK
        values = tensor.new_empty((b1 - b0, *tensor.shape[1:]))
        fill(values, torch.Generator(device=tensor.device).manual_seed(seed * 1_000_003 + block))
        lo, hi = max(b0, c0), min(b1, c1)
        tensor[lo - c0 : hi - c0] = values[lo - b0 : hi - b0]


def seed_class_rows(head: ClassRows, rows: tuple[int, int], seed: int) -> None:
    """Every class-row tensor of ``head`` (``class_rows``), holding the rows [c0, c1) of the logical tensor, from
    (seed, row) (:func:`seeded_rows`): the same W whether a head holds every row (one process, ``head.shard``
    false: ``faceforge.build.build_head``) or a shard of them."""
    for name, fill in head.class_rows().items():
        seeded_rows(getattr(head, name), rows, seed, fill)


def _unwrap_keys(module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    """State-dict hook: the inner head's entries under their own names (``weight``, not ``head.weight``), the keys
    of the unsharded head."""
    inner = f"{prefix}head."
    for key in [k for k in state if k.startswith(inner)]:
        state[prefix + key[len(inner):]] = state.pop(key)


def _wrap_keys(state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook: the unsharded head's keys back under ``head.`` (the inner module holds them)."""
    for key in [k for k in state if k.startswith(prefix)]:
        state[f"{prefix}head.{key[len(prefix):]}"] = state.pop(key)


# ----------------------------------------------------------------------------------------------------------
# Partial FC: the rows of one step

def sample_rows(local_labels: Tensor, rows: int, sample_rate: float, generator: torch.Generator) -> Tensor:
    """Partial FC's rows of one step (K,), sorted: every positive (a class of the global batch on this shard) plus
    uniformly drawn negatives, ceil(sample_rate x rows) in all (only the positives when they are more).

    local_labels: (B_g,) rows in this shard, -1 for classes elsewhere. generator: a CPU generator.
    """
    positives = torch.unique(local_labels[local_labels >= 0]).cpu()
    count = min(rows, max(1, math.ceil(sample_rate * rows)))
    if positives.numel() >= count:
        return positives.to(local_labels.device)
    scores = torch.rand(rows, generator=generator)
    scores[positives] = 2.0  # above every uniform draw: the positives are always kept
    return scores.topk(count).indices.sort().values.to(local_labels.device)


class _SelectRows(torch.autograd.Function):
    """weight[index] (K, ...); backward: the gradient as a sparse COO tensor of those rows (``sparse``) or dense."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, index: Tensor, sparse: bool) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.shape, ctx.sparse = weight.shape, sparse
        return weight.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        (index,) = ctx.saved_tensors
        if ctx.sparse:
            full = torch.sparse_coo_tensor(index.unsqueeze(0), grad, ctx.shape, is_coalesced=True, check_invariants=False)
        else:
            full = grad.new_zeros(ctx.shape).index_add_(0, index, grad)
        return full, None, None


# ----------------------------------------------------------------------------------------------------------
# the head


class ShardedHead(nn.Module, ClassifierHead, TrainHooks):
    """A head whose class rows are sharded over the ranks of ``group`` (module docstring).

    Args:
        head: the name of a head in ``HEADS``, or ``"package.module:Class"``, with class rows
            (``heads.base.ClassRows``: every margin head, ``MarginHead`` subclasses written anywhere, sphereface2).
        num_classes: C, over all ranks (>= the world size). embedding_size: D.
        seed: the initial rows are a function of (seed, row) (module docstring). Default 0.
        group: the process group (default: the world). Built after ``torch.distributed.init_process_group``.
        **kwargs: the head's own arguments (``s``, ``m``, ``lamb`` ...).
    Call: ``loss = head(embeddings (B_r, D), labels (B_r,))`` on every rank -> the mean over the global batch,
    the same scalar on every rank. Attributes: ``head`` (the head on this rank's rows), ``weight`` (its rows,
    (c1 - c0, D), or (c1 - c0, K, D) for K sub-centres a class), ``rows`` = (c0, c1), ``num_classes`` = C.
    """

    def __init__(
        self,
        head: str,
        num_classes: int,
        embedding_size: int,
        /,
        *,
        seed: int = 0,
        group: Any = None,
        sample_rate: float = 1.0,
        sparse_grad: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.num_classes = check_size("num_classes", num_classes)
        self.embedding_size = check_size("embedding_size", embedding_size)
        self.group = group
        self.rank, self.world_size = _world(group)
        if self.num_classes < self.world_size:
            raise ValueError(
                f"num_classes={num_classes} < world size {self.world_size}: every rank needs at least one class"
            )
        self.rows = shard_range(self.num_classes, self.world_size, self.rank)
        local = self.rows[1] - self.rows[0]
        self.head = HEADS.build(head, num_classes=local, embedding_size=self.embedding_size, **kwargs)
        if not isinstance(self.head, ClassRows):
            raise ValueError(
                f"head {head!r} ({type(self.head).__name__}) cannot be sharded by class: it has no class_rows / "
                f"class_loss (heads.base.ClassRows); expected a margin head (heads.softmax.MarginHead) or "
                f"sphereface2 (broadface and attfc have their own sharded forms, build_sharded)"
            )
        refusal = self.head.sharded_refusal()
        if refusal is not None:
            raise ValueError(f"head {head!r} cannot be sharded by class: {refusal}")
        self.reduce = RankReduction(group)
        if not (isinstance(sample_rate, (int, float)) and 0.0 < float(sample_rate) <= 1.0):
            raise ValueError(f"sample_rate={sample_rate!r}; expected a number in (0, 1]")
        self.sample_rate, self.sparse_grad = float(sample_rate), bool(sparse_grad)
        # optimiser steps done (Partial FC's sampling key): kept in extra_state, not in the state dict, whose keys
        # are the unsharded head's (a checkpoint moves between shard=true/false and any world size)
        self.register_buffer("sample_step", torch.zeros((), dtype=torch.long), persistent=False)
        self._micro = 0  # forwards since the last optimiser step (gradient accumulation)
        self._pending_ids: Tensor | None = None  # observe_sample_ids, gathered by the next forward
        self._lazy: LazyRows | None = None
        self.seed = int(seed)
        self.name = head
        self.reset_parameters()
        self._register_state_dict_hook(_unwrap_keys)
        self._register_load_state_dict_pre_hook(_wrap_keys)

    def reset_parameters(self) -> None:
        """Row j of every class-row tensor from the generator of (seed, j // INIT_BLOCK); the head's other
        tensors as for the whole run's C (``reset_shared``: SphereFace2's balanced bias)."""
        seed_class_rows(self.head, self.rows, self.seed)
        self.head.reset_shared(self.num_classes)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, rows={self.rows}, rank={self.rank}, world_size={self.world_size}"

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        """This rank's class rows W[c0:c1] (c1 - c0, D) ((c1 - c0, K, D) with sub-centres: whole classes)."""
        return self.head.weight

    # --- the loss ---

    def gather(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The global batch: (B_g, D) embeddings (differentiable) and (B_g,) labels, in rank order."""
        labels = check_inputs(embeddings, labels, self.num_classes, self.embedding_size)
        return all_gather_rows(embeddings, self.group), all_gather_rows(labels, self.group)

    def local_labels(self, labels: Tensor) -> Tensor:
        """Global labels (B,) -> row indices in this rank's shard, -1 where the class lives on another rank."""
        c0, c1 = self.rows
        return torch.where((labels >= c0) & (labels < c1), labels - c0, torch.full_like(labels, -1))

    def per_sample_loss(self, embeddings: Tensor, labels: Tensor, *, classifier_grad: bool = True) -> Tensor:
        """(B_g,) the loss of every sample of the GLOBAL batch (rank order), the same on every rank.

        classifier_grad=False holds the class side fixed (no gradient reaches it)."""
        x, y = self.gather(embeddings, labels)
        return self.global_loss(x, y, classifier_grad=classifier_grad)

    def global_loss(self, embeddings: Tensor, labels: Tensor, *, classifier_grad: bool = True,
                    sample_ids: Tensor | None = None) -> Tensor:
        """(N,) the loss of rows that every rank already holds, the same (N, D) embeddings, (N,) global labels and
        (N,) sample ids (None: unknown) on every rank (a gathered batch, BroadFace's queue): no gather; the gradient
        to ``embeddings`` is this rank's share (sum it over the ranks)."""
        labels = labels.long()
        local = self.local_labels(labels)
        if self.sample_rate < 1.0:
            return self._sampled_loss(embeddings, labels, local, classifier_grad, sample_ids)
        return self.head.class_loss(embeddings, labels, local_labels=local, reduce=self.reduce,
                                    classifier_grad=classifier_grad, sample_ids=sample_ids)

    def sampled_rows(self, local_labels: Tensor) -> Tensor:
        """This forward's Partial FC rows (K,) (``sample_rows``), drawn from the generator of
        (seed, optimiser step, micro-batch, rank): a resumed run draws what the uninterrupted one did."""
        key = f"{self.seed},{int(self.sample_step)},{self._micro},{self.rank}".encode()
        generator = torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=7).digest(), "little"))
        rows = self.rows[1] - self.rows[0]
        return sample_rows(local_labels, rows, self.sample_rate, generator)

    def _sampled_loss(self, x: Tensor, labels: Tensor, local_labels: Tensor, classifier_grad: bool,
                      sample_ids: Tensor | None) -> Tensor:
        """Partial FC: the head's loss on the sampled rows only (positives + negatives), their gradient sparse."""
        index = self.sampled_rows(local_labels)
        self._micro += 1
        sharded = {name: getattr(self.head, name) for name in self.head.class_rows()}
        if classifier_grad:
            self.catch_up(index)
        rows = {
            name: _SelectRows.apply(t if classifier_grad else t.detach(), index, self.sparse_grad)
            for name, t in sharded.items()
        }
        position = torch.searchsorted(index, local_labels.clamp_min(0))
        found = (local_labels >= 0) & (index[position.clamp_max(index.numel() - 1)] == local_labels)
        sampled = torch.where(found, position, torch.full_like(local_labels, -1))
        return self.head.class_loss(x, labels, local_labels=sampled, reduce=self.reduce,
                                    classifier_grad=classifier_grad, rows=rows, sample_ids=sample_ids)

    def catch_up(self, index: Tensor) -> None:
        """Bring this shard's class rows ``index`` (K,) to what dense SGD would have left in them, when a lazy
        optimiser updates them (``LazyRows``, Partial FC); nothing otherwise."""
        if self._lazy is not None:
            for name in self.head.class_rows():
                self._lazy.catch_up(getattr(self.head, name), index)

    def observe_batch(self, embeddings: Tensor, labels: Tensor, *, sample_ids: Tensor | None = None) -> None:
        """The head's ``observe_batch`` of the GLOBAL batch (embeddings (N, D), labels (N,), sample ids (N,) or None,
        the same on every rank), with this rank's local labels and the ranks' reduction. The positives' rows are
        caught up first: a statistic of the target cosines (CurricularFace's t) reads them."""
        labels = labels.long()
        local = self.local_labels(labels)
        if self._lazy is not None:
            self.catch_up(torch.unique(local[local >= 0]))
        self.head.observe_batch(embeddings, labels, local_labels=local, reduce=self.reduce, sample_ids=sample_ids)

    def observe_sample_ids(self, sample_ids: Tensor) -> None:
        """Name this rank's rows of the next forward: (B,) int64 view ids; the forward gathers them with the batch."""
        self._pending_ids = sample_ids

    def gather_sample_ids(self, rows: int, device: torch.device) -> Tensor | None:
        """The global batch's (B_g,) sample ids in rank order, from each rank's ``observe_sample_ids`` (taken once);
        None when this rank named none. Every rank must call it (a collective when some were named)."""
        ids, self._pending_ids = self._pending_ids, None
        if ids is None:
            return None
        if ids.shape != (rows,):
            raise ValueError(f"sample ids of shape {tuple(ids.shape)} for a batch of {rows}; expected ({rows},)")
        return all_gather_rows(ids.to(device=device, dtype=torch.long), self.group)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Scalar: the mean over the global batch of the head's per-sample loss (the same on every rank)."""
        x, y = self.gather(embeddings, labels)
        ids = self.gather_sample_ids(embeddings.shape[0], embeddings.device)
        self.observe_batch(x, y, sample_ids=ids)
        return self.global_loss(x, y, sample_ids=ids).mean()

    # --- what the trainer asks (TrainHooks) ---

    def row_shards(self) -> dict[str, RowShard]:
        """The state_dict entries that are this rank's rows of a logical (C, ...) tensor."""
        c0, c1 = self.rows
        return {name: RowShard(c0, c1, self.num_classes) for name in self.head.class_rows()}

    def verification_threshold(self) -> float | None:
        return self.head.verification_threshold() if isinstance(self.head, TrainHooks) else None

    def use_optimizer(self, optimizer: Any) -> None:
        """Partial FC reads its sampled rows through the optimiser's ``catch_up`` when it updates lazily."""
        self._lazy = optimizer if isinstance(optimizer, LazyRows) else None

    def extra_state(self) -> dict[str, Any]:
        """{"sample_step": optimiser steps done}: Partial FC's sampling key, so a resumed run draws the same rows."""
        return {"sample_step": int(self.sample_step)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.sample_step.fill_(int(state.get("sample_step", 0)))

    def on_batch(self, batch: Any) -> None:
        """Name the next forward's rows by the batch's view ids, gathered with the batch for the head's context
        (the inner head sees the global batch only: it is not handed this rank's part)."""
        self.observe_sample_ids(batch.view_ids())

    def after_optimizer_step(self, step: int) -> None:
        self.sample_step.fill_(step)
        self._micro = 0
        if isinstance(self.head, TrainHooks):  # a head that keeps the step itself (a step-dependent margin)
            self.head.after_optimizer_step(step)


# ----------------------------------------------------------------------------------------------------------
# head.shard: true


def build_sharded(name: str, num_classes: int, embedding_size: int, /, **kwargs: Any) -> nn.Module:
    """The class-sharded form of head ``name`` (``head.shard: true``): the form registered for it in
    :data:`faceforge.heads.base.SHARDED_HEADS` (``broadface``: its queue's W rows sharded with W; ``attfc``: its
    container sharded by slot), else :class:`ShardedHead` around it. kwargs: ``seed``, ``group``, ``sample_rate``
    and the head's own."""
    if name in SHARDED_HEADS:
        return SHARDED_HEADS.build(name, num_classes=num_classes, embedding_size=embedding_size, **kwargs)
    return ShardedHead(name, num_classes, embedding_size, **kwargs)
