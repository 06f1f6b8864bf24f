"""ElasticFace: a per-sample margin drawn from a normal distribution (Boutros et al., CVPRW 2022).

    m_b ~ N(m, sigma^2)                                                            Eq. 5 (E(m, sigma))
    ElasticFace-Arc:  t_b = s cos(theta_{b y_b} + m_b),  the others s cos(theta_bj)   Eq. 6
    ElasticFace-Cos:  t_b = s (cos(theta_{b y_b}) - m_b), the others s cos(theta_bj)  Eq. 7

A new margin for every sample at every training step. ElasticFace+ (Sec. 3, "ElasticFace+") draws the batch's
margins the same way, then hands them out by the samples' target cosines: the largest margin to the sample with the
smallest cos(theta_y) (the farthest from its class centre), the smallest to the closest. That is the direction the
paper states and the sort directions of the official code (``fdbtrs/ElasticFace``, ``utils/losses.py``: target
cosines sorted descending, margins ascending); its last line, ``m_hot.scatter_(1, label, margin[idicate_cosie])``,
indexes the sorted margins by the cosine ORDER instead of scattering them to it (row i gets the margin of rank
argsort(-cos)[i], not of its own rank), which pairs them as intended only when that permutation is its own
inverse; here each row gets the margin of its own rank.

The draw is a function of (seed, step, sample) only (:func:`elastic_margins`), never of a random-number generator's
state: every rank of a class-sharded run, a resumed run and one process with the whole batch draw the same margin
for the same sample. ``seed`` is the run's seed (``margin_seed``, filled by the trainer, ``RUN_FACTS``), ``step``
the optimiser steps done (``after_optimizer_step``; the buffer ``margin_step`` is in the checkpoint, so a resumed run
continues the key), ``sample`` the view id of the image (``Batch.view_ids``: dataset index and flip, named by the
trainer's ``on_batch``, gathered with the batch when sharded, kept in BroadFace's queue). A row whose id is unknown
(-1, or a head called directly as ``head(x, y)`` / ``per_sample_loss``) is keyed by its position p in the call's rows
instead, key -(p + 1): deterministic, the same distribution, but the same row position of two calls in one step draws
the same margin (gradient accumulation without ids; a forward and its ``per_sample_loss``, which must agree).

The margins are drawn in the margin hook's ``prepare``, over ALL the rows of a call (the global batch when sharded,
a block of BroadFace's queue) before the rows whose target class is here are taken, so that "+" sorts the whole
batch (its target cosines come all-reduced: ``needs_target_cosines``). Under BroadFace each block (the batch, then
``row_chunk`` queue rows at a time) is sorted on its own. Eval mode draws too (the loss stays a function of its
inputs and the step). The margin has no gradient; the target logit's gradient in cos(theta_y) is the formula's
(``margin_grad="exact"``, as the official code's autograd through arccos) or straight-through (``"detached"``).
Past pi the angle theta + m_b is continued monotonically (``heads.margin.monotonic_cos``, as ArcFace here), and
arccos uses the project's guard (ten machine epsilons from +-1) where the official code clamps cos to [-1, 1].

Defaults (docs/heads.md, "Defaults checked against the papers"): s = 64; Arc m = 0.5, Cos m = 0.35, sigma = 0.05
(the paper's choice for both, and the official ``config/config.py``); Arc+ sigma = 0.0175 (paper and official
config); Cos+ sigma = 0.025 (the paper's; the official config uses 0.02).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faceforge.heads.base import (
    ANGULAR_MARGIN_RANGE,
    COSINE_MARGIN_RANGE,
    HEADS,
    SCALE_RANGE,
    KwargRange,
    MarginContext,
    TrainHooks,
    check_buffer_policy,
    check_inputs,
    check_size,
    compute_dtype,
    require_in_ranges,
    row_norms,
)
from faceforge.heads.buffers import make_step_buffers
from faceforge.heads.margin import MARGIN_GRADS, check_margin_grad, monotonic_cos, safe_acos
from faceforge.heads.softmax import DEFAULT_CHUNK_SIZE, MarginHead

__all__ = [
    "ElasticFace",
    "ElasticFaceArc",
    "ElasticFaceArcPlus",
    "ElasticFaceCos",
    "ElasticFaceCosPlus",
    "assign_by_target_cosine",
    "elastic_margins",
    "margin_keys",
    "normal_variates",
]

SIGMA_RANGE = KwargRange(0.0, 1.0)  # the paper's grid: 0.0125 .. 0.05; 0 is the fixed margin

# ----------------------------------------------------------------------------------------------------------
# the draw: a counter-based normal variate per (seed, step, key)

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment (2^64 / golden ratio)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele, Lea and Flood 2014), a bijection of uint64 arrays, elementwise."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _uniforms(seed: int, step: int, keys: np.ndarray, streams: int) -> list[np.ndarray]:
    """``streams`` arrays (n,) of uniforms in (0, 1], each element a hash of (seed, step, key, stream) only."""
    n = keys.shape[0]
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2^64 by design
        h = _mix64(np.full(n, (seed + _GOLDEN) & _MASK64, dtype=np.uint64))
        h = _mix64(h ^ np.full(n, (step + 2 * _GOLDEN) & _MASK64, dtype=np.uint64))
        h = _mix64(h ^ (keys.astype(np.int64).astype(np.uint64) + np.uint64(3 * _GOLDEN & _MASK64)))
        out = []
        for stream in range(streams):
            bits = _mix64(h ^ np.full(n, ((stream + 4) * _GOLDEN) & _MASK64, dtype=np.uint64))
            out.append(((bits >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53)  # the top 53 bits, (0, 1]
    return out


def normal_variates(seed: int, step: int, keys: Tensor) -> Tensor:
    """(n,) float64 standard normal variates, z_i a function of (seed, step, keys[i]) only (keys (n,) int64, any
    sign): Box-Muller of two hashed uniforms, z = sqrt(-2 ln u1) cos(2 pi u2), u1, u2 in (0, 1] from 53 bits."""
    u1, u2 = _uniforms(int(seed), int(step), keys.detach().cpu().numpy(), 2)
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)
    return torch.from_numpy(z).to(keys.device)


def margin_keys(sample_ids: Tensor | None, rows: int, device: torch.device) -> Tensor:
    """(rows,) int64 draw keys: each row's view id where known (>= 0), else -(p + 1) for the row at position p."""
    positions = -1 - torch.arange(rows, device=device)
    if sample_ids is None:
        return positions
    return torch.where(sample_ids >= 0, sample_ids.to(device).long(), positions)


def elastic_margins(seed: int, step: int, keys: Tensor, m: float, sigma: float) -> Tensor:
    """(n,) float64 margins m + sigma z, z = :func:`normal_variates` (ElasticFace Eq. 5): N(m, sigma^2) per key."""
    return m + sigma * normal_variates(seed, step, keys)


def assign_by_target_cosine(margins: Tensor, target_cosines: Tensor) -> Tensor:
    """ElasticFace+: the same (n,) margins, the largest to the row with the smallest target cosine (n,), and so on
    down (ties in the cosine by row position, so every rank and one process agree)."""
    order = torch.argsort(target_cosines, stable=True)  # ascending cos(theta_y)
    out = torch.empty_like(margins)
    out[order] = torch.sort(margins, descending=True).values
    return out


# ----------------------------------------------------------------------------------------------------------
# the target logits (Eq. 6, Eq. 7), unscaled, with the margins m (K,)


def arc_target(cos_y: Tensor, m: Tensor) -> Tensor:
    """cos(theta_y + m) (Eq. 6), continued strictly decreasing past pi (``monotonic_cos``)."""
    return monotonic_cos(safe_acos(cos_y) + m)


def cos_target(cos_y: Tensor, m: Tensor) -> Tensor:
    """cos(theta_y) - m (Eq. 7)."""
    return cos_y - m


TARGETS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"arc": arc_target, "cos": cos_target}


class ElasticFace(MarginHead, TrainHooks):
    """ElasticFace (module docstring): the target logit with a margin drawn per sample and step from N(m, sigma^2).

    Args:
        num_classes: C. embedding_size: D.
        s: feature scale. m, sigma: the margin's mean and standard deviation (radians for "arc").
        kind: "arc" (Eq. 6, default: ElasticFace-Arc) or "cos" (Eq. 7).
        plus: ElasticFace+ (the batch's margins handed out by target cosine, largest to the smallest).
        margin_seed: the draw's seed (the trainer passes the run's ``seed``).
        margin_grad: "exact" (default) or "detached" (straight-through).
        chunk_size, buffers: as ``MarginSoftmax``.
    Call: ``loss = head(embeddings (B, D), labels (B,))``; ``head.margins(sample_ids, rows, target_cosines)`` is the
    draw of the current step. Buffer: ``margin_step`` (optimiser steps done, the draw's step key).
    """

    KWARG_RANGES = {"s": SCALE_RANGE, "m": ANGULAR_MARGIN_RANGE, "sigma": SIGMA_RANGE}
    RUN_FACTS = {"margin_seed": "seed"}  # filled by the trainer (faceforge.build.build_head) when left out

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5, sigma: float = 0.05,
                 kind: str = "arc", plus: bool = False, margin_seed: int = 0, margin_grad: str = "exact",
                 chunk_size: int = DEFAULT_CHUNK_SIZE, buffers: str = "auto") -> None:
        super().__init__()
        self.num_classes = check_size("num_classes", num_classes)
        self.embedding_size = check_size("embedding_size", embedding_size)
        self.chunk_size = check_size("chunk_size", chunk_size)
        require_in_ranges(self.KWARG_RANGES, s=s, m=m, sigma=sigma)
        if kind not in TARGETS:
            raise ValueError(f"kind={kind!r}; expected one of {sorted(TARGETS)}")
        if isinstance(margin_seed, bool) or int(margin_seed) != margin_seed:
            raise ValueError(f"margin_seed={margin_seed!r}; expected an integer")
        check_margin_grad(margin_grad)
        self.scale, self.m, self.sigma = float(s), float(m), float(sigma)
        self.kind, self.plus, self.margin_seed, self.margin_grad = kind, bool(plus), int(margin_seed), margin_grad
        self.needs_target_cosines = self.plus  # "+" orders the batch by its target cosines
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        self.register_buffer("margin_step", torch.zeros((), dtype=torch.long))  # the draw's step key, checkpointed
        self.buffers = check_buffer_policy(buffers)
        self.step_buffers = make_step_buffers(buffers)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, s={self.scale}, "
                f"kind={self.kind!r}, m={self.m}, sigma={self.sigma}, plus={self.plus}, margin_seed={self.margin_seed}")

    def margins(self, sample_ids: Tensor | None, rows: int, target_cosines: Tensor | None = None,
                device: torch.device | None = None) -> Tensor:
        """(rows,) float64: this step's margins of a call's rows (``margin_keys``), ordered by ``target_cosines``
        (rows,) for "+"."""
        keys = margin_keys(sample_ids, rows, device or self.weight.device)
        drawn = elastic_margins(self.margin_seed, int(self.margin_step), keys, self.m, self.sigma)
        if not self.plus:
            return drawn
        if target_cosines is None:
            raise ValueError("ElasticFace+ needs the rows' target cosines to order its margins; got none")
        return assign_by_target_cosine(drawn, target_cosines.to(drawn.device))

    def prepare(self, context: MarginContext) -> MarginContext:
        """Every row's margin, in ``extras["margin"]``, drawn before the rows whose target is here are taken."""
        margins = self.margins(context.sample_ids, context.labels.shape[0], context.target_cosines,
                               context.labels.device)
        return context._replace(extras={**(context.extras or {}), "margin": margins})

    def target_logit(self, cos_y: Tensor, context: MarginContext) -> Tensor:
        """(K,) s psi(cos_y, m_b) of the rows at hand (Eq. 6 or Eq. 7), the margins from ``prepare``."""
        psi = TARGETS[self.kind](cos_y, context.extras["margin"].to(cos_y.dtype))
        return self.scale * MARGIN_GRADS[self.margin_grad](cos_y, psi)

    def logits(self, embeddings: Tensor, labels: Tensor, sample_ids: Tensor | None = None) -> Tensor:
        """The plain (B, C) scaled logits of this step's draw (small C, for checking): s cos(theta_bj), the target
        column s psi(cos theta_y, m_b) (Eq. 6 / 7), m_b keyed by ``sample_ids`` (B,) (None: by row position)."""
        labels = check_inputs(embeddings, labels, self.num_classes, self.embedding_size)
        dtype = compute_dtype(embeddings, self.weight)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            weight = self.weight.to(dtype)
            cos = F.normalize(embeddings.to(dtype), dim=1) @ weight.t() / row_norms(weight)
            index = labels.unsqueeze(1)
            cos_y = cos.gather(1, index).squeeze(1)
            margins = self.margins(sample_ids, labels.shape[0], cos_y.detach(), embeddings.device)
            target = self.target_logit(cos_y, MarginContext(cos_y, labels, extras={"margin": margins}))
            return (self.scale * cos).scatter(1, index, target.unsqueeze(1))

    # --- TrainHooks: the step key and the sample ids ---

    def on_batch(self, batch: Any) -> None:
        """Name the next forward's rows by the batch's view ids (the draw's sample key)."""
        self.observe_sample_ids(batch.view_ids())

    def after_optimizer_step(self, step: int) -> None:
        """The draw's step key: optimiser steps done."""
        self.margin_step.fill_(int(step))


@HEADS.register("elasticface_arc")
class ElasticFaceArc(ElasticFace):
    """ElasticFace-Arc (Eq. 6): s = 64, m = 0.5 rad, sigma = 0.05."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5, sigma: float = 0.05,
                 **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size, s=s, m=m, sigma=sigma, kind="arc", **kwargs)


@HEADS.register("elasticface_cos")
class ElasticFaceCos(ElasticFace):
    """ElasticFace-Cos (Eq. 7): s = 64, m = 0.35, sigma = 0.05."""

    KWARG_RANGES = {"s": SCALE_RANGE, "m": COSINE_MARGIN_RANGE, "sigma": SIGMA_RANGE}

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.35, sigma: float = 0.05,
                 **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size, s=s, m=m, sigma=sigma, kind="cos", **kwargs)


@HEADS.register("elasticface_arc_plus")
class ElasticFaceArcPlus(ElasticFace):
    """ElasticFace-Arc+ (Eq. 6, margins by target cosine): s = 64, m = 0.5 rad, sigma = 0.0175."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5, sigma: float = 0.0175,
                 **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size, s=s, m=m, sigma=sigma, kind="arc", plus=True, **kwargs)


@HEADS.register("elasticface_cos_plus")
class ElasticFaceCosPlus(ElasticFace):
    """ElasticFace-Cos+ (Eq. 7, margins by target cosine): s = 64, m = 0.35, sigma = 0.025."""

    KWARG_RANGES = {"s": SCALE_RANGE, "m": COSINE_MARGIN_RANGE, "sigma": SIGMA_RANGE}

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.35, sigma: float = 0.025,
                 **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size, s=s, m=m, sigma=sigma, kind="cos", plus=True, **kwargs)
