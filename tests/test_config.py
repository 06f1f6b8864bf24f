"""faceforge.train.config: YAML -> dataclasses, dotted overrides, errors that name file/key/value/type."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from faceforge.train.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    to_dict,
    to_yaml,
)

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """\
output: runs/x
model:
  backbone: r18
head:
  name: arcface
"""


@pytest.fixture
def minimal(tmp_path: Path) -> Path:
    path = tmp_path / "minimal.yaml"
    path.write_text(MINIMAL)
    return path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_fill_a_minimal_file(minimal: Path) -> None:
    cfg = load_config(minimal)
    assert isinstance(cfg, Config)
    assert cfg.output == "runs/x" and cfg.model.backbone == "r18" and cfg.head.name == "arcface"
    assert cfg.seed == 0
    assert cfg.model.embedding_size == 512 and cfg.model.kwargs == {}
    assert cfg.data.name == "synthetic" and cfg.data.batch_size == 128 and cfg.data.flip is True
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.1 and cfg.optim.head_lr is None
    assert cfg.schedule.name == "poly" and cfg.schedule.warmup_steps is None
    assert cfg.train.amp == "auto" and cfg.train.grad_accum == 1 and cfg.train.steps is None


def test_shipped_config_loads() -> None:
    cfg = load_config(REPO / "configs" / "synthetic_r18_arcface.yaml")
    assert cfg.model.backbone == "r18" and cfg.head.name == "arcface"
    assert cfg.optim.weight_decay == pytest.approx(5e-4)
    assert cfg.data.image_size == 56 and cfg.model.kwargs["width"] == 0.5


def test_overrides_apply_nested_and_typed(minimal: Path) -> None:
    cfg = load_config(
        minimal,
        [
            "optim.lr=0.05",
            "train.amp=false",
            "model.kwargs.width=0.5",
            "model.backbone=iresnet",
            "model.kwargs.layers=[1,1,1,1]",
            "data.batch_size=32",
            "schedule.milestones=[10, 20]",
            "optim.head_lr=0.01",
            "optim.head_weight_decay=null",
            "optim.name=adamw",  # betas are AdamW's (an SGD run refuses them)
            "optim.betas=[0.8, 0.99]",
            "optim.weight_decay=1e-4",  # YAML 1.1 would read this as a string
            "train.steps=7",
            "head.kwargs.s=30",
        ],
    )
    assert cfg.optim.lr == 0.05 and type(cfg.optim.lr) is float
    assert cfg.train.amp is False
    assert cfg.model.kwargs == {"width": 0.5, "layers": [1, 1, 1, 1]}
    assert cfg.data.batch_size == 32 and type(cfg.data.batch_size) is int
    assert cfg.schedule.milestones == [10, 20]
    assert cfg.optim.head_lr == 0.01 and cfg.optim.head_weight_decay is None
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.optim.weight_decay == 1e-4 and type(cfg.optim.weight_decay) is float
    assert cfg.train.steps == 7
    assert cfg.head.kwargs == {"s": 30}


def test_an_int_is_a_valid_float_but_not_the_reverse(minimal: Path) -> None:
    assert load_config(minimal, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"data\.batch_size = 1\.5: expected int"):
        load_config(minimal, ["data.batch_size=1.5"])


@pytest.mark.parametrize(
    "override, pieces",
    [
        ("optim.lr=abc", ["optim.lr", "'abc'", "float"]),
        ("data.batch_size=1.5", ["data.batch_size", "1.5", "int"]),
        ("data.flip=1", ["data.flip", "1", "bool"]),
        ("train.epochs=true", ["train.epochs", "True", "int"]),
        ("train.amp=maybe", ["train.amp", "'maybe'", "auto"]),
        ("optim.name=lamb", ["optim.name", "'lamb'", "sgd", "adamw"]),
        ("optim.betas=[0.9]", ["optim.betas", "[0.9]", "tuple"]),
        ("schedule.milestones=[1, x]", ["schedule.milestones[1]", "'x'", "int"]),
        ("optim.lrr=0.1", ["unknown key optim.lrr", "0.1", "lr"]),
        ("trian.epochs=1", ["unknown key trian", "epochs"]),
        ("data.batch_size=0", ["data.batch_size", "0", ">= 1"]),
        ("optim.lr.x=1", ["optim.lr", "{'x': 1}", "float"]),
        ("output.x=1", ["output", "'runs/x'", "not a section"]),
    ],
)
def test_bad_overrides_name_file_key_value_and_type(minimal: Path, override: str, pieces: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(minimal, [override])
    message = str(err.value)
    assert str(minimal) in message
    for piece in pieces:
        assert piece in message, (piece, message)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "optim:\n  momentun: 0.9\n")
    with pytest.raises(ConfigError, match=r"unknown key optim\.momentun = 0\.9; expected one of: .*momentum") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_wrong_type_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: optim\.lr = 'fast': expected float"):
        load_config(path)


def test_a_section_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "data: 3\n")
    with pytest.raises(ConfigError, match=r"data = 3: expected DataConfig"):
        load_config(path)


def test_missing_required_field(tmp_path: Path) -> None:
    path = write(tmp_path, "output: runs/x\nmodel: {embedding_size: 128}\nhead: {name: arcface}\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: missing required key model\.backbone \(expected str\)"):
        load_config(path)


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "output: runs/x\nmodel: {backbone: r18\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: invalid YAML"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"expected a mapping at the top level, got list"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_override(minimal: Path) -> None:
    with pytest.raises(ConfigError, match=r"override 'optim\.lr': expected dotted\.key=value"):
        load_config(minimal, ["optim.lr"])


def test_round_trip_through_yaml(minimal: Path, tmp_path: Path) -> None:
    cfg = load_config(minimal, ["model.backbone=iresnet", "model.kwargs.layers=[1,1,1,1]", "optim.name=adamw", "optim.betas=[0.8, 0.9]",
                                  "schedule.milestones=[3]"])
    saved = tmp_path / "saved.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(saved) == cfg
    assert config_from_dict(to_dict(cfg)) == cfg


def test_to_dict_is_plain_enough_for_weights_only_checkpoints(minimal: Path) -> None:
    cfg = load_config(minimal)
    buffer = io.BytesIO()
    torch.save({"config": to_dict(cfg)}, buffer)
    buffer.seek(0)
    assert config_from_dict(torch.load(buffer, weights_only=True)["config"]) == cfg


def test_config_is_mutable_for_callers(minimal: Path) -> None:
    cfg = load_config(minimal)
    cfg.data.kwargs["eval_pairs"] = 10  # faceforge.eval.evaluate (_Checkpoint.held_out_sets) does this
    assert cfg.data.kwargs["eval_pairs"] == 10
