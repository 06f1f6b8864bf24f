"""Every `faceforge train` input error names its key: one line, exit 2, before the run folder exists (issue 25,
"One line, exit 2, everywhere").

Each case goes through the CLI (``faceforge.cli.main`` in-process) with the tiny config of ``tests/_runs.py``
and an override; the error line must name the dotted key (not another key, not none), and ``output`` must not
have been created.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from _runs import make_config
from faceforge.cli import main
from faceforge.train.config import to_yaml

pytestmark = pytest.mark.usefixtures("one_thread")


def train_error(tmp_path: Path, capsys: pytest.CaptureFixture, *overrides: str, **sections: dict) -> str:
    """`faceforge train CONFIG OVERRIDES`: asserts exit 2, one line on stderr, no run folder; returns the line."""
    config = tmp_path / "c.yaml"
    run = tmp_path / "run"
    config.write_text(to_yaml(make_config(run, **sections)))
    assert main(["train", str(config), *overrides]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("faceforge train: "), err
    assert "internal error" not in lines[0] and "Traceback" not in err, err
    assert not run.exists(), sorted(p.name for p in run.iterdir())
    return lines[0]


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("data.eval_identities=1", "data.eval_identities = 1", "an int >= 2"),
        ("data.image_size=7", "data.image_size = 7", "an int >= 16"),
        ("head.kwargs.s=abc", "head.kwargs.s = 'abc'", "expected float"),
        ("optim.lr=1e308", "optim.lr = 1e+308", "a float in [0, 100]"),
        ("optim.head_lr=1e30", "optim.head_lr = 1e+30", "a float in [0, 100]"),
        ("optim.momentum=1.5", "optim.momentum = 1.5", "a float in [0, 1)"),
        ("optim.momentum=1", "optim.momentum = 1.0", "a float in [0, 1)"),
        ("optim.weight_decay=1e300", "optim.weight_decay = 1e+300", "a float in [0, 1]"),
        ("schedule.min_lr=1e300", "schedule.min_lr = 1e+300", "a float in [0, 100]"),
    ],
)
def test_a_value_out_of_range_names_its_key(tmp_path: Path, capsys, override: str, key: str, expected: str) -> None:
    line = train_error(tmp_path, capsys, override, data={"eval_pairs": 20, "eval_identities": 4})
    assert f": {key}: expected " in line and expected in line, line
    assert str(tmp_path / "c.yaml") in line  # the file too


@pytest.mark.parametrize(
    ("overrides", "key", "reads"),
    [
        (("optim.name=adamw", "optim.momentum=0.8"), "optim.momentum = 0.8", "(the adamw keys: betas, eps)"),
        (("optim.name=adamw", "optim.nesterov=true"), "optim.nesterov = True", "(the adamw keys: betas, eps)"),
        (("optim.name=sgd", "optim.betas=[0.8, 0.99]"), "optim.betas = (0.8, 0.99)", "(the sgd keys: momentum, nesterov)"),
        (("optim.name=lars", "optim.eps=1e-6"), "optim.eps = 1e-06", "(the lars keys: momentum, trust_coefficient)"),
    ],
)
def test_a_key_the_chosen_optimiser_does_not_read_is_refused_not_ignored(tmp_path: Path, capsys, overrides, key,
                                                                         reads) -> None:
    line = train_error(tmp_path, capsys, *overrides)
    assert f": {key}: optim.name " in line and line.endswith(reads), line


def test_an_unknown_backbone_names_model_backbone(tmp_path: Path, capsys) -> None:
    line = train_error(tmp_path, capsys, "model.backbone=r19")
    assert line.startswith("faceforge train: model.backbone: unknown backbone 'r19'; expected one of: ") and "r18" in line


def test_a_small_image_size_is_fine_for_image_folders(tmp_path: Path) -> None:
    """The synthetic renderer's smallest face is not a limit of other data (attfc's tests train at 8 pixels)."""
    cfg = make_config(tmp_path / "run", data={"name": "folder", "path": str(tmp_path), "image_size": 8})
    assert cfg.data.image_size == 8


class _Hostile:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_a_hostile_bin_is_a_user_error_naming_the_set(tmp_path: Path, capsys) -> None:
    """UnsafePickleError (a pickle.UnpicklingError, not a ValueError) was an internal error, exit 1."""
    hostile = tmp_path / "hostile.bin"
    hostile.write_bytes(pickle.dumps((_Hostile(), [True])))
    line = train_error(tmp_path, capsys, data={"eval_bins": [str(hostile)]})
    assert line.startswith("faceforge train: data.eval_bins: ") and "hostile.bin" in line, line
    assert "system" in line  # the refused global is named


def test_a_config_value_that_is_a_deep_shared_nest_is_quoted_in_bounded_words() -> None:
    """Issue 26.10: a checkpoint's config is data from someone else; a value that is a nest shared 60 levels
    deep has an exponential repr (2**60 leaves: the old message never finished). The message quotes a bounded
    repr, on one line."""
    from faceforge.train.config import ConfigError, config_from_dict

    nest: list = []
    for _ in range(60):
        nest = [nest, nest]
    for data in ({"output": "x", "model": {"backbone": "r18", "embedding_size": nest}, "head": {"name": "arcface"}},
                 {"output": "x", "model": {"backbone": "r18", "unknown": nest}, "head": {"name": "arcface"}}, nest):
        with pytest.raises(ConfigError) as info:
            config_from_dict(data, "last.pt")
        message = str(info.value)
        assert "\n" not in message and len(message) < 400, message
