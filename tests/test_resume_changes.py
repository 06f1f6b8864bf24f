"""A resumed run applies what it records (issue 25, items 1 and 2).

A hyperparameter changed on ``--resume`` (lr, momentum, weight decay, head lr) is in the optimiser's groups from
the resumed step: the resumed steps differ from an unchanged resume and equal, bit for bit, a run that used the
new value from that step. A change the resume policy refuses (embedding size, classes, head) is one line through
the CLI, exit 2, before any step: nothing in the run folder changes. Runs are the tiny ones of ``tests/_runs.py``
(64 synthetic 32x32 images, TinyNet, 4 steps, checkpoint at step 2), on one thread so that equal computations
give equal bits.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from _runs import assert_same, make_config
from faceforge.cli import main
from faceforge.core.checkpoint import load_checkpoint, save_checkpoint
from faceforge.train.config import to_yaml
from faceforge.train.engine import TrainResult, train
from faceforge.train.lifecycle import APPLIED, REFUSED, RESUME_POLICY, resume_policy

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
HALF = 2  # the straight run's checkpoint that every resume starts from
CONSTANT = {"name": "constant"}  # the lr of every step is optim.lr (head_lr): the reference runs are exact


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """4 steps at lr 0.1, momentum 0.9, weight decay 5e-4, a constant schedule; step_0000002.pt kept."""
    return train(make_config(tmp_path_factory.mktemp("straight") / "run", schedule=CONSTANT))


def resume_from(straight: TrainResult, folder: Path, checkpoint: dict[str, Any] | None = None,
                **sections: dict[str, Any]) -> TrainResult:
    """Resume the straight run's step-2 checkpoint (or ``checkpoint``, an edited copy of it) in ``folder`` with
    the straight config changed by ``sections``."""
    folder.mkdir()
    if checkpoint is None:
        shutil.copy(straight.output / f"step_{HALF:07d}.pt", folder / "last.pt")
    else:
        save_checkpoint(folder / "last.pt", checkpoint)
    sections = {"schedule": CONSTANT, **sections}
    return train(make_config(folder, **sections), resume=True)


def groups(result: TrainResult) -> list[dict[str, Any]]:
    return load_checkpoint(result.checkpoint)["optimizer"]["param_groups"]


def assert_same_weights(a: TrainResult, b: TrainResult) -> None:
    """The trained state of two runs bit for bit: weights, optimiser state (momenta), RNG and sampler."""
    x, y = load_checkpoint(a.checkpoint), load_checkpoint(b.checkpoint)
    for key in ("backbone", "head", "rng", "sampler"):
        assert_same(x[key], y[key], key)
    assert_same(x["optimizer"]["state"], y["optimizer"]["state"], "optimizer.state")


def test_an_unchanged_resume_is_the_straight_run(straight: TrainResult, tmp_path: Path) -> None:
    resumed = resume_from(straight, tmp_path / "same")
    assert resumed.losses == straight.losses[HALF:]
    assert_same_weights(resumed, straight)


def test_a_new_lr_is_used_from_the_resumed_step(straight: TrainResult, tmp_path: Path) -> None:
    resumed = resume_from(straight, tmp_path / "lr", optim={"lr": 0.05})
    assert resumed.losses != straight.losses[HALF:]
    assert [g["lr"] for g in groups(resumed)] == [0.05, 0.05]  # backbone, head
    assert load_checkpoint(resumed.checkpoint)["scheduler"]["base_lrs"] == [0.05, 0.05]
    # the reference: one run whose step schedule halves the rate at step 2 (0.1 x 0.5 is 0.05 exactly)
    halved = train(make_config(tmp_path / "halved", schedule={"name": "step", "milestones": [HALF], "gamma": 0.5}))
    assert halved.losses[:HALF] == straight.losses[:HALF]
    assert resumed.losses == halved.losses[HALF:]
    assert_same_weights(resumed, halved)


def _with_group_value(checkpoint: dict[str, Any], key: str, value: float, group_names: tuple[str, ...]) -> None:
    """The step-2 checkpoint as if its run had used ``key = value`` in the named groups from the start (lr also
    in the schedule's base rates): what a run that used that value from step 2 resumes from."""
    names = [g["name"] for g in checkpoint["optimizer"]["param_groups"]]
    for i, group in enumerate(checkpoint["optimizer"]["param_groups"]):
        if group["name"] in group_names:
            group[key] = value
            if key == "lr":
                group["initial_lr"] = value
                checkpoint["scheduler"]["base_lrs"][i] = value
                checkpoint["scheduler"]["_last_lr"][i] = value
    assert any(n in group_names for n in names)


@pytest.mark.parametrize(
    ("section", "key", "value", "group_key", "group_names"),
    [
        ({"momentum": 0.5}, "momentum", 0.5, "momentum", ("backbone", "head")),
        ({"weight_decay": 0.05}, "weight_decay", 0.05, "weight_decay", ("backbone", "head")),
        ({"head_lr": 0.01}, "head_lr", 0.01, "lr", ("head",)),
    ],
)
def test_a_new_optimiser_value_is_used_from_the_resumed_step(
    straight: TrainResult, tmp_path: Path, section: dict, key: str, value: float, group_key: str,
    group_names: tuple[str, ...],
) -> None:
    resumed = resume_from(straight, tmp_path / "changed", optim=section)
    assert resumed.losses != straight.losses[HALF:]
    for group, before in zip(groups(resumed), groups(straight)):
        assert group[group_key] == (value if group["name"] in group_names else before[group_key]), group["name"]
    # the reference: the same checkpoint holding the new value already (no change on resume)
    edited = load_checkpoint(straight.output / f"step_{HALF:07d}.pt")
    _with_group_value(edited, group_key, value, group_names)
    edited["config"]["optim"][key] = value
    reference = resume_from(straight, tmp_path / "reference", checkpoint=edited, optim=section)
    assert resumed.losses == reference.losses
    assert_same_weights(resumed, reference)


def test_a_longer_run_recomputes_the_schedule(tmp_path: Path) -> None:
    """train.steps 4 -> 6 on a poly schedule: the lr of the resumed steps is the 6-step schedule's (float64)."""
    short = train(make_config(tmp_path / "short", train={"steps": 4}))
    resumed = train(make_config(tmp_path / "short", train={"steps": 6}), resume=True)
    log = (resumed.log).read_text()
    logged = [float(x) for x in re.findall(r" step [56]/6 epoch \d+ loss \S+ lr (\S+) ", log)]
    assert logged == pytest.approx([0.1 * (1 - t / 6) for t in (4, 5)], rel=1e-4)  # printed with 5 digits
    assert short.step == 4 and resumed.step == 6


# ----------------------------------------------------------------------------------------------
# Refused changes: one line, exit 2, nothing touched


def folder_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("override", "key", "old", "new"),
    [
        ("model.embedding_size=64", "model.embedding_size", "16", "64"),
        ("data.num_identities=30", "data.kwargs.num_identities", "8", "30"),  # an old flat key is named as it is stored
        ("head.name=cosface", "head.name", "'arcface'", "'cosface'"),
    ],
)
def test_a_refused_change_is_one_line_before_any_step(tmp_path: Path, capsys, override: str, key: str, old: str,
                                                      new: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(to_yaml(make_config(tmp_path / "run", train={"steps": 2})))
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    before = folder_state(tmp_path / "run")
    assert main(["train", str(config), "--resume", override]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"faceforge train: {key}: "), err
    assert f"trained with {old}, this run asks for {new}" in lines[0], lines[0]
    assert str(tmp_path / "run" / "last.pt") in lines[0]
    assert folder_state(tmp_path / "run") == before


def test_the_policy_decides_by_the_first_matching_rule() -> None:
    assert resume_policy("optim.lr").policy == APPLIED
    assert resume_policy("optim.name").policy == REFUSED
    assert resume_policy("data.eval_pairs").policy == APPLIED
    assert resume_policy("data.kwargs.eval_identities").policy == REFUSED
    assert resume_policy("model.kwargs.width").policy == REFUSED
    assert resume_policy("head.kwargs.m").policy == REFUSED
    assert resume_policy("head.shard").policy == APPLIED
    assert resume_policy("no_such_section.x").policy == REFUSED


def test_docs_show_the_policy_table() -> None:
    text = (REPO / "docs" / "training.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \| (applied|refused) \| (.+) \|$", text, re.M)
    assert rows == [(rule.pattern, rule.policy, rule.why) for rule in RESUME_POLICY]


def test_every_config_key_has_a_rule() -> None:
    """No key falls to the catch-all: every field of the config is named by a rule on purpose."""
    from faceforge.train.config import to_dict

    def keys(d: dict, prefix: str = "") -> list[str]:
        return [k for key, v in d.items() for k in (keys(v, f"{prefix}{key}.") if isinstance(v, dict) and v
                                                   else [f"{prefix}{key}"])]

    cfg = make_config(Path("unused"))
    for key in keys(to_dict(cfg)):
        assert resume_policy(key).why != "no resume rule names it", key
