"""The seams of docs/extending.md, through the trainer: a head, a sampler and an objective defined in
``tests/_extending.py`` and named in the config as ``"_extending:..."``; the registries' import specs.

Runs are tiny (64 synthetic 32x32 images, TinyNet, 4 steps, one thread), so that a resumed run must give the
same bits as an uninterrupted one.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import _extending
from _runs import make_config, resumed_equals_straight
from faceforge.data.samplers import SAMPLERS, Batch, TrainSampler
from faceforge.heads.base import ClassifierHead, TrainHooks
from faceforge.core.registry import Registry
from faceforge.core import shards
from faceforge.core.checkpoint import load_checkpoint
from faceforge.train.config import ConfigError, to_yaml
from faceforge.train.engine import NonFiniteLossError, train
from faceforge.train.objectives import OBJECTIVES, Classification

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------- a head


def test_example_head_meets_the_contract() -> None:
    head = _extending.CosineHead(5, 4).double()
    assert isinstance(head, ClassifierHead) and isinstance(head, TrainHooks) and not head.batch_level_loss
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 5, (6,))
    cos = (x / x.norm(dim=1, keepdim=True)) @ (head.weight / head.weight.norm(dim=1, keepdim=True)).T
    plain = -torch.log_softmax(16.0 * cos, dim=1)[range(6), y]  # NormFace Eq. 2 as written
    torch.testing.assert_close(head.per_sample_loss(x, y), plain)
    torch.testing.assert_close(head(x, y), plain.mean())


@pytest.mark.equivalence
def test_example_head_trains_with_its_hooks_and_resumes(tmp_path: Path) -> None:
    state = resumed_equals_straight(
        tmp_path, head={"name": "_extending:CosineHead", "kwargs": {"s": 8.0}}, train={"diagnostics_every": 2}
    )
    assert state["extra"] == {"head": {"updates": 4}}  # extra_state, after 4 after_optimizer_step calls
    norms = state["head"]["weight"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))  # renormalised after the last step
    log = (tmp_path / "straight" / "train.log").read_text()
    assert "diagnostics step 2: row_norm_max" in log and "diagnostics step 4: row_norm_max" in log


# ---------------------------------------------------------------------------------------------- a sampler + an objective


def test_example_sampler_yields_extras() -> None:
    from faceforge.data.samplers import SamplerContext
    from faceforge.data.synthetic import SyntheticFaces

    dataset = SyntheticFaces(4, 4, image_size=16, seed=0)
    context = SamplerContext(dataset=dataset, batch_size=4, world_size=1, rank=0, seed=0, grad_accum=1,
                             micro_per_epoch=4)
    sampler = SAMPLERS.build("_extending:MirrorSampler", context=context)
    assert isinstance(sampler, TrainSampler)
    batches = list(sampler.batches(epoch=0, start_micro=1))
    assert len(batches) == 3 and all(isinstance(b, Batch) for b in batches)
    for b in batches:
        assert torch.equal(b.extras["mirror"], b.images.flip(-1))
        assert torch.equal(b.view_ids(), 2 * b.sample_ids + b.flipped.long())


@pytest.mark.equivalence
def test_example_objective_with_an_owned_encoder_through_the_trainer(tmp_path: Path) -> None:
    sections = {
        "data": {"sampler": "_extending:MirrorSampler"},
        "objective": {"name": "_extending:MirrorConsistency", "kwargs": {"weight": 0.5, "momentum": 0.5}},
    }
    state = resumed_equals_straight(tmp_path, **sections)
    ema, backbone = state["objective"], state["backbone"]  # the owned modules' state, saved under "objective"
    assert set(ema) == {f"ema.{k}" for k in backbone}
    assert not torch.equal(ema["ema.fc.weight"], backbone["fc.weight"])  # a momentum copy, not the backbone
    # both named terms are logged each step
    lines = [line for line in (tmp_path / "straight" / "train.log").read_text().splitlines() if " step " in line
             and "loss" in line]
    assert len(lines) == 4 and all(" classification " in line and " consistency " in line for line in lines)


@pytest.mark.equivalence
def test_objective_terms_sum_to_the_logged_loss(tmp_path: Path) -> None:
    """The plain objective's one term is the head's loss; the logged loss is the sum of the terms."""
    sections = {"data": {"sampler": "_extending:MirrorSampler"},
                "objective": {"name": "_extending:MirrorConsistency", "kwargs": {"weight": 0.0}}}
    with_zero_term = train(make_config(tmp_path / "zero", train={"steps": 2, "checkpoint_every": 0}, **sections))
    plain = train(make_config(tmp_path / "plain", train={"steps": 2, "checkpoint_every": 0},
                              data={"sampler": "_extending:MirrorSampler"}))
    assert with_zero_term.losses == plain.losses  # + 0 * consistency changes nothing
    assert OBJECTIVES.get("classification") is Classification


# ---------------------------------------------------------------------------------------------- registries


def test_registry_names_and_import_specs() -> None:
    registry: Registry[Any] = Registry("thing")
    registry.register("one")(lambda **kw: ("one", kw))
    assert registry.build("ONE", a=1) == ("one", {"a": 1})
    assert registry.get("_extending:CosineHead") is _extending.CosineHead
    with pytest.raises(KeyError, match="unknown thing 'two'; expected one of: one"):
        registry.get("two")
    with pytest.raises(ValueError, match="cannot import '_extending:Nothing'"):
        registry.get("_extending:Nothing")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("one")(lambda: None)


@pytest.mark.parametrize("key", ["data.name", "data.sampler", "optim.name", "schedule.name", "objective.name"])
def test_config_names_are_checked_against_their_registries(tmp_path: Path, key: str) -> None:
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"{section}\.{name} = 'nope': expected one of: .*'package.module:callable'"):
        make_config(tmp_path, **{section: {name: "nope"}})
    make_config(tmp_path, **{section: {name: "somewhere.else:factory"}})  # a spec is imported when built


# ---------------------------------------------------------------------------------------------- sharded opt-out


def _two_ranks_in_one_process(cfg: Any) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]], list[float]]:
    """The 2-rank run of ``cfg`` (float64, no dropout) replayed in one process, written out step by step: each
    rank r builds the same backbone and head (the trainer's seed and builders), takes its half batch from the
    sampler at (world 2, rank r); the backbone's gradient is the mean of the ranks' (DDP), the head's is the
    rank's own (``row_shards``); the global norm is sqrt(|mean backbone grad|^2 + sum_r |head_r grad|^2), the clip
    factor min(1, clip / (norm + 1e-6)) (``clip_grads_with_norm_``); then SGD and the head's row renormalisation.
    Returns the head's initial rows, each rank's final {"weight": head rows, backbone keys...} and the grad norm
    of each step."""
    import copy

    from faceforge.build import build_backbone, build_head
    from faceforge.data.samplers import SamplerContext
    from faceforge.train.data import build_dataset
    from faceforge.train.optim import build_optimizer, build_scheduler

    torch.manual_seed(cfg.seed)  # as the trainer: seed, dataset, backbone, head
    dataset = build_dataset(cfg)
    backbone, head = build_backbone(cfg), build_head(cfg, int(dataset.num_classes))
    world, steps, batch = 2, cfg.train.steps, cfg.data.batch_size
    per_epoch = len(dataset) // (batch * world)
    ranks = []
    for r in range(world):
        bb, hd = copy.deepcopy(backbone), copy.deepcopy(head)
        opt = build_optimizer(cfg.optim, bb, torch.nn.ModuleList([hd]), batch * world, zero=False)
        context = SamplerContext(dataset=dataset, batch_size=batch, world_size=world, rank=r, seed=cfg.seed,
                                 grad_accum=1, micro_per_epoch=per_epoch, flip=cfg.data.flip)
        sampler = SAMPLERS.build(cfg.data.sampler, context=context)
        ranks.append((bb, hd, opt, build_scheduler(cfg.schedule, opt, steps, per_epoch), sampler.batches(0, 0)))
    norms = []
    for step in range(1, steps + 1):
        grads = []
        for bb, hd, _, _, batches in ranks:
            b = next(batches)
            loss = hd(bb(b.images), b.labels)
            grads.append(torch.autograd.grad(loss, [*bb.parameters(), hd.weight]))
        backbone_grad = [sum(g) / world for g in zip(*(g[:-1] for g in grads))]
        square = sum(float(g.square().sum()) for g in backbone_grad) + sum(float(g[-1].square().sum()) for g in grads)
        norms.append(square ** 0.5)
        factor = min(1.0, cfg.train.clip_grad_norm / (norms[-1] + 1e-6))
        for (bb, hd, opt, sched, _), g in zip(ranks, grads):
            for p, grad in zip([*bb.parameters(), hd.weight], [*backbone_grad, g[-1]]):
                p.grad = grad * factor
            opt.step()
            sched.step()
            hd.after_optimizer_step(step)
    final = [{"weight": hd.weight.detach(), **bb.state_dict()} for bb, hd, *_ in ranks]
    return head.weight.detach(), final, norms


def test_sharded_head_is_left_to_itself_on_two_gloo_ranks(tmp_path: Path) -> None:
    """A head with ``row_shards``, on 2 gloo ranks in float64: each rank's rows are trained on its own half batch
    alone, the backbone on both halves (their gradients averaged), the gradient norm for clipping sums both
    ranks' squared head norms, and the checkpoint holds both ranks' rows as one logical tensor (rank r's at
    [8 r, 8 r + 8)). All checked against the same 2 steps written out in one process, in float64 but for the
    trainer's gradient norm, which it takes in float32 (``_grad_norm``): the clip factor carries a relative
    error of a few 2^-24 (<= 3e-7), on updates of at most lr x clip = 0.1 per step, so the parameters differ
    by <= 2 x 0.1 x 3e-7 = 6e-8 (measured 3.3e-10); 1e-7, where rank 1 untrained or the rows averaged
    differ by > 1e-3.

    Rank 1's rows after step 2 come from rank 1's forward at step 2, through rank 1's backbone after step 1: their
    agreement with the replay says that backbone equals rank 0's (the checkpoint's), step by step.
    """
    cfg = make_config(
        tmp_path / "run", head={"name": "_train_worker:float64_head", "kwargs": {"inner": "_extending:RankLocalHead", "s": 8.0}},
        model={"kwargs": {"dtype": "float64", "dropout": 0.0}},
        data={"batch_size": 8}, train={"steps": 2, "checkpoint_every": 0, "clip_grad_norm": 1.0},
    )
    config = tmp_path / "run.yaml"
    config.write_text(to_yaml(cfg))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    worker = Path(__file__).with_name("_train_worker.py")
    proc = subprocess.run([sys.executable, str(worker), str(config), "--nprocs", "2", "--port", str(port)],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = shards.resolve(load_checkpoint(tmp_path / "run" / "last.pt"), tmp_path / "run")
    weight = state["head"]["weight"]  # rank 0's rows, then rank 1's
    assert weight.shape == (2 * 8, 16) and weight.dtype == torch.float64

    initial, expected, norms = _two_ranks_in_one_process(cfg)
    for r in range(2):
        rows = weight[8 * r: 8 * (r + 1)]
        assert (rows - initial).abs().max() > 1e-3, f"rank {r}'s rows did not move"
        torch.testing.assert_close(rows, expected[r]["weight"], rtol=0.0, atol=1e-7)
    assert (weight[:8] - weight[8:]).abs().max() > 1e-3  # each rank learnt from its own half of the batch
    for key, value in state["backbone"].items():
        torch.testing.assert_close(value, expected[0][key], rtol=0.0, atol=1e-7)
    logged = [float(m) for m in re.findall(r"grad_norm (\d+\.\d+)", (tmp_path / "run" / "train.log").read_text())]
    assert len(logged) == 2
    for step, (got, want) in enumerate(zip(logged, norms), 1):
        assert abs(got - want) <= 0.5e-4 + 1e-12, f"step {step}: logged grad_norm {got} != {want:.6f}"  # %.4f


def test_a_non_finite_term_is_named(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "nan", data={"sampler": "_extending:MirrorSampler"},
                      objective={"name": "_extending:MirrorConsistency", "kwargs": {"weight": float("nan")}})
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss term 'consistency' nan at step 1 \(epoch 0"):
        train(cfg)
    assert not (tmp_path / "nan" / "last.pt").exists()


def test_load_backbone_reads_the_backbone_or_an_owned_encoder(tmp_path: Path) -> None:
    from faceforge.build import load_backbone

    result = train(make_config(tmp_path / "run", train={"steps": 1, "checkpoint_every": 0},
                               data={"sampler": "_extending:MirrorSampler"},
                               objective={"name": "_extending:MirrorConsistency", "kwargs": {"momentum": 0.5}}))
    state = load_checkpoint(result.checkpoint)
    backbone, cfg = load_backbone(result.checkpoint)
    ema, _ = load_backbone(state, encoder="ema")
    assert cfg.objective.name == "_extending:MirrorConsistency"
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state["backbone"][key])
        assert torch.equal(ema.state_dict()[key], state["objective"][f"ema.{key}"])
    with pytest.raises(ValueError, match="no encoder 'teacher'; expected 'backbone' or one the objective owned: ema"):
        load_backbone(state, encoder="teacher")


def test_a_sampler_reads_the_labels_the_trainer_gives(tmp_path: Path) -> None:
    """``SamplerContext.labels()`` through the trainer: the example pairs each image with another of its identity."""
    from faceforge.data.samplers import SamplerContext
    from faceforge.train.data import build_dataset, dataset_labels

    cfg = make_config(tmp_path / "run", train={"steps": 2, "checkpoint_every": 0},
                      data={"sampler": "_extending:SameIdentitySampler"})
    train(cfg)  # the trainer's context has labels(); the sampler asserts it
    dataset = build_dataset(cfg)
    labels = torch.from_numpy(dataset_labels(dataset))
    context = SamplerContext(dataset=dataset, batch_size=16, world_size=1, rank=0, seed=0, grad_accum=1,
                             micro_per_epoch=4, labels=lambda: labels)
    sampler = _extending.SameIdentitySampler(context)
    batch = next(sampler.batches(epoch=0, start_micro=0))
    partners = sampler.partner[batch.sample_ids]
    assert torch.equal(labels[partners], batch.labels) and bool((partners != batch.sample_ids).all())
    assert torch.equal(batch.extras["same_identity"][0], dataset[int(partners[0])][0])
