"""AdaFace: a margin adapted by the feature norm as an image-quality proxy (Kim et al., CVPR 2022).

    z_b = clip(h (|x_b| - mu) / (sigma + eps), -1, 1)                      Eq. 10 (|x_b| clipped to [0.001, 100], detached)
    g_angle = -m z_b,  g_add = m z_b + m                                    Eq. 11
    t_b = s (cos(clip(theta_b + g_angle, eps, pi - eps)) - g_add),  others s cos(theta_j)    Eq. 8 with Eq. 11

mu and sigma are the running mean and (unbiased) standard deviation of the batch's embedding norms, EMA with
momentum ``t_alpha`` (Eq. 10's "batch statistics", the official code's ``batch_mean`` / ``batch_std``, started at 20
and 100), updated once per training forward BEFORE the batch's loss (the official order). They are buffers: in the
checkpoint, and identical on every rank when the classes are sharded, since the margin hook's ``observe`` sees the
gathered global batch there (``heads.parallel.ShardedHead.forward``). Eval mode reads them without moving them.

Defaults are the paper's (its implementation details and the official code's arguments): m = 0.4, h = 0.333, s = 64,
t_alpha = 0.01; eps = 1e-3 as the official code. theta = arccos of cos_y clamped ten machine epsilons from +-1
(``heads.margin.safe_acos``, the project's guard) instead of the official 1e-3: finite gradients at |cos| = 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from faceforge.heads.base import (
    COSINE_MARGIN_RANGE,
    HEADS,
    SCALE_RANGE,
    KwargRange,
    MarginContext,
    check_buffer_policy,
    check_size,
    require_in_ranges,
)
from faceforge.heads.buffers import make_step_buffers
from faceforge.heads.margin import safe_acos
from faceforge.heads.softmax import DEFAULT_CHUNK_SIZE, MarginHead

EPS = 1e-3  # the official code's eps: sigma + eps, the angle clipped to [eps, pi - eps]
NORM_CLIP = (0.001, 100.0)  # the official code's safe_norms
INITIAL_MEAN, INITIAL_STD = 20.0, 100.0  # the official code's batch_mean / batch_std at start

H_RANGE = KwargRange(0.0, 1.0, open_low=True)
MOMENTUM_RANGE = KwargRange(0.0, 1.0, open_low=True)


def adaface_target(cos_y: Tensor, z: Tensor, s: float, m: float) -> Tensor:
    """(K,) s (cos(clip(theta - m z, eps, pi - eps)) - (m z + m)) of target cosines cos_y (K,) and the standardised
    norms z (K,) in [-1, 1] (AdaFace Eq. 8 with g_angle = -m z, g_add = m z + m, Eq. 11)."""
    angle = (safe_acos(cos_y) - m * z).clamp(EPS, math.pi - EPS)
    return s * (torch.cos(angle) - (m * z + m))


@HEADS.register("adaface")
class AdaFace(MarginHead):
    """AdaFace (module docstring): s = 64, m = 0.4, h = 0.333, norm statistics with EMA momentum t_alpha = 0.01.

    Args:
        num_classes: C. embedding_size: D.
        s: feature scale. m: the margin (angular and additive parts, Eq. 11). h: the concentration of z (Eq. 10).
        t_alpha: the EMA momentum of the norm statistics.
        chunk_size, buffers: as ``MarginSoftmax``.
    Call: ``loss = head(embeddings (B, D) of any norm, labels (B,))``. Buffers: ``norm_mean``, ``norm_std`` (scalars).
    """

    norm_is_quality = True  # the feature norm is its image-quality proxy (deploy: Recognizer.quality)
    KWARG_RANGES = {"s": SCALE_RANGE, "m": COSINE_MARGIN_RANGE, "h": H_RANGE, "t_alpha": MOMENTUM_RANGE}

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.4, h: float = 0.333,
                 t_alpha: float = 0.01, chunk_size: int = DEFAULT_CHUNK_SIZE, buffers: str = "auto") -> None:
        super().__init__()
        self.num_classes = check_size("num_classes", num_classes)
        self.embedding_size = check_size("embedding_size", embedding_size)
        self.chunk_size = check_size("chunk_size", chunk_size)
        require_in_ranges(self.KWARG_RANGES, s=s, m=m, h=h, t_alpha=t_alpha)
        self.scale, self.m, self.h, self.t_alpha = float(s), float(m), float(h), float(t_alpha)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        self.register_buffer("norm_mean", torch.tensor(INITIAL_MEAN))
        self.register_buffer("norm_std", torch.tensor(INITIAL_STD))
        self.buffers = check_buffer_policy(buffers)
        self.step_buffers = make_step_buffers(buffers)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, s={self.scale}, m={self.m}, "
                f"h={self.h}, t_alpha={self.t_alpha}")

    def standardised(self, norms: Tensor) -> Tensor:
        """z (K,) in [-1, 1] of the embedding norms (K,) against the running statistics (Eq. 10, h-scaled, clipped)."""
        z = (norms.clamp(*NORM_CLIP) - self.norm_mean) / (self.norm_std + EPS)
        return (self.h * z).clamp(-1.0, 1.0)

    @torch.no_grad()
    def observe(self, context: MarginContext) -> None:
        """mu <- (1 - t_alpha) mu + t_alpha mean|x|, sigma likewise with the unbiased std, over the whole batch."""
        norms = context.norms.clamp(*NORM_CLIP).to(self.norm_mean.dtype)
        std = norms.std() if norms.numel() > 1 else torch.zeros_like(self.norm_std)  # one sample: no spread
        self.norm_mean.mul_(1.0 - self.t_alpha).add_(self.t_alpha * norms.mean())
        self.norm_std.mul_(1.0 - self.t_alpha).add_(self.t_alpha * std)

    def target_logit(self, cos_y: Tensor, context: MarginContext) -> Tensor:
        """(K,) the AdaFace target logit (Eq. 8, 11) of the rows at hand."""
        return adaface_target(cos_y, self.standardised(context.norms).to(cos_y.dtype), self.scale, self.m)
