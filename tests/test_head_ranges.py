"""Values a run would silently train on wrongly are refused before step 1, one line naming the key (issue 25, 27).

- a head's margins and scale outside the documented range its class declares beside its signature
  (``KWARG_RANGES``, checked once, ``heads.base.check_kwarg_ranges``): ``head.kwargs.m=-5`` made ArcFace's
  target logit larger than every other logit, and the loss went to 0 while nothing was learned;
- hooks that cannot be missed: a head or an objective that defines a ``TrainHooks`` member without opting in, a
  head that is not a ``ClassifierHead`` for an objective that calls it as one;
- ``objective.kwargs`` and ``data.sampler_kwargs`` against their factories' signatures, like head kwargs.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from _runs import make_config
from faceforge.build import build_head
from faceforge.cli import main
from faceforge.data.samplers import build_sampler
from faceforge.heads import HEADS, ArcFace
from faceforge.heads.base import ClassifierHead, DeclaresRanges, KwargRange
from faceforge.train.config import ConfigError, to_yaml
from faceforge.train.objectives import build_objective

pytestmark = pytest.mark.usefixtures("one_thread")

C, D = 8, 16


def head_config(tmp_path: Path, name: str, **kwargs):
    return make_config(tmp_path / "run", head={"name": name, "kwargs": kwargs})


def test_a_negative_margin_trains_to_loss_zero_without_the_check() -> None:
    """Why the range exists: with m2 = -5 the target logit s cos(theta - 5) is near s for any embedding (the
    monotonic continuation of cos), so the loss is ~0 for random embeddings and W: nothing to learn."""
    torch.manual_seed(0)
    x, y = torch.randn(32, D), torch.randint(0, C, (32,))
    assert ArcFace(C, D, m=-5.0)(x, y).item() < 1e-3
    assert ArcFace(C, D)(x, y).item() > 1.0


@pytest.mark.parametrize(
    ("name", "kwargs", "key"),
    [
        ("arcface", {"m": -5}, "m"),
        ("arcface", {"s": 0.0}, "s"),
        ("arcface", {"m": 2.0}, "m"),  # past pi/2: theta + m leaves the monotone range for most theta
        ("cosface", {"m": -0.35}, "m"),
        ("sphereface", {"m": 0.2}, "m"),
        ("normface", {"s": float("nan")}, "s"),
        ("margin_softmax", {"m2": -1.0}, "m2"),
        ("margin_softmax", {"m3": 1.5}, "m3"),
        ("sphereface2", {"lamb": 1.5}, "lamb"),
        ("sphereface2", {"t": 0.5}, "t"),
        ("sphereface2", {"r": -30.0}, "r"),
        ("attfc", {"batch_size": 16, "m2": -0.5}, "m2"),
        ("broadface", {"queue_size": 16, "head": "arcface", "head_kwargs": {"m": -5}}, "head_kwargs.m"),
    ],
)
def test_out_of_range_margins_and_scales_name_their_key(tmp_path: Path, name: str, kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^(<test>: )?head\.kwargs\.{re_key(key)}: .*expected a number in [\[(]") as info:
        build_head(head_config(tmp_path, name, **kwargs), C)
    assert "\n" not in str(info.value)


def test_a_margin_that_is_not_a_number_names_its_key(tmp_path: Path) -> None:
    # the config's type check (against the factory's type hints) meets it first, when the config is read
    with pytest.raises(ConfigError, match=r"head\.kwargs\.m1 = '1': expected float$") as info:
        build_head(head_config(tmp_path, "margin_softmax", m1="1"), C)
    assert "\n" not in str(info.value)


def re_key(key: str) -> str:
    return key.replace(".", r"\.")


def test_sharded_heads_are_range_checked_too(tmp_path: Path) -> None:
    # refused when the config is read (naming the key), before build_head would refuse it for API callers
    with pytest.raises(ConfigError, match=r"^(<test>: )?head\.kwargs\.m: -5; expected a number in \[0, 1\.5708\]"):
        build_head(make_config(tmp_path / "run", head={"name": "arcface", "kwargs": {"m": -5}, "shard": True}), C)


def test_every_declared_range_holds_the_papers_defaults() -> None:
    """Each registered head's declared ranges hold its own defaults (the papers' values), and name real kwargs."""
    declared = 0
    for name in HEADS.names():
        factory = HEADS.get(name)
        if not isinstance(factory, DeclaresRanges):
            continue
        declared += 1
        parameters = inspect.signature(factory).parameters
        for key, allowed in factory.KWARG_RANGES.items():
            assert key in parameters, f"{name}: range for {key!r}, which the signature does not take"
            default = parameters[key].default
            if default is not inspect.Parameter.empty:
                assert allowed.holds(default), f"{name}.{key} = {default} outside {allowed.describe()}"
    assert declared >= 7  # margin_softmax, arcface, cosface, sphereface, normface, sphereface2, attfc


def test_a_range_is_closed_or_open_as_declared() -> None:
    r = KwargRange(0.0, math.pi / 2, open_low=True)
    assert not r.holds(0.0) and r.holds(1e-9) and r.holds(math.pi / 2) and not r.holds(2.0)
    assert not r.holds(True) and not r.holds(float("inf")) and not r.holds("0.5")
    assert r.describe() == "a number in (0, 1.5708]"


def test_cli_refuses_a_negative_margin_with_one_line_exit_2(tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(to_yaml(make_config(tmp_path / "run")))
    assert main(["train", str(config), "head.kwargs.m=-5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "head.kwargs.m: -5" in err[0] and "expected a number in [0, 1.5708]" in err[0], err
    assert main(["train", str(config), "objective.kwargs.nope=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "objective.kwargs.nope" in err[0], err


# ------------------------------------------------------------------------------------------ hooks that cannot be missed


class UnhookedHead(nn.Module, ClassifierHead):
    """A head that renormalises its rows after each step, but forgot to subclass TrainHooks."""

    def __init__(self, num_classes: int, embedding_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_size))

    def per_sample_loss(self, embeddings: Tensor, labels: Tensor, *, classifier_grad: bool = True) -> Tensor:
        return nn.functional.cross_entropy(embeddings @ self.weight.T, labels, reduction="none")

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.per_sample_loss(embeddings, labels).mean()

    def after_optimizer_step(self, step: int) -> None:  # never called: not a TrainHooks
        raise AssertionError("unreachable")


class NotAClassifier(nn.Module):
    """A head without per_sample_loss, observe_batch or batch_level_loss."""

    def __init__(self, num_classes: int, embedding_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_size))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return nn.functional.cross_entropy(embeddings @ self.weight.T, labels)


def test_a_head_with_a_hook_it_did_not_opt_into_is_refused(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "run", head={"name": "test_head_ranges:UnhookedHead", "kwargs": {}})
    with pytest.raises(ConfigError, match=r"^head\.name: .*UnhookedHead\.after_optimizer_step is a TrainHooks member"):
        build_head(cfg, C)
    # wrapped: BroadFace around it is refused for the inner head's member
    cfg = make_config(tmp_path / "run", head={"name": "broadface", "kwargs": {
        "queue_size": 8, "head": "test_head_ranges:UnhookedHead"}})
    with pytest.raises(ConfigError, match=r"UnhookedHead\.after_optimizer_step"):
        build_head(cfg, C)


def test_a_head_that_is_not_a_classifier_head_is_refused_naming_the_member() -> None:
    backbone = nn.Linear(4, D)
    with pytest.raises(ConfigError, match=r"^head\.name: NotAClassifier lacks the ClassifierHead member "
                                          r"'batch_level_loss', which objective 'classification' needs"):
        build_objective("classification", {}, backbone=backbone, head=NotAClassifier(C, D), amp_dtype=None)
    build_objective("classification", {}, backbone=backbone, head=ArcFace(C, D), amp_dtype=None)  # the contract holds


def test_objective_and_sampler_kwargs_are_checked_against_their_signatures() -> None:
    backbone = nn.Linear(4, D)
    with pytest.raises(ConfigError, match=r"^objective\.kwargs\.momentun: objective 'attfc' does not take it"):
        build_objective("attfc", {"momentun": 0.9}, backbone=backbone, head=ArcFace(C, D), amp_dtype=None)
    with pytest.raises(ConfigError, match=r"^objective\.kwargs\.head: "):  # the trainer passes it itself
        build_objective("classification", {"head": "x"}, backbone=backbone, head=ArcFace(C, D), amp_dtype=None)
    with pytest.raises(ValueError, match=r"^data\.sampler_kwargs\.k: sampler 'epoch' does not take it"):
        build_sampler("epoch", None, {"k": 2})  # k is the attfc sampler's


# ------------------------------------------------------------------------------------------ run facts


def test_the_trainer_passes_the_global_batch_to_attfc(tmp_path: Path) -> None:
    """AttFC's ``batch_size`` is the run's global batch: a config may leave it out (the trainer passes it in,
    ``RUN_FACTS``); one it sets is still checked against the run (before: required, restated by the user)."""
    from test_attfc_train import make_config as attfc_config

    from faceforge.train.engine import train
    from faceforge.train.preflight import check_head

    cfg = attfc_config(tmp_path / "run", head={"name": "attfc", "kwargs": {"container_size": 32, "s": 16.0}},
                       train={"steps": 2, "checkpoint_every": 2})
    check_head(cfg, C, world_size=2)  # left out: nothing to contradict
    head = build_head(cfg, C, global_batch=16)
    assert head.batch_size == 16
    result = train(cfg)  # one process: data.batch_size 8 x 1
    assert result.step == 2 and torch.isfinite(torch.as_tensor(result.losses)).all()
    cfg.head.kwargs["batch_size"] = 16
    with pytest.raises(ConfigError, match=r"^(<test>: )?head\.kwargs\.batch_size: 16, but one forward of this run enqueues a "
                                          r"global batch of 8"):
        check_head(cfg, C, world_size=1)


def test_a_sampler_without_the_objectives_extras_is_refused_before_step_1(tmp_path: Path) -> None:
    """objective attfc with data.sampler epoch: one line naming data.sampler, before any step (before: at step 1)."""
    from test_attfc_train import make_config as attfc_config

    from faceforge.train.engine import train

    cfg = attfc_config(tmp_path / "run", data={"sampler": "epoch", "sampler_kwargs": {}}, train={"steps": 1})
    with pytest.raises(ValueError, match=r"^data\.sampler: 'epoch': objective attfc: the batch has no "
                                         r"extras\['class_images'\]"):
        train(cfg)
    assert not (Path(cfg.output) / "last.pt").exists()
