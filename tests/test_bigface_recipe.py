"""The BigFace recipe config, and the config switches of its parts (checkpointing, masks, LARS, ZeRO)."""

from __future__ import annotations

from pathlib import Path

import pytest

from faceforge.train.config import ConfigError, load_config
from faceforge.build import build_backbone, build_head

REPO = Path(__file__).resolve().parents[1]


def test_webface42m_r240_recipe():
    cfg = load_config(REPO / "configs/webface42m_r240_bigface.yaml")
    assert cfg.model.backbone == "r240" and cfg.model.grad_checkpointing == "block"
    assert cfg.head.name == "cosface" and cfg.head.kwargs == {"s": 64.0, "m": 0.4}
    assert cfg.data.mask_ratio == 0.35 and cfg.data.batch_size * cfg.train.grad_accum == 256
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.reference_batch, cfg.optim.weight_decay) == ("lars", 0.01, 256, 5e-4)
    assert cfg.schedule.name == "step" and cfg.train.epochs == 30 and cfg.train.zero
    assert cfg.objective.name == "distillation" and cfg.objective.kwargs["lam"] == 9.0
    assert "r600" in cfg.objective.kwargs["teacher"]
    head = build_head(cfg, num_classes=10)
    assert (head.s, head.m3) == (64.0, 0.4)  # CosFace: cos(theta) - m


def test_cpu_distillation_demo_config():
    cfg = load_config(REPO / "configs/synthetic_distill_demo.yaml")
    assert cfg.objective.name == "distillation" and cfg.objective.kwargs["teacher"] == "runs/demo/last.pt"
    teacher = load_config(REPO / "configs/demo.yaml")
    assert teacher.output == "runs/demo" and teacher.data.image_size == cfg.data.image_size
    assert cfg.model.embedding_size != teacher.model.embedding_size  # the demo shows the learned projection


@pytest.mark.parametrize(("value", "expected"), [("stage", "stage"), ("true", "block"), ("false", None)])
def test_model_grad_checkpointing_switches_the_backbone(tmp_path, value, expected):
    path = tmp_path / "c.yaml"
    path.write_text("output: x\nmodel: {backbone: r18, kwargs: {width: 0.125}}\nhead: {name: cosface}\ndata: {image_size: 32}\n")
    backbone = build_backbone(load_config(path, [f"model.grad_checkpointing={value}"]))
    assert backbone.grad_checkpointing == expected


def test_bad_values_are_config_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output: x\nmodel: {backbone: r18}\nhead: {name: cosface}\n")
    for override, key in [("model.grad_checkpointing=layer", "model.grad_checkpointing"),
                          ("data.mask_ratio=1.5", "data.mask_ratio"), ("optim.trust_coefficient=0", "optim.trust_coefficient"),
                          ("optim.reference_batch=0", "optim.reference_batch"), ("train.ddp_comm_hook=int8", "train.ddp_comm_hook")]:
        with pytest.raises(ConfigError, match=key):
            load_config(path, [override])
