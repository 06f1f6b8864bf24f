"""Tiny training runs shared by the seam and contract tests: 64 synthetic 32x32 images, TinyNet, 4 steps.

Run them on one thread (the ``one_thread`` fixture), so that a resumed run must give the same bits as an
uninterrupted one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from faceforge.core.checkpoint import load_checkpoint
from faceforge.train.config import Config, config_from_dict
from faceforge.train.engine import train

BASE: dict[str, Any] = {
    "seed": 0,
    "output": "unset",
    "model": {"backbone": "_train_worker:TinyNet", "embedding_size": 16, "kwargs": {"dropout": 0.2}},
    "head": {"name": "arcface", "kwargs": {"s": 16.0}},
    "data": {"num_identities": 8, "images_per_identity": 8, "image_size": 32, "batch_size": 16, "cache": True,
             "eval_pairs": 0},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    "train": {"steps": 4, "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 5, "progress": False},
}


def make_config(output: Path, **sections: dict[str, Any]) -> Config:
    """BASE with ``output`` and each section's keys replaced (``train={"steps": 2}``)."""
    return config_from_base(BASE, output, **sections)


def config_from_base(base: dict[str, Any], output: Path, **sections: dict[str, Any]) -> Config:
    """A deep copy of the config dict ``base`` with ``output`` and each section's keys replaced."""
    data = yaml.safe_load(yaml.safe_dump(base))
    data["output"] = str(output)
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data, "<test>")


def assert_same(actual: Any, expected: Any, where: str = "checkpoint") -> None:
    """Tensors bit for bit, containers recursively, the rest ==."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), f"{where}: tensors differ"
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), f"{where}: keys {set(actual)} != {set(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def resumed_equals_straight(tmp_path: Path, steps: int = 4, **sections: dict[str, Any]) -> dict[str, Any]:
    """Train ``steps`` steps straight; resume another folder from the straight run's checkpoint half-way; the
    final checkpoints must be equal bit for bit (except the output folder in the config). Returns the final one."""
    half = steps // 2
    sections = {**sections, "train": {"steps": steps, "checkpoint_every": half, **sections.get("train", {})}}
    straight = train(make_config(tmp_path / "straight", **sections))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(straight.output / f"step_{half:07d}.pt", resumed_dir / "last.pt")
    resumed = train(make_config(resumed_dir, **sections), resume=True)
    assert resumed.losses == straight.losses[half:]
    a, e = load_checkpoint(resumed.checkpoint), load_checkpoint(straight.checkpoint)
    a["config"].pop("output"), e["config"].pop("output")
    assert_same(a, e)
    return e


