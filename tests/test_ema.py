"""Model EMA (``train.ema``, ``faceforge.train.ema``): the average against its float64 formula, evaluated during
training, written to the checkpoint and to ``model.safetensors``, resumed bit for bit, beside a class-sharded head.

Runs are the tiny ones of ``tests/_runs.py`` (64 synthetic 32x32 images, TinyNet, 4 steps), on one thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from _runs import assert_same, make_config, resumed_equals_straight
from faceforge.core.checkpoint import load_checkpoint
from faceforge.train.config import ConfigError
from faceforge.train.ema import ModelEMA, build_ema
from faceforge.train.engine import train

pytestmark = pytest.mark.usefixtures("one_thread")

EMA = {"ema": {"decay": 0.9, "every": 1}}


def model_file(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_the_average_follows_its_formula_every_k_steps() -> None:
    """ema_k = d ema_{k-1} + (1 - d) w_k at the steps divisible by ``every``, in float64; buffers copied."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(net, decay=0.75, every=2)
    ema.start()
    expected = {k: v.double().clone() for k, v in net.named_parameters()}
    for step in range(1, 6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[1].running_mean.add_(1.0)
        ema.after_optimizer_step(step)
        if step % 2 == 0:
            for k, p in net.named_parameters():
                expected[k] = 0.75 * expected[k] + 0.25 * p.double()
    averaged = dict(ema.module.named_parameters())
    for k, v in expected.items():
        # float32 lerp of values of size ~3: a few ulps (1e-7 relative) per update, 2 updates
        torch.testing.assert_close(averaged[k].double(), v, rtol=1e-6, atol=1e-6)
    # the buffers are the backbone's as of the last update (step 4): running_mean moved 4 times, then once more
    assert torch.equal(ema.module[1].running_mean, net[1].running_mean - 1.0)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    ema.train()
    assert not ema.module.training  # the average never trains (no dropout, no masking)


def test_off_by_default_and_its_values_checked(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "run")
    assert cfg.train.ema.decay == 0.0 and build_ema(cfg.train.ema, nn.Linear(2, 2)) is None
    with pytest.raises(ConfigError, match=r"train\.ema\.decay = 1\.0: expected a float in \[0, 1\)"):
        make_config(tmp_path / "run", train={"ema": {"decay": 1.0}})
    with pytest.raises(ConfigError, match=r"train\.ema\.every = 0: expected an int >= 1"):
        make_config(tmp_path / "run", train={"ema": {"decay": 0.5, "every": 0}})
    with pytest.raises(ConfigError, match=r"unknown key train\.ema\.rate"):
        make_config(tmp_path / "run", train={"ema": {"rate": 0.5}})


def test_a_resumed_run_with_ema_is_the_straight_run_bit_for_bit(tmp_path: Path) -> None:
    """Killed at step 2 (its checkpoint), resumed: every tensor of the final checkpoint equal, the average
    included; the model file holds the average, the checkpoint both."""
    final = resumed_equals_straight(tmp_path, train=EMA)
    averaged = final["extra"]["ema"]["backbone"]
    raw = final["backbone"]
    assert set(averaged) == set(raw)
    assert any(not torch.equal(averaged[k], raw[k]) for k in raw if raw[k].is_floating_point())
    for folder in ("straight", "resumed"):
        assert_same(model_file(tmp_path / folder), {k: v.contiguous() for k, v in averaged.items()}, folder)
    log = (tmp_path / "straight" / "train.log").read_text()
    assert "train.ema: decay 0.9 every 1 step(s); evaluations and model.safetensors use the averaged backbone" in log


def test_every_k_steps_resumes_bit_for_bit_too(tmp_path: Path) -> None:
    """every = 3 over 4 steps, killed at 2: the resumed run makes the update of step 3 from the restored average."""
    resumed_equals_straight(tmp_path, train={"ema": {"decay": 0.5, "every": 3}})


def test_without_ema_the_model_file_is_the_raw_backbone(tmp_path: Path) -> None:
    result = train(make_config(tmp_path / "run", train={"steps": 2}))
    state = load_checkpoint(result.checkpoint)
    assert "ema" not in state.get("extra", {})
    assert_same(model_file(result.output), {k: v.contiguous() for k, v in state["backbone"].items()})


class RecordingSet:
    """An evaluation set that records the weights it is given (``faceforge.eval.sets`` protocol)."""

    name = ""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def evaluate(self, backbone: nn.Module, image_size: int, batch_size: int, device: Any) -> dict[str, float]:
        self.seen.append({k: v.detach().clone() for k, v in backbone.state_dict().items()})
        return {"accuracy": 0.5}


def test_the_evaluation_during_training_uses_the_average(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import faceforge.train.evaluation as evaluation

    recorder = RecordingSet()
    monkeypatch.setattr(evaluation, "open_evaluators", lambda cfg: [recorder])
    result = train(make_config(tmp_path / "run", train={"steps": 2, "eval_every": 1, **EMA}))
    assert len(recorder.seen) == 2
    state = load_checkpoint(result.checkpoint)
    assert_same(recorder.seen[-1], state["extra"]["ema"]["backbone"], "evaluated")
    assert not all(torch.equal(recorder.seen[-1][k], v) for k, v in state["backbone"].items())


def test_ema_beside_a_class_sharded_head(tmp_path: Path) -> None:
    """The head's row shards are not averaged (the EMA covers the backbone only); killed at step 2 and resumed
    (its checkpoint and shard files), the run ends bit for bit as the straight one."""
    import shutil

    sections = {"head": {"name": "arcface", "kwargs": {"s": 16.0}, "shard": True}, "train": EMA}
    straight = train(make_config(tmp_path / "straight", **sections))
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(straight.output / "shards", resumed_dir / "shards")
    shutil.copy(straight.output / "step_0000002.pt", resumed_dir / "last.pt")
    resumed = train(make_config(resumed_dir, **sections), resume=True)
    assert resumed.losses == straight.losses[2:]
    a, e = load_checkpoint(resumed.checkpoint), load_checkpoint(straight.checkpoint)
    assert_same(a["extra"], e["extra"], "extra")
    assert_same(a["backbone"], e["backbone"], "backbone")
    assert set(e["extra"]["ema"]) == {"backbone", "decay", "every"}
    assert set(e["extra"]["ema"]["backbone"]) == set(e["backbone"])


def test_ema_turned_on_at_a_resume_starts_from_the_resumed_weights(tmp_path: Path) -> None:
    import shutil

    straight = train(make_config(tmp_path / "straight", train={"steps": 2, "checkpoint_every": 2}))
    (tmp_path / "resumed").mkdir()
    shutil.copy(straight.checkpoint, tmp_path / "resumed" / "last.pt")
    resumed = train(make_config(tmp_path / "resumed", train={"steps": 3, "ema": {"decay": 0.5}}), resume=True)
    start, end = load_checkpoint(straight.checkpoint)["backbone"], load_checkpoint(resumed.checkpoint)
    for k, v in end["extra"]["ema"]["backbone"].items():
        if k.endswith(("weight", "bias")) and v.is_floating_point():
            # one update from the resumed weights: 0.5 start + 0.5 step-3 weights, in float32 (lerp: 1 rounding)
            torch.testing.assert_close(v, 0.5 * start[k] + 0.5 * end["backbone"][k], rtol=1e-6, atol=1e-7)
