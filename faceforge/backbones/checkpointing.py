"""Activation (gradient) checkpointing shared by every backbone: `set_grad_checkpointing`, timm's name.

A backbone that mixes in :class:`GradCheckpointing` lists its body as stages of blocks
(``checkpoint_stages()``) and runs them through :meth:`GradCheckpointing.run_stages`. Then

    net.set_grad_checkpointing()                        # every block checkpointed (the default, "block")
    net.set_grad_checkpointing(granularity="stage")     # one checkpoint per stage (less memory, same compute)
    net.set_grad_checkpointing(False)                   # off

While training with gradients on, each checkpointed unit keeps only its input for backward and runs its
forward again there (about one more forward pass in all). Outputs, gradients and BatchNorm running
statistics are those of the plain model: the recomputation updates throwaway copies of the running
statistics (plain `torch.utils.checkpoint` would apply the BN momentum update twice), and the RNG state
is replayed, so dropout draws the same mask. Memory: "block" keeps one activation per block, "stage"
one per stage plus the blocks of the one stage being recomputed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["GRANULARITIES", "GradCheckpointing", "checkpointed"]

Granularity = Literal["block", "stage"]
GRANULARITIES: tuple[str, ...] = ("block", "stage")
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def _scratch_running_stats(modules: Sequence[nn.Module]) -> Iterator[None]:
    """During checkpoint recomputation, BN layers update throwaway copies of their running statistics.

    The recomputation must save the same tensors as the first forward (non-reentrant checkpoint checks
    it), so BN keeps running in training mode; only its buffers are swapped for clones, then put back.
    """
    swapped = []
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                for name in _RUNNING_STATS:
                    buffer = getattr(m, name)
                    if buffer is not None:
                        swapped.append((m, name, buffer))
                        setattr(m, name, buffer.clone())
    try:
        yield
    finally:
        for m, name, buffer in swapped:
            setattr(m, name, buffer)


def _run_in_order(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


def checkpointed(blocks: nn.Module | Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``blocks(x)`` (one module, or several applied in order) under non-reentrant activation checkpointing.

    Same outputs and gradients as without it; the recomputation in backward does not update BatchNorm
    running statistics a second time.
    """
    modules = [blocks] if isinstance(blocks, nn.Module) else list(blocks)
    return checkpoint(
        _run_in_order,
        modules,
        x,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _scratch_running_stats(modules)),
    )


class GradCheckpointing:
    """Mixin for an ``nn.Module`` backbone whose body is ``checkpoint_stages()``: stages, each a list of blocks.

    Off by default; ``grad_checkpointing`` is None (off), ``"block"`` or ``"stage"``.
    """

    grad_checkpointing: str | None = None

    def checkpoint_stages(self) -> list[list[nn.Module]]:
        """The body as stages of blocks, in forward order (each backbone defines it)."""
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True, granularity: Granularity = "block") -> None:
        """Checkpoint every block (``granularity="block"``) or every stage (``"stage"``) while training;
        ``enable=False`` turns it off. timm's method name and first argument."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}")
        self.grad_checkpointing = granularity if enable else None

    def run_stages(self, x: torch.Tensor) -> torch.Tensor:
        """Run the body on ``x``, checkpointed as set while training with gradients enabled."""
        mode = self.grad_checkpointing
        if mode is None or not (self.training and torch.is_grad_enabled()):  # type: ignore[attr-defined]
            for stage in self.checkpoint_stages():
                x = _run_in_order(stage, x)
            return x
        for stage in self.checkpoint_stages():
            if mode == "stage":
                x = checkpointed(stage, x)
            else:
                for block in stage:
                    x = checkpointed(block, x)
        return x
