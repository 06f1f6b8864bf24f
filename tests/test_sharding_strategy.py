"""Sharding is an execution strategy, not a model change (issue 27).

- the same config built unsharded (one process) and with ``head.shard: true`` starts from the same W: the rows
  of both from (seed, row) (``heads.parallel.seed_class_rows``), at any world size (test_parallel.py checks that
  the sharded rows do not depend on the world size);
- the sharded head's state dict has the unsharded head's keys;
- through the trainer: an unsharded run in one process and a ``head.shard: true`` run on 2 gloo ranks of the
  same config end equal (float32: the tolerance of test_parallel.py's ``assert_close_state``, 1e-5 of each
  tensor's scale, for sums in another order); the 2 ranks' checkpoint resumes in one process unsharded, and a
  one-process unsharded checkpoint resumes on 2 ranks sharded, each continuing the same training.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

from _runs import BASE as RUN_BASE
from _runs import make_config
from faceforge.build import build_head
from faceforge.core.checkpoint import load_checkpoint
from faceforge.train.config import config_from_dict
from faceforge.train.engine import train
from test_parallel import GLOBAL_BATCH, assert_close_state, free_port, resolved, worker

pytestmark = pytest.mark.usefixtures("one_thread")

C = 8  # RUN_BASE's identities
HEADS = {  # name -> kwargs: a margin head, plain softmax (W and b are class rows), SphereFace2 (a shared bias)
    "arcface": {"s": 16.0},
    "softmax": {},
    "sphereface2": {"r": 6.0, "chunk_size": 3},
}


def head_config(tmp_path: Path, name: str, shard: bool, seed: int = 5, kwargs: dict | None = None):
    cfg = make_config(tmp_path / "run", head={"name": name, "kwargs": HEADS[name] if kwargs is None else kwargs,
                                              "shard": shard})
    cfg.seed = seed
    return cfg


@pytest.mark.parametrize("name", sorted(HEADS))
def test_unsharded_and_sharded_heads_start_from_the_same_rows_with_the_same_keys(tmp_path: Path, name: str) -> None:
    plain = build_head(head_config(tmp_path, name, shard=False), C).state_dict()
    sharded = build_head(head_config(tmp_path, name, shard=True), C).state_dict()  # one process: every row
    assert set(plain) == set(sharded)
    for key, value in plain.items():
        assert torch.equal(value, sharded[key]), f"{name}: {key}"
    other_seed = build_head(head_config(tmp_path, name, shard=False, seed=6), C).state_dict()
    assert not torch.equal(plain["weight"], other_seed["weight"])  # rows from (seed, row), not a fixed init


def test_a_wrapped_head_starts_from_the_same_rows(tmp_path: Path) -> None:
    """BroadFace's inner head is seeded as the sharded one is."""
    kwargs = {"queue_size": 8, "head": "arcface", "head_kwargs": {"s": 16.0}}
    plain = build_head(head_config(tmp_path, "broadface", shard=False, kwargs=kwargs), C)
    sharded = build_head(head_config(tmp_path, "broadface", shard=True, kwargs=kwargs), C)
    assert torch.equal(plain.state_dict()["head.weight"], sharded.state_dict()["head.weight"])


# ------------------------------------------------------------------------------------------ through the trainer


def strategy_config(output: Path, world: int, steps: int, shard: bool):
    """test_parallel.py's sharded ArcFace run (8 classes, TinyNet, constant lr, clipping), sharded or not."""
    data = copy.deepcopy(RUN_BASE)
    data["output"] = str(output)
    data["model"]["kwargs"] = {"dropout": 0.0}
    data["head"] = {"name": "arcface", "kwargs": {"s": 16.0}, "shard": shard}
    data["data"]["batch_size"] = GLOBAL_BATCH // world
    data["schedule"] = {"name": "constant", "warmup_steps": 0}
    data["train"].update(steps=steps, checkpoint_every=2, keep_checkpoints=5, clip_grad_norm=1.0)
    return config_from_dict(data, "<test>")


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory) -> Path:
    """One process, head.shard false, 6 steps (checkpoints at 2, 4, 6)."""
    output = tmp_path_factory.mktemp("unsharded") / "run"
    train(strategy_config(output, 1, 6, shard=False))
    return output


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """2 gloo ranks, head.shard true, 4 steps."""
    output = tmp_path_factory.mktemp("two_ranks") / "run"
    worker(strategy_config(output, 2, 4, shard=True), "--nprocs", "2", "--port", str(free_port()))
    return output


def test_sharded_on_2_ranks_ends_as_unsharded_in_one_process(unsharded: Path, two_ranks: Path) -> None:
    final, expected = resolved(two_ranks / "last.pt"), resolved(unsharded / "step_0000004.pt")
    assert final["step"] == expected["step"] == 4 and final["world_size"] == 2
    assert set(final["head"]) == set(expected["head"]) == {"weight"}  # the same keys
    for key in ("backbone", "head", "optimizer"):
        assert_close_state(final[key], expected[key], key)
    initial = build_head(strategy_config(unsharded, 1, 6, shard=False), C).state_dict()["weight"]
    assert (expected["head"]["weight"] - initial).abs().max() > 1e-3  # the comparison has teeth


def test_a_2_rank_sharded_checkpoint_resumes_in_one_process_unsharded(unsharded: Path, two_ranks: Path,
                                                                      tmp_path: Path) -> None:
    """Before: ``Missing key(s) in state_dict: "weight"``."""
    output = tmp_path / "run"
    shutil.copytree(two_ranks, output)
    train(strategy_config(output, 1, 6, shard=False), resume=True)
    final, expected = resolved(output / "last.pt"), resolved(unsharded / "last.pt")
    assert final["step"] == expected["step"] == 6
    for key in ("backbone", "head", "optimizer"):
        assert_close_state(final[key], expected[key], key)


def test_a_one_process_unsharded_checkpoint_resumes_on_2_ranks_sharded(unsharded: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    output.mkdir()
    shutil.copy(unsharded / "step_0000002.pt", output / "last.pt")  # an unsharded checkpoint holds no shard files
    assert load_checkpoint(output / "last.pt")["head"]["weight"].shape == (C, 16)
    worker(strategy_config(output, 2, 4, shard=True), "--resume", "--nprocs", "2", "--port", str(free_port()))
    final, expected = resolved(output / "last.pt"), resolved(unsharded / "step_0000004.pt")
    assert final["step"] == 4 and final["world_size"] == 2
    for key in ("backbone", "head", "optimizer"):
        assert_close_state(final[key], expected[key], key)
