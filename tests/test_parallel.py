"""heads/parallel.py: class-sharded heads on 2 and 3 gloo ranks against one process with the whole batch.

Every head (the margin presets, plain softmax, SphereFace2 with its replicated bias) runs several SGD steps
(momentum, weight decay) in float64 on C = 7 classes, which neither 2 nor 3 divides, with ranks holding
different numbers of embeddings at one step. The reference is the plain head (``heads.build``) on all C
classes with the concatenated batch. Only the order of float64 sums differs: agreement to 1e-10 relative
(float64 epsilon 2.2e-16 times a few hundred terms leaves six orders of magnitude of margin); a gradient off
by one rank's share or a missed target would be off by > 1e-3.
"""

from __future__ import annotations

import datetime
import re
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from faceforge.heads import build
from faceforge.heads.parallel import ShardedHead, shard_range
from test_heads import TINY_LOSS_RTOL, tiny_to_large_loss_batch

pytestmark = pytest.mark.usefixtures("one_thread")

C, D, STEPS = 7, 5, 3
SPECS: dict[str, dict] = {  # name -> head kwargs; every margin flavour, the Eq. 5 term, plain softmax, SphereFace2
    "arcface": {"s": 8.0, "m": 0.5},
    "cosface": {"s": 8.0, "m": 0.35, "intra_loss_weight": 0.3},
    "sphereface": {"s": 8.0, "m": 1.35, "margin_grad": "detached"},
    "softmax": {},
    "sphereface2": {"r": 6.0, "m": 0.2, "t": 3.0, "lamb": 0.7, "chunk_size": 2},
}


def batch_size(rank: int, step: int) -> int:
    return 3 if (rank, step) == (1, 1) else 4  # unequal batches at step 1: the gather pads


def batch(rank: int, step: int, num_classes: int = C) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s float64 (B_r, D) embeddings and (B_r,) labels in [0, num_classes) at ``step``."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    n = batch_size(rank, step)
    return torch.randn(n, D, generator=g, dtype=torch.float64), torch.randint(0, num_classes, (n,), generator=g)


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=5e-3)


def sgd_steps(head: torch.nn.Module, rank: int, steps: int = STEPS) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``steps`` steps of :func:`sgd` on ``head`` with this rank's batches: the losses (steps,) and each step's
    embedding grads."""
    optimizer = sgd(head.parameters())
    losses, grads = [], []
    for step in range(steps):
        x, y = batch(rank, step)
        x.requires_grad_(True)
        loss = head(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        grads.append(x.grad)
    return torch.stack(losses), grads


def run_sharded(name: str, world: int, rank: int, group=None) -> dict:
    """STEPS steps of the sharded head on this rank's batches; per step the loss and this rank's embedding grad."""
    head = ShardedHead(name, C, D, seed=3, group=group, **SPECS[name]).double()
    losses, grads = sgd_steps(head, rank)
    return {"losses": losses, "grads": grads, "state": head.state_dict(), "rows": head.rows}


def run_reference(name: str, world: int) -> dict:
    """The plain head on all C classes, the same initial rows, the ranks' batches concatenated in rank order."""
    initial = ShardedHead(name, C, D, seed=3, **SPECS[name]).double()  # no process group: all C rows, one rank
    head = build(name, num_classes=C, embedding_size=D, **SPECS[name]).double()
    head.load_state_dict(initial.state_dict())  # the same keys, sharded or not
    optimizer = sgd(head.parameters())
    losses, grads = [], []
    for step in range(STEPS):
        parts = [batch(r, step) for r in range(world)]
        x = torch.cat([p[0] for p in parts]).requires_grad_(True)
        loss = head(x, torch.cat([p[1] for p in parts]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        sizes = [batch_size(r, step) for r in range(world)]
        grads.append(list(x.grad.split(sizes)))
    return {"losses": torch.stack(losses), "grads": grads, "state": head.state_dict()}


def run_tiny_losses(world: int, rank: int, group=None) -> torch.Tensor:
    """The float32 per-sample ArcFace losses (1e-5 .. 300, test_heads.py) of the global batch, the batch split
    over the ranks, W sharded; every label is 0, so every target lives on rank 0 and the others hold negatives."""
    weight, x, labels, _ = tiny_to_large_loss_batch()
    head = ShardedHead("arcface", weight.shape[0], weight.shape[1], group=group, chunk_size=3)
    c0, c1 = head.rows
    with torch.no_grad():
        head.weight.copy_(weight[c0:c1])
    return head.per_sample_loss(x.tensor_split(world)[rank], labels.tensor_split(world)[rank]).detach()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """3 gloo ranks: every head on all 3, then on the 2-rank group of ranks 0 and 1 (one spawn for both)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        pair = dist.new_group([0, 1])
        results = {(name, world): run_sharded(name, world, rank) for name in SPECS}
        results[("tiny", world)] = run_tiny_losses(world, rank)
        if rank < 2:
            results.update({(name, 2): run_sharded(name, 2, rank, group=pair) for name in SPECS})
            results[("tiny", 2)] = run_tiny_losses(2, rank, group=pair)
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # no rank destroys the group while another still uses it
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, world: int, *args) -> None:
    # spawn, not fork: a forked rank inherits the parent's OpenMP thread pool and can deadlock in it
    torch.multiprocessing.start_processes(worker, args=(world, free_port(), *args), nprocs=world, start_method="spawn")


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item(), msg=what)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory) -> list[dict]:
    """What each of 3 gloo ranks computed in :func:`_worker` (one spawn for the tests below)."""
    out = tmp_path_factory.mktemp("three_ranks")
    spawn(_worker, 3, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(3)]


def test_sharded_heads_on_2_and_3_ranks_equal_one_process_with_the_whole_batch(three_ranks: list[dict]) -> None:
    ranks = three_ranks
    for name, world in [(name, world) for world in (2, 3) for name in SPECS]:
        ref = run_reference(name, world)
        for rank, result in enumerate(ranks[:world]):
            got = result[(name, world)]
            assert got["rows"] == shard_range(C, world, rank)
            close(got["losses"], ref["losses"], f"{name}: losses on rank {rank}")
            for step in range(STEPS):
                # the gather hands back world_size x the rank's share, since the trainer averages over ranks
                close(got["grads"][step] / world, ref["grads"][step][rank], f"{name}: embedding grad, step {step}")
            c0, c1 = got["rows"]
            for key, value in ref["state"].items():
                sharded = got["state"][key]
                expected = value[c0:c1] if value.shape[0] == C else value  # rows, or SphereFace2's bias
                close(sharded, expected, f"{name}: {key} after {STEPS} steps, rank {rank}")
        # the comparison has teeth: the weights moved far beyond the tolerance
        initial = ShardedHead(name, C, D, seed=3, **SPECS[name]).double().state_dict()["weight"]
        assert (ref["state"]["weight"] - initial).abs().max() > 1e-3


def test_sharded_losses_are_exact_from_tiny_to_large_on_2_and_3_ranks(three_ranks: list[dict]) -> None:
    """The distributed loss softplus(LSE_neg - t) in float32 against the float64 formula, at losses 1e-5 .. 300.

    Tolerance as test_heads.py's single-process test: 2 s (D + 2) eps32 = 1.5e-4 relative (float32 inputs); the
    ranks' logsumexps meet in one more float32 logaddexp, a few eps32 more. As LSE - t the smallest losses
    would be off by ulp(64) / 1e-5, nearly 100 %.
    """
    _, _, _, want = tiny_to_large_loss_batch()
    assert want.min() < 1e-4 and want.max() > 100
    for world in (2, 3):
        for rank in range(world):
            got = three_ranks[rank][("tiny", world)]
            torch.testing.assert_close(got.double(), want, rtol=TINY_LOSS_RTOL, atol=0,
                                       msg=f"{world} ranks, rank {rank}")


def test_shard_layout_covers_every_class_once() -> None:
    for classes, world in [(7, 2), (7, 3), (10, 4), (3, 3)]:
        ranges = [shard_range(classes, world, r) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == classes
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [c1 - c0 for c0, c1 in ranges]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_initial_rows_do_not_depend_on_the_world_size() -> None:
    full = ShardedHead("arcface", 10_000, 4, seed=1).state_dict()["weight"]  # INIT_BLOCK = 4096: 3 blocks
    other_seed = ShardedHead("arcface", 10_000, 4, seed=2).state_dict()["weight"]
    assert not torch.equal(full, other_seed)
    import faceforge.heads.parallel as parallel

    head = ShardedHead("arcface", 10_000, 4, seed=1)
    for c0, c1 in [(0, 5000), (5000, 10_000), (4095, 4097)]:
        head.rows = (c0, c1)
        head.head.weight = torch.nn.Parameter(torch.empty(c1 - c0, 4))
        head.reset_parameters()
        assert torch.equal(head.head.weight.detach(), full[c0:c1]), (c0, c1)
    assert parallel.INIT_BLOCK == 4096


def test_bad_sharded_heads_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot be sharded"):
        ShardedHead("broadface", 10, 4, queue_size=4, head="arcface")
    with pytest.raises(ValueError, match="inter_loss_weight"):
        ShardedHead("arcface", 10, 4, inter_loss_weight=0.1)


# ---------------------------------------------------------------------------------------------- through the trainer

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from _runs import BASE as RUN_BASE  # noqa: E402
from faceforge.core import shards  # noqa: E402
from faceforge.core.checkpoint import load_checkpoint  # noqa: E402
from faceforge.train.config import config_from_dict, to_dict, to_yaml  # noqa: E402
from faceforge.train.engine import train  # noqa: E402

WORKER = Path(__file__).with_name("_train_worker.py")
GLOBAL_BATCH = 12  # 1 x 12, 2 x 6, 3 x 4: the same images per step (faceforge.data.samplers)


def sharded_config(output: Path, world: int, steps: int, float64: bool = False):
    """A sharded ArcFace (8 classes: 3 + 3 + 2 rows on 3 ranks) on TinyNet; constant lr, so that runs of 2, 4
    and 6 steps take the same updates; clipping active (global norm over the shards); no dropout. ``float64``:
    the backbone's and the head's weights (so its embeddings and logits) in float64 (``_train_worker``'s
    ``TinyNet(dtype="float64")`` and ``float64_head``), for runs compared with one another across world sizes."""
    import copy

    data = copy.deepcopy(RUN_BASE)
    data["output"] = str(output)
    data["model"]["kwargs"] = {"dropout": 0.0, **({"dtype": "float64"} if float64 else {})}
    head = {"name": "_train_worker:float64_head", "kwargs": {"inner": "arcface", "s": 16.0}} if float64 else \
        {"name": "arcface", "kwargs": {"s": 16.0}}
    data["head"] = {**head, "shard": True}
    data["data"]["batch_size"] = GLOBAL_BATCH // world
    data["schedule"] = {"name": "constant", "warmup_steps": 0}
    data["train"].update(steps=steps, checkpoint_every=2, keep_checkpoints=5, clip_grad_norm=1.0)
    return config_from_dict(data, "<test>")


def worker(config, *args: str, launcher: list[str] | None = None, timeout: float = 240.0) -> None:
    """tests/_train_worker.py on ``config`` (written beside its output as ``<output>.yaml``); its stdout and
    stderr (torchrun's agent log with a launcher) go to ``<output>.torchrun.log``."""
    path = Path(config.output).with_suffix(".yaml")
    path.write_text(to_yaml(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [*(launcher or [sys.executable]), str(WORKER), str(path), *args]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    path.with_suffix(".torchrun.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]


def resolved(path: Path) -> dict:
    return shards.resolve(load_checkpoint(path), path.parent)


def assert_close_state(actual, expected, where: str, rel: float = 1e-5, dtype: torch.dtype | None = None) -> None:
    """Tensors within ``rtol = rel`` and ``atol = rel * max|expected|`` (default: float32 sums in another order,
    gather, all-reduce, per-shard logsumexp: ~1e-6 of each tensor's scale); with ``dtype``, every floating tensor
    of both sides of that dtype; other tensors equal, dicts recursively."""
    if isinstance(expected, torch.Tensor):
        if expected.is_floating_point():
            assert dtype is None or actual.dtype == expected.dtype == dtype, f"{where}: {actual.dtype} {expected.dtype}"
            atol = rel * max(expected.abs().max().item(), 1e-12)
            torch.testing.assert_close(actual, expected, rtol=rel, atol=atol, msg=lambda m: f"{where}: {m}")
        else:
            assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), f"{where}: {set(actual)} != {set(expected)}"
        for key in expected:
            assert_close_state(actual[key], expected[key], f"{where}.{key}", rel, dtype)


# The straight, elastic and resumed runs below are float64 (sharded_config(float64=True)), the global gradient
# norm for clipping included (faceforge.train.step.grad_norm works in the gradients' dtype): 1 process, 2 and 3
# ranks sum the same float64 numbers in another order (all-reduce, gather, per-shard logsumexp, the shards'
# squares), each sum <= n u relative with u = 2^-53 and n <= a few hundred terms, and clipping acts at every step
# (norms 30 .. 250 > clip 1). Measured: the runs differ by <= 1.8e-15 relative to each tensor's max|.|. Allowed:
# 1e-9, more than 10^5 x that, yet a shard row passed through float32 on its way to the checkpoint (2^-24 = 6e-8
# relative) fails it, as do a row block resumed one row off or the last rank's momentum rows never written
# (2e-4 .. 1.2e-2; each mutant tried). With the norm in float32 (before this change) the runs drifted by up to
# 6.4e-7 and needed 1e-5, which the float32-rounded shard rows passed.
SHARDED_FLOAT64_REL = 1e-9


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The reference: one process, the sharded head holding all 8 rows, 8 steps (checkpoints every 2)."""
    output = tmp_path_factory.mktemp("straight") / "run"
    train(sharded_config(output, 1, 8, float64=True))
    return output


def torchrun_log(config_path: Path) -> str:
    return config_path.with_suffix(".torchrun.log").read_text()


@pytest.fixture(scope="module")
def elastic(tmp_path_factory) -> Path:
    """torchrun --max-restarts 1, 2 ranks, 4 steps: rank 1 dies (SIGKILL) after step 3, once; the agent restarts
    both ranks, which resume from step 2 (``--resume``) and finish. One restart only: the restarted group must
    connect at its first try (before faceforge.train.distributed.elastic_attempt_store, a restarted gloo group
    read the dead group's addresses from torchrun's shared store: refused, or a hang). train.dist_timeout 60:
    a collective or a connection that still hung would fail the attempt within a minute, not at the 240 s limit."""
    output = tmp_path_factory.mktemp("elastic") / "run"
    config = sharded_config(output, 2, 4, float64=True)
    config.train.dist_timeout = 60.0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--max-restarts", "1", "--monitor-interval", "0.1"]
    worker(config, "--resume", "--kill-rank", "1", "--kill-at-step", "3", launcher=torchrun)
    return output


@pytest.mark.equivalence
def test_elastic_restart_after_a_killed_rank_finishes_the_run(straight: Path, elastic: Path) -> None:
    """The elastic run ends as the straight one at step 4, and it did go through a kill and a restart."""
    log = (elastic / "train.log").read_text()
    assert "resumed from" in log and "step 4/4" in log
    assert elastic.with_suffix(".killed").exists()  # rank 1 did die
    agent = torchrun_log(elastic.with_suffix(".yaml"))
    assert agent.count("failed (exitcode: -9)") == 1 and "connectFullMesh failed" not in agent, agent[-3000:]
    final, expected = resolved(elastic / "last.pt"), resolved(straight / "step_0000004.pt")
    assert final["step"] == 4 and final["world_size"] == 2
    for key in ("backbone", "head", "optimizer"):
        assert_close_state(final[key], expected[key], key, SHARDED_FLOAT64_REL, torch.float64)


@pytest.mark.equivalence
def test_resume_on_2_then_3_ranks_then_1_process_continues_the_same_training(
    straight: Path, elastic: Path, tmp_path: Path
) -> None:
    """The elastic run's 2-rank checkpoint (step 4) resumed on 3 ranks to step 6, then on one process to step 8:
    the straight run's step 8."""
    output = tmp_path / "run"
    shutil.copytree(elastic, output)
    state = load_checkpoint(output / "last.pt")
    entry = state["head"]["weight"]
    assert shards.is_placeholder(entry) and entry["shape"] == [8, 16]  # one logical (C, D) W, written by 2 ranks
    momentum = [v for s in state["optimizer"]["state"].values() for v in s.values() if shards.is_placeholder(v)]
    assert len(momentum) == 1 and momentum[0]["shape"] == [8, 16]
    worker(sharded_config(output, 3, 6, float64=True), "--resume", "--nprocs", "3", "--port", str(free_port()))
    assert load_checkpoint(output / "last.pt")["world_size"] == 3
    train(sharded_config(output, 1, 8, float64=True), resume=True)
    final, expected = resolved(output / "last.pt"), resolved(straight / "last.pt")
    assert final["step"] == expected["step"] == 8
    for key in ("backbone", "head", "optimizer"):
        assert_close_state(final[key], expected[key], key, SHARDED_FLOAT64_REL, torch.float64)
    # the comparison has teeth: training moved W beyond the tolerance, and clipping (global norm) was active
    early = resolved(straight / "step_0000004.pt")["head"]["weight"]
    assert (expected["head"]["weight"] - early).abs().max() > 1e-3
    norms = [float(m) for m in re.findall(r"grad_norm ([0-9.]+)", (straight / "train.log").read_text())]
    assert max(norms) > 1.0
    # only the shard folders that a checkpoint names are left
    kept = sorted(p.name for p in (output / "shards").iterdir())
    assert kept == [f"step_{int(p.stem.removeprefix('step_')):07d}" for p in sorted(output.glob("step_*.pt"))]


def test_each_elastic_attempt_has_its_own_keys_in_the_agent_store(monkeypatch) -> None:
    """torchrun's agent store is shared by every restart attempt: what attempt 0 wrote (a dead rank's gloo address)
    is invisible to attempt 1, which reads only its own writes; outside torchrun's agent store there is none."""
    import datetime as dt

    from faceforge.train.distributed import elastic_attempt_store

    timeout = dt.timedelta(seconds=10)
    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout)  # the agent's
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert elastic_attempt_store(2, timeout) is None
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run7")
    stores = []
    for attempt in (0, 1):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(attempt))
        stores.append(elastic_attempt_store(2, timeout))
    stores[0].set("rank_1", "127.0.0.1:40327 (dead)")
    assert stores[1].check(["rank_1"]) is False
    stores[1].set("rank_1", "127.0.0.1:51111")
    assert stores[1].get("rank_1") == b"127.0.0.1:51111" and stores[0].get("rank_1") == b"127.0.0.1:40327 (dead)"
    assert server.get("faceforge/run7/attempt_1/rank_1") == b"127.0.0.1:51111"


def test_row_shards_written_by_3_ranks_read_by_2_and_1(tmp_path: Path) -> None:
    """A logical (7, 3) tensor written by 3 "ranks" at their offsets reads back whole, and as any other layout's rows."""
    from faceforge.heads.base import RowShard

    full = torch.arange(21, dtype=torch.float32).reshape(7, 3) / 7
    file = shards.shard_file(5, "head.head.weight")
    shards.create(tmp_path, file, [7, 3], full.dtype)
    for rank in (2, 0, 1):  # in any order
        c0, c1 = shard_range(7, 3, rank)
        shards.write_rows(tmp_path, file, RowShard(c0, c1, 7), full[c0:c1])
    entry = shards.placeholder(file, RowShard(0, 3, 7), full[:3])
    assert entry == {"__row_shard__": "shards/step_0000005/head.head.weight.bin", "shape": [7, 3], "dtype": "float32"}
    state = {"head": {"head.weight": entry}, "step": 5}
    assert torch.equal(shards.resolve(state, tmp_path)["head"]["head.weight"], full)
    for rank in range(2):
        rows = shard_range(7, 2, rank)
        got = shards.resolve(state, tmp_path, lambda key: rows if key == "head.head.weight" else None)
        assert torch.equal(got["head"]["head.weight"], full[rows[0] : rows[1]])
    shards.prune(tmp_path, {4})
    with pytest.raises(FileNotFoundError, match="row-sharded tensor"):
        shards.resolve(state, tmp_path)


# ---------------------------------------------------------------------------------------------- Partial FC

from faceforge.heads.parallel import sample_rows  # noqa: E402
from faceforge.train.optim import LazyRowSGD  # noqa: E402


def test_partial_fc_keeps_every_positive_and_samples_deterministically() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        labels = torch.randint(-1, 50, (16,), generator=g)  # -1: a class on another shard
        rows = sample_rows(labels, 50, 0.1, torch.Generator().manual_seed(trial))
        positives = set(labels[labels >= 0].tolist())
        assert positives <= set(rows.tolist())
        assert rows.tolist() == sorted(set(rows.tolist()))  # sorted, no repeats
        assert len(rows) == max(5, len(positives))  # ceil(0.1 x 50) rows, or the positives alone when more
    head = ShardedHead("arcface", 100, 4, seed=1, sample_rate=0.2)
    labels = torch.tensor([3, 7, -1, 50])
    first = head.sampled_rows(labels)
    assert torch.equal(head.sampled_rows(labels), first)  # a function of (seed, step, micro-batch, rank)
    head.after_optimizer_step(1)
    assert not torch.equal(head.sampled_rows(labels), first)


def train_steps(head, optimizer, steps: int = 6, lrs=(0.5, 0.3, 0.4, 0.2, 0.35, 0.25)) -> list:
    """Steps of the head on fixed random batches (float64) with a changing lr; returns the losses."""
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(6, head.embedding_size, generator=g, dtype=torch.float64)
        y = torch.randint(0, head.num_classes, (6,), generator=g)
        for group in optimizer.param_groups:
            group["lr"] = lrs[step]
        loss = head(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        head.after_optimizer_step(step + 1)
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("name", ["arcface", "softmax"])
def test_sparse_lazy_momentum_equals_dense_sgd(name: str) -> None:
    """r = 0.3: the sparse rows with lazily caught-up decay and momentum (LazyRowSGD) against torch's dense SGD on
    the same sampled loss (an unsampled row's gradient 0, insightface's PartialFC_V2). Float64; the catch-up's
    2 x 2 products round differently from step-by-step updates: agreement to 1e-12 relative."""
    kwargs = {"s": 8.0} if name == "arcface" else {}
    sparse = ShardedHead(name, 20, 4, seed=5, sample_rate=0.3, **kwargs).double()
    dense = ShardedHead(name, 20, 4, seed=5, sample_rate=0.3, sparse_grad=False, **kwargs).double()
    lazy = LazyRowSGD(sparse.parameters(), lr=0.5, momentum=0.9, weight_decay=0.05)
    reference = torch.optim.SGD(dense.parameters(), lr=0.5, momentum=0.9, weight_decay=0.05)
    sparse.use_optimizer(lazy)
    seen = train_steps(sparse, lazy)
    expected = train_steps(dense, reference)
    torch.testing.assert_close(torch.stack(seen), torch.stack(expected), rtol=1e-12, atol=0)
    stale = sparse.weight.detach().clone()
    for name_, p in sparse.head.named_parameters():
        lazy.catch_up(p, torch.arange(p.shape[0]))
        q = dict(dense.head.named_parameters())[name_]
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(lazy.state[p]["momentum_buffer"], reference.state[q]["momentum_buffer"],
                                   rtol=1e-12, atol=1e-14)
    assert (stale - sparse.weight.detach()).abs().max() > 1e-4  # rows left behind were caught up, not untouched
    touched = lazy.state[sparse.head.weight]["last_step"]
    assert int(touched.max()) == 6


def test_partial_fc_keeping_every_row_equals_the_full_head() -> None:
    """sample_rate 0.99 of 7 rows keeps all 7 (ceil): the sampled, sparse path with LazyRowSGD gives the plain
    head's losses, embedding gradients and weights under torch's SGD (float64)."""
    sampled = ShardedHead("cosface", 7, 4, seed=2, sample_rate=0.99, s=8.0).double()
    plain = build("cosface", num_classes=7, embedding_size=4, s=8.0).double()
    plain.load_state_dict({"weight": sampled.weight.detach().clone()})
    lazy = LazyRowSGD(sampled.parameters(), lr=0.5, momentum=0.9, weight_decay=0.05)
    sampled.use_optimizer(lazy)
    reference = torch.optim.SGD(plain.parameters(), lr=0.5, momentum=0.9, weight_decay=0.05)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(6, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 7, (6,), generator=g)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        a, b = sampled(x1, y), plain(x2, y)
        a.backward(), b.backward()
        assert sampled.weight.grad.is_sparse
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-15)
        for opt in (lazy, reference):
            opt.step()
            opt.zero_grad(set_to_none=True)
        sampled.after_optimizer_step(step + 1)
        torch.testing.assert_close(sampled.weight, plain.weight, rtol=1e-12, atol=1e-15)


def test_partial_fc_run_resumes_bit_identical_through_the_trainer(tmp_path: Path) -> None:
    """head.sample_rate 0.5 with a sharded head, sparse rows, lazy SGD and clipping (on one process): 2 steps,
    then resumed to 4, give the bits of 4 steps straight (sampling keyed on (seed, step, rank); the optimiser's
    lazy state, last_step per row and the lr history, in the checkpoint)."""
    def config(output: Path, steps: int):
        cfg = sharded_config(output, 1, steps)
        cfg.head.sample_rate = 0.5
        cfg.data.kwargs.update(num_identities=32, images_per_identity=2)  # a batch of 12 holds at most 12 classes
        return cfg

    straight = train(config(tmp_path / "straight", 4))
    train(config(tmp_path / "resumed", 2))
    resumed = train(config(tmp_path / "resumed", 4), resume=True)
    assert resumed.losses == straight.losses[2:]
    a, e = resolved(resumed.checkpoint), resolved(straight.checkpoint)
    for key in ("backbone", "head", "optimizer"):
        _assert_equal(a[key], e[key], key)
    lazy = [s for s in e["optimizer"]["state"].values() if "last_step" in s]
    assert len(lazy) == 1 and lazy[0]["step"] == 4 and int(lazy[0]["last_step"].min()) < 4  # some rows skipped


def _assert_equal(actual, expected, where: str) -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            _assert_equal(actual[key], expected[key], f"{where}.{key}")
    else:
        assert actual == expected, where


def test_partial_fc_config_needs_shard_and_sgd(tmp_path: Path) -> None:
    from faceforge.train.config import ConfigError

    cfg = sharded_config(tmp_path / "x", 1, 2)
    data = {"head": {"name": "arcface", "shard": False, "sample_rate": 0.1}}
    with pytest.raises(ConfigError, match="head.sample_rate = 0.1 needs head.shard = true"):
        config_from_dict({**to_dict(cfg), **data}, "<test>")
    with pytest.raises(ConfigError, match="needs optim.name = 'sgd'"):
        config_from_dict({**to_dict(cfg), "head": {"name": "arcface", "shard": True, "sample_rate": 0.1},
                          "optim": {"name": "adamw"}}, "<test>")
    with pytest.raises(ConfigError, match=r"head.sample_rate = 0.0: expected a float in \(0, 1\]"):
        config_from_dict({**to_dict(cfg), "head": {"name": "arcface", "shard": True, "sample_rate": 0.0}}, "<test>")
