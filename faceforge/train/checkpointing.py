"""A run's checkpoints: what ``last.pt`` holds, how it is written and how a run resumes or starts from one.

:class:`Checkpointer` is built by the trainer once its parts exist (:class:`RunParts`). It assembles the
checkpoint dict (:meth:`Checkpointer.state`), writes it (:meth:`Checkpointer.save`: the parts' row-sharded
tensors into shard files, every rank its rows, then ``last.pt`` atomically, the model files a user takes away
and the older ``step_XXXXXXX.pt``), loads one back into every part (:meth:`Checkpointer.resume`, with the
config's changed hyperparameters applied: :func:`load_optimizer_and_schedule`) and starts a run from another
run's weights (:meth:`Checkpointer.init_from`, ``model.init_from``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from faceforge.build import load_class_weights, load_part
from faceforge.heads.base import RowShard
from faceforge.deploy.modelfile import write_model_files
from faceforge.train import distributed as fdist
from faceforge.core import shards
from faceforge.core.checkpoint import CHECKPOINT_NAME, THRESHOLD_KEY, save_checkpoint
from faceforge.core.config import to_dict
from faceforge.train.lifecycle import ConfigChange
from faceforge.train.parts import RunParts
from faceforge.train.preflight import check_init_from
from faceforge.train.step import parameters_by_key

__all__ = ["Checkpointer", "Resumed", "count", "load_optimizer_and_schedule", "row_sharded_state"]


@dataclass
class Resumed:
    """What a resumed run continues from: its step, its last metrics, and notes for the run log."""

    step: int
    metrics: dict[str, float]
    metrics_step: int | None
    notes: list[str] = field(default_factory=list)


class Checkpointer:
    """Writes and reads the checkpoints of one run (:class:`RunParts`)."""

    def __init__(self, parts: RunParts) -> None:
        self.parts = parts
        self.path = parts.output / CHECKPOINT_NAME
        self.init_from_parts = ""  # what model.init_from loaded, in words (init_from)

    # --- writing ---

    def state(self, step: int, metrics: dict[str, float], metrics_step: int | None) -> dict[str, Any]:
        """The checkpoint. Built on every rank: a part's ``extra_state`` may communicate; rank 0's is written."""
        p = self.parts
        rng = {"torch": torch.get_rng_state(), "cuda": None}
        if p.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(p.device)
        state = {
            "format": 1,
            "step": step,
            "epoch": step // p.steps_per_epoch,
            "batch": (step % p.steps_per_epoch) * p.cfg.train.grad_accum,  # next micro-batch of the epoch
            "steps_per_epoch": p.steps_per_epoch,
            "world_size": p.world_size,
            "backbone": p.backbone.state_dict(),
            "head": p.head.state_dict(),
            # ZeRO: consolidated on rank 0 only (save()); the other ranks' copy is never written
            "optimizer": p.optimizer.state_dict() if p.main or not p.zero else {},
            "scheduler": p.scheduler.state_dict(),
            "scaler": p.scaler.state_dict(),
            "rng": rng,
            "sampler": p.sampler.state_dict(),
            "config": to_dict(p.cfg),
            "metrics": dict(metrics),
            "metrics_step": metrics_step,  # the step the metrics were measured at (None: never)
            # the learned decision boundary in cosine terms (SphereFace2's), for `faceforge eval`
            THRESHOLD_KEY: next((t for h in p.hooks.values() if (t := h.verification_threshold()) is not None), None),
        }
        owned = p.objective.owned_state_dict()
        if owned:
            state["objective"] = owned
        extra = {key: e for key, h in p.hooks.items() if (e := h.extra_state())}
        if extra:
            state["extra"] = extra
        return state

    def save(self, step: int, metrics: dict[str, float], metrics_step: int | None) -> None:
        """Rank 0 writes last.pt atomically (and a step_XXXXXXX.pt link when keep_checkpoints > 0); the parts'
        row-sharded tensors (and their optimiser state) go first into one file each, every rank writing its own
        rows (``faceforge.core.shards``), and last.pt names those files; rank 0 also writes the
        backbone a user takes away: model.safetensors + model.json (:mod:`faceforge.deploy.modelfile`). Every rank calls it."""
        p = self.parts
        if p.zero:  # every rank sends its shard of the optimiser state to rank 0
            p.optimizer.consolidate_state_dict(to=0)
        state = self.state(step, metrics, metrics_step)
        entries = self._row_shard_entries()
        for path, (tensor, shard) in entries.items():
            if p.main:
                shards.create(p.output, shards.shard_file(step, _dotted(path)), [shard.total, *tensor.shape[1:]],
                              tensor.dtype)
        if entries:
            fdist.barrier()  # every file exists at its full size
        for path, (tensor, shard) in entries.items():
            file = shards.shard_file(step, _dotted(path))
            shards.write_rows(p.output, file, shard, tensor)
            _set_path(state, path, shards.placeholder(file, shard, tensor))
        if entries:
            fdist.barrier()  # every rank's rows are written and fsync'ed before last.pt names them
        if p.main:
            save_checkpoint(self.path, state)
            evaluated = p.backbone if p.ema is None else p.ema.module  # train.ema: the average is the model
            write_model_files(p.output, evaluated, p.cfg, metrics, state[THRESHOLD_KEY], step)
            self._keep_older(step, state)
            if entries:
                kept = {int(f.stem.removeprefix("step_")) for f in p.output.glob("step_*.pt")}
                shards.prune(p.output, kept | {step})
        fdist.barrier()

    def _keep_older(self, step: int, state: dict[str, Any]) -> None:
        keep = self.parts.cfg.train.keep_checkpoints
        if keep <= 0:
            return
        output = self.parts.output
        named = output / f"step_{step:07d}.pt"
        named.unlink(missing_ok=True)
        try:
            named.hardlink_to(self.path)  # the same bytes; survives the next os.replace of last.pt
        except OSError:
            save_checkpoint(named, state)
        for old in sorted(output.glob("step_*.pt"))[:-keep]:
            old.unlink(missing_ok=True)

    def _row_shard_entries(self) -> dict[tuple, tuple[Tensor, RowShard]]:
        """{path in the checkpoint dict: (this rank's rows, their RowShard)} of every part's ``row_shards``
        (TrainHooks), and of the optimiser state of each declared parameter (:func:`row_sharded_state`)."""
        entries: dict[tuple, tuple[Tensor, RowShard]] = {}
        for (key, name), (tensor, shard, index) in self._declared().items():
            entries[(key, name)] = (tensor.detach(), shard)
            if index is not None:
                for slot, value in row_sharded_state(self.parts.optimizer, tensor, shard, f"{key}.{name}").items():
                    entries[("optimizer", "state", index, slot)] = (value, shard)
        return entries

    def shard_rows(self) -> Callable[[str], tuple[int, int] | None]:
        """rows_of for ``shards.resolve``: the rows this rank holds of each row-sharded checkpoint entry (the
        parts' declared tensors, and every optimiser state entry of a declared parameter)."""
        rows: dict[str, tuple[int, int]] = {}
        for (key, name), (_, shard, index) in self._declared().items():
            rows[f"{key}.{name}"] = (shard.start, shard.stop)
            if index is not None:
                rows[f"optimizer.state.{index}"] = (shard.start, shard.stop)

        def rows_of(key: str) -> tuple[int, int] | None:
            if key.startswith("optimizer.state."):
                key = ".".join(key.split(".")[:3])  # optimizer.state.<param index>.<slot>
            return rows.get(key)

        return rows_of

    def _declared(self) -> dict[tuple[str, str], tuple[Tensor, RowShard, int | None]]:
        """{(part key, state_dict name): (the tensor, its RowShard, the optimiser's index of it when it is a
        parameter, else None)}: the parts' ``row_shards`` declarations, the one source of what is row-sharded."""
        optimizer = self.parts.optimizer
        index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
        declared: dict[tuple[str, str], tuple[Tensor, RowShard, int | None]] = {}
        for key, part in self.parts.hooks.items():
            tensors = part.state_dict(keep_vars=True)  # type: ignore[attr-defined]
            params = parameters_by_key(part)
            for name, shard in part.row_shards().items():
                param = params.get(name)
                declared[(key, name)] = (tensors[name], shard, index.get(id(param)) if param is not None else None)
        return declared

    # --- reading ---

    def resume(self, saved: dict[str, Any], changes: list[ConfigChange]) -> Resumed:
        """Load the checkpoint ``saved`` (read, its config checked by ``check_resume``) into every part; the
        ``changes`` of the config since it (the ones the resume policy applies) take effect from its step."""
        p = self.parts
        state = shards.resolve(saved, p.output, self.shard_rows())
        p.backbone.load_state_dict(state["backbone"])
        p.head.load_state_dict(state["head"])
        if "objective" in state:
            p.objective.load_owned_state_dict(state["objective"])
        for key, state_of_part in state.get("extra", {}).items():
            if key in p.hooks:
                p.hooks[key].load_extra_state(state_of_part)
        load_optimizer_and_schedule(p.optimizer, p.scheduler, state["optimizer"], state["scheduler"])
        p.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        p.sampler.load_state_dict(state["sampler"] if "sampler" in state else {"flip": rng["flip"]})
        if p.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], p.device)
        resumed = Resumed(int(state["step"]), dict(state.get("metrics", {})), state.get("metrics_step"))
        if state.get("world_size") != p.world_size:
            writers = count(state.get("world_size"), "process")
            resumed.notes.append(f"resume: {self.path} was written by {writers}, this run has {p.world_size}")
        if state.get("steps_per_epoch") != p.steps_per_epoch:
            resumed.notes.append(
                f"resume: {self.path} was written with {state.get('steps_per_epoch')} steps per epoch, "
                f"this run has {p.steps_per_epoch} (data.batch_size x world size x train.grad_accum); "
                f"the data order changes"
            )
        changed = [c for c in changes if c.key != "output"]
        if changed:
            resumed.notes.append(
                f"resume: config changed since the checkpoint: "
                f"{', '.join(f'{c.key} ({c.old!r} -> {c.new!r})' for c in changed)}; applied from step {resumed.step + 1}"
            )
        return resumed

    def init_from(self, path: Path, num_classes: int) -> None:
        """model.init_from: start from another run's backbone and head class weights (not its optimiser or queue),
        or from a model file's backbone (``.safetensors``; the head starts fresh). Sets :attr:`init_from_parts`."""
        p = self.parts
        state = shards.resolve(check_init_from(p.cfg), path.parent, self.shard_rows())
        load_part(p.backbone, state.get("backbone"), f"model.init_from {path}: the backbone")
        if state.get("head") is None:  # a model file: the backbone only
            self.init_from_parts = "the backbone (a model file; the head starts from its initialisation)"
            return
        load_class_weights(
            p.head, state.get("head"), f"model.init_from {path}: the head (num_classes {num_classes} from the data here)",
        )
        self.init_from_parts = "backbone and head class weights"


def load_optimizer_and_schedule(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
) -> None:
    """A checkpoint's optimiser state (momenta, ...) and schedule position, with the hyperparameters the optimiser
    and scheduler were built with (this run's config).

    torch's ``load_state_dict`` would bring back the checkpoint's lr, momentum, weight decay (every group key)
    and the schedule's base rates; the groups keep the ones built from this config instead, and the lr of the
    next step is this config's schedule at the resumed step: equal to the checkpoint's when nothing changed,
    and what a run started with the new config would use at this step when something did."""
    built = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    base_lrs = list(scheduler.base_lrs)
    optimizer.load_state_dict(optimizer_state)
    for group, hyper in zip(optimizer.param_groups, built):
        group.update(hyper)
    scheduler.load_state_dict({**scheduler_state, "base_lrs": base_lrs})
    t = scheduler.last_epoch
    lrs = [base * factor(t) for base, factor in zip(base_lrs, scheduler.lr_lambdas)]  # LambdaLR's get_lr
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports until the next step


def row_sharded_state(optimizer: torch.optim.Optimizer, param: Tensor, shard: RowShard, name: str) -> dict[str, Tensor]:
    """The optimiser state of a parameter declared row-sharded (``row_shards``): its tensor entries of one or
    more dimensions, each holding one row per row of ``param`` (SGD's momentum, Adam's moments, LazyRowSGD's
    ``last_step``); its scalars (a step count, an lr history) are the same on every rank. An entry whose first
    dimension is not the parameter's rows cannot be written as this rank's rows: ValueError naming it."""
    state = {}
    for slot, value in optimizer.state.get(param, {}).items():
        if torch.is_tensor(value) and value.dim() >= 1:
            if value.shape[0] != param.shape[0]:
                raise ValueError(
                    f"optimiser state {slot!r} of row-sharded {name} {tuple(param.shape)} (rows [{shard.start}, "
                    f"{shard.stop}) of {shard.total}) has shape {tuple(value.shape)}; expected one row per row"
                )
            state[slot] = value
    return state


def count(n: Any, noun: str) -> str:
    """``1 process``, ``2 processes`` (``noun`` + ``es`` after s, else ``s``)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def _dotted(path: tuple) -> str:
    return ".".join(str(k) for k in path)


def _set_path(state: dict[str, Any], path: tuple, value: Any) -> None:
    """state[path[0]][path[1]]... = value, each dict on the way shallow-copied first (the optimiser's
    ``state_dict`` shares its per-parameter dicts with the live optimiser)."""
    for key in path[:-1]:
        state[key] = dict(state[key])
        state = state[key]
    state[path[-1]] = value
