"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017), BigFace's large-batch optimiser.

For every parameter tensor w ("layer") with gradient g, weight decay beta, trust coefficient eta:

    local_lr = eta * ||w|| / (||g|| + beta * ||w|| + eps)        (You et al. 2017, Eq. 6; 1 if ||w|| or ||g|| is 0)
    v <- momentum * v + local_lr * (g + beta * w)                (Algorithm 1, the momentum form)
    w <- w - lr * v

with the learning rate applied after the momentum, as ``torch.optim.SGD`` does (the same update while
lr is constant; a scheduled lr takes effect at once instead of through the momentum). BatchNorm
parameters and biases are excluded, as in the LARS code of SimCLR / Barlow Twins: every parameter with
``ndim <= 1`` (BN scales and shifts, biases, PReLU slopes) gets plain momentum SGD, ``local_lr = 1`` and
no weight decay.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

__all__ = ["LARS", "trust_ratio"]


def trust_ratio(weight_norm: torch.Tensor, grad_norm: torch.Tensor, weight_decay: float, eta: float, eps: float) -> torch.Tensor:
    """``eta * ||w|| / (||g|| + beta ||w|| + eps)``, or 1 where ``||w||`` or ``||g||`` is 0 (a 0-d tensor)."""
    ratio = eta * weight_norm / (grad_norm + weight_decay * weight_norm + eps)
    return torch.where((weight_norm > 0) & (grad_norm > 0), ratio, torch.ones_like(ratio))


class LARS(Optimizer):
    """LARS with momentum; BN / bias (``ndim <= 1``) parameters excluded from adaptation and weight decay.

    Args:
        params: parameters or groups (a group may set its own ``lr``, ``weight_decay``, ``momentum``,
            ``trust_coefficient``).
        lr: the global learning rate (gamma).
        momentum: m (default 0.9).
        weight_decay: beta (default 0).
        trust_coefficient: eta (default 0.001, You et al.).
        eps: added to the denominator of the trust ratio (default 1e-8).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0 or eps < 0:
            raise ValueError(
                f"LARS expects lr, momentum, weight_decay, eps >= 0 and trust_coefficient > 0; got lr={lr}, "
                f"momentum={momentum}, weight_decay={weight_decay}, trust_coefficient={trust_coefficient}, eps={eps}"
            )
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta, eta, eps = group["weight_decay"], group["trust_coefficient"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if p.ndim > 1:  # a weight matrix / kernel: adapted and decayed
                    ratio = trust_ratio(torch.linalg.vector_norm(p), torch.linalg.vector_norm(d_p), beta, eta, eps)
                    d_p = (d_p + beta * p if beta else d_p) * ratio
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d_p.detach().clone()
                else:
                    buf.mul_(group["momentum"]).add_(d_p)
                p.add_(buf, alpha=-group["lr"])
        return loss
