"""The gradient step (faceforge.train.step) and the row-sharded optimiser state declaration
(faceforge.train.checkpointing.row_sharded_state), checked in float64 against formulas written here.

The model: a "backbone" A (2 x 3) and class rows W (5 x 2); for images x_i (3,) and labels y_i the loss is
L = mean_i (s_i - 1)^2 with s_i = W[y_i] . (A x_i). Its gradients, written out:
dL/dW[c] = sum_{i: y_i = c} 2 (s_i - 1) A x_i / B,   dL/dA = sum_i 2 (s_i - 1) W[y_i] x_i^T / B.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from faceforge.data.samplers import Batch
from faceforge.heads.base import RowShard, TrainHooks
from faceforge.train.checkpointing import Checkpointer, row_sharded_state
from faceforge.train.step import (
    GradientStep,
    NonFiniteLossError,
    TrainedParameters,
    amp_dtype,
    split_parameters,
    use_zero,
)

CPU = torch.device("cpu")


class Rows(nn.Module, TrainHooks):
    """Class rows W (C, D), all of them this process's rows of a logical (total, D) tensor."""

    def __init__(self, weight: Tensor, total: int | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.total = total or weight.shape[0]

    def row_shards(self) -> dict[str, RowShard]:
        return {"weight": RowShard(0, self.weight.shape[0], self.total)}


def make_data(n: int = 8) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, generator=g, dtype=torch.float64)
    w = torch.randn(5, 2, generator=g, dtype=torch.float64)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 3, 4, 0, 2, 1][:n])
    return a, w, x, y


def batch(x: Tensor, y: Tensor) -> Batch:
    return Batch(images=x, labels=y, sample_ids=torch.arange(len(y)), flipped=torch.zeros(len(y), dtype=torch.bool))


def formula_grads(a: Tensor, w: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, float]:
    """(dL/dA, dL/dW, L) by the module docstring's formulas, float64."""
    gA, gW, loss, B = torch.zeros_like(a), torch.zeros_like(w), 0.0, len(y)
    for i in range(B):
        ax = a @ x[i]
        s = float(w[y[i]] @ ax)
        loss += (s - 1.0) ** 2 / B
        gW[y[i]] += 2 * (s - 1.0) * ax / B
        gA += 2 * (s - 1.0) * torch.outer(w[y[i]], x[i]) / B
    return gA, gW, loss


def make_step(a: Tensor, w: Tensor, *, accum: int = 1, clip: float = 0.0, sparse: bool = False, lr: float = 1.0,
              momentum: float = 0.0, objective: Any = None, steps_per_epoch: int = 100
              ) -> tuple[GradientStep, nn.Parameter, Rows]:
    A = nn.Parameter(a.clone())
    rows = Rows(w)

    def loss(b: Batch) -> dict[str, Tensor]:
        wy = nn.functional.embedding(b.labels, rows.weight, sparse=sparse)
        return {"loss": ((b.images @ A.T) * wy).sum(1).sub(1.0).square().mean()}

    optimizer = torch.optim.SGD([A, rows.weight], lr=lr, momentum=momentum)
    step = GradientStep(
        objective=objective or loss, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        params=TrainedParameters(replicated=[A], head_replicated=[], sharded=[rows.weight]), hooks=[rows],
        grad_accum=accum, clip_grad_norm=clip, device=CPU, world_size=1, steps_per_epoch=steps_per_epoch,
    )
    return step, A, rows


def test_two_micro_batches_equal_one_big_batch_float64() -> None:
    a, w, x, y = make_data(8)
    big, A1, W1 = make_step(a, w, accum=1, lr=0.1, momentum=0.9)
    out1 = big(iter([batch(x, y)]), 1)
    acc, A2, W2 = make_step(a, w, accum=2, lr=0.1, momentum=0.9)
    out2 = acc(iter([batch(x[:4], y[:4]), batch(x[4:], y[4:])]), 1)
    # the mean of two equal halves' means is the mean: equal up to a few float64 roundings (|values| ~ 1..10)
    torch.testing.assert_close(A2.detach(), A1.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(W2.weight.detach(), W1.weight.detach(), rtol=1e-12, atol=1e-12)
    gA, gW, loss = formula_grads(a, w, x, y)
    torch.testing.assert_close(A1.detach(), a - 0.1 * gA, rtol=1e-12, atol=1e-12)  # first step: momentum = grad
    torch.testing.assert_close(W1.weight.detach(), w - 0.1 * gW, rtol=1e-12, atol=1e-12)
    # the logged loss goes through float32 (one all-reduce of float32 values): one float32 rounding, 2^-24 relative
    assert out1.loss == pytest.approx(loss, rel=1e-6) and out2.loss == pytest.approx(loss, rel=1e-6)
    # with row-sharded parts the norm is summed in float32 (as the trainer always has): a few roundings of 2^-24
    assert math.sqrt(float(gA.square().sum() + gW.square().sum())) == pytest.approx(out1.grad_norm, rel=1e-6)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "row-sparse"])
def test_clipping_uses_the_global_norm_including_row_sharded_parts(sparse: bool) -> None:
    a, w, x, y = make_data(8)
    clip = 0.01
    step, A, rows = make_step(a, w, clip=clip, sparse=sparse)
    out = step(iter([batch(x, y)]), 1)
    gA, gW, _ = formula_grads(a, w, x, y)
    total = math.sqrt(float(gA.square().sum() + gW.square().sum()))  # replicated and row-sharded together
    factor = clip / (total + 1e-6)
    assert factor < 0.5  # the clip acts; without the rows' part of the norm the factor would differ
    # the norm is summed in float32 when row-sharded parts exist (the trainer's rule): relative error a few 2^-24,
    # and the clip factor carries it into the update: |factor * g| <= clip, so 1e-6 * clip absolute at most
    assert out.grad_norm == pytest.approx(total, rel=1e-6)
    torch.testing.assert_close(A.detach(), a - factor * gA, rtol=0, atol=1e-6 * clip)
    torch.testing.assert_close(rows.weight.detach(), w - factor * gW, rtol=0, atol=1e-6 * clip)


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: Tensor) -> Tensor:
        return v.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return torch.full_like(grad, math.inf)


def test_non_finite_gradient_stops_naming_the_step_without_updating() -> None:
    a, w, x, y = make_data(8)
    holder: dict[str, Any] = {}

    def inf_grad(b: Batch) -> dict[str, Tensor]:
        return {"loss": _InfGrad.apply(holder["A"]).sum() * 0.0 + 1.0}

    step, A, rows = make_step(a, w, objective=inf_grad)
    holder["A"] = A
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm (inf|nan) at step 7 \(epoch 0, "
                                                 r"micro-batch 1 of 1\).*last good checkpoint: none written"):
        step(iter([batch(x, y)]), 7)
    assert torch.equal(A.detach(), a) and torch.equal(rows.weight.detach(), w)


def test_non_finite_loss_term_names_term_step_epoch_and_micro_batch() -> None:
    a, w, x, y = make_data(8)
    holder: dict[str, Any] = {}

    def terms(b: Batch) -> dict[str, Tensor]:
        first = b.sample_ids[0] == 0  # the second micro-batch's term is NaN
        return {"fit": holder["A"].sum(), "extra": holder["A"].sum() * (0.0 if first else math.nan)}

    step, A, rows = make_step(a, w, accum=2, objective=terms, steps_per_epoch=2)
    holder["A"] = A
    second = Batch(images=x[4:], labels=y[4:], sample_ids=torch.arange(4, 8), flipped=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(NonFiniteLossError,
                       match=r"non-finite loss term 'extra' nan at step 3 \(epoch 1, micro-batch 2 of 2\)"):
        step(iter([batch(x[:4], y[:4]), second]), 3)
    assert torch.equal(A.detach(), a)


def test_split_parameters_follows_the_row_shards_declaration() -> None:
    a, w, _, _ = make_data()
    backbone, rows, learned = nn.Linear(3, 2), Rows(w), nn.Linear(1, 1)
    params = split_parameters(backbone, rows, learned, [rows])
    assert [id(p) for p in params.sharded] == [id(rows.weight)]
    assert {id(p) for p in params.replicated} == {id(p) for p in (*backbone.parameters(), *learned.parameters())}
    assert {id(p) for p in params.head_replicated} == {id(p) for p in learned.parameters()}


def test_zero_refused_with_row_sharded_parameters_and_off_in_one_process() -> None:
    w = nn.Parameter(torch.zeros(4, 2))
    assert use_zero(True, 1, [w], "arcface") is False
    assert use_zero(True, 2, [], "arcface") is True
    with pytest.raises(ValueError, match=r"^train.zero = true: head 'arcface' keeps per-rank parameter shards"):
        use_zero(True, 2, [w], "arcface")


def test_amp_is_float32_off_cuda() -> None:
    assert amp_dtype(True, "bfloat16", CPU) is None
    assert amp_dtype("auto", "float16", CPU) is None
    assert amp_dtype(False, "float16", torch.device("cuda")) is None
    assert amp_dtype("auto", "float16", torch.device("cuda")) is torch.float16


# --- which optimiser state a checkpoint writes as rows: declared by the part that owns the rows -------------


def _checkpointer(optimizer: torch.optim.Optimizer, hooks: dict[str, Any]) -> Checkpointer:
    return Checkpointer(SimpleNamespace(output=Path("."), optimizer=optimizer, hooks=hooks))  # type: ignore[arg-type]


def test_row_sharded_optimiser_state_is_the_declared_parameters_state() -> None:
    _, w, x, y = make_data()
    rows = Rows(w, total=9)
    other = nn.Parameter(torch.zeros(5, 2, dtype=torch.float64))  # as many rows as W, but not declared
    optimizer = torch.optim.SGD([rows.weight, other], lr=0.1, momentum=0.9)
    (rows.weight.sum() + other.sum()).backward()
    optimizer.step()
    entries = _checkpointer(optimizer, {"head": rows})._row_shard_entries()
    assert set(entries) == {("head", "weight"), ("optimizer", "state", 0, "momentum_buffer")}
    assert entries[("optimizer", "state", 0, "momentum_buffer")][1] == RowShard(0, 5, 9)
    rows_of = _checkpointer(optimizer, {"head": rows}).shard_rows()
    assert rows_of("optimizer.state.0.momentum_buffer") == (0, 5) and rows_of("optimizer.state.1.momentum_buffer") is None


def test_declared_parameter_state_that_is_not_one_row_per_row_is_refused() -> None:
    """The old rule took an entry as rows when its first dimension happened to equal the row count and otherwise
    wrote rank 0's copy as if replicated (a wrong resume on other ranks); now it is refused, naming it."""
    _, w, _, _ = make_data()
    rows = Rows(w)
    optimizer = torch.optim.SGD([rows.weight], lr=0.1, momentum=0.9)
    rows.weight.sum().backward()
    optimizer.step()
    optimizer.state[rows.weight]["step"] = torch.tensor(3.0)  # a scalar: the same on every rank, not rows
    assert set(row_sharded_state(optimizer, rows.weight, RowShard(0, 5, 5), "head.weight")) == {"momentum_buffer"}
    optimizer.state[rows.weight]["per_column"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"optimiser state 'per_column' of row-sharded head.weight \(5, 2\)"):
        _checkpointer(optimizer, {"head": rows})._row_shard_entries()
