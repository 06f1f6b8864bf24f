"""The angular regularisers of ArcFace Section 2.3: Intra-Loss (Eq. 5) and Inter-Loss (Eq. 6).

    Eq. 5 term:  (1 / (pi N)) sum_i theta_{y_i}
    Eq. 6 term: -(1 / (pi N (n - 1))) sum_i sum_{j != y_i} arccos(W_{y_i}^T W_j)        (W rows normalised)

`MarginSoftmax(intra_loss_weight=..., inter_loss_weight=...)` adds them (weight 1.0 gives the paper's
L5 / L6 on top of its margin loss). The Eq. 6 term touches every class; `inter_class_loss` computes it
over class chunks with a hand-written backward, so it holds one (B, chunk) block at a time (its gradient
for W is one extra (C, D) tensor, which autograd adds in place to the main gradient).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from faceforge.heads.margin import acos_eps, safe_acos


def intra_class_angle(cos_y: Tensor) -> Tensor:
    """theta_{y_i} / pi per sample (B,), from the target cosines (B,); its batch mean is the Eq. 5 term."""
    return safe_acos(cos_y) / math.pi  # ArcFace Eq. 5 summand


def _row_norms(weight: Tensor) -> Tensor:
    return torch.linalg.vector_norm(weight, dim=1).clamp_min(torch.finfo(weight.dtype).tiny)


class _InterClassLoss(torch.autograd.Function):
    """Eq. 6 term over class chunks; backward recomputes each (B, chunk) cosine block."""

    @staticmethod
    def forward(ctx, weight: Tensor, labels: Tensor, chunk_size: int) -> Tensor:  # type: ignore[override]
        num_classes = weight.shape[0]
        if num_classes < 2:
            raise ValueError(f"the inter-class loss needs at least 2 classes, got num_classes={num_classes}")
        w_y = weight[labels]
        u = w_y / _row_norms(w_y).unsqueeze(1)  # (B, D) normalised target rows
        eps = acos_eps(weight.dtype)
        total = weight.new_zeros(())
        for c0 in range(0, num_classes, chunk_size):
            block, _, own = _cos_block(u, weight, labels, c0, min(c0 + chunk_size, num_classes))
            block.clamp_(-1.0 + eps, 1.0 - eps).acos_()
            block[own] = 0.0  # j != y_i
            total += block.sum()
        ctx.save_for_backward(weight, labels)
        ctx.chunk_size = chunk_size
        return -total / (math.pi * labels.numel() * (num_classes - 1))  # ArcFace Eq. 6 term

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        weight, labels = ctx.saved_tensors
        num_classes, batch = weight.shape[0], labels.numel()
        w_y = weight[labels]
        n_y = _row_norms(w_y).unsqueeze(1)
        u = w_y / n_y
        eps = acos_eps(weight.dtype)
        coef = grad / (math.pi * batch * (num_classes - 1))  # dL/da = -coef * d(arccos a)/da = coef / sqrt(1 - a^2)
        grad_w = torch.zeros_like(weight)
        grad_u = torch.zeros_like(u)
        for c0 in range(0, num_classes, ctx.chunk_size):
            c1 = min(c0 + ctx.chunk_size, num_classes)
            a, norms, own = _cos_block(u, weight, labels, c0, c1)
            inside = (a > -1.0 + eps) & (a < 1.0 - eps)  # the clamp passes no gradient
            h = torch.rsqrt((1.0 - a * a).clamp_min(eps)).mul_(inside).mul_(coef)  # dL/da_bj
            h[own] = 0.0
            h.div_(norms)  # h_bj / n_j
            w_c = weight[c0:c1]
            grad_u.addmm_(h, w_c)  # sum_j h_bj W_j / n_j
            radial = (h * a).sum(0) / norms  # sum_b h_bj a_bj / n_j^2
            torch.mm(h.t(), u, out=grad_w[c0:c1])
            grad_w[c0:c1].addcmul_(w_c, radial.unsqueeze(1), value=-1.0)
        # u = W_y / |W_y|: project onto the tangent plane and divide by the norm
        grad_w.index_put_((labels,), (grad_u - (grad_u * u).sum(1, keepdim=True) * u) / n_y, accumulate=True)
        return grad_w, None, None


def _cos_block(u: Tensor, weight: Tensor, labels: Tensor, c0: int, c1: int) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """(B, c1 - c0) cosines u_b . W_j / |W_j|, the chunk's row norms (c1 - c0,) and the (row, column)
    indices of each sample's own class inside the chunk (to exclude j = y_i)."""
    norms = _row_norms(weight[c0:c1])
    block = (u @ weight[c0:c1].t()).div_(norms)
    return block, norms, _own_class(labels, c0, c1)


def _own_class(labels: Tensor, c0: int, c1: int) -> tuple[Tensor, Tensor]:
    """Indices (rows, columns) of the entries (b, labels[b] - c0) that fall in classes [c0, c1)."""
    rows = ((labels >= c0) & (labels < c1)).nonzero().squeeze(1)
    return rows, labels[rows] - c0


def inter_class_loss(weight: Tensor, labels: Tensor, chunk_size: int = 65536) -> Tensor:
    """-(1 / (pi N (n-1))) sum_i sum_{j != y_i} arccos(W_{y_i}^T W_j), W rows normalised (ArcFace Eq. 6 term).

    Args:
        weight: (C, D) class centres (not necessarily unit rows). labels: (N,) int64.
        chunk_size: classes per block; memory is one (N, chunk_size) block.
    Returns:
        scalar tensor (radians / pi, negative: minimising it spreads the centres apart).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive number of classes")
    return _InterClassLoss.apply(weight, labels.long(), int(chunk_size))
