"""The exact full-softmax margin head whose class weights are updated by SGD chunk by chunk inside the backward
pass, so that the dense (C, D) gradient of W is never held (the 10M-class plan of docs/heads.md, "One GPU, 10M
classes").

The loss is the margin softmax of ArcFace Eq. 4 over all C classes, per sample

    loss_b = logsumexp_j(z_bj) - z_by,   z_bj = s cos(theta_bj) (j != y_b),   z_by = target(cos(theta_by)),

cos(theta_bj) = x_b . w_j / (|x_b| |w_j|), with ``target`` any elementwise map of the target cosine to the
target logit (``margin_target(s, m1, m2, m3)`` is ArcFace's, through :func:`faceforge.heads.target_logit`).

Forward (pass 1): for each class chunk, logits (B, c) from one GEMM, folded into a running logsumexp (B,).
Backward (pass 2): for each chunk, the same logits again, p = softmax, dL/dcos (B, c), then
    grad x_hat += dcos @ w_hat             (B, D)   GEMM 2
    grad w     =  dcos^T @ x_hat  (+ the row-normalisation's projection)   (c, D)   GEMM 3
and torch.optim.SGD's update of that chunk's rows and momentum at once (:func:`sgd_rows_`), before the next
chunk; no chunk's update is read by another chunk (each logit reads only its own row), so the result equals
the textbook head + ``torch.optim.SGD`` step for step (tests/test_fused_sgd.py, float64).

Memory: W and its momentum (2 |W|), plus a bf16 copy of W (|W| / 2) when ``gemm_dtype=torch.bfloat16``;
per chunk a few (B, c) and (c, D) temporaries. What is given up: the gradient of W is never seen whole, so
global-norm clipping cannot include it and a GradScaler's scale is not undone (use float32 or bf16 autocast).
The backward applies the update: call ``backward`` once per forward (the trainer's usual step), and set
``head.lr`` from the schedule each step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faceforge.heads.base import check_inputs, check_size, chunks, row_norms
from faceforge.heads.margin import target_logit

__all__ = ["FusedSGDSoftmax", "SGDHyper", "fused_sgd_softmax_backward", "fused_sgd_softmax_forward",
           "margin_target", "sgd_rows_"]

TargetFn = Callable[[Tensor], Tensor]  # cos_y (B,) -> target logit (B,), already scaled
DEFAULT_CHUNK = 65536


def margin_target(s: float, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0, margin_grad: str = "exact") -> TargetFn:
    """ArcFace's target logit s (cos(m1 theta + m2) - m3) as a function of the target cosine (B,) -> (B,)."""
    return lambda cos_y: s * target_logit(cos_y, m1, m2, m3, margin_grad)


@dataclass
class SGDHyper:
    """torch.optim.SGD's hyper-parameters (same meaning, same defaults except momentum)."""

    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        for name in ("lr", "momentum", "weight_decay", "dampening"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r}: expected a finite float >= 0")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0 (as torch.optim.SGD)")


def sgd_rows_(rows: Tensor, buf: Tensor, grad: Tensor, hyper: SGDHyper, first: bool) -> None:
    """torch.optim.SGD's step on a block of rows, in place: ``rows`` (c, D) parameters, ``buf`` (c, D) their
    momentum (written on the first step, as torch's lazily created buffer), ``grad`` (c, D) their gradient,
    used as scratch (overwritten)."""
    d_p = grad.add_(rows, alpha=hyper.weight_decay) if hyper.weight_decay else grad
    if hyper.momentum:
        if first:
            buf.copy_(d_p)
        else:
            buf.mul_(hyper.momentum).add_(d_p, alpha=1.0 - hyper.dampening)
        d_p = d_p.add_(buf, alpha=hyper.momentum) if hyper.nesterov else buf
    rows.add_(d_p, alpha=-hyper.lr)


def _gemm(a: Tensor, b: Tensor, dtype: torch.dtype, gemm_dtype: torch.dtype | None) -> Tensor:
    """a @ b in ``gemm_dtype`` (when given and different), returned in ``dtype``."""
    if gemm_dtype is None or gemm_dtype == dtype:
        return a.to(dtype) @ b.to(dtype)
    return (a.to(gemm_dtype) @ b.to(gemm_dtype)).to(dtype)


def _chunk_cos(x_hat: Tensor, rows: Tensor, gemm_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """(cos (B, c), |w| (c,)) of one chunk of rows, in x_hat's dtype, without a normalised copy of the rows:
    cos = (x_hat @ w^T) / |w|, the GEMM in ``gemm_dtype`` (GEMM 1)."""
    dtype = x_hat.dtype
    norms = torch.linalg.vector_norm(rows, dim=1, dtype=dtype).clamp_min(torch.finfo(dtype).tiny)
    return _gemm(x_hat, rows.t(), dtype, gemm_dtype).div_(norms), norms


def _chunk_logits(cos: Tensor, labels: Tensor, target: Tensor, c0: int, c1: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(logits (B, c) = s cos with each target column of this chunk replaced by the target logit, rows, cols)."""
    logits = scale * cos
    here = ((labels >= c0) & (labels < c1)).nonzero().squeeze(1)
    cols = labels[here] - c0
    logits[here, cols] = target[here]
    return logits, here, cols


def fused_sgd_softmax_forward(
    x_hat: Tensor, labels: Tensor, gemm_weight: Tensor, target_fn: TargetFn, scale: float, chunk_size: int,
    gemm_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pass 1. x_hat (B, D) unit embeddings, labels (B,), gemm_weight (C, D) the rows the GEMMs read.

    Returns (loss (B,), lse (B,), d target / d cos_y (B,)), all in x_hat's dtype; nothing holds a graph.
    """
    dtype = x_hat.dtype
    w_y = gemm_weight[labels].to(dtype)
    cos_y = ((x_hat * w_y).sum(1) / row_norms(w_y)).detach().requires_grad_(True)
    with torch.enable_grad():  # t'(cos_y) (B,): target_fn is elementwise, so the gradient of the sum is it
        target = target_fn(cos_y)
        dtarget = torch.autograd.grad(target.sum(), cos_y)[0] if target.requires_grad else torch.zeros_like(cos_y)
    target = target.detach()
    lse = torch.full_like(target, -math.inf)
    for c0, c1 in chunks(gemm_weight.shape[0], chunk_size):
        cos, _ = _chunk_cos(x_hat, gemm_weight[c0:c1], gemm_dtype)
        logits, _, _ = _chunk_logits(cos, labels, target, c0, c1, scale)
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
    return lse - target, lse, dtarget


def fused_sgd_softmax_backward(
    x_hat: Tensor, labels: Tensor, weight: Tensor, momentum: Tensor, lse: Tensor, dtarget: Tensor,
    target: Tensor, grad_loss: Tensor, hyper: SGDHyper, first: bool, scale: float, chunk_size: int,
    gemm_weight: Tensor | None = None, gemm_dtype: torch.dtype | None = None,
) -> Tensor:
    """Pass 2: d(sum_b grad_loss_b loss_b)/d x_hat (B, D), and SGD applied to ``weight`` / ``momentum`` (C, D)
    chunk by chunk (``gemm_weight``, a low-precision copy the GEMMs read, refreshed from the updated rows).

    grad_loss (B,): the upstream gradient of each sample's loss (1/B for a batch mean).
    With cos_bj = x_b . w_j / |w_j| and g_bj = dL/dcos_bj:
        dL/dx_b = sum_j g_bj w_j / |w_j|                                    (GEMM 2)
        dL/dw_j = sum_b g_bj x_b / |w_j|  -  (sum_b g_bj cos_bj) w_j / |w_j|^2   (GEMM 3, then one pass)
    """
    dtype = x_hat.dtype
    gemm_weight = weight if gemm_weight is None else gemm_weight
    grad_x_hat = torch.zeros_like(x_hat)
    for c0, c1 in chunks(weight.shape[0], chunk_size):
        rows = gemm_weight[c0:c1]
        cos, norms = _chunk_cos(x_hat, rows, gemm_dtype)
        logits, here, cols = _chunk_logits(cos, labels, target, c0, c1, scale)
        g = torch.exp(logits.sub_(lse.unsqueeze(1))).mul_(grad_loss.unsqueeze(1))  # dL/dlogit = p g
        g[here, cols] = (g[here, cols] - grad_loss[here]) * dtarget[here] / scale  # (p - 1) g t'(cos)
        g.mul_(scale)  # dL/dcos: dlogit/dcos = s off the target
        along = (g * cos).sum(0)  # (c,) sum_b g_bj cos_bj
        g.div_(norms)
        grad_x_hat += _gemm(g, rows, dtype, gemm_dtype)  # GEMM 2
        grad_w = _gemm(g.t(), x_hat, dtype, gemm_dtype)  # GEMM 3
        grad_w.addcmul_(rows, (along / norms.square()).unsqueeze(1), value=-1.0)
        sgd_rows_(weight[c0:c1], momentum[c0:c1], grad_w.to(weight.dtype), hyper, first)
        if gemm_weight is not weight:
            gemm_weight[c0:c1].copy_(weight[c0:c1])
    return grad_x_hat


class _FusedSGDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_hat: Tensor, labels: Tensor, head: "FusedSGDSoftmax") -> Tensor:  # type: ignore[override]
        loss, lse, dtarget = fused_sgd_softmax_forward(
            x_hat, labels, head.gemm_weight, head.target_fn, head.scale, head.chunk_size, head.gemm_dtype)
        ctx.head = head
        ctx.save_for_backward(x_hat, labels, lse, dtarget, lse - loss)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        x_hat, labels, lse, dtarget, target = ctx.saved_tensors
        head: FusedSGDSoftmax = ctx.head
        grad_x_hat = fused_sgd_softmax_backward(
            x_hat, labels, head.weight, head.momentum_buffer, lse, dtarget, target, grad.to(x_hat.dtype),
            head.hyper(), bool(head.steps.item() == 0), head.scale, head.chunk_size,
            None if head.gemm_dtype is None else head.gemm_weight, head.gemm_dtype)
        head.steps += 1
        return grad_x_hat, None, None


class FusedSGDSoftmax(nn.Module):
    """Exact margin softmax over C classes with SGD on W inside the backward pass (module doc).

    Args:
        num_classes: C. embedding_size: D.
        target_fn: cos_y (B,) -> scaled target logit (B,); ``margin_target(64.0, m2=0.5)`` is ArcFace.
        scale: s, the scale of the non-target logits.
        lr, momentum, weight_decay, dampening, nesterov: torch.optim.SGD's, for W; ``head.lr`` may be reset
            every step by the schedule.
        chunk_size: classes per block (default 65536).
        gemm_dtype: ``torch.bfloat16`` keeps a bf16 copy of W for the GEMMs (W and momentum stay float32).
    Call: ``loss = head(embeddings (B, D), labels (B,))``, the batch mean; ``loss.backward()`` gives the
    embeddings their gradient and applies one SGD step to ``head.weight`` (a buffer, not a Parameter: keep it
    out of the optimiser).
    """

    def __init__(
        self, num_classes: int, embedding_size: int, target_fn: TargetFn, *, scale: float, lr: float,
        momentum: float = 0.9, weight_decay: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
        chunk_size: int = DEFAULT_CHUNK, gemm_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.num_classes = check_size("num_classes", num_classes)
        self.embedding_size = check_size("embedding_size", embedding_size)
        self.chunk_size = check_size("chunk_size", chunk_size)
        if not (math.isfinite(float(scale)) and scale > 0):
            raise ValueError(f"scale={scale!r}: expected a finite float > 0")
        self.target_fn, self.scale, self.gemm_dtype = target_fn, float(scale), gemm_dtype
        SGDHyper(lr, momentum, weight_decay, dampening, nesterov)  # checks them
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.dampening, self.nesterov = float(dampening), bool(nesterov)
        self.register_buffer("weight", torch.empty(num_classes, embedding_size, device=device, dtype=dtype).normal_(std=0.01))
        self.register_buffer("momentum_buffer", torch.zeros_like(self.weight))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=device))
        low = None if gemm_dtype is None or gemm_dtype == dtype else self.weight.to(gemm_dtype)
        self.register_buffer("weight_lowp", low, persistent=False)

    @property
    def gemm_weight(self) -> Tensor:
        """The rows the GEMMs read: the bf16 copy when ``gemm_dtype`` asks for one, else ``weight``."""
        return self.weight if self.weight_lowp is None else self.weight_lowp

    def hyper(self) -> SGDHyper:
        return SGDHyper(self.lr, self.momentum, self.weight_decay, self.dampening, self.nesterov)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Scalar batch mean of the per-sample losses (module doc); embeddings (B, D), labels (B,) int64."""
        labels = check_inputs(embeddings, labels, self.num_classes, self.embedding_size)
        dtype = torch.promote_types(torch.float32, self.weight.dtype)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x_hat = F.normalize(embeddings.to(dtype), dim=1)
            return _FusedSGDLoss.apply(x_hat, labels, self).mean()
