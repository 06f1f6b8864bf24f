"""LARS against its formula on a toy problem, linear LR scaling, and the multi-step schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from faceforge.train.config import OptimConfig, ScheduleConfig
from faceforge.train.lars import LARS
from faceforge.train.optim import build_optimizer, build_scheduler, linear_scaled_lr


def toy_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 two-layer regression: weights (2-d) are adapted, BN and biases (1-d) are not."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).double()
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    y = torch.randn(16, 2, generator=g, dtype=torch.float64)
    return model, x, y


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).square().mean()


@pytest.mark.parametrize(("momentum", "weight_decay", "eta"), [(0.9, 5e-4, 0.001), (0.0, 0.1, 0.02)])
def test_lars_matches_the_written_update(momentum, weight_decay, eta):
    lr, steps = 0.5, 4
    model, x, y = toy_problem()
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    velocity = {n: torch.zeros_like(p) for n, p in expected.items()}
    ref = toy_problem()[0]
    optimizer = LARS(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=eta)
    for _ in range(steps):
        # the formula, parameter by parameter, on a copy of the model holding the expected weights
        ref.load_state_dict({**ref.state_dict(), **expected})
        ref.zero_grad()
        loss_of(ref, x, y).backward()
        for n, p in ref.named_parameters():
            w, g = expected[n], p.grad
            if w.ndim > 1:  # You et al.: local_lr = eta ||w|| / (||g|| + beta ||w||); v = m v + local_lr (g + beta w)
                local_lr = eta * w.norm() / (g.norm() + weight_decay * w.norm() + 1e-8)
                velocity[n] = momentum * velocity[n] + local_lr * (g + weight_decay * w)
            else:  # BN and bias: excluded, plain momentum SGD without decay
                velocity[n] = momentum * velocity[n] + g
            expected[n] = w - lr * velocity[n]
        optimizer.zero_grad()
        loss_of(model, x, y).backward()
        optimizer.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-12, atol=1e-14, msg=n)
    # the comparison has teeth: every parameter moved
    start = dict(toy_problem()[0].named_parameters())
    assert all((p - start[n]).abs().max() > 1e-6 for n, p in model.named_parameters())


def test_lars_trust_ratio_is_one_for_zero_weights_and_lars_decreases_the_loss():
    w = nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))
    w.grad = torch.ones(3, 3, dtype=torch.float64)
    LARS([w], lr=0.1, momentum=0.0, trust_coefficient=0.001).step()
    torch.testing.assert_close(w.detach(), torch.full((3, 3), -0.1, dtype=torch.float64))  # ||w|| = 0: ratio 1
    model, x, y = toy_problem()
    optimizer = build_optimizer(OptimConfig(name="lars", lr=2.0, trust_coefficient=0.02, weight_decay=0.0), model, nn.Identity())
    assert isinstance(optimizer, LARS)
    with torch.no_grad():
        first = loss_of(model, x, y).item()
    for _ in range(30):
        optimizer.zero_grad()
        loss_of(model, x, y).backward()
        optimizer.step()
    assert loss_of(model, x, y).item() < 0.8 * first
    with pytest.raises(ValueError, match="trust_coefficient"):
        LARS([w], lr=0.1, trust_coefficient=0.0)


def test_linear_lr_scaling_from_a_reference_batch():
    assert linear_scaled_lr(0.01, 256 * 64, 256) == pytest.approx(0.64)
    assert linear_scaled_lr(0.1, 512, None) == 0.1
    cfg = OptimConfig(lr=0.1, head_lr=0.4, reference_batch=256)
    optimizer = build_optimizer(cfg, nn.Linear(2, 2), nn.Linear(2, 2, bias=False), global_batch=64)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.025, 0.1])
    with pytest.raises(ValueError, match="global batch"):
        build_optimizer(cfg, nn.Linear(2, 2), nn.Linear(2, 2))


def test_step_schedule_is_torch_multistep_after_warmup():
    # BigFace's multi-step LR: lr x gamma at each milestone; after warm-up it equals torch's MultiStepLR.
    milestones, gamma, warmup, total, base = [7, 12, 16], 0.1, 3, 20, 0.4
    model = nn.Linear(2, 2)
    ours = build_optimizer(OptimConfig(lr=base, momentum=0.0), model, nn.Identity())
    sched = build_scheduler(ScheduleConfig(name="step", warmup_steps=warmup, milestones=milestones, gamma=gamma), ours, total)
    theirs = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=base)
    multistep = torch.optim.lr_scheduler.MultiStepLR(theirs, milestones=milestones, gamma=gamma)
    for t in range(total):
        lr = ours.param_groups[0]["lr"]
        if t < warmup:
            assert lr == pytest.approx(base * (t + 1) / warmup)
        else:
            assert lr == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-12)
            assert lr == pytest.approx(base * gamma ** sum(t >= m for m in milestones), rel=1e-12)
        ours.step(), sched.step(), theirs.step(), multistep.step()
    assert math.isclose(ours.param_groups[0]["lr"], base * gamma**3, rel_tol=1e-12)
