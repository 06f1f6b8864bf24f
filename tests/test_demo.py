"""The demo pipeline in a tiny size, and the `faceforge` command line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from faceforge.cli import build_parser, main
from faceforge.data.pairs import write_bin
from faceforge.data.synthetic import synthetic_pairs
from faceforge.cli.demo import load_demo_config, run_demo
from faceforge.train.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_tiny_demo_trains_evaluates_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = run_demo(tiny=True, overrides=[f"output={tmp_path / 'demo'}", "train.progress=false"])
    out = capsys.readouterr().out
    untrained, trained = results["untrained"], results["trained"]
    assert len(trained.labels) == 64 and len(untrained.labels) == 64  # the same held-out pairs
    assert (trained.labels == untrained.labels).all()
    for r in (untrained, trained):
        assert 0.0 <= r.accuracy <= 1.0 and 0.0 <= r.tar_at_far[1e-3] <= 1.0
    # training changed the model the trained row measures: its cosine scores of the same pairs moved (a
    # float32 re-run of one model differs by ~1e-7; trained weights move scores by orders of magnitude more)
    assert np.abs(trained.scores - untrained.scores).max() > 1e-2
    # the table shows both rows with the numbers just measured, and where the files went
    assert re.search(r"^\| untrained +\|", out, re.M) and re.search(r"^\| trained +\|", out, re.M)
    assert f"{100 * trained.accuracy:.2f} ±" in out and f"{100 * untrained.accuracy:.2f} ±" in out
    for name in ("last.pt", "train.log", "roc.png"):
        path = tmp_path / "demo" / name
        assert path.is_file() and path.stat().st_size > 0
        assert str(path) in out

    # `faceforge eval CHECKPOINT --bin X.bin`: the same held-out pairs written as an insightface .bin
    images, issame = synthetic_pairs(32, num_identities=200, image_size=32, split="test")
    write_bin(tmp_path / "held_out.bin", images, issame)
    assert main(["eval", str(tmp_path / "demo" / "last.pt"), "--bin", str(tmp_path / "held_out.bin"),
                 "--output", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^\| last\.pt on held_out +\| \d+\.\d\d ±", table, re.M)
    assert (tmp_path / "roc.png").is_file() and not (tmp_path / "roc_eval.png").exists()  # no compatibility copy

    # a second demo never reuses the first one's folder
    run_demo(tiny=True, overrides=[f"output={tmp_path / 'demo'}", "train.progress=false"])
    assert "demo-2/last.pt" in capsys.readouterr().out and (tmp_path / "demo-2" / "last.pt").is_file()


def test_demo_config_is_valid_and_is_arcface_on_an_iresnet() -> None:
    cfg = load_demo_config()  # package data, as an installed wheel finds it
    assert cfg == load_config(REPO / "configs" / "demo.yaml")  # the repository's configs/demo.yaml links to it
    assert cfg.head.name == "arcface" and cfg.model.backbone.startswith("r")
    assert cfg.data.name == "synthetic" and cfg.data.kwargs["difficulty"] == 1.0  # the default difficulty
    assert cfg.data.kwargs["eval_pairs"] >= 1000


def test_help_lists_every_subcommand() -> None:
    text = build_parser().format_help()
    for command in ("train", "demo", "eval", "backbones", "render", "align"):
        assert command in text


def test_console_script_runs(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "faceforge.cli", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and "train" in done.stdout


def test_bad_config_key_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", str(REPO / "configs" / "demo.yaml"), "optim.learning_rate=0.1", f"output={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("faceforge train: ") and "unknown key optim.learning_rate" in err
