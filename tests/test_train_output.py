"""What a user of `faceforge train` sees (issue 25, "What a user sees"): resume notes on the terminal, the exact
resume command on Ctrl-C, the final table once, one ``checkpoint:`` line per step, no ``0.0 images/s``, plurals.

Runs are the tiny ones of ``tests/_runs.py`` (TinyNet, 32x32 synthetic images, a few steps).
"""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from _runs import make_config
from faceforge.cli import main
from faceforge.train import engine
from faceforge.core.checkpoint import load_checkpoint, save_checkpoint
from faceforge.train.config import to_yaml

pytestmark = pytest.mark.usefixtures("one_thread")


def write(tmp_path: Path, **sections: dict) -> Path:
    config = tmp_path / "c.yaml"
    config.write_text(to_yaml(make_config(tmp_path / "run", **sections)))
    return config


def on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr claims to be a terminal: the progress bar is on and log lines go to train.log only."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)


def test_resume_notes_reach_the_terminal(tmp_path: Path, capsys, monkeypatch) -> None:
    config = write(tmp_path, train={"steps": 2, "progress": True})
    assert main(["train", str(config)]) == 0
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    state["world_size"] = 2  # as if written by two ranks
    save_checkpoint(tmp_path / "run" / "last.pt", state)
    capsys.readouterr()
    on_a_terminal(monkeypatch)
    assert main(["train", str(config), "--resume", "train.steps=3", "optim.lr=0.05"]) == 0
    err = capsys.readouterr().err
    assert not re.search(r"^20\d\d-", err, re.M)  # no log lines on the terminal: the notes are printed for it
    assert "faceforge train: resume: config changed since the checkpoint: optim.lr (0.1 -> 0.05), train.steps " \
           "(2 -> 3); applied from step 3" in err, err
    assert f"faceforge train: resume: {tmp_path / 'run' / 'last.pt'} was written by 2 processes, this run has 1" in err


def test_one_process_is_singular() -> None:
    from faceforge.train.checkpointing import count

    assert count(1, "process") == "1 process"
    assert count(3, "process") == "3 processes"


def test_the_interrupt_message_is_the_exact_command(tmp_path: Path, monkeypatch, capsys) -> None:
    config = write(tmp_path, train={"steps": 4, "checkpoint_every": 0})

    def interrupt_at_2(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(engine, "train", functools.partial(engine.train, on_step=interrupt_at_2))
    assert main(["train", str(config)]) == 130
    err = capsys.readouterr().err
    assert f"continue with `faceforge train {tmp_path / 'run' / 'config.yaml'} --resume`" in err, err


def test_the_final_table_is_printed_once_and_each_checkpoint_logged_once(tmp_path: Path, capsys) -> None:
    config = write(tmp_path, data={"eval_pairs": 20, "eval_identities": 4},
                   train={"steps": 4, "eval_every": 2, "checkpoint_every": 2})
    assert main(["train", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out.count("| set") == 1 and "evaluation at step 4:" in out  # the result, on stdout
    assert err.count("| set") == 1 and "eval step 2:\n|" in err  # the evaluation during training, on stderr
    log = (tmp_path / "run" / "train.log").read_text()
    lines = re.findall(r"checkpoint: .* \(step (\d+)\)$", log, re.M)
    assert lines == ["2", "4"]  # saved twice at each of these steps (before and after the evaluation), said once


def test_a_resume_with_nothing_to_train_says_so(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "run", train={"steps": 2})
    engine.train(cfg)
    engine.train(cfg, resume=True)  # resumed at the end: evaluates (nothing here) and saves, trains nothing
    done = re.findall(r"done: .*$", (tmp_path / "run" / "train.log").read_text(), re.M)
    assert done[0].startswith("done: step 2, ") and "images/s" in done[0]
    assert done[1] == "done: step 2 (no step left to train; resumed at the end)"
