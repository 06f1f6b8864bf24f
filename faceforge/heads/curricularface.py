"""CurricularFace: adaptive curriculum learning of hard negatives (Huang et al., CVPR 2020, Sec. 3: its loss with
the positive function T and the negative function N, and the EMA of t).

    T(cos theta_y) = cos(theta_y + m)                                                      (ArcFace's positive)
    N(t, cos theta_j) = cos theta_j                    if T(cos theta_y) - cos theta_j >= 0   (easy)
                        cos theta_j (t + cos theta_j)  otherwise                              (hard)
    t <- alpha r + (1 - alpha) t,  r = mean_b cos theta_{b y_b} of the batch,  t = 0 at start
    L_b = -log( e^{s T(cos theta_y)} / (e^{s T(cos theta_y)} + sum_{j != y} e^{s N(t, cos theta_j)}) )

(The paper's text is not in shared/papers; the formulas are checked against the official code instead, whose
``t = target_logit.mean() * 0.01 + (1 - 0.01) * t`` fixes alpha = 0.01 as the weight of the batch mean.)

Early in training t is small, so a hard negative's logit shrinks (easy samples first); as t grows towards 1 hard
negatives weigh more. Written on the public margin hook alone: ``target_logit`` (s T), ``nontarget_logits`` (s N,
applied by the chunked kernel block by block), ``prepare`` (each row's threshold T(cos theta_y) from the context's
``target_cosines``) and ``observe`` (t from the whole batch's target cosines).

Choices, against the paper and the official code (``HuangYG123/CurricularFace``, ``head/metrics.py``):

- t is the EMA of the batch's mean target cosine (cos clamped to [-1, 1]), a buffer updated once per training
  forward BEFORE the loss (the official order), from the GLOBAL batch when the classes are sharded (the context's
  target cosines are all-reduced), so it is the same number on every rank and in the checkpoint. Eval mode reads it.
- Backward: t is a constant (the official code updates it under ``no_grad``), so d N / d cos_j = t + 2 cos_j for a
  hard negative, 1 for an easy one (times s). The threshold T(cos theta_y) only chooses which negatives are hard
  (a mask, not differentiated: the official ``mask = cos_theta > cos_theta_m`` is boolean). The target logit keeps
  its exact gradient (autograd through arccos, as the official code through its sqrt).
- Past pi: T is the project's monotonic continuation of cos(theta_y + m) (``heads.margin``, as ArcFace here),
  instead of the official linear fallback ``cos theta - m sin(m)`` for cos theta_y < cos(pi - m); the threshold is
  that same T, so "hard" means, as in the paper, "above the positive's logit" (the official mask compares with the
  raw cos(theta_y + m), which turns back up past pi). The two differ only for cos theta_y < -0.878 (m = 0.5).
- The threshold and t of a block of BroadFace's queue: the target cosines of the block's own rows (against the
  current W) set its thresholds; t is moved only by the training batch (``observe``), never by queue rows.

Defaults are the paper's and the official code's: m = 0.5, s = 64, alpha = 0.01, t starting at 0 (``register_buffer('t',
torch.zeros(1))``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from faceforge.heads.base import (
    ANGULAR_MARGIN_RANGE,
    HEADS,
    SCALE_RANGE,
    KwargRange,
    MarginContext,
    check_buffer_policy,
    check_size,
    require_in_ranges,
)
from faceforge.heads.buffers import make_step_buffers
from faceforge.heads.margin import target_logit
from faceforge.heads.softmax import DEFAULT_CHUNK_SIZE, MarginHead

ALPHA_RANGE = KwargRange(0.0, 1.0, open_low=True)


def hard_negatives(cos: Tensor, threshold: Tensor) -> Tensor:
    """(N, n) 1.0 where a cosine (N, n) lies above its row's threshold T(cos theta_y) (N,) (the hard case), else 0.0.
    sign(cos - T) is exact (a float difference is 0 only for equal numbers), and a float mask avoids the CPU's slow
    bool-mask kernels (``torch.where`` on a (128, 4096) block: 2.6 ms against 0.17 ms for an elementwise pass)."""
    return torch.sub(cos, threshold.unsqueeze(1)).sign_().clamp_min_(0.0)


@HEADS.register("curricularface")
class CurricularFace(MarginHead):
    """CurricularFace (module docstring): s = 64, m = 0.5, t the EMA (alpha = 0.01) of the mean target cosine.

    Args:
        num_classes: C. embedding_size: D.
        s: feature scale. m: the additive angular margin of the positive (radians). alpha: t's EMA momentum.
        chunk_size, buffers: as ``MarginSoftmax``.
    Call: ``loss = head(embeddings (B, D), labels (B,))``. Buffer: ``t`` (a scalar, replicated when sharded).
    """

    KWARG_RANGES = {"s": SCALE_RANGE, "m": ANGULAR_MARGIN_RANGE, "alpha": ALPHA_RANGE}
    needs_target_cosines = True

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5, alpha: float = 0.01,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, buffers: str = "auto") -> None:
        super().__init__()
        self.num_classes = check_size("num_classes", num_classes)
        self.embedding_size = check_size("embedding_size", embedding_size)
        self.chunk_size = check_size("chunk_size", chunk_size)
        require_in_ranges(self.KWARG_RANGES, s=s, m=m, alpha=alpha)
        self.scale, self.m, self.alpha = float(s), float(m), float(alpha)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        self.register_buffer("t", torch.zeros(()))
        self.buffers = check_buffer_policy(buffers)
        self.step_buffers = make_step_buffers(buffers)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, s={self.scale}, m={self.m}, "
                f"alpha={self.alpha}")

    def positive(self, cos_y: Tensor) -> Tensor:
        """T(cos theta_y) = cos(theta_y + m), continued monotonically past pi (unscaled), (K,)."""
        return target_logit(cos_y, 1.0, self.m, 0.0)

    def target_logit(self, cos_y: Tensor, context: MarginContext) -> Tensor:
        """(K,) s T(cos theta_y) (Eq. 8)."""
        return self.scale * self.positive(cos_y)

    def prepare(self, context: MarginContext) -> MarginContext:
        """Every row's threshold T(cos theta_y) (detached: a mask) in ``extras["threshold"]``."""
        extras = {**(context.extras or {}), "threshold": self.positive(context.target_cosines)}
        return context._replace(extras=extras)

    @torch.no_grad()
    def observe(self, context: MarginContext) -> None:
        """t <- alpha mean_b cos theta_{b y_b} + (1 - alpha) t, over the whole batch (Eq. 10)."""
        mean = context.target_cosines.clamp(-1.0, 1.0).mean()
        self.t.mul_(1.0 - self.alpha).add_(self.alpha * mean.to(self.t.dtype))

    def nontarget_logits(self, cos: Tensor, context: MarginContext) -> Tensor:
        """(N, n) s N(t, cos theta_j) of a block of non-target cosines (N, n): s c (1 + h (c + t - 1)), h the hard
        mask (c (t + c) where hard, c elsewhere)."""
        hard = hard_negatives(cos, context.extras["threshold"])
        return torch.add(cos, (self.t - 1.0).to(cos.dtype)).mul_(hard).add_(1.0).mul_(cos).mul_(self.scale)

    def nontarget_grad(self, cos: Tensor, context: MarginContext) -> Tensor:
        """(N, n) d s N / d cos = s (1 + h (2 c + t - 1)): s (t + 2 cos) where hard, s elsewhere (t a constant, the
        threshold a mask)."""
        hard = hard_negatives(cos, context.extras["threshold"])
        return torch.mul(cos, 2.0).add_((self.t - 1.0).to(cos.dtype)).mul_(hard).add_(1.0).mul_(self.scale)
