"""Sharded BroadFace (heads/parallel_broadface.py) and sharded AttFC (heads/parallel_attfc.py) on 2 and 3 gloo ranks
against the unsharded heads in one process with the whole batch.

BroadFace(ArcFace / CosFace) on C = 7 classes (3 + 2 + 2 rows on 3 ranks, 4 + 3 on 2), a queue of 10 that wraps,
blocks of 4 queue rows, unequal batches at one step, SGD with momentum and weight decay. AttFC with a container of
S = 12 slots (6 + 6 and 4 + 4 + 4: S is a multiple of the global batch, hence of W, so its slots always divide
evenly) over C = 4 classes, so the conflict mask of Alg. 1 removes entries at every step, and the FIFO wraps twice.

Float64 throughout. Only the order of float64 sums differs (the distributed logsumexp, the gathered shifts of
Eq. 7, the all-reduced embedding gradient): agreement to 1e-10 relative, as in test_parallel.py (float64 epsilon
2.2e-16 times a few hundred terms leaves six orders of magnitude of margin); a gradient off by one rank's share, a
compensation from the wrong row or an entry written to the wrong slot is off by > 1e-3.

The checkpoint: after 2 of the 4 steps the 2 ranks write their head's state as the trainer does (row shards into
one logical file each, ``faceforge.core.shards``; ``extra_state`` from rank 0), and one process resumes from it
and runs the last 2 steps on the whole batches: the same losses and state as the 2 ranks and the reference.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from faceforge.heads import build
from faceforge.heads.attfc import AttFC
from faceforge.heads.parallel import build_sharded, shard_range
from faceforge.core import shards
from test_parallel import D, batch, close, spawn

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, SAVED_AT = 4, 2  # D: test_parallel's
BROADFACE = {"queue_size": 10, "row_chunk": 4}
INNER = {"arcface": {"s": 8.0, "m": 0.5}, "cosface": {"s": 8.0, "m": 0.35}}
C_BF = 7
C_ATT, GLOBAL, K = 4, 6, 3  # AttFC: classes, global batch (2 x 3 or 3 x 2), class images per sample
ATTFC = {"batch_size": GLOBAL, "container_size": 12, "s": 8.0, "m2": 0.3}


# ------------------------------------------------------------------------------------------------- the batches


def bf_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """test_parallel's batches (unequal at step 1: the gather pads) over BroadFace's C_BF classes."""
    return batch(rank, step, num_classes=C_BF)


def att_global(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch of a step in the epoch sampler's order (rank r holds rows r, r + W, ...)."""
    g = torch.Generator().manual_seed(77 + step)
    x = torch.randn(GLOBAL, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C_ATT, (GLOBAL,), generator=g)
    return x, y, torch.randn(GLOBAL, K, D, generator=g, dtype=torch.float64)


def att_batch(rank: int, world: int, step: int) -> tuple[torch.Tensor, ...]:
    return tuple(t[rank::world] for t in att_global(step))


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=5e-3)


# ------------------------------------------------------------------------------------------------- the runs


def make(kind: str, group=None) -> torch.nn.Module:
    if kind == "attfc":
        return build_sharded("attfc", C_ATT, D, seed=3, group=group, **ATTFC).double()
    return build_sharded("broadface", C_BF, D, seed=3, group=group, head=kind, head_kwargs=INNER[kind],
                         **BROADFACE).double()


def step_of(kind: str, head, optimizer, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step; (loss, the embeddings' gradient)."""
    x = inputs[0].clone().requires_grad_(True)
    loss = head(x, *inputs[1:])
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad()
    return loss.detach(), x.grad


def rank_inputs(kind: str, rank: int, world: int, step: int) -> tuple:
    return att_batch(rank, world, step) if kind == "attfc" else bf_batch(rank, step)


def run_sharded(kind: str, world: int, rank: int, group, folder: Path | None) -> dict:
    """STEPS steps on this rank's batches; the head's state written as a checkpoint after SAVED_AT (``folder``)."""
    head = make(kind, group)
    optimizer = sgd(head.parameters()) if kind != "attfc" else None
    losses, grads = [], []
    for step in range(STEPS):
        if step == SAVED_AT and folder is not None:
            write_checkpoint(head, optimizer, folder, rank, group)
        loss, grad = step_of(kind, head, optimizer, rank_inputs(kind, rank, world, step))
        losses.append(loss)
        grads.append(grad)
    extra = head.extra_state() if kind != "attfc" else {}
    return {"losses": torch.stack(losses), "grads": grads, "state": head.state_dict(), "extra": extra,
            "shards": {k: tuple(v) for k, v in head.row_shards().items()},
            "optimizer": optimizer.state_dict() if optimizer is not None else None}


def write_checkpoint(head, optimizer, folder: Path, rank: int, group) -> None:
    """What the trainer writes (train/engine.py ``save``): each row-sharded tensor (and its SGD momentum) as rows at
    their offset in one logical file, placeholders and the rest (``extra_state`` too) from rank 0."""
    state = {"head": head.state_dict(), "extra": head.extra_state(), "optimizer": None}
    if optimizer is not None:  # state_dict() shares the per-parameter dicts with the live optimiser: copies
        packed = optimizer.state_dict()
        state["optimizer"] = {**packed, "state": {i: dict(v) for i, v in packed["state"].items()}}
    params = {k: v for k, v in head.state_dict(keep_vars=True).items() if isinstance(v, torch.nn.Parameter)}
    for name, shard in head.row_shards().items():
        places = [(state["head"], name, name)]
        if name in params and optimizer is not None:  # the head's only parameter: index 0
            places.append((state["optimizer"]["state"][0], "momentum_buffer", f"momentum.{name}"))
        for where, key, file_name in places:
            tensor = where[key]
            file = shards.shard_file(SAVED_AT, file_name)
            if rank == 0:
                shards.create(folder, file, [shard.total, *tensor.shape[1:]], tensor.dtype)
            dist.barrier(group)
            shards.write_rows(folder, file, shard, tensor)
            where[key] = shards.placeholder(file, shard, tensor)
    dist.barrier(group)
    if rank == 0:
        torch.save(state, folder / "head.pt")


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """3 gloo ranks: both heads on all 3, then on the 2-rank group of ranks 0 and 1 (which also checkpoints)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        pair = dist.new_group([0, 1])
        results = {}
        for kind in ("arcface", "cosface", "attfc"):
            results[(kind, world)] = run_sharded(kind, world, rank, None, None)
            if rank < 2:
                folder = Path(out) / kind
                folder.mkdir(exist_ok=True)
                results[(kind, 2)] = run_sharded(kind, 2, rank, pair, folder)
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # no rank destroys the group while another still uses it
    finally:
        dist.destroy_process_group()


def global_inputs(kind: str, world: int, step: int) -> tuple[tuple, list[int]]:
    """The whole batch of a step (the sampler's order; rank order for unequal batches) and each rank's size."""
    if kind == "attfc":
        return att_global(step), [GLOBAL // world] * world
    parts = [bf_batch(r, step) for r in range(world)]
    sizes = [p[0].shape[0] for p in parts]
    if len(set(sizes)) == 1:  # equal batches: the sampler's order (rank r's row b at b W + r), as the trainer's
        return tuple(torch.stack(t, 1).flatten(0, 1) for t in zip(*parts)), sizes
    return tuple(torch.cat(t) for t in zip(*parts)), sizes  # unequal (no sampler gives them): rank order


def reference(kind: str, world: int) -> dict:
    """The unsharded head, the same initial state (the logical tensors of a one-process sharded head)."""
    initial = make(kind).state_dict()
    if kind == "attfc":
        head = AttFC(C_ATT, D, **ATTFC).double()
        head.load_state_dict(initial)
    else:
        head = build("broadface", num_classes=C_BF, embedding_size=D, head=kind, head_kwargs=INNER[kind],
                     **BROADFACE).double()
        head.head.load_state_dict({"weight": initial["head.weight"]})
    optimizer = sgd(head.parameters()) if kind != "attfc" else None
    losses, grads = [], []
    for step in range(STEPS):
        inputs, sizes = global_inputs(kind, world, step)
        loss, grad = step_of(kind, head, optimizer, inputs)
        losses.append(loss)
        grads.append([grad[r::world] for r in range(world)] if len(set(sizes)) == 1 else list(grad.split(sizes)))
    return {"losses": torch.stack(losses), "grads": grads, "state": head.state_dict()}


def resumed(kind: str, folder: Path) -> dict:
    """One process resumes from the 2 ranks' checkpoint and runs the last steps on the whole batches."""
    head = make(kind)
    state = shards.resolve(torch.load(folder / "head.pt", weights_only=True), folder)
    head.load_state_dict(state["head"])
    if state["extra"]:
        head.load_extra_state(state["extra"])
    optimizer = None
    if state["optimizer"] is not None:
        optimizer = sgd(head.parameters())
        optimizer.load_state_dict(state["optimizer"])
    losses = [step_of(kind, head, optimizer, global_inputs(kind, 2, step)[0])[0] for step in range(SAVED_AT, STEPS)]
    return {"losses": torch.stack(losses), "state": head.state_dict(),
            "extra": head.extra_state() if kind != "attfc" else {}}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("queues")
    spawn(_worker, 3, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(3)], out


@pytest.mark.parametrize("kind", ["arcface", "cosface", "attfc"])
def test_sharded_queue_heads_on_2_and_3_ranks_equal_one_process_with_the_whole_batch(kind: str, ranks) -> None:
    results, _ = ranks
    for world in (2, 3):
        ref = reference(kind, world)
        for rank, result in enumerate(results[:world]):
            got = result[(kind, world)]
            close(got["losses"], ref["losses"], f"{kind}: losses on rank {rank} of {world}")
            for step in range(STEPS):
                # the gather hands back world_size x the rank's share, since the trainer averages over ranks
                close(got["grads"][step] / world, ref["grads"][step][rank], f"{kind}: embedding grad, step {step}")
            for key, value in ref["state"].items():
                if kind != "attfc" and key == "queue_weights":  # with the owners: the logical (Q, D) in extra_state
                    close(got["extra"]["queue_weights"], value, f"{kind}: W-_y rows on rank {rank} of {world}")
                    continue
                name = key  # the sharded head keeps the unsharded head's keys
                mine = got["state"][name]
                if name in got["shards"]:  # a logical tensor: this rank's rows
                    start, stop, total = got["shards"][name]
                    assert (start, stop) == shard_range(total, world, rank)
                    value = value[start:stop]
                if value.is_floating_point():
                    close(mine, value, f"{kind}: {key} after {STEPS} steps, rank {rank} of {world}")
                else:
                    assert torch.equal(mine, value), f"{kind}: {key}, rank {rank} of {world}"
        # the comparison has teeth: the state moved far beyond the tolerance
        initial = make(kind).state_dict()
        key = "container" if kind == "attfc" else "head.weight"
        ref_key = "container" if kind == "attfc" else "head.weight"
        assert (ref["state"][ref_key] - initial[key]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["arcface", "attfc"])
def test_checkpoint_of_2_ranks_resumes_on_1_process(kind: str, ranks) -> None:
    results, out = ranks
    got = resumed(kind, out / kind)
    pair = [results[r][(kind, 2)] for r in range(2)]
    close(got["losses"], pair[0]["losses"][SAVED_AT:], f"{kind}: losses after the resume")
    for key, value in got["state"].items():
        if key in pair[0]["shards"]:  # the logical tensor: the ranks' rows in order
            expected = torch.cat([p["state"][key] for p in pair])
        else:
            expected = pair[0]["state"][key]
        if value.is_floating_point():
            close(value, expected, f"{kind}: {key} after the resume")
        else:
            assert torch.equal(value, expected), f"{kind}: {key} after the resume"
    if kind != "attfc":
        close(got["extra"]["queue_weights"], pair[0]["extra"]["queue_weights"], "W-_y rows after the resume")
    # the resumed steps wrote new entries (the state after the checkpoint differs from it)
    saved = shards.resolve(torch.load(out / kind / "head.pt", weights_only=True), out / kind)["head"]
    key = "container" if kind == "attfc" else "head.weight"
    assert (saved[key] - got["state"][key]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- through the trainer

TRAINER_HEADS = {  # head.shard: true through the config; global batch 8 (2 ranks x 4 or 1 x 8)
    "broadface": {"head": {"name": "broadface", "shard": True, "kwargs": {
        "queue_size": 12, "head": "arcface", "head_kwargs": {"s": 16.0}}}},
    "attfc": {"head": {"name": "attfc", "shard": True, "kwargs": {"batch_size": 8, "container_size": 16, "s": 16.0}},
              "objective": {"name": "attfc", "kwargs": {"momentum": 0.9}},
              "data": {"sampler": "attfc", "sampler_kwargs": {"k": 2}}},
}


def trainer_config(kind: str, output: Path, world: int, steps: int):
    from _runs import BASE as RUN_BASE, config_from_base

    sections = TRAINER_HEADS[kind]
    data = {**RUN_BASE["data"], **sections.get("data", {}), "batch_size": 8 // world}
    return config_from_base(
        RUN_BASE, output, head=sections["head"], data=data, model={"kwargs": {"dropout": 0.0}},
        objective=sections.get("objective", {"name": "classification", "kwargs": {}}),
        schedule={"name": "constant", "warmup_steps": 0}, train={"steps": steps, "checkpoint_every": 2},
    )


# two trainer launches per head (~1 min loaded): BroadFace in the default run, so that a checkpoint written by the
# trainer's own save (row shards + extra_state from 2 ranks) is read back by one process in every run; AttFC's
# state takes the same path, its launch is slow-only
@pytest.mark.parametrize("kind", ["broadface", pytest.param("attfc", marks=pytest.mark.slow)])
def test_trainer_run_of_2_ranks_resumes_on_1_process_as_one_process_straight(kind: str, tmp_path: Path) -> None:
    from test_parallel import assert_close_state, free_port, resolved, worker
    from faceforge.core.checkpoint import load_checkpoint
    from faceforge.train.engine import train

    straight = train(trainer_config(kind, tmp_path / "straight", 1, 4))
    output = tmp_path / "run"
    worker(trainer_config(kind, output, 2, 2), "--nprocs", "2", "--port", str(free_port()))
    state = load_checkpoint(output / "last.pt")
    key = "container" if kind == "attfc" else "head.weight"
    assert shards.is_placeholder(state["head"][key]) and state["world_size"] == 2
    resumed = train(trainer_config(kind, output, 1, 4), resume=True)
    close_losses = torch.tensor(resumed.losses), torch.tensor(straight.losses[2:])
    torch.testing.assert_close(*close_losses, rtol=1e-5, atol=1e-6)
    final, expected = resolved(resumed.checkpoint), resolved(straight.checkpoint)
    for part in ("backbone", "head", "optimizer", "extra"):
        if part in expected:
            assert_close_state(final[part], expected[part], part)


def test_head_shard_builds_the_sharded_queue_heads_and_refuses_what_they_cannot_do(tmp_path: Path) -> None:
    from faceforge.build import build_head
    from faceforge.heads.parallel_attfc import ShardedAttFC
    from faceforge.heads.parallel_broadface import ShardedBroadFace
    from faceforge.train.config import ConfigError

    assert isinstance(build_head(trainer_config("broadface", tmp_path / "b", 1, 2), 8), ShardedBroadFace)
    attfc = build_head(trainer_config("attfc", tmp_path / "a", 1, 2), 8)
    assert isinstance(attfc, ShardedAttFC) and attfc.row_shards()["container"] == (0, 16, 16)
    with pytest.raises(ValueError, match="Partial FC"):
        build_sharded("broadface", 8, 4, queue_size=4, sample_rate=0.5)
    with pytest.raises(ValueError, match="gather"):
        build_sharded("broadface", 8, 4, queue_size=4, gather=True)
    with pytest.raises(ValueError, match="sample_rate"):
        build_sharded("attfc", 8, 4, batch_size=2, container_size=4, sample_rate=0.5)
    cfg = trainer_config("broadface", tmp_path / "c", 1, 2)
    cfg.head.sample_rate = 0.5
    with pytest.raises(ConfigError, match="head.kwargs"):
        build_head(cfg, 8)
