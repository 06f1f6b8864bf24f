"""faceforge.train: resume after kill -9, DDP / accumulation equivalence, NaN stop, schedules,
optimiser groups, checkpoint files, logs.

Runs are tiny (64 synthetic 32x32 images, TinyNet, 10 steps) and use one thread everywhere, so that
float sums happen in the same order: the same config on CPU must give the same bits whether it ran
straight through or was killed and resumed. The runs that must be separate processes (SIGKILL, 2 gloo ranks)
go through ``tests/_train_worker.py``; the reference runs are in-process.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

import _train_worker
from faceforge.heads.base import ClassifierHead
from faceforge.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from faceforge.train.config import Config, OptimConfig, ScheduleConfig, config_from_dict, load_config, to_yaml
from faceforge.train.engine import NonFiniteLossError, TrainResult, train
from faceforge.train.optim import build_optimizer, build_scheduler, lr_at

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(_train_worker.__file__).resolve()

STEPS = 10  # 64 images / 16 per step = 4 steps per epoch: the runs cross two epoch boundaries
CHECKPOINT_EVERY = 3  # checkpoints at steps 3, 6, 9 and 10

BASE: dict[str, Any] = {
    "seed": 0,
    "output": "unset",
    "model": {"backbone": "_train_worker:TinyNet", "embedding_size": 16, "kwargs": {"dropout": 0.2}},
    "head": {"name": "arcface", "kwargs": {"s": 16.0}},
    "data": {
        "num_identities": 8, "images_per_identity": 8, "image_size": 32, "batch_size": 16,
        "cache": True, "eval_pairs": 0,
    },
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    "schedule": {"name": "poly", "warmup_steps": 2},
    "train": {
        "steps": STEPS, "clip_grad_norm": 5.0, "log_every": 1, "checkpoint_every": CHECKPOINT_EVERY,
        "keep_checkpoints": 10, "progress": False,
    },
}


# ----------------------------------------------------------------------------------------------
# Helpers


# Where 1 x B, 2 ranks x B/2 and grad_accum 2 x B/2 must agree: no dropout (each rank and micro-batch
# draws its own mask), no clipping (it would hide a gradient off by a constant factor), and float64 weights,
# embeddings and logits: the three runs sum the same numbers in another order (all-reduce, two micro-batches),
# which costs ~1e-4 relative after 10 float32 steps, depending on the CPU kernel, but ~1e-13 in float64.
PLAIN: dict[str, dict[str, Any]] = {
    "model": {"kwargs": {"dropout": 0.0, "dtype": "float64"}},
    "head": {"name": "_train_worker:float64_head", "kwargs": {"inner": "arcface", "s": 16.0}},
    "train": {"clip_grad_norm": 0.0},
}


def make_config(output: Path, *overrides: dict[str, dict[str, Any]], **sections: dict[str, Any]) -> Config:
    """BASE with ``output``, then each override's and ``sections``' keys replaced (``train={"steps": 4}``)."""
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["output"] = str(output)
    for override in (*overrides, sections):
        for section, values in override.items():
            data[section].update(values)
    return config_from_dict(data, "<test>")


def write_config(cfg_dir: Path, output: Path, *overrides: dict[str, dict[str, Any]], **sections: dict[str, Any]) -> Path:
    """The YAML file of :func:`make_config` (for the worker's command line)."""
    path = cfg_dir / f"{output.name}.yaml"
    path.write_text(to_yaml(make_config(output, *overrides, **sections)))
    return path




def run_worker(*args: str, expect_kill: bool = False, timeout: float = 180.0) -> subprocess.CompletedProcess:
    """``python tests/_train_worker.py ARGS``; asserts a clean exit, or death by SIGKILL with expect_kill."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, str(WORKER), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    expected = -signal.SIGKILL if expect_kill else 0
    assert proc.returncode == expected, (
        f"worker exit {proc.returncode}, expected {expected}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    )
    return proc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_state(actual: Any, expected: Any, where: str = "state", rel: float = 0.0, floor: float = 0.0) -> None:
    """Recursively compare checkpoint contents: tensors bit for bit, or with ``rel`` > 0 within
    ``rtol = rel`` and ``atol = rel * max(max|expected|, floor)`` (float32 sums in another order; ``floor``: the
    scale below which a tensor is rounding noise, e.g. a bias whose true gradient is 0); the rest ==."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: {type(actual).__name__}, expected a tensor"
        if rel > 0 and expected.is_floating_point():
            atol = rel * max(expected.abs().max().item(), floor)
            torch.testing.assert_close(actual, expected, rtol=rel, atol=atol, msg=lambda m: f"{where}: {m}")
        else:
            assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
            assert torch.equal(actual, expected), f"{where}: tensors differ"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), f"{where}: keys {set(actual)} != {set(expected)}"
        for key in expected:
            assert_same_state(actual[key], expected[key], f"{where}.{key}", rel, floor)
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_state(a, e, f"{where}[{i}]", rel, floor)
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


TRAINED = ("step", "epoch", "batch", "steps_per_epoch", "backbone", "head", "optimizer", "scheduler", "scaler", "rng")


def assert_same_training(actual: Path, expected: Path) -> None:
    """Two checkpoints hold the same training state bit for bit (the config's output path may differ)."""
    a, e = load_checkpoint(actual), load_checkpoint(expected)
    for key in TRAINED:
        assert_same_state(a[key], e[key], key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, TrainResult]:
    """The uninterrupted one-process run of BASE (batch 16, grad_accum 1, dropout, clipping)."""
    cfg = make_config(tmp_path_factory.mktemp("reference") / "run")
    result = train(cfg)
    assert result.step == STEPS and result.checkpoint.is_file()
    return cfg, result


@pytest.fixture(scope="module")
def plain_reference(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """The one-process run of BASE + PLAIN (batch 16, grad_accum 1)."""
    result = train(make_config(tmp_path_factory.mktemp("plain_reference") / "run", PLAIN))
    assert result.step == STEPS
    return result


def logged_losses(log: Path) -> list[float]:
    """The ``loss`` of each ``step N/M`` line of a train.log (log_every 1), in order."""
    return [float(m) for m in re.findall(r" step \d+/\d+ epoch \d+ loss (\S+) ", log.read_text())]


# ----------------------------------------------------------------------------------------------
# 1. Resume after kill -9


@pytest.mark.equivalence
def test_kill_after_step_then_resume_is_bit_identical(reference, tmp_path: Path) -> None:
    _, ref = reference
    kill_at = 5  # not a checkpoint boundary: the last checkpoint is step 3, steps 4-5 are lost
    output = tmp_path / "killed"
    config = write_config(tmp_path, output)
    run_worker(str(config), "--kill-at-step", str(kill_at), expect_kill=True)

    saved = load_checkpoint(output / "last.pt")
    assert saved["step"] == 3
    assert_same_training(output / "last.pt", ref.output / "step_0000003.pt")

    resumed = train(load_config(config), resume=True)
    assert resumed.step == STEPS
    assert len(resumed.losses) == STEPS - 3  # steps 4..10 only: nothing re-read, nothing skipped
    torch.testing.assert_close(resumed.losses, ref.losses[3:], rtol=0, atol=0)
    assert_same_training(output / "last.pt", ref.checkpoint)
    assert "resumed from" in (output / "train.log").read_text()


@pytest.mark.equivalence
def test_kill_inside_checkpoint_write_keeps_previous_checkpoint(reference, tmp_path: Path) -> None:
    _, ref = reference
    output = tmp_path / "killed_in_save"
    config = write_config(tmp_path, output)
    run_worker(str(config), "--kill-in-save", "2", expect_kill=True)  # the write of step 6 dies before os.replace

    stale = list(output.glob(".last.pt.tmp-*"))
    assert len(stale) == 1 and stale[0].stat().st_size > 0  # the complete temp file never replaced last.pt
    saved = load_checkpoint(output / "last.pt")
    assert saved["step"] == 3
    assert_same_training(output / "last.pt", ref.output / "step_0000003.pt")
    assert not (output / "step_0000006.pt").exists()

    resumed = train(load_config(config), resume=True)
    assert resumed.step == STEPS
    assert_same_training(output / "last.pt", ref.checkpoint)
    assert not list(output.glob(".last.pt.tmp-*"))  # the resumed run removed the stale temp file


# ----------------------------------------------------------------------------------------------
# 2. Equivalent batches: 2 gloo ranks x B/2, grad_accum 2 x B/2, 1 x B


FLOAT64_REL = 1e-9  # derived in assert_close_training


def _tensors(state: Any) -> list[torch.Tensor]:
    """Every tensor in a nested checkpoint part (dicts, lists)."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []


def assert_close_training(actual: Path, expected: Path) -> None:
    a, e = load_checkpoint(actual), load_checkpoint(expected)
    assert a["step"] == e["step"] == STEPS
    assert a["steps_per_epoch"] == e["steps_per_epoch"]
    # Only the order of float64 sums differs. A reordered sum of n terms is off by at most ~n * eps * sum|terms|
    # (eps = 1.1e-16); in float32 (eps = 6e-8) these runs differed by up to 6.7e-5 relative, an amplification of
    # ~1e3 eps over 10 steps of lr 0.1 and momentum 0.9. The same amplification in float64 is ~1e-13 (measured,
    # benchmarks/equivalence_drift.py: up to 1.3e-14 under ATEN_CPU_CAPABILITY=default and avx2), so
    # rel = 1e-9 keeps 4 orders of margin on any CPU kernel, while a wrong gradient (a factor 2 from a missed
    # all-reduce average or accumulation mean) moves the weights by > 1e-3 (asserted in the DDP test).
    for key in ("backbone", "head", "optimizer"):
        assert a[key] and all(v.dtype == torch.float64 for v in _tensors(a[key]) if v.is_floating_point()), key
        assert_same_state(a[key], e[key], key, rel=FLOAT64_REL)


@pytest.mark.equivalence
def test_two_gloo_ranks_equal_one_process_with_double_batch(plain_reference, tmp_path: Path) -> None:
    ref = plain_reference
    output = tmp_path / "ddp"
    config = write_config(tmp_path, output, PLAIN, data={"batch_size": 8})
    run_worker(str(config), "--nprocs", "2", "--port", str(free_port()))
    state = load_checkpoint(output / "last.pt")
    assert state["world_size"] == 2
    assert_close_training(output / "last.pt", ref.checkpoint)
    assert logged_losses(output / "train.log") == pytest.approx(ref.losses, abs=2e-5)  # "%.5f", averaged over ranks
    # The comparison has teeth: training moved the weights well beyond the tolerance.
    early = load_checkpoint(ref.output / "step_0000003.pt")["backbone"]["fc.weight"]
    assert (state["backbone"]["fc.weight"] - early).abs().max() > 1e-3


@pytest.mark.equivalence
def test_grad_accum_equals_one_double_batch(plain_reference, tmp_path: Path) -> None:
    ref = plain_reference
    cfg = make_config(tmp_path / "accum", PLAIN, data={"batch_size": 8}, train={"grad_accum": 2})
    result = train(cfg)
    assert result.step == STEPS
    # The float64 losses are logged as float32 (engine._loss_value): at most one float32 rounding step apart.
    torch.testing.assert_close(result.losses, ref.losses, rtol=2 * 2**-23, atol=0)
    assert_close_training(result.checkpoint, ref.checkpoint)


def test_clip_grad_norm_bounds_the_update(tmp_path: Path) -> None:
    # Plain SGD (no momentum, no decay, lr 1): the first update is -grad, clipped to norm `clip`.
    clip = 1e-3
    plain_sgd = {"momentum": 0.0, "weight_decay": 0.0}
    flat = {"name": "constant", "warmup_steps": 0}
    initial = train(make_config(tmp_path / "lr0", optim={"lr": 0.0, **plain_sgd}, schedule=flat, train={"steps": 1}))
    clipped = train(make_config(
        tmp_path / "clipped", optim={"lr": 1.0, **plain_sgd}, schedule=flat, train={"steps": 1, "clip_grad_norm": clip}
    ))
    before, after = load_checkpoint(initial.checkpoint), load_checkpoint(clipped.checkpoint)
    deltas = [after[part][k] - before[part][k] for part in ("backbone", "head") for k in before[part]]
    update = torch.linalg.vector_norm(torch.cat([d.flatten() for d in deltas]))
    assert update.item() == pytest.approx(clip, rel=1e-4)
    assert clipped.losses == initial.losses  # the same first batch


# ----------------------------------------------------------------------------------------------
# 3. NaN / inf


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, grad_accum: int) -> None:
    # NaNHead turns NaN at call 5 (step 5) with grad_accum 1, call 10 (step 5, micro-batch 2) with 2.
    calls = 5 if grad_accum == 1 else 10
    cfg = make_config(
        tmp_path / "nan",
        head={"name": "_train_worker:NaNHead", "kwargs": {"s": 16.0, "nan_at_call": calls}},
        data={"batch_size": 16 // grad_accum},
        train={"checkpoint_every": 2, "grad_accum": grad_accum},
    )
    with pytest.raises(NonFiniteLossError, match=r"at step 5\b") as info:
        train(cfg)
    message = str(info.value)
    assert f"micro-batch {grad_accum} of {grad_accum}" in message
    assert "step 4" in message and "last.pt" in message  # names the last good checkpoint

    output = Path(cfg.output)
    state = load_checkpoint(output / "last.pt")
    assert state["step"] == 4
    assert not (output / "step_0000005.pt").exists()
    assert sorted(p.name for p in output.glob("step_*.pt")) == ["step_0000002.pt", "step_0000004.pt"]
    assert not list(output.glob(".last.pt.tmp-*"))
    for part in ("backbone", "head"):
        for name, tensor in state[part].items():
            assert torch.isfinite(tensor).all(), f"{part}.{name} is not finite in the last good checkpoint"
    torch.load(output / "last.pt", weights_only=True)
    assert "non-finite loss nan at step 5" in (output / "train.log").read_text()


class _InfGrad(torch.autograd.Function):
    """Identity forward (a finite value), inf gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, math.inf)


class InfGradHead(nn.Module, ClassifierHead):
    """A finite loss (1.0) whose gradient for ``weight`` is inf; the backbone's gradient is 0."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def per_sample_loss(self, embeddings: torch.Tensor, labels: torch.Tensor, *, classifier_grad: bool = True):
        return (_InfGrad.apply(self.weight) + 0.0 * embeddings.mean()).expand(embeddings.shape[0])

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _InfGrad.apply(self.weight) + 0.0 * embeddings.mean()


def test_non_finite_gradient_norm_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from faceforge.train import parts

    monkeypatch.setattr(parts, "build_head", lambda cfg, num_classes, **facts: InfGradHead())
    cfg = make_config(tmp_path / "infgrad")
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm inf at step 1\b"):
        train(cfg)
    assert not (Path(cfg.output) / "last.pt").exists()


# ----------------------------------------------------------------------------------------------
# 4. Schedules


def written_lr(name: str, t: int, base: float, total: int, warmup: int, min_lr: float,
               power: float = 1.0, milestones: tuple[int, ...] = (), gamma: float = 0.1) -> float:
    """The schedules as written in the docs: linear warm-up to base, then a decay to min_lr."""
    if t < warmup:
        return base * (t + 1) / warmup
    p = (t - warmup) / (total - warmup)
    if name == "poly":
        return min_lr + (base - min_lr) * (1 - p) ** power
    if name == "cosine":
        return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * p))
    if name == "step":
        return min_lr + (base - min_lr) * gamma ** sum(t >= m for m in milestones)
    raise ValueError(name)


SCHEDULES = [
    ScheduleConfig(name="poly", warmup_steps=3, power=2.0, min_lr=0.001),
    ScheduleConfig(name="poly", warmup_steps=0, power=1.0),
    ScheduleConfig(name="cosine", warmup_steps=4, min_lr=0.002),
    ScheduleConfig(name="step", warmup_steps=2, milestones=[12, 5], gamma=0.5),
]


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: f"{s.name}-w{s.warmup_steps}")
def test_lr_at_matches_the_formulas(sched: ScheduleConfig) -> None:
    base, total = 0.2, 20
    expected = [
        written_lr(sched.name, t, base, total, sched.warmup_steps, sched.min_lr, sched.power,
                   tuple(sched.milestones), sched.gamma)
        for t in range(total)
    ]
    actual = [lr_at(sched, t, base, total, sched.warmup_steps) for t in range(total)]
    assert actual == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if sched.warmup_steps:
        assert actual[sched.warmup_steps - 1] == pytest.approx(base)  # warm-up ends at base_lr
        assert actual[0] == pytest.approx(base / sched.warmup_steps)


def test_step_schedule_values() -> None:
    sched = ScheduleConfig(name="step", milestones=[3, 6], gamma=0.1)
    lrs = [lr_at(sched, t, 1.0, 10, 0) for t in range(10)]
    assert lrs == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01])


def test_warmup_epochs_convert_to_steps() -> None:
    backbone, head = nn.Linear(2, 2), nn.Linear(2, 2, bias=False)
    optimizer = build_optimizer(OptimConfig(lr=1.0, momentum=0.0), backbone, head)
    scheduler = build_scheduler(ScheduleConfig(name="constant", warmup_epochs=0.5), optimizer, 100, steps_per_epoch=8)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])  # round(0.5 * 8) = 4 warm-up steps


def test_scheduler_drives_every_group_and_resumes_from_state_dict() -> None:
    sched = ScheduleConfig(name="cosine", warmup_steps=3, min_lr=0.0)
    total = 12

    def build() -> tuple[torch.optim.Optimizer, Any]:
        torch.manual_seed(0)
        backbone, head = nn.Linear(4, 3), nn.Linear(3, 5, bias=False)
        optimizer = build_optimizer(OptimConfig(lr=0.1, head_lr=0.4, momentum=0.9), backbone, head)
        return optimizer, build_scheduler(sched, optimizer, total)

    optimizer, scheduler = build()
    straight = []
    for t in range(total):
        straight.append([g["lr"] for g in optimizer.param_groups])
        assert straight[-1] == pytest.approx([lr_at(sched, t, 0.1, total, 3), lr_at(sched, t, 0.4, total, 3)])
        optimizer.step()
        scheduler.step()

    optimizer, scheduler = build()
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    saved_opt, saved_sched = optimizer.state_dict(), scheduler.state_dict()
    assert saved_sched["last_epoch"] == 5
    optimizer, scheduler = build()  # a fresh process: new optimiser and schedule, then the saved state
    optimizer.load_state_dict(saved_opt)
    scheduler.load_state_dict(saved_sched)
    resumed = []
    for _ in range(5, total):
        resumed.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert resumed == straight[5:]  # exactly, not approximately


def test_scheduler_rejects_bad_arguments() -> None:
    optimizer = build_optimizer(OptimConfig(), nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(ScheduleConfig(), optimizer, 0)


# ----------------------------------------------------------------------------------------------
# 5. Optimiser param groups


def _ids(params: list[torch.Tensor]) -> set[int]:
    return {id(p) for p in params}


def test_head_parameters_get_their_own_group() -> None:
    backbone, head = _train_worker.TinyNet(16, 32), nn.Linear(16, 10, bias=False)
    cfg = OptimConfig(name="sgd", lr=0.1, weight_decay=5e-4, head_lr=0.03, head_weight_decay=1e-3, momentum=0.8)
    optimizer = build_optimizer(cfg, backbone, head)
    assert isinstance(optimizer, torch.optim.SGD)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["backbone", "head"]
    assert _ids(groups["head"]["params"]) == _ids(list(head.parameters()))
    assert _ids(groups["backbone"]["params"]) == _ids(list(backbone.parameters()))
    assert (groups["head"]["lr"], groups["head"]["weight_decay"]) == (0.03, 1e-3)
    assert (groups["backbone"]["lr"], groups["backbone"]["weight_decay"]) == (0.1, 5e-4)
    assert groups["head"]["momentum"] == 0.8

    same = build_optimizer(OptimConfig(lr=0.1, weight_decay=5e-4), backbone, head)
    assert [(g["lr"], g["weight_decay"]) for g in same.param_groups] == [(0.1, 5e-4), (0.1, 5e-4)]


def test_no_decay_group_and_frozen_parameters() -> None:
    backbone, head = _train_worker.TinyNet(16, 32), nn.Linear(16, 10, bias=False)
    backbone.conv.weight.requires_grad_(False)
    optimizer = build_optimizer(OptimConfig(no_decay_bn_bias=True, weight_decay=1e-2), backbone, head)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["backbone", "backbone_no_decay", "head"]
    assert _ids(groups["backbone"]["params"]) == {id(backbone.fc.weight)}  # conv.weight is frozen
    assert _ids(groups["backbone_no_decay"]["params"]) == _ids([backbone.conv.bias, backbone.act.weight, backbone.fc.bias])
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert groups["backbone"]["weight_decay"] == groups["head"]["weight_decay"] == 1e-2


def test_adamw_builds_and_steps() -> None:
    torch.manual_seed(0)
    backbone, head = nn.Linear(4, 3), nn.Linear(3, 2, bias=False)
    cfg = OptimConfig(name="adamw", lr=1e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.05, head_lr=1e-2)
    optimizer = build_optimizer(cfg, backbone, head)
    assert type(optimizer) is torch.optim.AdamW
    assert [g["name"] for g in optimizer.param_groups] == ["backbone", "head"]
    for group in optimizer.param_groups:
        assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-7 and group["weight_decay"] == 0.05
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-2]
    before = head.weight.detach().clone()
    head(backbone(torch.randn(5, 4))).square().sum().backward()
    optimizer.step()
    assert not torch.equal(head.weight, before)
    assert set(optimizer.state[head.weight]) >= {"exp_avg", "exp_avg_sq"}


def test_unknown_optimizer_and_no_parameters_raise() -> None:
    cfg = OptimConfig()
    cfg.name = "lamb"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="optim.name = 'lamb'"):
        build_optimizer(cfg, nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(OptimConfig(), nn.Identity(), nn.Identity())


# ----------------------------------------------------------------------------------------------
# 6. Checkpoint files


class Pickled:
    """A class instance: torch.load(weights_only=True) must refuse it."""

    def __init__(self) -> None:
        self.value = 1


def test_load_checkpoint_rejects_bad_files(tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path / "good.pt", {"step": 3, "w": torch.arange(1000.0)})
    data = good.read_bytes()
    bad: dict[str, bytes | None] = {
        "missing.pt": None,
        "empty.pt": b"",
        "truncated.pt": data[: len(data) // 2],
        "garbage.pt": bytes(range(256)) * 8,
    }
    for name, content in bad.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value), f"{name}: {info.value}"

    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], not_dict)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(not_dict)

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"obj": Pickled()}, unsafe)
    with pytest.raises(CheckpointError, match="unsafe.pt"):  # weights_only=True refuses pickled classes
        load_checkpoint(unsafe)

    state = load_checkpoint(good)
    assert state["step"] == 3 and torch.equal(state["w"], torch.arange(1000.0))


def test_failed_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "last.pt", {"step": 1, "w": torch.ones(3)})
    with pytest.raises(Exception):
        save_checkpoint(path, {"step": 2, "f": lambda: None})  # cannot be pickled: fails mid-write
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_run_checkpoints_load_with_weights_only(reference) -> None:
    cfg, ref = reference
    state = torch.load(ref.checkpoint, weights_only=True)
    assert state["step"] == STEPS and state["epoch"] == STEPS // 4 and state["world_size"] == 1
    assert config_from_dict(state["config"]) == cfg
    backbone = _train_worker.TinyNet(16, 32)
    backbone.load_state_dict(state["backbone"])  # the saved backbone is a plain state_dict
    assert sorted(p.name for p in ref.output.glob("step_*.pt")) == [
        "step_0000003.pt", "step_0000006.pt", "step_0000009.pt", "step_0000010.pt"
    ]
    assert [load_checkpoint(p)["step"] for p in sorted(ref.output.glob("step_*.pt"))] == [3, 6, 9, 10]


def test_keep_checkpoints_prunes_older(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "keep", train={"steps": 6, "checkpoint_every": 1, "keep_checkpoints": 2})
    train(cfg)
    output = Path(cfg.output)
    assert sorted(p.name for p in output.glob("step_*.pt")) == ["step_0000005.pt", "step_0000006.pt"]
    assert load_checkpoint(output / "step_0000005.pt")["step"] == 5
    assert load_checkpoint(output / "last.pt")["step"] == 6


# ----------------------------------------------------------------------------------------------
# 7. Logs, TensorBoard, config.yaml


def test_log_tensorboard_and_config_yaml(reference) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, ref = reference
    assert ref.log == ref.output / "train.log"
    log = ref.log.read_text()
    for step in range(1, STEPS + 1):
        assert f"step {step}/{STEPS} " in log
    assert f"checkpoint: {ref.checkpoint} (step {STEPS})" in log
    assert f"done: step {STEPS}" in log

    events = list((ref.output / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(events[0]))
    accumulator.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_second"} <= set(accumulator.Tags()["scalars"])
    losses = accumulator.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, STEPS + 1))
    assert [e.value for e in losses] == pytest.approx(ref.losses, rel=1e-6)
    lrs = [e.value for e in accumulator.Scalars("train/lr")]
    assert lrs == pytest.approx([lr_at(cfg.schedule, t, cfg.optim.lr, STEPS, 2) for t in range(STEPS)], rel=1e-6)

    assert load_config(ref.output / "config.yaml") == cfg
