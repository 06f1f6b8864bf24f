"""Angular distillation (BigFace): the student's embedding direction is pulled onto the teacher's.

BigFace-Distill (Kim et al., MFR-ICCV2021, slide "Loss Function")::

    L = L_CosFace(s = 64, m = 0.4) + lambda * L_distill,     lambda = 9
    L_distill = (1/N) sum_i || x_t,i / ||x_t,i|| - x_s,i / ||x_s,i|| ||_2^2

For unit vectors ||a - b||^2 = 2 - 2 cos(a, b), so ``L_distill = mean_i (2 - 2 cos(x_t,i, x_s,i))``, in
[0, 4]. The ``lam`` here is the paper's lambda on this squared-distance form: lambda = 9 on it equals 18
on the ``1 - cos`` form of margindistillation / TFace's EKD.

The teacher's embeddings are a target: this loss never sends a gradient into them (they are detached).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["AngularDistillation", "angular_distillation"]


def angular_distillation(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``(1/N) sum_i ||x̂_t,i - x̂_s,i||^2`` (BigFace L_distill) of (N, D) student and teacher embeddings.

    Computed as ``mean(2 - 2 cos)`` in float32 at least (float64 stays float64); the teacher is detached.
    Returns a 0-d tensor. ``eps`` guards the normalisation of a zero vector (``F.normalize``).
    """
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"angular distillation expects student and teacher embeddings of one shape (N, D); got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)} (different widths need a projection)"
        )
    dtype = torch.promote_types(student.dtype, torch.float32)
    s = F.normalize(student.to(dtype), dim=1, eps=eps)
    t = F.normalize(teacher.detach().to(dtype), dim=1, eps=eps)
    cosine = (s * t).sum(dim=1)  # cos(x_t,i, x_s,i), (N,)
    return (2.0 - 2.0 * cosine).mean()  # = mean ||x̂_t - x̂_s||^2 for unit vectors


class AngularDistillation(nn.Module):
    """``lam * (1/N) sum_i ||x̂_t,i - x̂_s,i||^2``, called as ``loss = distill(student_emb, teacher_emb)``.

    Args:
        lam: lambda, the weight on the squared-distance form (BigFace: 9; equals 2 * lam on ``1 - cos``).

    Shapes: student_emb and teacher_emb (N, D), any scale (they are normalised here). Returns a 0-d tensor.
    """

    def __init__(self, lam: float = 9.0) -> None:
        super().__init__()
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0; got {lam!r}")
        self.lam = float(lam)

    def forward(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
        return self.lam * angular_distillation(student_emb, teacher_emb)

    def extra_repr(self) -> str:
        return f"lam={self.lam}"
