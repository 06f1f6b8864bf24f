"""The transformer recipe (issue 30): weight decay kept off what the backbone declares and off norms and biases
(by module type), AdamW's decoupled decay against its formula, warm-up + cosine/poly over every group (AdamW and
the SGD that Partial FC needs), ``model.init_from`` a model file (an imported arcface_torch backbone), and the
ViT configs training 2 steps."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from _runs import make_config
from faceforge.backbones import build
from faceforge.train.config import ConfigError, OptimConfig, ScheduleConfig, config_from_dict, load_config, to_dict
from faceforge.train.engine import train
from faceforge.train.optim import build_optimizer, build_scheduler, lr_at, no_decay_parameters, param_groups

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


def small_vit() -> nn.Module:
    return build("vit_t", 16, input_size=18, width=0.0625, mask_ratio=0.1)  # 2 x 2 patches, C = 16, 12 blocks


def test_a_vit_declares_its_no_decay_parameters_and_norms_and_biases_are_found_by_type() -> None:
    vit = small_vit()
    names = {n for n, _ in vit.named_parameters()}
    # written independently of the optimiser: by the module names of faceforge's ViT
    expected = {n for n in names if n.endswith(".bias") or re.search(r"(^|\.)norm\d?\.", n) or
                re.fullmatch(r"feature\.[13]\.weight", n)} | {"pos_embed", "mask_token"}
    assert no_decay_parameters(vit) == expected
    groups = {g["name"]: g for g in param_groups(OptimConfig(name="adamw", weight_decay=0.1, no_decay_bn_bias=True),
                                                 vit, nn.Linear(16, 4, bias=False))}
    by_id = {id(p): n for n, p in vit.named_parameters()}
    assert {by_id[id(p)] for p in groups["backbone_no_decay"]["params"]} == expected
    assert {by_id[id(p)] for p in groups["backbone"]["params"]} == names - expected
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 0.1


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_the_convolutional_backbones_groups_are_unchanged(name: str) -> None:
    """By type = the 1-d parameters the option took before (BN, PReLU, biases): old checkpoints resume."""
    model = build(name, 16, input_size=32, **({"width": 0.125} if name == "r18" else {}))
    assert no_decay_parameters(model) == {n for n, p in model.named_parameters() if p.ndim <= 1}


def test_a_wrong_declared_name_is_refused() -> None:
    class Bad(nn.Linear):
        def no_weight_decay(self) -> set[str]:
            return {"pos_embed"}

    with pytest.raises(ValueError, match=r"Bad.no_weight_decay\(\) names \['pos_embed'\], which are not its"):
        no_decay_parameters(Bad(2, 2))


def test_adamw_decays_only_the_decay_group_by_lr_times_wd() -> None:
    """With zero gradients AdamW's step is the decoupled decay alone: w <- w (1 - lr wd) (Loshchilov & Hutter);
    the no-decay group does not move."""
    vit = small_vit()
    head = nn.Linear(16, 4, bias=False)
    cfg = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1, no_decay_bn_bias=True, head_weight_decay=0.0)
    optimizer = build_optimizer(cfg, vit, head)
    before = {n: p.detach().double().clone() for n, p in vit.named_parameters()}
    head_before = head.weight.detach().clone()
    for p in [*vit.parameters(), *head.parameters()]:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    exempt = no_decay_parameters(vit)
    for n, p in vit.named_parameters():
        factor = 1.0 if n in exempt else 1.0 - 1e-3 * 0.1
        # float32 product of one rounding: relative 2^-24
        torch.testing.assert_close(p.detach().double(), before[n] * factor, rtol=1e-7, atol=1e-12)
    assert torch.equal(head.weight, head_before)


@pytest.mark.parametrize(("optim", "schedule"), [("adamw", "cosine"), ("adamw", "poly"), ("sgd", "cosine")])
def test_warmup_then_decay_drives_every_group(optim: str, schedule: str) -> None:
    """Each group (backbone, its no-decay part, the head at its own lr) gets lr_at(t, its base lr) at step t:
    warm-up (t + 1) / W, then the decay, checked against the formula in float64."""
    torch.manual_seed(0)
    vit, head = small_vit(), nn.Linear(16, 4, bias=False)
    ocfg = OptimConfig(name=optim, lr=1e-3, head_lr=1e-2, weight_decay=0.1, no_decay_bn_bias=True)
    scfg = ScheduleConfig(name=schedule, warmup_steps=3, power=2.0, min_lr=1e-5)
    optimizer = build_optimizer(ocfg, vit, head)
    scheduler = build_scheduler(scfg, optimizer, total_steps=10)
    for t in range(10):
        for group in optimizer.param_groups:
            base = 1e-2 if group["name"] == "head" else 1e-3
            if t < 3:
                want = base * (t + 1) / 3
            else:
                p = (t - 3) / 7
                decay = 0.5 * (1 + math.cos(math.pi * p)) if schedule == "cosine" else (1 - p) ** 2
                want = 1e-5 + (base - 1e-5) * decay
            assert group["lr"] == pytest.approx(want, rel=1e-12), (t, group["name"])
            assert group["lr"] == pytest.approx(lr_at(scfg, t, base, 10, 3), rel=1e-12)
        optimizer.step()
        scheduler.step()
    assert [g["name"] for g in optimizer.param_groups] == ["backbone", "backbone_no_decay", "head"]


def test_partial_fc_keeps_its_lazy_sgd_and_says_so_for_adamw(tmp_path: Path) -> None:
    """Partial FC (head.sample_rate < 1) updates sampled rows lazily with SGD (LazyRowSGD, under the schedule as
    above); AdamW with it is refused in one line when the config is read."""
    data = to_dict(make_config(tmp_path / "run"))
    data["head"] = {"name": "arcface", "shard": True, "sample_rate": 0.5}
    data["optim"]["name"] = "adamw"
    with pytest.raises(ConfigError, match=r"head.sample_rate = 0.5 needs optim.name = 'sgd'"):
        config_from_dict(data, "<test>")


# ------------------------------------------------------------------------------ model.init_from a model file


def test_init_from_an_imported_model_file_starts_the_backbone_from_it(tmp_path: Path) -> None:
    """An arcface_torch-style state dict (DDP ``module.`` prefix) -> import-weights -> model.init_from: the
    backbone starts from it (lr 0: the trained parameters stay those imported), the head from its own init."""
    torch.manual_seed(123)
    source = build("r18", 16, input_size=32, width=0.125)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "model.pt")
    from faceforge.deploy.import_weights import import_weights

    weights, _ = import_weights(tmp_path / "model.pt", "r18", tmp_path / "imported", embedding_size=16,
                                image_size=32, backbone_kwargs={"width": 0.125})
    model = {"backbone": "r18", "embedding_size": 16, "kwargs": {"width": 0.125}, "init_from": str(weights)}
    result = train(make_config(tmp_path / "run", model=model, optim={"lr": 0.0, "weight_decay": 0.0},
                               train={"steps": 1}))
    from faceforge.core.checkpoint import load_checkpoint

    trained = load_checkpoint(result.checkpoint)["backbone"]
    for name, p in source.named_parameters():
        assert torch.equal(trained[name], p.detach()), name
    log = (result.output / "train.log").read_text()
    assert f"initialised from {weights} (model.init_from): the backbone (a model file; the head starts" in log


def test_init_from_a_model_file_of_another_backbone_is_one_line(tmp_path: Path) -> None:
    from faceforge.deploy.import_weights import import_weights

    torch.save(build("r18", 16, input_size=32, width=0.125).state_dict(), tmp_path / "model.pt")
    weights, _ = import_weights(tmp_path / "model.pt", "r18", tmp_path / "imported", embedding_size=16,
                                image_size=32, backbone_kwargs={"width": 0.125})
    model = {"backbone": "r34", "embedding_size": 16, "kwargs": {"width": 0.125}, "init_from": str(weights)}
    with pytest.raises(ConfigError, match=r"model.init_from: .*model.safetensors: a r18 with embedding size 16; "
                                          r"expected this run's model.backbone r34"):
        train(make_config(tmp_path / "run", model=model, train={"steps": 1}))


def test_a_missing_or_unreadable_model_file_is_one_line_before_the_first_step(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    (tmp_path / "bad.safetensors").write_bytes(b"not a model file")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))  # no faceforge metadata, no model.json
    for path, why in ((tmp_path / "missing.safetensors", "model file not found"),
                      (tmp_path / "bad.safetensors", "not a safetensors file"),
                      (tmp_path / "bare.safetensors", "no faceforge metadata")):
        with pytest.raises(ConfigError, match=rf"model\.init_from: .*{path.name}: {why}"):
            train(make_config(tmp_path / f"run_{path.stem}", model={"init_from": str(path)}))


# ------------------------------------------------------------------------------ the ViT configs


@pytest.mark.parametrize("variant", ["t", "s"])
def test_the_vit_config_loads_and_trains_two_steps(variant: str, tmp_path: Path) -> None:
    path = REPO / "configs" / f"vit_{variant}_synthetic.yaml"
    cfg = load_config(path)
    assert (cfg.optim.name, cfg.optim.weight_decay, cfg.optim.no_decay_bn_bias) == ("adamw", 0.1, True)
    assert cfg.train.ema.decay > 0 and cfg.schedule.name in ("cosine", "poly") and cfg.data.image_size == 112
    tiny = load_config(path, [
        f"output={tmp_path / 'run'}", "model.kwargs.width=0.0625", "data.num_identities=4",
        "data.images_per_identity=4", "data.batch_size=8", "data.eval_pairs=20", "data.eval_identities=4",
        "data.eval_batch_size=8", "train.steps=2", "train.eval_every=0", "train.checkpoint_every=0",
    ])
    result = train(tiny)
    assert result.step == 2 and all(math.isfinite(v) for v in result.losses)
    assert math.isfinite(result.metrics["accuracy"])
    log = (result.output / "train.log").read_text()
    assert "evaluations and model.safetensors use the averaged backbone" in log
