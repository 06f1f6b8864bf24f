"""Angular distillation (BigFace): the loss and its gradient against the written formula, in float64."""

from __future__ import annotations

import pytest
import torch

from faceforge.distill import AngularDistillation, angular_distillation


def written_loss(s: torch.Tensor, t: torch.Tensor, lam: float) -> torch.Tensor:
    # BigFace: lambda * (1/N) sum_i || x_t / ||x_t|| - x_s / ||x_s|| ||^2, one row at a time
    total = torch.zeros((), dtype=torch.float64)
    for i in range(len(s)):
        d = t[i] / t[i].norm() - s[i] / s[i].norm()
        total = total + (d * d).sum()
    return lam * total / len(s)


def written_grad(s: torch.Tensor, t: torch.Tensor, lam: float) -> torch.Tensor:
    # d/ds of ||t̂ - ŝ||^2 = -2 (I - ŝŝᵀ)(t̂ - ŝ) / ||s|| = -2 (t̂ - (ŝ·t̂) ŝ) / ||s||
    s_hat = s / s.norm(dim=1, keepdim=True)
    t_hat = t / t.norm(dim=1, keepdim=True)
    cos = (s_hat * t_hat).sum(1, keepdim=True)
    return -2.0 * lam / len(s) * (t_hat - cos * s_hat) / s.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("lam", [9.0, 1.0, 0.0])
def test_loss_and_gradient_match_the_formula(lam):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(7, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randn(7, 5, generator=g, dtype=torch.float64) * 0.2
    loss = AngularDistillation(lam)(s, t)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, written_loss(s.detach(), t, lam), rtol=1e-12, atol=1e-14)
    loss.backward()
    torch.testing.assert_close(s.grad, written_grad(s.detach(), t, lam), rtol=1e-10, atol=1e-14)


def test_it_is_two_minus_two_cos_and_scale_free():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(s, t, dim=1)
    torch.testing.assert_close(angular_distillation(s, t), (2 - 2 * cos).mean(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(angular_distillation(5 * s, 0.1 * t), angular_distillation(s, t), rtol=1e-12, atol=1e-14)
    assert float(angular_distillation(s, s)) == pytest.approx(0.0, abs=1e-12)
    assert float(angular_distillation(s, -s)) == pytest.approx(4.0, abs=1e-12)


def test_the_teacher_gets_no_gradient():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    AngularDistillation()(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_float32_inputs_and_bad_shapes():
    s = torch.randn(3, 4, dtype=torch.bfloat16)
    assert angular_distillation(s, s.float()).dtype == torch.float32  # computed in float32 at least
    with pytest.raises(ValueError, match="projection"):
        angular_distillation(torch.randn(3, 4), torch.randn(3, 8))
    with pytest.raises(ValueError, match="lam"):
        AngularDistillation(-1.0)
