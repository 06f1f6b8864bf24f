"""torch.distributed helpers: one process needs nothing; under ``torchrun`` a process group is made.

``init_distributed()`` reads the environment torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT). With WORLD_SIZE > 1 it initialises the default group: NCCL when CUDA is available,
gloo otherwise. Every helper below is safe to call with no process group (it then does nothing).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["register_compression", "DistInfo", "init_distributed", "is_distributed", "is_main", "get_rank", "get_world_size", "barrier", "cleanup"]


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


def init_distributed(backend: str | None = None) -> DistInfo:
    """Initialise the default process group when WORLD_SIZE > 1 (once); return this process's DistInfo.

    backend: default ``"nccl"`` with CUDA, ``"gloo"`` without. The device is ``cuda:LOCAL_RANK`` when
    CUDA is available, else CPU.
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
        dist.init_process_group(backend=backend or ("nccl" if device.type == "cuda" else "gloo"))
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


def cleanup() -> None:
    """Destroy the default process group if one exists."""
    if is_distributed():
        dist.destroy_process_group()


def register_compression(ddp: torch.nn.parallel.DistributedDataParallel, name: str) -> None:
    """Make ``ddp`` all-reduce its gradients in ``name`` (``"fp16"`` or ``"bf16"``; ``"none"`` does nothing).

    DDP's own hooks (``ddp_comm_hooks.default_hooks``): each gradient bucket is cast, all-reduced, divided by
    the world size and cast back, so the traffic halves and the gradients carry that format's rounding.
    """
    if name == "none":
        return
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hooks = {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook}
    if name not in hooks:
        raise ValueError(f"train.ddp_comm_hook = {name!r}: expected one of none, {', '.join(hooks)}")
    ddp.register_comm_hook(None, hooks[name])
