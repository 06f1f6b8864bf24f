"""The target-logit transform of the combined margin (ArcFace Eq. 4), as pure functions.

    psi(theta) = cos(m1 * theta + m2) - m3,     theta = arccos(cos_y)      (unscaled; the caller multiplies by s)

(m1, m2, m3) = (1, 0.5, 0) is ArcFace, (1, 0, 0.35) CosFace, (1.35, 0, 0) SphereFace in its arccos form
(ArcFace Section 2.2), (1, 0, 0) NormFace. Margins are in radians.

Two guards make it usable everywhere on [0, pi]:

- monotonic extension: where phi = m1 * theta + m2 leaves [0, pi], cos(phi) alone would turn back up, so
  SphereFace's piecewise psi is used, generalised: (-1)^k cos(phi) - 2k with k = floor(phi / pi). It is
  continuous and strictly decreasing in theta (for m1 > 0) and equals cos(phi) on [0, pi).
- |cos| = 1: theta = arccos of cos clamped to [-1 + eps, 1 - eps] (eps per dtype), so that value and
  gradient stay finite at theta = 0 and theta = pi.

The gradient is the formula's own (`margin_grad="exact"`) or, as in insightface arcface_torch and
OpenSphere, straight-through (`"detached"`): the value is the margined logit, d(logit)/d(cos) = 1.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

_ACOS_EPS_IN_ULPS = 10.0  # clamp |cos| to 1 - 10 machine epsilons before arccos


def acos_eps(dtype: torch.dtype) -> float:
    """The margin kept from +/-1 before arccos: 10 machine epsilons of `dtype` (1.2e-6 for float32)."""
    return _ACOS_EPS_IN_ULPS * torch.finfo(dtype).eps


def safe_acos(cos: Tensor) -> Tensor:
    """theta = arccos(cos) in radians, cos clamped to [-1 + eps, 1 - eps]: finite value and gradient at |cos| = 1."""
    eps = acos_eps(cos.dtype)
    return torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps))


def monotonic_cos(phi: Tensor) -> Tensor:
    """(-1)^k cos(phi) - 2k with k = floor(phi / pi): cos(phi) on [0, pi), continued strictly decreasing.

    SphereFace's psi (Liu et al. 2017, Eq. 7) written for a real-valued angle phi (radians).
    """
    k = torch.floor(phi.detach() / math.pi)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (-1)^k
    return sign * torch.cos(phi) - 2.0 * k


def _exact(cos: Tensor, psi: Tensor) -> Tensor:
    return psi


def _detached(cos: Tensor, psi: Tensor) -> Tensor:
    return cos + (psi - cos).detach()  # straight-through: value psi, d/dcos = 1 (arcface_torch, OpenSphere)


MARGIN_GRADS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"exact": _exact, "detached": _detached}


def check_margin_grad(margin_grad: str) -> None:
    """Raise ValueError unless `margin_grad` is a key of MARGIN_GRADS ("exact" or "detached")."""
    if margin_grad not in MARGIN_GRADS:
        raise ValueError(f"margin_grad={margin_grad!r}; expected one of {sorted(MARGIN_GRADS)}")


def check_margins(m1: float, m2: float, m3: float, margin_grad: str = "exact") -> None:
    """Raise ValueError unless m1 > 0, m2 and m3 are finite and `margin_grad` is known."""
    for name, value in (("m1", m1), ("m2", m2), ("m3", m3)):
        if not math.isfinite(float(value)):
            raise ValueError(f"margin {name}={value!r} must be a finite number (radians for m2)")
    if not m1 > 0:
        raise ValueError(f"multiplicative margin m1={m1!r} must be > 0 (1.0 means no multiplicative margin)")
    check_margin_grad(margin_grad)


def target_logit(
    cos_y: Tensor, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0, margin_grad: str = "exact"
) -> Tensor:
    """psi(theta_y) = cos(m1 * theta_y + m2) - m3 of the target cosines (ArcFace Eq. 4, unscaled).

    Args:
        cos_y: (B,) cosine between each embedding and its own class centre.
        m1, m2, m3: multiplicative angular, additive angular (radians) and additive cosine margins.
        margin_grad: "exact" (autograd of the formula, default) or "detached" (straight-through).
    Returns:
        (B,) target logits before the scale s, same dtype as `cos_y`.
    """
    check_margins(m1, m2, m3, margin_grad)
    theta = safe_acos(cos_y)
    psi = monotonic_cos(m1 * theta + m2) - m3  # ArcFace Eq. 4, extended past pi
    return MARGIN_GRADS[margin_grad](cos_y, psi)


def apply_margin(
    cos: Tensor, labels: Tensor, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0, margin_grad: str = "exact"
) -> Tensor:
    """Replace the target column of a (B, C) cosine matrix by `target_logit` (insightface's seam).

    Args:
        cos: (B, C) cosines. labels: (B,) int64 class indices.
    Returns:
        (B, C) unscaled logits: psi(theta_y) in column labels[b] of row b, cos elsewhere.
    """
    index = labels.long().unsqueeze(1)
    target = target_logit(cos.gather(1, index).squeeze(1), m1, m2, m3, margin_grad)
    return cos.scatter(1, index, target.unsqueeze(1))
