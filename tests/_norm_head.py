"""A margin head written OUTSIDE faceforge against its public margin hook only (``heads.softmax.MarginHead``):
the margin depends on the embedding norm, in AdaFace's form (Kim et al. 2022, Eq. 8-11; its official code):

    z_b = clip(h (|x_b| - mu) / (sigma + eps), -1, 1)       |x_b| detached, mu / sigma running batch statistics
    g_angle = -m z_b,  g_add = m z_b + m
    t_b = s (cos(clip(theta_b + g_angle, eps, pi - eps)) - g_add)

mu and sigma are buffers updated once per training forward from the whole (global) batch (``observe``), with
momentum ``t_alpha`` as the official code, before the batch's loss. Used by tests/test_margin_hook.py: one
process, class-sharded on 2 and 3 ranks, Partial FC and BroadFace, with no edit of faceforge.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from faceforge.heads import MarginContext, MarginHead, SphereFace2

EPS = 1e-3


def norm_margin_target(cos_y: Tensor, z: Tensor, s: float, m: float) -> Tensor:
    """(K,) s (cos(clip(theta + g_angle)) - g_add) of the target cosines and the standardised norms z (K,)."""
    theta = torch.acos(cos_y.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
    angle = (theta - m * z).clamp(EPS, math.pi - EPS)
    return s * (torch.cos(angle) - (m * z + m))


class NormMarginHead(MarginHead):
    """AdaFace-form margin: s = 64, m = 0.4, h = 0.333, running norm statistics with momentum t_alpha = 0.01."""

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.4, h: float = 0.333,
                 t_alpha: float = 0.01) -> None:
        super().__init__()
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.scale, self.m, self.h, self.t_alpha = float(s), float(m), float(h), float(t_alpha)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        self.register_buffer("norm_mean", torch.tensor(20.0))
        self.register_buffer("norm_std", torch.tensor(100.0))
        self.reset_parameters()

    def standardised(self, norms: Tensor) -> Tensor:
        """z (K,) of embedding norms (K,) against the running statistics."""
        z = (norms.clamp(0.001, 100.0) - self.norm_mean) / (self.norm_std + EPS)
        return (self.h * z).clamp(-1.0, 1.0)

    @torch.no_grad()
    def observe(self, context: MarginContext) -> None:
        norms = context.norms.clamp(0.001, 100.0).to(self.norm_mean.dtype)
        self.norm_mean.mul_(1.0 - self.t_alpha).add_(self.t_alpha * norms.mean())
        self.norm_std.mul_(1.0 - self.t_alpha).add_(self.t_alpha * norms.std())

    def target_logit(self, cos_y: Tensor, context: MarginContext) -> Tensor:
        return norm_margin_target(cos_y, self.standardised(context.norms).to(cos_y.dtype), self.scale, self.m)


class NormSphereFace2(SphereFace2):
    """SphereFace2's one-vs-all family with a norm-dependent positive margin through its hook ``positive_logit``:
    r (g(cos_y) - m (1 + z_b)), z_b = clip((|x_b| - 1) / 4, -1, 1) (a fixed standardisation: the hook alone)."""

    def positive_logit(self, cos_y: Tensor, context: MarginContext) -> Tensor:
        z = ((context.norms.to(cos_y.dtype) - 1.0) / 4.0).clamp(-1.0, 1.0)
        return self.r * (2.0 * ((cos_y + 1.0) / 2.0) ** self.t - 1.0 - self.m * (1.0 + z))
