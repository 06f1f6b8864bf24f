"""A run is never lost, and every error is one line (issue 11).

Save before the final evaluation, refuse to reuse a run folder, SIGINT writes a checkpoint, inputs checked
before the first step (evaluation sets, init_from, image sizes), unreadable training records stop the run
or are skipped (data.skip_bad), a resumed run's log shows no step twice, `faceforge <cmd>` errors are one
line with exit 2, config ranges and kwargs keys. Runs are tiny: TinyNet on 32x32 synthetic images.
"""

from __future__ import annotations

import functools
import os
import re
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from faceforge.cli import main
from faceforge.data import recordio
from faceforge.data.pairs import write_bin
from faceforge.data.synthetic import render_images, synthetic_pairs
from faceforge.eval.sets import PairSet
from faceforge.train import engine
from faceforge.core.checkpoint import load_checkpoint
from faceforge.train.config import ConfigError, config_from_dict, load_config, to_yaml
from faceforge.train.lifecycle import TrainingInterrupted, config_changes, drop_replayed_steps
from faceforge.train.preflight import RunFolderError

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32


def cfg_dict(output: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    data = {
        "seed": 0,
        "output": str(output),
        "model": {"backbone": "_train_worker:TinyNet", "embedding_size": 16},
        "head": {"name": "arcface", "kwargs": {"s": 16.0}},
        "data": {"num_identities": 4, "images_per_identity": 8, "image_size": SIZE, "batch_size": 8,
                 "cache": True, "eval_pairs": 0},
        "optim": {"name": "sgd", "lr": 0.05},
        "train": {"steps": 4, "log_every": 1, "progress": False},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return data


def make(output: Path, **sections: dict[str, Any]) -> Any:
    return config_from_dict(cfg_dict(output, **sections), "<test>")


def write_yaml(path: Path, output: Path, **sections: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg_dict(output, **sections)))
    return path


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str], code: int = 2) -> str:
    """Run `faceforge ARGV`; assert it exits `code` with one line `faceforge <cmd>: ...` on stderr; return it."""
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("20")]  # log lines
    assert len(lines) == 1, err
    assert lines[0].startswith(f"faceforge {argv[0]}: ") and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# 2. A run is never lost


def test_final_evaluation_failing_after_the_save_keeps_the_run(tmp_path: Path, monkeypatch) -> None:
    def broken(self, *args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(PairSet, "evaluate", broken)
    cfg = make(tmp_path / "run", data={"eval_pairs": 20}, train={"eval_every": 0})
    with pytest.raises(RuntimeError, match="evaluation broke"):
        engine.train(cfg)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 4  # the steps were saved first
    monkeypatch.undo()
    result = engine.train(cfg, resume=True)  # resumed at the end: evaluates and saves the metrics
    assert result.step == 4 and "accuracy" in result.metrics
    assert load_checkpoint(result.checkpoint)["metrics"] == result.metrics


def test_a_folder_holding_a_run_is_refused_without_resume(tmp_path: Path, capsys) -> None:
    config = write_yaml(tmp_path / "c.yaml", tmp_path / "run")
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    before = (tmp_path / "run" / "last.pt").read_bytes()
    line = one_line_error(capsys, ["train", str(config)])
    assert str(tmp_path / "run") in line and "--resume" in line and "output" in line
    assert (tmp_path / "run" / "last.pt").read_bytes() == before  # untouched
    with pytest.raises(RunFolderError):
        engine.train(load_config(config))
    # --resume, with an override after it: accepted, and the changed key is named in train.log
    assert main(["train", str(config), "--resume", "train.steps=6"]) == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert "config changed since the checkpoint: train.steps" in log
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 6


def test_sigint_writes_a_checkpoint_and_exits_130(tmp_path: Path, monkeypatch, capsys) -> None:
    config = write_yaml(tmp_path / "c.yaml", tmp_path / "run", train={"steps": 8})

    def interrupt_at_2(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(engine, "train", functools.partial(engine.train, on_step=interrupt_at_2))
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs as a background job
    assert main(["train", str(config)]) == 130
    err = capsys.readouterr().err
    assert "SIGINT at step 2" in err and "--resume" in err
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 2  # checkpoint_every 0: written for the stop
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    monkeypatch.undo()
    assert engine.train(load_config(config), resume=True).step == 8


def test_sigterm_under_train_raises_training_interrupted(tmp_path: Path) -> None:
    cfg = make(tmp_path / "run", train={"steps": 6, "checkpoint_every": 2})
    on_step = lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == 3 else None  # noqa: E731
    with pytest.raises(TrainingInterrupted, match="SIGTERM at step 3"):
        engine.train(cfg, on_step=on_step)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 3


def test_eval_bins_work_with_any_dataset(tmp_path: Path) -> None:
    images, issame = synthetic_pairs(10, num_identities=4, image_size=SIZE, split="test")
    write_bin(tmp_path / "mini.bin", images, issame)
    result = engine.train(make(tmp_path / "run", data={"eval_pairs": 20, "eval_bins": [str(tmp_path / "mini.bin")]}))
    assert "accuracy" in result.metrics and "mini/accuracy" in result.metrics  # synthetic pairs and the .bin


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"eval_bins": ["missing.bin"]}, r"data\.eval_bins: .*missing\.bin"),
        ({"eval_ijb": "no_such_ijb"}, r"data\.eval_ijb: .*no_such_ijb"),
        ({"eval_retrieval": "no_such_folder"}, r"data\.eval_retrieval: no_such_folder"),
        ({"eval_probes": "p", "eval_distractors": "d"}, r"data\.eval_probes: p"),
        ({"small_bin": True}, r"data\.eval_bins: .*small\.bin: verification images are 16x16 but data\.image_size is 32"),
    ],
)
def test_inputs_are_checked_before_the_first_step(tmp_path: Path, data: dict, expected: str, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    if data.pop("small_bin", False):
        small, issame = synthetic_pairs(10, num_identities=4, image_size=16)
        write_bin(tmp_path / "small.bin", small, issame)
        data = {"eval_bins": [str(tmp_path / "small.bin")]}
    with pytest.raises(ConfigError, match=expected):
        engine.train(make(tmp_path / "run", data=data))
    assert not (tmp_path / "run" / "train.log").exists()  # stopped before any step


def test_image_sets_of_the_wrong_size_are_named_before_the_first_step(tmp_path: Path) -> None:
    from PIL import Image

    for person in ("a", "b"):
        (tmp_path / "people" / person).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(tmp_path / "people" / person / f"{k}.png")
    with pytest.raises(ConfigError, match=r"data\.eval_retrieval: .*0\.png: image is 24x24 but data\.image_size is 32"):
        engine.train(make(tmp_path / "run", data={"eval_retrieval": str(tmp_path / "people")}))


def test_init_from_is_checked_before_the_first_step(tmp_path: Path) -> None:
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    for path in (tmp_path / "missing.pt", tmp_path / "bad.pt"):
        with pytest.raises(ConfigError, match=rf"model\.init_from: .*{path.name}"):
            engine.train(make(tmp_path / f"run_{path.stem}", model={"init_from": str(path)}))


@pytest.fixture()
def rec_with_bad_records(tmp_path: Path) -> str:
    """4 identities x 8 images; keys 3 and 12 (images 2 and 11) hold bytes that are no image."""
    labels = np.repeat(np.arange(4), 8)
    images: list[Any] = list(render_images(labels, np.tile(np.arange(8), 4), image_size=SIZE))
    images[2] = images[11] = b"this is not an image"
    prefix = tmp_path / "train"
    recordio.write(prefix, zip(images, labels.tolist()))
    return str(prefix)


def test_an_unreadable_record_stops_the_run_naming_it(tmp_path: Path, rec_with_bad_records: str, capsys) -> None:
    config = write_yaml(tmp_path / "c.yaml", tmp_path / "run",
                        data={"name": "recordio", "path": rec_with_bad_records, "batch_size": 8},
                        train={"steps": 4, "checkpoint_every": 1})
    from faceforge.data.samplers import EpochBatchSampler
    from faceforge.core.checkpoint import load_checkpoint

    seed = yaml.safe_load(config.read_text())["seed"]
    batches = list(EpochBatchSampler(32, 8, 1, 0, seed, 0, 0, 4))  # the run's first epoch: 4 steps of 8 images
    first_bad = next(step for step, ids in enumerate(batches, 1) if {2, 11} & set(ids))  # images 2, 11: keys 3, 12
    assert first_bad > 1  # so that a checkpoint was written before the run met a bad record
    line = one_line_error(capsys, ["train", str(config)])
    assert re.search(r"train\.rec: key (3|12) \(byte offset \d+\)", line) and "data.skip_bad" in line
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == first_bad - 1  # the last checkpoint is kept


def test_skip_bad_counts_and_lists_the_skipped_records(tmp_path: Path, rec_with_bad_records: str) -> None:
    cfg = make(tmp_path / "run", data={"name": "recordio", "path": rec_with_bad_records, "skip_bad": True},
               train={"steps": 8})  # 2 epochs: each bad record met twice, listed once
    result = engine.train(cfg)
    assert result.step == 8
    listed = (tmp_path / "run" / "bad_records.txt").read_text().splitlines()
    assert len(listed) == 2 and all("train.rec: key" in line for line in listed)
    assert {re.search(r"key (\d+)", line).group(1) for line in listed} == {"3", "12"}
    assert "skipped 2 unreadable training records" in result.log.read_text()


def test_a_resumed_run_logs_no_step_twice(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_text("".join(
        f"2026-01-01 00:00:0{k} INFO step {k}/6 epoch 0 loss 1.0 lr 1 grad_norm 1 images/s 1\n" for k in range(1, 6)
    ) + "2026-01-01 INFO checkpoint: run/last.pt (step 3)\n2026-01-01 INFO checkpoint: run/last.pt (step 5)\n"
        "2026-01-01 INFO eval step 4: accuracy 0.5\n2026-01-01 ERROR something else\n")
    assert drop_replayed_steps(log, 3) == 4
    text = log.read_text()
    assert "step 3/6" in text and "step 4/6" not in text and "(step 3)" in text and "(step 5)" not in text
    assert "eval step 4" not in text and "something else" in text


def test_killed_and_resumed_run_logs_each_step_once(tmp_path: Path) -> None:
    cfg = make(tmp_path / "run", train={"steps": 6, "checkpoint_every": 3})

    def die(step: int) -> None:
        if step == 5:
            raise SystemExit("simulated kill after step 5")

    with pytest.raises(SystemExit):
        engine.train(cfg, on_step=die)
    engine.train(cfg, resume=True)
    steps = [int(m) for m in re.findall(r" step (\d+)/6 epoch", (tmp_path / "run" / "train.log").read_text())]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_config_changes_name_dotted_keys() -> None:
    saved = {"optim": {"lr": 0.1, "momentum": 0.9}, "model": {"kwargs": {"width": 0.5}}, "seed": 0}
    now = {"optim": {"lr": 0.2, "momentum": 0.9}, "model": {"kwargs": {}}, "seed": 0}
    assert config_changes(saved, now) == ["optim.lr", "model.kwargs.width"]


# ----------------------------------------------------------------------------------------------
# 3. One clear line


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.momentum=-0.9", r"optim\.momentum = -0\.9: expected a float in \[0, 1\)"),
        ("optim.weight_decay=-1e-4", r"optim\.weight_decay = -0\.0001: expected a float in \[0, 1\]"),
        ("optim.head_lr=-0.1", r"optim\.head_lr = -0\.1: expected null"),
        ("optim.head_weight_decay=-1.0", r"optim\.head_weight_decay = -1\.0: expected null"),
        ("optim.lr=.nan", r"optim\.lr = nan: expected a finite number"),
        ("train.clip_grad_norm=.inf", r"train\.clip_grad_norm = inf: expected a finite number"),
        ("head.kwargs.s=.inf", r"head\.kwargs\.s: inf; expected a number in \(0, 1024\]"),
        ("model.kwargs.widht=0.5", r"model\.kwargs\.widht: not an argument of backbone .*expected one of: .*width"),
        ("head.kwargs.scale=30", r"head\.kwargs\.scale: not an argument of head 'arcface'; expected one of: .*\bs\b"),
        ("head.kwargs.num_classes=3", r"head\.kwargs\.num_classes: set by the trainer"),
    ],
)
def test_config_ranges_and_kwargs_are_one_line_errors(tmp_path: Path, capsys, override: str, expected: str) -> None:
    config = write_yaml(tmp_path / "c.yaml", tmp_path / "run", model={"backbone": "r18"})
    line = one_line_error(capsys, ["train", str(config), override])
    assert re.search(expected, line), line
    assert str(config) in line or "kwargs (" in line  # a value a factory rejects is named when it is built


def test_kwargs_a_preset_sets_itself_are_named_when_built(tmp_path: Path, capsys) -> None:
    config = write_yaml(tmp_path / "c.yaml", tmp_path / "run")
    line = one_line_error(capsys, ["train", str(config), "head.kwargs.m2=0.4"])  # ArcFace sets m2 from m
    assert "head.kwargs.m2" in line
    assert not (tmp_path / "run" / "train.log").exists()


def test_config_docstring_example_works(tmp_path: Path) -> None:
    from faceforge.core import config as config_module

    example = re.search(r"^    seed: 0\n(.*?)\n\n", config_module.__doc__, re.S | re.M).group(0)
    cfg = config_from_dict(yaml.safe_load(example), "<docstring>")
    from faceforge.build import build_head

    assert build_head(cfg, 10).s == 64.0


def test_debug_shows_the_traceback(tmp_path: Path, capsys) -> None:
    config = write_yaml(tmp_path / "c.yaml", tmp_path / "run")
    assert main(["train", str(config), "optim.lr=-1", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "no_such.yaml"], r"no_such\.yaml: config file not found"),
        (["eval", "CKPT", "--pairs", "-5"], r"--pairs -5: expected an int >= 0"),
        (["eval", "no_such.pt"], r"no_such\.pt"),
        (["eval"], r"CHECKPOINT: missing"),
        (["inspect", "no_such_prefix"], r"no_such_prefix"),
    ],
)
def test_every_command_errors_in_one_line(tmp_path: Path, monkeypatch, capsys, argv: list[str], expected: str) -> None:
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, argv)
    assert re.search(expected, line), line


def test_render_prints_the_path(tmp_path: Path, capsys) -> None:
    assert main(["render", str(tmp_path / "m.png"), "--identities", "2", "--images", "2", "--size", "32"]) == 0
    assert capsys.readouterr().out.strip() == f"montage: {tmp_path / 'm.png'}"


def test_every_option_has_help_with_its_default() -> None:
    import argparse

    from faceforge.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help and "default" in action.help, f"faceforge {name} {action.option_strings[0]}: {action.help!r}"


def test_training_prints_its_metrics_as_a_table(tmp_path: Path, capsys) -> None:
    config = write_yaml(tmp_path / "c.yaml", tmp_path / "run", data={"eval_pairs": 20}, train={"eval_every": 2})
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr()
    assert "| set" in out.out and "accuracy" in out.out  # the final table on stdout
    assert "eval step 2:" in out.err and "| held-out" in out.err  # and during training (the final one once)


def test_to_yaml_round_trip_keeps_skip_bad(tmp_path: Path) -> None:
    cfg = make(tmp_path / "run", data={"skip_bad": True})
    assert config_from_dict(yaml.safe_load(to_yaml(cfg)), "<yaml>").data.skip_bad is True
