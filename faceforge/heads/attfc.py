"""AttFC (papers/attfc.md): a dynamic class container of generated class centres instead of the (C, D) FC.

Each sample's positive centre is generated on the fly from k other images of its identity, encoded by a
momentum class encoder (that encoder is the objective's, ``faceforge.train.objectives.AttFCObjective``: a
head knows no backbone). Here:

- the attention loader: alpha_bi = softmax_i cos(f_b, K_bi) (Eq. 8), w+_b = normalise(sum_i alpha_bi K_bi)
  with the raw K (Eq. 9) (:func:`attention_weights`, :func:`generated_centres`; ``weighting`` also gives
  Table 4's constant weights 1/k and DCQ's single image);
- the dynamic class container (DCC): a FIFO of S unit rows and their labels (:func:`enqueue`), S =
  floor(ratio C / global batch) x global batch (:func:`container_capacity`);
- the loss (Eq. 10): cross-entropy over ``[s psi(cos(f, w+)), s cos(f, DCC_j) for j]`` with the positive at
  column 0, psi any margin of ``heads/margin.py``; container entries of the sample's own label are left out of
  the softmax (Alg. 1, :func:`conflict_mask`), exactly (-inf), with no clamp anywhere on the negatives;
- the batch's centres and labels are enqueued after the loss (all-gathered over ranks first, so every rank
  holds the same container), overwriting the oldest.

Nothing on the class side takes a gradient: the head has no parameters, only buffers. The negative part
is one chunked pass over the container (:class:`_ContainerLSE`): per sample the log-sum-exp of the negatives
and their softmax-weighted mean row, accumulated online chunk by chunk (the flash-attention rescaling), so
backward is ``grad f_b = g_b s E_b`` and no (B, S) tensor is kept, whatever S is.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from faceforge.heads.base import (
    ANGULAR_MARGIN_RANGE,
    COSINE_MARGIN_RANGE,
    HEADS,
    MULTIPLICATIVE_MARGIN_RANGE,
    SCALE_RANGE,
    HeadKwargError,
    KwargRange,
    softplus,
)
from faceforge.heads.margin import check_margins, target_logit

__all__ = [
    "AttFC",
    "WEIGHTINGS",
    "attention_weights",
    "conflict_mask",
    "container_capacity",
    "container_lse",
    "enqueue",
    "gather_global_batch",
    "generated_centres",
]

DEFAULT_CHUNK_SIZE = 65536  # container rows per block: (B, 65536) float32 temporaries, 32 MiB at B = 128
WEIGHTINGS = ("attention", "constant", "single")  # AttFC Table 4: attention (Eq. 8), 1/k, one image (DCQ)


# ----------------------------------------------------------------------------------------------------------
# the attention loader (Eq. 8, 9)


def attention_weights(f: Tensor, K: Tensor) -> Tensor:
    """alpha (B, k) = softmax over i of cos(f_b, K_bi) (AttFC Eq. 8; no temperature, as in the official code).

    Args:
        f: (B, D) query features (any norm). K: (B, k, D) class features of the same identities (raw).
    """
    cos = torch.einsum("bd,bkd->bk", F.normalize(f, dim=1), F.normalize(K, dim=2))
    return torch.softmax(cos, dim=1)


def generated_centres(f: Tensor, K: Tensor, weighting: str = "attention") -> Tensor:
    """w+ (B, D) = normalise(sum_i alpha_bi K_bi), the raw (unnormalised) K summed (AttFC Eq. 9).

    weighting: "attention" (alpha of Eq. 8), "constant" (alpha = 1/k, Table 4) or "single" (K_b0 alone:
    DCQ's one image per centre).
    """
    if weighting == "attention":
        alpha = attention_weights(f, K)
    elif weighting == "constant":
        alpha = K.new_full(K.shape[:2], 1.0 / K.shape[1])
    elif weighting == "single":
        return F.normalize(K[:, 0], dim=1)
    else:
        raise ValueError(f"weighting={weighting!r}; expected one of {list(WEIGHTINGS)}")
    return F.normalize(torch.einsum("bk,bkd->bd", alpha.to(K.dtype), K), dim=1)  # AttFC Eq. 9


# ----------------------------------------------------------------------------------------------------------
# the dynamic class container (plain functions: a sharded container reuses them)


def container_capacity(num_classes: int, ratio: float, batch_size: int, container_size: int | None = None) -> int:
    """S: ``container_size`` when given (a multiple of ``batch_size``), else floor(ratio C / B) x B (official code).

    batch_size is the global batch (per-rank batch x world size) that one enqueue writes. Raises ValueError for
    an S that is not a positive multiple of it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected the global batch (per-rank batch x world size), >= 1")
    if container_size is None:
        if not ratio > 0:
            raise ValueError(f"ratio={ratio!r}: expected the container size as a fraction of the classes, > 0")
        size = int(ratio * num_classes / batch_size) * batch_size
        if size < batch_size:
            raise ValueError(
                f"ratio {ratio} x {num_classes} classes = {ratio * num_classes:g} holds no full global batch of "
                f"{batch_size}; expected a larger ratio or container_size"
            )
        return size
    if container_size < batch_size or container_size % batch_size:
        raise ValueError(
            f"container_size={container_size}: expected a positive multiple of the global batch {batch_size}"
        )
    return int(container_size)


def conflict_mask(labels: Tensor, container_labels: Tensor) -> Tensor:
    """(B, S) bool, True where container entry j has sample b's label (AttFC Alg. 1: w+_cft, masked out).

    Labels are int64 and compared exactly (the official code compares float32 labels, exact below 2^24 only).
    """
    return labels.long().unsqueeze(1) == container_labels.long().unsqueeze(0)


def enqueue(container: Tensor, container_labels: Tensor, pointer: int, centres: Tensor, labels: Tensor) -> int:
    """Write ``centres`` (n, D) and ``labels`` (n,) over the n oldest entries, from ``pointer`` on and wrapping
    around (FIFO); returns the next pointer. In place; n <= S."""
    size, n = container.shape[0], centres.shape[0]
    if n > size:
        raise ValueError(f"cannot enqueue {n} centres into a container of {size}")
    positions = (pointer + torch.arange(n, device=container.device)) % size
    container[positions] = centres.to(container.dtype)
    container_labels[positions] = labels.to(container_labels.dtype)
    return int((pointer + n) % size)


def gather_global_batch(centres: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The global batch's centres (W B, D) and labels (W B,) on every rank, interleaved by rank.

    Sample b of rank r lands at b W + r, which is where the epoch sampler took it from
    (``data.samplers.rank_positions``: rank r holds every W-th sample of the global batch), so W ranks fill
    the container exactly as one process with the whole batch. Ranks hold equal batches. One process: as given.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return centres, labels
    world = dist.get_world_size()
    parts_c = [torch.empty_like(centres) for _ in range(world)]
    parts_l = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(parts_c, centres.contiguous())
    dist.all_gather(parts_l, labels.contiguous())
    return torch.stack(parts_c, 1).flatten(0, 1), torch.stack(parts_l, 1).flatten(0, 1)


# ----------------------------------------------------------------------------------------------------------
# the chunked negative pass


def _negative_block(f: Tensor, rows: Tensor, row_labels: Tensor, labels: Tensor, scale: float) -> Tensor:
    """(B, n) s cos(f_b, DCC_j) for a block of container rows, -inf where the labels conflict (Alg. 1)."""
    z = torch.mm(f, rows.to(f.dtype).t()).mul_(scale)
    return z.masked_fill_(conflict_mask(labels, row_labels), float("-inf"))


class _ContainerLSE(torch.autograd.Function):
    """lse_b = log sum_{j not masked} exp(s f_b . DCC_j), chunked; gradient to f only (the container has none).

    Forward keeps, per sample, the running max m_b, the sum of exp(z - m_b) and the sum of exp(z - m_b) DCC_j
    (rescaled whenever m_b grows), so it also yields E_b = sum_j p_bj DCC_j, the softmax-weighted mean row;
    backward is then d lse_b / d f_b = s E_b. A row with every entry masked has lse -inf and E 0.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, f: Tensor, container: Tensor, container_labels: Tensor, labels: Tensor, scale: float, chunk: int
    ) -> Tensor:
        batch, size = f.shape[0], container.shape[0]
        dtype = f.dtype
        m = f.new_full((batch,), torch.finfo(dtype).min)  # finite start: exp(-inf - m) = 0, never NaN
        total = f.new_zeros(batch)
        weighted = f.new_zeros(f.shape)
        for c0 in range(0, size, chunk):
            c1 = min(c0 + chunk, size)
            rows = container[c0:c1].to(dtype)
            z = _negative_block(f, rows, container_labels[c0:c1], labels, scale)
            m_new = torch.maximum(m, z.max(1).values)
            rescale = torch.exp(m - m_new)
            p = z.sub_(m_new.unsqueeze(1)).exp_()  # in place: the block is not needed again
            total.mul_(rescale).add_(p.sum(1))
            weighted.mul_(rescale.unsqueeze(1)).addmm_(p, rows)
            m = m_new
        lse = m + torch.log(total)  # -inf where every entry is masked
        mean_row = weighted / total.clamp_min(torch.finfo(dtype).tiny).unsqueeze(1)
        ctx.save_for_backward(mean_row)
        ctx.scale = scale
        return lse

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        (mean_row,) = ctx.saved_tensors
        grad_f = (grad.to(mean_row.dtype) * ctx.scale).unsqueeze(1) * mean_row  # AttFC Eq. 11, negative part
        return grad_f, None, None, None, None, None


def container_lse(
    f: Tensor, container: Tensor, container_labels: Tensor, labels: Tensor, scale: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """(B,) log sum over the unmasked container entries of exp(s cos(f_b, DCC_j)), chunked over S.

    f: (B, D) unit rows (gradient flows to it); container (S, D) unit rows and container_labels (S,) int64
    (no gradient); labels (B,) int64. Memory: one (B, chunk) block and a few (B, D) tensors.
    """
    return _ContainerLSE.apply(f, container.detach(), container_labels, labels, float(scale), int(chunk_size))


# ----------------------------------------------------------------------------------------------------------
# the head


@HEADS.register("attfc")
class AttFC(nn.Module):
    """AttFC's head: a dynamic class container of generated centres as the FC (Eq. 8-11, Alg. 1).

    ``loss = head(embeddings (B, D), labels (B,) int64, class_features (B, k, D))``: class features from the
    momentum class encoder (no gradient is taken through them). In training mode the batch's generated centres
    and labels are then enqueued (all-gathered across ranks under torch.distributed); an eval-mode call leaves
    the container as it is.

    Args:
        num_classes: C, the training identities (sizes the container through ``ratio``).
        embedding_size: D.
        ratio: S / C (default 0.3, the paper's).
        batch_size: the GLOBAL batch one forward enqueues (per-rank batch x world size); S is a multiple of it.
        container_size: S directly (a multiple of batch_size); overrides ``ratio``.
        s, m1, m2, m3: scale and combined margin of the positive (ArcFace s 64, m 0.5 by default; CosFace
            m2 = 0, m3 = 0.35), ``heads/margin.py``.
        margin_grad: "exact" or "detached" (straight-through, the official code's).
        weighting: "attention" (Eq. 8), "constant" (1/k) or "single" (one image, DCQ): Table 4.
        chunk_size: container rows per block of the negative pass.
        slots: the entries [s0, s1) of the S this module holds (a container sharded over ranks,
            ``heads/parallel_attfc.py``); default all.

    Buffers (saved in ``state_dict``): ``container`` (S, D) unit rows, initialised from a normal distribution;
    ``container_labels`` (S,) int64, -1 (never a label) until written; ``container_ptr`` () int64, the next row.
    """

    RUN_FACTS = {"batch_size": "global_batch"}  # filled by the trainer when the config leaves it out
    KWARG_RANGES = {"ratio": KwargRange(0.0, 1.0, open_low=True), "s": SCALE_RANGE,
                    "m1": MULTIPLICATIVE_MARGIN_RANGE, "m2": ANGULAR_MARGIN_RANGE, "m3": COSINE_MARGIN_RANGE}
    batch_level_loss = False

    def __init__(
        self, num_classes: int, embedding_size: int, ratio: float = 0.3, batch_size: int | None = None,
        container_size: int | None = None, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
        margin_grad: str = "exact", weighting: str = "attention", chunk_size: int = DEFAULT_CHUNK_SIZE,
        slots: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if batch_size is None:
            raise ValueError("AttFC: batch_size is required: the global batch (per-rank data.batch_size x world size)")
        check_margins(m1, m2, m3, margin_grad)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r}; expected one of {list(WEIGHTINGS)}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r}; expected >= 1")
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.batch_size = int(batch_size)
        self.s, self.m1, self.m2, self.m3, self.margin_grad = float(s), m1, m2, m3, margin_grad
        self.weighting, self.chunk_size = weighting, int(chunk_size)
        size = container_capacity(self.num_classes, ratio, self.batch_size, container_size)
        self.slots = (0, size) if slots is None else (int(slots[0]), int(slots[1]))
        if not 0 <= self.slots[0] < self.slots[1] <= size:
            raise ValueError(f"slots={slots!r}: expected [s0, s1) within the container's {size} entries")
        self.total_size = size
        container = torch.randn(self.slots[1] - self.slots[0], self.embedding_size)
        container.div_(torch.linalg.vector_norm(container, dim=1, keepdim=True))  # in place: no second S x D copy
        self.register_buffer("container", container)
        self.register_buffer("container_labels", torch.full((container.shape[0],), -1, dtype=torch.long))
        self.register_buffer("container_ptr", torch.zeros((), dtype=torch.long))

    @property
    def container_size(self) -> int:
        """S, the whole container's entries (this module holds ``slots`` of them)."""
        return self.total_size

    @classmethod
    def check_training(cls, kwargs: dict[str, Any], *, num_classes: int, global_batch: int) -> None:
        """The trainer's preflight (``heads.base.TrainingCheck``): ``batch_size`` is the run's global batch and S
        a positive multiple of it, checked before any work (else the first enqueue would raise)."""
        batch = kwargs.get("batch_size", global_batch)  # left out: the trainer passes it in (RUN_FACTS)
        if batch != global_batch:
            raise HeadKwargError("batch_size", f"{batch!r}, but one forward of this run enqueues a global batch of "
                                               f"{global_batch} (data.batch_size x world size); expected {global_batch}")
        size = kwargs.get("container_size")
        ratio = kwargs.get("ratio", inspect.signature(cls).parameters["ratio"].default)
        try:
            container_capacity(num_classes, ratio, global_batch, size)
        except ValueError as e:
            raise HeadKwargError("container_size" if size is not None else "ratio", str(e)) from None

    def extra_repr(self) -> str:
        filled = int((self.container_labels >= 0).sum())  # entries holding a generated centre (the rest: random)
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, container_size="
                f"{self.container_size} ({self.container_size / self.num_classes:.3g} x the classes, "
                f"{self.container_size // self.batch_size} global batches), slots={self.slots} filled {filled}, "
                f"s={self.s}, m=({self.m1}, {self.m2}, {self.m3}), weighting={self.weighting}")

    def _positive(self, f: Tensor, centres: Tensor) -> Tensor:
        """(B,) s psi(cos(f_b, w+_b)), the margined positive logit (column 0)."""
        cos = (f * centres.to(f.dtype)).sum(1)
        return self.s * target_logit(cos, self.m1, self.m2, self.m3, self.margin_grad)

    def _inputs(self, embeddings: Tensor, labels: Tensor, class_features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(unit f (B, D), labels int64 (B,), generated centres (B, D), no grad); checks shapes."""
        b = embeddings.shape[0]
        if embeddings.dim() != 2 or labels.shape != (b,) or class_features.dim() != 3 or class_features.shape[0] != b \
                or class_features.shape[2] != embeddings.shape[1]:
            raise ValueError(
                f"AttFC: embeddings {tuple(embeddings.shape)}, labels {tuple(labels.shape)}, class features "
                f"{tuple(class_features.shape)}; expected (B, D), (B,), (B, k, D)"
            )
        f = F.normalize(embeddings, dim=1)
        with torch.no_grad():
            centres = generated_centres(f.detach(), class_features.detach().to(f.dtype), self.weighting)
        return f, labels.long(), centres

    def per_sample_loss(self, embeddings: Tensor, labels: Tensor, class_features: Tensor) -> Tensor:
        """(B,) log(exp(t_b) + sum_{j in M_S} exp(s cos(f_b, DCC_j))) - t_b (AttFC Eq. 10), no enqueue."""
        f, labels, centres = self._inputs(embeddings, labels, class_features)
        return self._loss(f, labels, centres)

    def _loss(self, f: Tensor, labels: Tensor, centres: Tensor) -> Tensor:
        t = self._positive(f, centres)
        lse = container_lse(f, self.container, self.container_labels, labels, self.s, self.chunk_size)
        return softplus(lse - t)  # AttFC Eq. 10, positive at column 0: log(exp(t) + sum exp) - t, exact when tiny

    def forward(self, embeddings: Tensor, labels: Tensor, class_features: Tensor) -> Tensor:
        f, labels, centres = self._inputs(embeddings, labels, class_features)
        loss = self._loss(f, labels, centres).mean()
        if self.training:  # after the loss: this batch's centres are negatives from the next step on
            self.enqueue(centres, labels)
        return loss

    @torch.no_grad()
    def enqueue(self, centres: Tensor, labels: Tensor) -> None:
        """All-gather the batch's centres (B, D) and labels (B,) over ranks, then :func:`enqueue` them (FIFO)."""
        centres, labels = gather_global_batch(centres.detach(), labels.long())
        if centres.shape[0] != self.batch_size:
            raise ValueError(
                f"AttFC: the global batch is {centres.shape[0]} but head batch_size is {self.batch_size}; expected "
                f"head.kwargs.batch_size = data.batch_size x world size (the container is a multiple of it)"
            )
        ptr = enqueue(self.container, self.container_labels, int(self.container_ptr), centres, labels)
        self.container_ptr.fill_(ptr)

    @torch.no_grad()
    def logits(self, embeddings: Tensor, labels: Tensor, class_features: Tensor) -> Tensor:
        """The plain (B, 1 + S) logits ``[s psi(cos(f, w+)), s cos(f, DCC_j)]``, -inf where masked (for checks)."""
        f, labels, centres = self._inputs(embeddings, labels, class_features)
        return self._plain_logits(f, labels, centres)

    def _plain_logits(self, f: Tensor, labels: Tensor, centres: Tensor) -> Tensor:
        negatives = self.s * (f @ self.container.to(f.dtype).t())
        negatives = negatives.masked_fill(conflict_mask(labels, self.container_labels), float("-inf"))  # Alg. 1
        return torch.cat([self._positive(f, centres).unsqueeze(1), negatives], 1)
