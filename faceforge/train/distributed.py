"""torch.distributed helpers: one process needs nothing; under ``torchrun`` a process group is made.

``init_distributed()`` reads the environment torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT). With WORLD_SIZE > 1 it initialises the default group: NCCL when CUDA is available,
gloo otherwise, with a finite timeout (``train.dist_timeout``) on its connection and every collective.
Every helper below is safe to call with no process group (it then does nothing).

Elastic restarts (``torchrun --max-restarts N``): torchrun's agent hosts one TCPStore for its whole life and
hands it to the workers of every restart attempt (``TORCHELASTIC_USE_AGENT_STORE=True``), and this torch puts
no per-attempt prefix on it (pytorch/pytorch#135712). A restarted group then reads the dead group's gloo
addresses (NCCL: unique ids) and connects to dead ports: refused (the attempt fails), or, when another
process has bound the port since, accepted by a stranger and waiting for a handshake that never comes (the
attempt hangs until the timeout). :func:`elastic_attempt_store` gives each attempt its own keys.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_TIMEOUT_S", "all_reduce_mean", "register_compression", "DistInfo", "elastic_attempt_store", "init_distributed", "is_distributed", "is_main", "get_rank", "get_world_size", "barrier", "cleanup", "end_process_after_group"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank in [0, world_size), local_rank on its host, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an int") from None


DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo: 30 minutes


def elastic_attempt_store(world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun's shared agent store, a client of it whose keys belong to this restart attempt alone
    (prefix ``faceforge/<TORCHELASTIC_RUN_ID>/attempt_<TORCHELASTIC_RESTART_COUNT>/``); None elsewhere (then
    ``init_process_group`` makes its own store from MASTER_ADDR / MASTER_PORT as usual).

    The restart count is the agent's: on one node (one agent) every attempt has its own. With several nodes, a
    membership change restarts the group without counting a restart; there set
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for torchrun, which then makes a fresh store per rendezvous round.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], _env_int("MASTER_PORT", 0), world_size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"faceforge/{run_id}/attempt_{attempt}", store)  # keys: <prefix>/<key>


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Initialise the default process group when WORLD_SIZE > 1 (once); return this process's DistInfo.

    backend: default ``"nccl"`` with CUDA, ``"gloo"`` without. The device is ``cuda:LOCAL_RANK`` when
    CUDA is available, else CPU.
    timeout_s: seconds that connecting the ranks, and then any collective, may wait for the other ranks
    before raising (default 1800, torch's); under torchrun the agent then restarts the group. Ranks wait
    for rank 0 at a barrier while it evaluates or writes a checkpoint: keep it above the longest of those.
    Under torchrun's agent store, each restart attempt gets its own keys (:func:`elastic_attempt_store`).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not is_distributed():
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s!r}: expected seconds > 0")
        timeout = datetime.timedelta(seconds=timeout_s)
        store = elastic_attempt_store(world_size, timeout)
        where = {"store": store, "rank": rank, "world_size": world_size} if store is not None else {}
        dist.init_process_group(backend=backend or ("nccl" if device.type == "cuda" else "gloo"), timeout=timeout,
                                **where)
        global _STARTED_GROUP
        _STARTED_GROUP = True
    if is_distributed():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def is_distributed() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0, and in a one-process run."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op in a one-process run."""
    if is_distributed():
        dist.barrier()


def cleanup(synchronise: bool = False) -> None:
    """Destroy the default process group if one exists.

    synchronise: barrier first, then the other ranks destroy their groups before rank 0 (which hosts the
    TCPStore) destroys its own, so that no rank tears the group down or exits while another still uses it; gloo
    aborts the late rank otherwise ("terminate called without an active exception"). Only on the success path:
    after an error another rank may never reach the barrier.
    """
    if not is_distributed():
        return
    if not synchronise:
        dist.destroy_process_group()
        return
    dist.barrier()
    # the barrier alone still let rank 0 tear down and exit while rank 1 was inside destroy_process_group (CI
    # saw the abort once more): the other ranks destroy first and say so in the store, which rank 0 hosts and
    # keeps alive (this reference) until all have, then rank 0 destroys its own
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank != 0:
        dist.destroy_process_group()
        store.set(f"faceforge/destroyed/{rank}", b"1")
        return
    store.wait([f"faceforge/destroyed/{r}" for r in range(1, world)], datetime.timedelta(seconds=_DESTROY_WAIT_S))
    dist.destroy_process_group()


_DESTROY_WAIT_S = 60.0  # rank 0 waits this long for the others to leave the group

_STARTED_GROUP = False  # init_distributed started a process group in this process (world size > 1)


def end_process_after_group(code: int) -> int:
    """Once a process group was started here (``init_distributed``, world size > 1): end the process now with
    ``code``, through ``os._exit`` after flushing the logs and stdio, so that no C++ exit-time teardown runs.
    Otherwise return ``code`` (a one-process run, or a test calling the command in-process, goes on as usual).

    Why: with torch 2.13 a ``DistributedDataParallel`` built on a gloo group keeps that group alive inside
    torch after ``destroy_process_group``: its threads (``gloo_tcp_loop``, two ``pt_gloo_runloop``) still run,
    and no Python object holds them (measured with a bare DDP of an ``nn.Linear``: benchmarks/RESULTS.md §24).
    A process that then exits normally runs C++ static destructors beside those threads, and now and then
    that ends in ``std::terminate`` ("terminate called without an active exception", SIGABRT) after the run
    has finished: torchrun and the 2-rank tests then report a failed run. Call it only after the group is
    destroyed (:func:`cleanup`); every file faceforge writes is complete and fsync'ed by then.
    """
    if not _STARTED_GROUP:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


COMPRESSION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def all_reduce_mean(tensors: list[torch.Tensor], compression: str = "none") -> None:
    """Average each tensor over the ranks, in place, as DDP averages the backbone's gradients; a no-op without a
    process group. ``compression`` ``"fp16"`` / ``"bf16"``: the same steps as DDP's compression hooks
    (``default_hooks.fp16_compress_hook``): cast, divide by the world size, all-reduce, cast back, so that
    ``train.ddp_comm_hook`` rounds (and halves the traffic of) the head's replicated gradients as the backbone's.
    """
    if not is_distributed():
        return
    if compression != "none" and compression not in COMPRESSION_DTYPES:
        raise ValueError(f"train.ddp_comm_hook = {compression!r}: expected one of none, {', '.join(COMPRESSION_DTYPES)}")
    world = dist.get_world_size()
    for t in tensors:
        if compression == "none":
            t.div_(world)
            dist.all_reduce(t)
        else:
            sent = t.to(COMPRESSION_DTYPES[compression]).div_(world)
            dist.all_reduce(sent)
            t.copy_(sent)


def register_compression(ddp: torch.nn.parallel.DistributedDataParallel, name: str) -> None:
    """Make ``ddp`` all-reduce its gradients in ``name`` (``"fp16"`` or ``"bf16"``; ``"none"`` does nothing).

    DDP's own hooks (``ddp_comm_hooks.default_hooks``): each gradient bucket is cast, all-reduced, divided by
    the world size and cast back, so the traffic halves and the gradients carry that format's rounding.
    """
    if name == "none":
        return
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hooks = {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook}  # COMPRESSION_DTYPES
    if name not in hooks:
        raise ValueError(f"train.ddp_comm_hook = {name!r}: expected one of none, {', '.join(hooks)}")
    ddp.register_comm_hook(None, hooks[name])
