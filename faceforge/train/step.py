"""One optimiser step: ``grad_accum`` micro-batches forward and backward, then one update.

:class:`GradientStep` is the whole of it, in this order:

1. per micro-batch: the parts' ``on_batch`` hook, the objective's named loss terms (averaged over ranks in one
   all-reduce, so every rank learns of a NaN on any rank; a non-finite term stops the run naming the step, the
   term and the micro-batch), ``backward`` of their sum / ``grad_accum`` through the AMP ``GradScaler``; DDP
   synchronises the backbone's gradients on the last micro-batch only;
2. the head's replicated parameters' gradients averaged over ranks (DDP wraps the backbone only);
   row-sharded parameters (a part's ``row_shards``) keep their own rows' gradients;
3. unscale, coalesce row-sparse gradients (Partial FC), the global gradient L2 norm (the row-sharded parameters'
   squares summed over ranks), a non-finite norm stops the run (without AMP: with it the scaler skips the step),
   clipping to ``train.clip_grad_norm`` with one factor for dense and row-sparse gradients alike;
4. the optimiser and scheduler steps, then the parts' ``after_optimizer_step``.

The helpers decide what the step works on: :func:`amp_dtype` (``train.amp``), :func:`split_parameters`
(replicated / row-sharded) and :func:`use_zero` (``train.zero``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from faceforge.data.samplers import Batch
from faceforge.heads.base import TrainHooks
from faceforge.train import distributed as fdist

__all__ = ["AMP_DTYPES", "GradientStep", "NonFiniteLossError", "StepResult", "TrainedParameters", "amp_dtype",
           "grad_norm", "clip_gradients", "row_sharded_parameters", "split_parameters", "use_zero"]

logger = logging.getLogger("faceforge.train")

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class NonFiniteLossError(FloatingPointError):
    """The loss (or the gradient norm) became NaN/inf; the message names the step and the value."""


class StepResult(NamedTuple):
    """One optimiser step: the mean loss and mean of each loss term over the micro-batches (averaged over ranks),
    the global gradient norm before clipping and the lr the update used."""

    loss: float
    terms: dict[str, float]
    grad_norm: float
    lr: float


@dataclass(frozen=True)
class TrainedParameters:
    """``replicated``: every trained parameter every rank holds whole (backbone, head, objective's learned
    modules); ``head_replicated``: those of them outside the backbone, whose gradients the step averages over
    ranks itself; ``sharded``: the parameters whose rows a part declares in ``row_shards`` (one rank's rows)."""

    replicated: list[nn.Parameter]
    head_replicated: list[nn.Parameter]
    sharded: list[nn.Parameter]


def amp_dtype(amp: bool | str, dtype_name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` (true / false / "auto": on CUDA) and ``train.amp_dtype``; None: float32.
    Mixed precision asked for off CUDA is refused with a warning (training stays in float32)."""
    on = device.type == "cuda" if amp == "auto" else bool(amp)
    if on and device.type != "cuda":
        logger.warning("train.amp = %r ignored: mixed precision runs on CUDA only; training in float32", amp)
        return None
    return AMP_DTYPES[dtype_name] if on else None


def parameters_by_key(part: Any) -> dict[str, nn.Parameter]:
    """A part's parameters by their ``state_dict`` key, the key ``row_shards`` names (a sharded head keeps the
    unsharded head's keys, which are not its module paths)."""
    return {k: v for k, v in part.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)}


def row_sharded_parameters(part: TrainHooks) -> list[nn.Parameter]:
    """The parameters among a part's ``row_shards`` (the declaration; its other entries are buffers)."""
    params = parameters_by_key(part)
    return [params[key] for key in part.row_shards() if key in params]


def split_parameters(backbone: nn.Module, head: nn.Module, learned: nn.Module,
                     hooks: Iterable[TrainHooks]) -> TrainedParameters:
    """The trained parameters of backbone, head and the objective's ``learned`` modules, split by the hooked
    parts' ``row_shards`` declarations into replicated and row-sharded (see :class:`TrainedParameters`)."""
    sharded = [p for h in hooks for p in row_sharded_parameters(h) if p.requires_grad]
    ids = {id(p) for p in sharded}
    learned_params = list(learned.parameters())
    return TrainedParameters(
        replicated=[p for p in (*backbone.parameters(), *head.parameters(), *learned_params) if id(p) not in ids],
        head_replicated=[p for p in (*head.parameters(), *learned_params) if p.requires_grad and id(p) not in ids],
        sharded=sharded,
    )


def use_zero(requested: bool, world_size: int, sharded: Sequence[nn.Parameter], head_name: str) -> bool:
    """Whether the optimiser state is partitioned over ranks (``train.zero``; a no-op in one process). ZeRO
    would partition a row-sharded parameter as if replicated: refused with one."""
    zero = requested and world_size > 1
    if zero and sharded:
        raise ValueError(f"train.zero = true: head {head_name!r} keeps per-rank parameter shards, which "
                         "ZeRO would partition as if replicated; expected train.zero = false with it")
    return zero


def broadcast_replicated(params: Iterable[nn.Parameter]) -> None:
    """Rank 0's values of the head's replicated parameters on every rank (DDP does it for the backbone)."""
    with torch.no_grad():
        for p in params:
            torch.distributed.broadcast(p, 0)


def grad_norm(grads: list[Tensor], sharded: list[Tensor], world_size: int) -> Tensor:
    """The global L2 norm of every gradient: ``grads`` (replicated) as they are, the squares of ``sharded``
    (this rank's rows) summed over ranks."""
    norm = nn.utils.get_total_norm(grads)
    if sharded:
        # at least float32 (a half-precision norm would overflow), float64 when the gradients are
        wide = torch.promote_types(norm.dtype, torch.float32)
        square = nn.utils.get_total_norm(sharded).to(wide).square()
        if world_size > 1:
            torch.distributed.all_reduce(square)
        norm = (norm.to(wide).square() + square).sqrt()
    return norm


def clip_gradients(params: list[nn.Parameter], max_norm: float, norm: Tensor) -> None:
    """Scale every gradient by ``min(1, max_norm / (norm + 1e-6))`` (``clip_grads_with_norm_``'s factor); a
    coalesced row-sparse gradient's values get the same factor."""
    nn.utils.clip_grads_with_norm_([p for p in params if not p.grad.is_sparse], max_norm, norm)
    rows = [p.grad._values() for p in params if p.grad.is_sparse]
    if rows:
        torch._foreach_mul_(rows, (max_norm / (norm + 1e-6)).clamp(max=1.0))


def _dense(grad: Tensor) -> Tensor:
    """A gradient as a strided tensor whose in-place scaling scales the gradient: a coalesced sparse one's values."""
    return grad._values() if grad.is_sparse else grad


def _sum(terms: Iterable[Tensor]) -> Tensor:
    """The sum of the loss terms (the first term itself when there is one: no ``0 +`` in the graph)."""
    total: Tensor | None = None
    for t in terms:
        total = t if total is None else total + t
    if total is None:
        raise ValueError("the objective returned no loss terms; expected {name: scalar tensor}")
    return total


class GradientStep:
    """Forward/backward ``grad_accum`` micro-batches, synchronise, clip, update (the module docstring).

    ``objective(batch) -> {name: scalar loss}``; ``ddp``: the DDP-wrapped backbone under torch.distributed (its
    gradient sync is held back until the last micro-batch), else None; ``comm_hook``: ``train.ddp_comm_hook``,
    the compression of the head's gradient all-reduce; ``last_checkpoint()``: the run's last good checkpoint, in
    words, for the message of a non-finite stop."""

    def __init__(
        self, *, objective: Callable[[Batch], dict[str, Tensor]], optimizer: torch.optim.Optimizer,
        scheduler: Any, scaler: torch.amp.GradScaler, params: TrainedParameters, hooks: Sequence[TrainHooks],
        grad_accum: int, clip_grad_norm: float, device: torch.device, world_size: int, steps_per_epoch: int,
        ddp: nn.Module | None = None, comm_hook: str = "none", last_checkpoint: Callable[[], str] = lambda: "none written",
    ) -> None:
        self.objective, self.optimizer, self.scheduler, self.scaler = objective, optimizer, scheduler, scaler
        self.params, self.hooks = params, list(hooks)
        self.grad_accum, self.clip_grad_norm = grad_accum, clip_grad_norm
        self.device, self.world_size, self.steps_per_epoch = device, world_size, steps_per_epoch
        self.ddp, self.comm_hook, self.last_checkpoint = ddp, comm_hook, last_checkpoint

    def __call__(self, batches: Iterator[Batch], step: int) -> StepResult:
        """Step number ``step`` (counted from 1) from the next ``grad_accum`` batches of ``batches``."""
        accum = self.grad_accum
        total, terms_total = 0.0, {}
        for micro in range(accum):
            batch = next(batches)
            for h in self.hooks:
                h.on_batch(batch)
            batch = batch.to(self.device, non_blocking=True)
            last = micro == accum - 1
            sync = self.ddp.no_sync() if (self.ddp is not None and not last) else contextlib.nullcontext()
            with sync:
                terms = self.objective(batch)
                values = self._loss_values(terms)
                for name, value in values.items():
                    if not math.isfinite(value):
                        raise self._non_finite(f"loss term {name!r}" if len(values) > 1 else "loss", value, step, micro)
                self.scaler.scale(_sum(terms.values()) / accum).backward()  # mean over the accumulated micro-batches
            total += sum(values.values()) / accum
            for name, value in values.items():
                terms_total[name] = terms_total.get(name, 0.0) + value / accum
        self._sync_head_grads()
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.params.replicated if p.grad is not None]
        sharded = [p for p in self.params.sharded if p.grad is not None]
        for p in (*params, *sharded):
            if p.grad.is_sparse:  # row-sparse (Partial FC): norm and clipping act on its rows' values
                p.grad = p.grad.coalesce()
        norm = grad_norm([_dense(p.grad) for p in params], [_dense(p.grad) for p in sharded], self.world_size)
        if not self.scaler.is_enabled() and not torch.isfinite(norm):
            raise self._non_finite("gradient norm", float(norm), step, accum - 1)
        if self.clip_grad_norm > 0:
            clip_gradients(params + sharded, self.clip_grad_norm, norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        for h in self.hooks:
            h.after_optimizer_step(step)
        return StepResult(total, terms_total, float(norm), lr)

    def _sync_head_grads(self) -> None:
        """Average the replicated head parameters' gradients over ranks, as DDP does for the backbone's, and
        compressed as its (``train.ddp_comm_hook``)."""
        if self.world_size == 1:
            return
        head = self.params.head_replicated
        for p in head:
            if p.grad is None:  # every rank must take part; an unused parameter has gradient 0
                p.grad = torch.zeros_like(p)
        fdist.all_reduce_mean([p.grad for p in head], self.comm_hook)

    def _loss_values(self, terms: dict[str, Tensor]) -> dict[str, float]:
        """Each loss term averaged over ranks, in one all-reduce (every rank learns of a NaN on any rank)."""
        values = torch.stack([t.detach().float().reshape(()) for t in terms.values()])
        if self.world_size > 1:
            torch.distributed.all_reduce(values)
            values /= self.world_size
        return dict(zip(terms, values.tolist()))

    def _non_finite(self, what: str, value: float, step: int, micro: int) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"non-finite {what} {value} at step {step} (epoch {(step - 1) // self.steps_per_epoch}, "
            f"micro-batch {micro + 1} of {self.grad_accum}); stopped without updating the weights "
            f"or saving this step; last good checkpoint: {self.last_checkpoint()}"
        )
