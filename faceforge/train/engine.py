"""The training loop: `train(cfg, resume=False) -> TrainResult`.

One run = one output folder holding ``config.yaml`` (the resolved config), ``train.log``,
``tensorboard/`` and the checkpoints ``last.pt`` (+ ``step_XXXXXXX.pt`` when ``keep_checkpoints``).

The loop meets its parts through written seams only (``docs/extending.md``):

* a sampler (``data.sampler``, ``faceforge.data.samplers.SAMPLERS``) yields this rank's typed ``Batch`` es;
* an objective (``objective.name``, ``faceforge.train.objectives.OBJECTIVES``) maps a batch to named loss
  terms; the loop sums them, logs each and stops on a non-finite one, naming it;
* the head and the objective may opt into ``faceforge.heads.base.TrainHooks`` (checked once, here);
* DDP wraps the backbone only; the gradients of the head's replicated parameters are all-reduced
  explicitly after the last micro-batch (a head's ``row_shards`` opt out: each rank holds its own rows and
  the head does its own communication; their squared gradient norm is summed over ranks for clipping).

Determinism (what makes a killed-and-resumed CPU run bit-identical to an uninterrupted one): the data
order and flips are the sampler's (``faceforge.data.samplers``: a function of seed, epoch and world size,
its generators in ``state_dict``, checkpointed); the global torch RNG (dropout) is checkpointed; a resumed
run starts the sampler at the next micro-batch, and nothing is re-read.

Steps are optimiser steps, counted from 1 in logs and checkpoints: "step 5" = five updates done.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from faceforge.build import FaceModel, build_backbone, build_head, load_class_weights, load_part, wrap_ddp
from faceforge.data.samplers import (
    Batch,
    EpochBatchSampler,
    SamplerContext,
    build_sampler,
    decode_sample_ids,
    encode_sample_ids,
    epoch_permutation,
    flip_images,
    rank_positions,
)
from faceforge.fileio import stale_temporaries
from faceforge.heads.base import RowShard, TrainHooks
from faceforge.modelfile import write_model_files
from faceforge.train import distributed as fdist
from faceforge.train import shards
from faceforge.train.checkpoint import CHECKPOINT_NAME, THRESHOLD_KEY, load_checkpoint, save_checkpoint
from faceforge.train.config import Config, to_dict, to_yaml
from faceforge.train.data import build_dataset, build_unlabelled, dataset_labels
from faceforge.train.lifecycle import (
    BAD_RECORDS_NAME, StopSignals, TrainingInterrupted, bad_records, config_changes, drop_replayed_steps,
)
from faceforge.train.preflight import check_head, check_init_from, check_run_folder, open_evaluators
from faceforge.train.objectives import Objective, build_objective
from faceforge.train.optim import build_optimizer, build_scheduler

__all__ = [
    "TrainResult",
    "NonFiniteLossError",
    "FaceModel",
    "EpochBatchSampler",
    "epoch_permutation",
    "rank_positions",
    "build_backbone",
    "build_head",
    "build_dataset",
    "encode_sample_ids",
    "decode_sample_ids",
    "train",
    "wrap_ddp",
]

logger = logging.getLogger("faceforge.train")


AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainResult:
    """What a run produced. ``step``: optimiser steps done; ``metrics``: the final verification
    (``VerificationResult.as_dict()``, keys prefixed ``<bin name>/`` for ``data.eval_bins``; empty
    without held-out sets); ``losses``: the mean loss
    of every step this process ran; ``images_per_second``: global training throughput (all ranks)."""

    output: Path
    checkpoint: Path
    log: Path
    step: int
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)
    images_per_second: float = 0.0
    losses: list[float] = field(default_factory=list)


class NonFiniteLossError(FloatingPointError):
    """The loss (or the gradient norm) became NaN/inf; the message names the step and the value."""


# ----------------------------------------------------------------------------------------------
# The run


class _Run:
    """The state of one training run; `train()` builds it and calls `fit()`."""

    def __init__(self, cfg: Config, resume: bool, on_step: Callable[[int], None] | None) -> None:
        self.cfg = cfg
        self.on_step = on_step
        self.dist = fdist.init_distributed(timeout_s=cfg.train.dist_timeout)
        self.device = self.dist.device
        self.world_size = self.dist.world_size
        self.rank = self.dist.rank
        self.main = self.dist.is_main
        self.output = Path(cfg.output)
        self.checkpoint_path = self.output / CHECKPOINT_NAME
        self.log_path = self.output / "train.log"
        t = cfg.train
        self._notes: list[str] = []  # warnings found before train.log is open (resume), logged once it is
        check_run_folder(self.output, resume)
        # every evaluation set read and checked now (rank 0 evaluates), not at the first evaluation
        self._eval_sets: list[Any] = _agreed(
            lambda: open_evaluators(cfg) if self.main else [], "evaluation sets", self.device)
        self.evaluates = _any_rank(bool(self._eval_sets), self.device)  # the same on every rank

        torch.manual_seed(cfg.seed)
        self.dataset = build_dataset(cfg)
        num_classes = int(self.dataset.num_classes)
        check_head(cfg, num_classes, self.world_size)  # the head factory's own check, before anything is built
        self.backbone = build_backbone(cfg)
        self.head = build_head(cfg, num_classes, global_batch=cfg.data.batch_size * self.world_size)
        self.amp_dtype = self._amp_dtype()
        self.objective: Objective = build_objective(
            cfg.objective.name, cfg.objective.kwargs, backbone=self.backbone, head=self.head, amp_dtype=self.amp_dtype
        ).to(self.device)
        # the parts that opted into TrainHooks, by their checkpoint key; checked once, here
        self.hooks: dict[str, TrainHooks] = {
            key: part for key, part in (("objective", self.objective), ("head", self.head)) if isinstance(part, TrainHooks)
        }
        if t.diagnostics_every and not any(h.provides_diagnostics for h in self.hooks.values()):
            raise ValueError(
                f"train.diagnostics_every = {t.diagnostics_every}: head {cfg.head.name!r} ({type(self.head).__name__}) "
                f"has no diagnostics; expected 0 (off) or a head that has them (broadface)"
            )
        self.sharded = [p for h in self.hooks.values() for p in _row_sharded_parameters(h) if p.requires_grad]
        sharded_ids = {id(p) for p in self.sharded}
        learned = list(self.objective.learned.parameters())  # trained like the head's replicated parameters
        self.trained = [p for p in (*self.backbone.parameters(), *self.head.parameters(), *learned) if id(p) not in sharded_ids]
        self.replicated_head = [p for p in (*self.head.parameters(), *learned) if p.requires_grad and id(p) not in sharded_ids]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        self.batch = cfg.data.batch_size
        self.global_micro = self.batch * self.world_size
        self.step_images = self.global_micro * t.grad_accum
        self.steps_per_epoch = len(self.dataset) // self.step_images
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{len(self.dataset)} training images give no full step of {self.step_images} images "
                f"(data.batch_size {self.batch} x world size {self.world_size} x train.grad_accum {t.grad_accum})"
            )
        self.total_steps = t.steps if t.steps is not None else t.epochs * self.steps_per_epoch
        self.zero = t.zero and self.world_size > 1
        if self.zero and self.sharded:
            raise ValueError(f"train.zero = true: head {cfg.head.name!r} keeps per-rank parameter shards, which "
                             "ZeRO would partition as if replicated; expected train.zero = false with it")
        self.optimizer = build_optimizer(cfg.optim, self.backbone, nn.ModuleList([self.head, self.objective.learned]),
                                         self.step_images, zero=self.zero)
        for part in self.hooks.values():
            part.use_optimizer(self.optimizer)
        self.scheduler = build_scheduler(cfg.schedule, self.optimizer, self.total_steps, self.steps_per_epoch)
        unlabelled = build_unlabelled(cfg)
        if unlabelled is not None and not self.objective.uses_unlabelled:
            raise ValueError(f"data.unlabelled = {cfg.data.unlabelled!r}: objective {cfg.objective.name!r} does not read "
                             "unlabelled images; expected an objective that does (distillation) or no data.unlabelled")
        context = SamplerContext(
            dataset=self.dataset, batch_size=self.batch, world_size=self.world_size, rank=self.rank,
            seed=cfg.seed, grad_accum=t.grad_accum, micro_per_epoch=self.steps_per_epoch * t.grad_accum,
            flip=cfg.data.flip, num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda",
            labels=functools.cache(lambda: torch.from_numpy(dataset_labels(self.dataset))),
            mask_ratio=cfg.data.mask_ratio, unlabelled=unlabelled,
            unlabelled_per_batch=max(1, round(cfg.data.unlabelled_ratio * self.batch)) if unlabelled is not None else 0,
        )
        self.sampler = build_sampler(cfg.data.sampler, context, cfg.data.sampler_kwargs,
                                     needs=self.objective.needs_extras, needed_by=f"objective {cfg.objective.name}")
        self.objective.bind(context)
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.metrics_step: int | None = None
        self.losses: list[float] = []
        self.resume_from = self._resume() if resume else None
        self.init_from = Path(cfg.model.init_from) if cfg.model.init_from and self.resume_from is None else None
        if self.init_from is not None:
            self._init_from(self.init_from)
        self.backbone_ddp = self._wrap_backbone() if self.world_size > 1 else None

    # --- setup ---

    def _amp_dtype(self) -> torch.dtype | None:
        amp = self.cfg.train.amp
        on = self.device.type == "cuda" if amp == "auto" else bool(amp)
        if on and self.device.type != "cuda":
            logger.warning("train.amp = %r ignored: mixed precision runs on CUDA only; training in float32", amp)
            return None
        return AMP_DTYPES[self.cfg.train.amp_dtype] if on else None

    def _wrap_backbone(self) -> nn.Module:
        """DDP around the backbone only (it broadcasts the backbone from rank 0); the head's replicated
        parameters are broadcast here once, and their gradients all-reduced in :meth:`_sync_head_grads`."""
        device = self.device
        ddp = nn.parallel.DistributedDataParallel(self.backbone, device_ids=[device] if device.type == "cuda" else None)
        fdist.register_compression(ddp, self.cfg.train.ddp_comm_hook)  # train.ddp_comm_hook: fp16 / bf16 / none
        with torch.no_grad():
            for p in self.replicated_head:
                torch.distributed.broadcast(p, 0)
        self.objective.set_encoder(ddp)
        return ddp

    def _sync_head_grads(self) -> None:
        """Average the replicated head parameters' gradients over ranks, as DDP does for the backbone's, and
        compressed as its (``train.ddp_comm_hook``)."""
        if self.world_size == 1:
            return
        for p in self.replicated_head:
            if p.grad is None:  # every rank must take part; an unused parameter has gradient 0
                p.grad = torch.zeros_like(p)
        fdist.all_reduce_mean([p.grad for p in self.replicated_head], self.cfg.train.ddp_comm_hook)

    def _resume(self) -> Path | None:
        if not self.checkpoint_path.is_file():
            logger.warning("resume: no checkpoint at %s; starting from step 0", self.checkpoint_path)
            return None
        state = shards.resolve(load_checkpoint(self.checkpoint_path), self.output, self._shard_rows())
        self.backbone.load_state_dict(state["backbone"])
        self.head.load_state_dict(state["head"])
        if "objective" in state:
            self.objective.load_owned_state_dict(state["objective"])
        for key, state_of_part in state.get("extra", {}).items():
            if key in self.hooks:
                self.hooks[key].load_extra_state(state_of_part)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.sampler.load_state_dict(state["sampler"] if "sampler" in state else {"flip": rng["flip"]})
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step = int(state["step"])
        self.metrics = dict(state.get("metrics", {}))
        self.metrics_step = state.get("metrics_step")
        if state.get("world_size") != self.world_size:
            self._notes.append(f"resume: {self.checkpoint_path} was written by {state.get('world_size')} processes, "
                               f"this run has {self.world_size}")
        if state.get("steps_per_epoch") != self.steps_per_epoch:
            self._notes.append(
                f"resume: {self.checkpoint_path} was written with {state.get('steps_per_epoch')} steps per epoch, "
                f"this run has {self.steps_per_epoch} (data.batch_size x world size x train.grad_accum); "
                f"the data order changes"
            )
        changed = config_changes(state.get("config", {}), to_dict(self.cfg))
        if changed:
            self._notes.append(f"resume: config changed since the checkpoint: {', '.join(changed)}")
        return self.checkpoint_path

    def _init_from(self, path: Path) -> None:
        """model.init_from: start from another run's backbone and head class weights (not its optimiser or queue)."""
        state = shards.resolve(check_init_from(self.cfg), path.parent, self._shard_rows())
        load_part(self.backbone, state.get("backbone"), f"model.init_from {path}: the backbone")
        load_class_weights(
            self.head, state.get("head"),
            f"model.init_from {path}: the head (num_classes {int(self.dataset.num_classes)} from the data here)",
        )

    # --- checkpoints ---

    def _state(self) -> dict[str, Any]:
        """The checkpoint. Built on every rank: a part's ``extra_state`` may communicate; rank 0's is written."""
        rng = {"torch": torch.get_rng_state(), "cuda": None}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "format": 1,
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "batch": (self.step % self.steps_per_epoch) * self.cfg.train.grad_accum,  # next micro-batch of the epoch
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.world_size,
            "backbone": self.backbone.state_dict(),
            "head": self.head.state_dict(),
            # ZeRO: consolidated on rank 0 only (save()); the other ranks' copy is never written
            "optimizer": self.optimizer.state_dict() if self.main or not self.zero else {},
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "sampler": self.sampler.state_dict(),
            "config": to_dict(self.cfg),
            "metrics": dict(self.metrics),
            "metrics_step": self.metrics_step,  # the step self.metrics were measured at (None: never)
            # the learned decision boundary in cosine terms (SphereFace2's), for `faceforge eval`
            THRESHOLD_KEY: next(
                (t for h in self.hooks.values() if (t := h.verification_threshold()) is not None), None
            ),
        }
        owned = self.objective.owned_state_dict()
        if owned:
            state["objective"] = owned
        extra = {key: e for key, h in self.hooks.items() if (e := h.extra_state())}
        if extra:
            state["extra"] = extra
        return state

    def save(self) -> None:
        """Rank 0 writes last.pt atomically (and a step_XXXXXXX.pt link when keep_checkpoints > 0); the parts'
        row-sharded tensors (and their optimiser state) go first into one file each, every rank writing its own
        rows (``faceforge.train.shards``), and last.pt names those files; rank 0 also writes the
        backbone a user takes away: model.safetensors + model.json (:mod:`faceforge.modelfile`)."""
        if self.zero:  # every rank sends its shard of the optimiser state to rank 0
            self.optimizer.consolidate_state_dict(to=0)
        state = self._state()
        entries = self._row_shard_entries()
        for path, (tensor, shard) in entries.items():
            if self.main:
                shards.create(self.output, shards.shard_file(self.step, _dotted(path)), [shard.total, *tensor.shape[1:]],
                              tensor.dtype)
        if entries:
            fdist.barrier()  # every file exists at its full size
        for path, (tensor, shard) in entries.items():
            file = shards.shard_file(self.step, _dotted(path))
            shards.write_rows(self.output, file, shard, tensor)
            _set_path(state, path, shards.placeholder(file, shard, tensor))
        if entries:
            fdist.barrier()  # every rank's rows are written and fsync'ed before last.pt names them
        if self.main:
            save_checkpoint(self.checkpoint_path, state)
            write_model_files(self.output, self.backbone, self.cfg, self.metrics, state[THRESHOLD_KEY], self.step)
            self._keep_older(state)
            if entries:
                kept = {int(f.stem.removeprefix("step_")) for f in self.output.glob("step_*.pt")}
                shards.prune(self.output, kept | {self.step})
            logger.info("checkpoint: %s (step %d)", self.checkpoint_path, self.step)
        fdist.barrier()

    def _row_shard_entries(self) -> dict[tuple, tuple[Tensor, RowShard]]:
        """{path in the checkpoint dict: (this rank's rows, their RowShard)} of every part's ``row_shards``
        (TrainHooks), and of the optimiser state of each such parameter (the tensors with one row per row)."""
        entries: dict[tuple, tuple[Tensor, RowShard]] = {}
        index = {id(p): i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        for key, part in self.hooks.items():
            tensors = part.state_dict(keep_vars=True)  # type: ignore[attr-defined]
            params = _parameters_by_key(part)
            for name, shard in part.row_shards().items():
                tensor = tensors[name]
                entries[(key, name)] = (tensor.detach(), shard)
                param = params.get(name)
                for slot, value in self.optimizer.state.get(param, {}).items() if param is not None else ():
                    if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == tensor.shape[0]:
                        entries[("optimizer", "state", index[id(param)], slot)] = (value, shard)
        return entries

    def _shard_rows(self) -> Callable[[str], tuple[int, int] | None]:
        """rows_of for ``shards.resolve``: the rows this rank holds of each row-sharded checkpoint entry."""
        index = {id(p): i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        rows: dict[str, tuple[int, int]] = {}
        for key, part in self.hooks.items():
            params = _parameters_by_key(part)
            for name, shard in part.row_shards().items():
                rows[f"{key}.{name}"] = (shard.start, shard.stop)
                if name in params:
                    rows[f"optimizer.state.{index[id(params[name])]}"] = (shard.start, shard.stop)

        def rows_of(key: str) -> tuple[int, int] | None:
            if key.startswith("optimizer.state."):
                key = ".".join(key.split(".")[:3])  # optimizer.state.<param index>.<slot>
            return rows.get(key)

        return rows_of

    def _keep_older(self, state: dict[str, Any]) -> None:
        keep = self.cfg.train.keep_checkpoints
        if keep <= 0:
            return
        named = self.output / f"step_{self.step:07d}.pt"
        named.unlink(missing_ok=True)
        try:
            named.hardlink_to(self.checkpoint_path)  # the same bytes; survives the next os.replace of last.pt
        except OSError:
            save_checkpoint(named, state)
        for old in sorted(self.output.glob("step_*.pt"))[:-keep]:
            old.unlink(missing_ok=True)

    # --- evaluation ---

    def evaluate(self, writer: Any) -> None:
        """Every evaluation set (rank 0: held-out pairs, IJB, identification, retrieval), logged; the
        others wait at a barrier."""
        if self.main:
            metrics: dict[str, float] = {}
            for s in self._eval_sets:
                numbers = s.evaluate(self.backbone, self.cfg.data.image_size,
                                     batch_size=self.cfg.data.eval_batch_size, device=self.device)
                prefix = f"{s.name}/" if s.name else ""
                metrics.update({f"{prefix}{k}": float(v) for k, v in numbers.items()})
            if self._eval_sets:
                self.metrics = metrics
                logger.info(
                    "eval step %d: %s", self.step, " ".join(f"{k} {v:.4f}" for k, v in self.metrics.items())
                )
                for k, v in self.metrics.items():
                    writer.add_scalar(f"eval/{k}", v, self.step)
                from tqdm import tqdm

                from faceforge.eval.report import metrics_table

                tqdm.write(f"eval step {self.step}:\n{metrics_table(self.metrics)}", file=sys.stderr)
        if self.evaluates:
            self.metrics_step = self.step
        fdist.barrier()

    # --- diagnostics ---

    def diagnose(self, writer: Any) -> None:
        """Rank 0: the parts' ``diagnostics(embed_fn)`` (BroadFace Fig. 5a), to train.log and TensorBoard."""
        if not self.main:
            return
        values: dict[str, float] = {}
        for h in self.hooks.values():
            if h.provides_diagnostics:
                values.update(h.diagnostics(self._embed_samples))
        logger.info("diagnostics step %d: %s", self.step, " ".join(f"{k} {v:.5g}" for k, v in values.items()) or "none")
        for k, v in values.items():
            writer.add_scalar(f"diagnostics/{k}", v, self.step)

    def _embed_samples(self, ids: torch.Tensor) -> torch.Tensor:
        """Current embeddings (K, D) float32 of the training images named by view ids (``Batch.view_ids``):
        the same image and flip as when trained, the backbone in eval mode, no gradient."""
        indices, flipped = decode_sample_ids(ids.cpu())
        was_training = self.backbone.training
        self.backbone.eval()
        embeddings = []
        try:
            with torch.no_grad():
                for k0 in range(0, len(indices), self.cfg.data.eval_batch_size):
                    part = range(k0, min(k0 + self.cfg.data.eval_batch_size, len(indices)))
                    images = torch.stack([self.dataset[int(indices[k])][0] for k in part])
                    images = flip_images(images, flipped[part.start : part.stop]).to(self.device)
                    embeddings.append(self.objective.embed(images, synced=False).float())
        finally:
            self.backbone.train(was_training)
        return torch.cat(embeddings)

    # --- one optimiser step ---

    def _loss_values(self, terms: dict[str, Tensor]) -> dict[str, float]:
        """Each loss term averaged over ranks, in one all-reduce (every rank learns of a NaN on any rank)."""
        values = torch.stack([t.detach().float().reshape(()) for t in terms.values()])
        if self.world_size > 1:
            torch.distributed.all_reduce(values)
            values /= self.world_size
        return dict(zip(terms, values.tolist()))

    def _non_finite(self, what: str, value: float, micro: int) -> NonFiniteLossError:
        last = f"{self.checkpoint_path} (step {self._last_saved})" if self._last_saved is not None else "none written"
        return NonFiniteLossError(
            f"non-finite {what} {value} at step {self.step + 1} (epoch {self.step // self.steps_per_epoch}, "
            f"micro-batch {micro + 1} of {self.cfg.train.grad_accum}); stopped without updating the weights "
            f"or saving this step; last good checkpoint: {last}"
        )

    def _grad_norm(self, grads: list[Tensor], sharded: list[Tensor]) -> Tensor:
        """The global L2 norm of every gradient: the replicated ones as they are, the sharded ones' squares
        summed over ranks."""
        norm = nn.utils.get_total_norm(grads)
        if sharded:
            square = nn.utils.get_total_norm(sharded).float().square()
            if self.world_size > 1:
                torch.distributed.all_reduce(square)
            norm = (norm.float().square() + square).sqrt()
        return norm

    def train_step(self, batches: Iterator[Batch]) -> tuple[float, dict[str, float], float, float]:
        """Forward/backward ``grad_accum`` micro-batches, clip, update.

        Returns (mean loss, mean of each loss term, grad norm, lr used).
        """
        accum = self.cfg.train.grad_accum
        total, terms_total = 0.0, {}
        for micro in range(accum):
            batch = next(batches)
            for h in self.hooks.values():
                h.on_batch(batch)
            batch = batch.to(self.device, non_blocking=True)
            last = micro == accum - 1
            ddp = self.backbone_ddp
            sync = ddp.no_sync() if (ddp is not None and not last) else contextlib.nullcontext()
            with sync:
                terms = self.objective(batch)
                values = self._loss_values(terms)
                for name, value in values.items():
                    if not math.isfinite(value):
                        raise self._non_finite(f"loss term {name!r}" if len(values) > 1 else "loss", value, micro)
                loss = _sum(terms.values())
                self.scaler.scale(loss / accum).backward()  # mean over the accumulated micro-batches
            total += sum(values.values()) / accum
            for name, value in values.items():
                terms_total[name] = terms_total.get(name, 0.0) + value / accum
        self._sync_head_grads()
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.trained if p.grad is not None]
        sharded = [p for p in self.sharded if p.grad is not None]
        for p in (*params, *sharded):
            if p.grad.is_sparse:  # row-sparse (Partial FC): norm and clipping act on its rows' values
                p.grad = p.grad.coalesce()
        norm = self._grad_norm([_dense(p.grad) for p in params], [_dense(p.grad) for p in sharded])
        if not self.scaler.is_enabled() and not torch.isfinite(norm):
            raise self._non_finite("gradient norm", float(norm), accum - 1)
        if self.cfg.train.clip_grad_norm > 0:
            clip = self.cfg.train.clip_grad_norm
            nn.utils.clip_grads_with_norm_([p for p in params + sharded if not p.grad.is_sparse], clip, norm)
            rows = [p.grad._values() for p in params + sharded if p.grad.is_sparse]
            if rows:  # the same factor as clip_grads_with_norm_'s, on the sampled rows' values
                torch._foreach_mul_(rows, (clip / (norm + 1e-6)).clamp(max=1.0))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        for h in self.hooks.values():
            h.after_optimizer_step(self.step + 1)
        return total, terms_total, float(norm), lr

    # --- the loop ---

    def fit(self) -> TrainResult:
        t = self.cfg.train
        self._last_saved = self.step if self.resume_from is not None else None
        writer = self._open_logs()
        bar = self._progress_bar()
        train_time, images_seen, window = 0.0, 0, []
        stop = StopSignals()
        try:
            stop.__enter__()
            while self.step < self.total_steps:
                epoch = self.step // self.steps_per_epoch
                first = self.step % self.steps_per_epoch
                batches = iter(self.sampler.batches(epoch, first * t.grad_accum))
                for _ in range(first, self.steps_per_epoch):
                    if self.step >= self.total_steps:
                        break
                    start = time.perf_counter()
                    loss, terms, grad_norm, lr = self.train_step(batches)
                    train_time += time.perf_counter() - start
                    images_seen += self.step_images
                    self.step += 1
                    self.losses.append(loss)
                    window.append((loss, terms))
                    self._log_step(writer, bar, window, grad_norm, lr, images_seen / max(train_time, 1e-9))
                    if t.diagnostics_every and self.step % t.diagnostics_every == 0:
                        self.diagnose(writer)
                    done = self.step == self.total_steps
                    self._save_and_evaluate(
                        writer,
                        save=done or bool(t.checkpoint_every and self.step % t.checkpoint_every == 0),
                        evaluate=done or bool(t.eval_every and self.step % t.eval_every == 0),
                    )
                    self._log_bad_records()
                    if self.on_step is not None:
                        self.on_step(self.step)
                    if self._stop_requested(stop) and not done:
                        self._interrupt(stop.name)
                del batches
            if self._last_saved != self.step:  # resumed at the very end: nothing left to train
                self._save_and_evaluate(writer, save=True, evaluate=True)
            elif self.evaluates and self.metrics_step != self.step:  # its final evaluation failed: run it again
                self._save_and_evaluate(writer, save=True, evaluate=True)
            ips = images_seen / train_time if train_time > 0 else 0.0
            logger.info("done: step %d, %.1f images/s", self.step, ips)  # before the log handlers close
        except (NonFiniteLossError, TrainingInterrupted) as e:
            logger.error("%s", e)
            raise
        except Exception as e:  # the run stops; say which checkpoint survives it
            logger.error("stopped after step %d: %s; last checkpoint: %s", self.step, e,
                         f"{self.checkpoint_path} (step {self._last_saved})" if self._last_saved is not None
                         else "none written")
            raise
        finally:
            stop.__exit__()
            bar.close()
            self._close_logs(writer)
        return TrainResult(
            output=self.output, checkpoint=self.checkpoint_path, log=self.log_path, step=self.step,
            epoch=self.step // self.steps_per_epoch, metrics=dict(self.metrics), images_per_second=ips,
            losses=list(self.losses),
        )

    def _save_and_evaluate(self, writer: Any, save: bool, evaluate: bool) -> None:
        """Checkpoint first, then evaluate: a failing evaluation never loses the steps. When both fall on this
        step the checkpoint is written again after the evaluation, so that it holds the metrics."""
        if save:
            self.save()
            self._last_saved = self.step
        if evaluate:
            self.evaluate(writer)
            if save and self.evaluates:
                self.save()

    def _stop_requested(self, stop: StopSignals) -> bool:
        """Whether a stop signal reached this process, or (under torch.distributed) any rank."""
        if self.world_size == 1:
            return stop.requested
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _interrupt(self, name: str) -> None:
        """Write a checkpoint at this step (unless it was just written) and raise TrainingInterrupted."""
        if self._last_saved != self.step:
            self.save()
            self._last_saved = self.step
        raise TrainingInterrupted(
            f"{name or 'a stop signal'} at step {self.step}: checkpoint {self.checkpoint_path} written; continue "
            f"with `faceforge train CONFIG --resume` (output {self.output})"
        )

    def _log_bad_records(self) -> None:
        """With data.skip_bad: a log line when more unreadable training records were skipped (bad_records.txt)."""
        if not (self.cfg.data.skip_bad and self.main):
            return
        count = len(bad_records(self.output / BAD_RECORDS_NAME))
        if count != getattr(self, "_bad_logged", 0):
            self._bad_logged = count
            logger.warning("skipped %d unreadable training records so far (data.skip_bad), listed in %s",
                           count, self.output / BAD_RECORDS_NAME)

    def _log_step(
        self, writer: Any, bar: Any, window: list[tuple[float, dict[str, float]]], grad_norm: float, lr: float,
        ips: float,
    ) -> None:
        """Every log_every steps: mean loss since the last line (and of each loss term, when there are several),
        the lr this step used, grad norm, images/s."""
        bar.update(1)
        if self.step % self.cfg.train.log_every and self.step != self.total_steps:
            return
        loss = sum(total for total, _ in window) / len(window)
        names = list(window[-1][1]) if len(window[-1][1]) > 1 else []
        terms = {name: sum(t.get(name, 0.0) for _, t in window) / len(window) for name in names}
        window.clear()
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
        if self.main:
            logger.info(
                "step %d/%d epoch %d loss %.5f%s lr %.4e grad_norm %.4f images/s %.1f",
                self.step, self.total_steps, (self.step - 1) // self.steps_per_epoch, loss,
                "".join(f" {name} {value:.5f}" for name, value in terms.items()), lr, grad_norm, ips,
            )
            writer.add_scalar("train/loss", loss, self.step)
            for name, value in terms.items():
                writer.add_scalar(f"train/{name}", value, self.step)
            writer.add_scalar("train/lr", lr, self.step)
            writer.add_scalar("train/grad_norm", grad_norm, self.step)
            writer.add_scalar("train/images_per_second", ips, self.step)

    def _progress_bar(self) -> Any:
        from tqdm import tqdm

        enabled = self.main and self.cfg.train.progress and sys.stderr.isatty()
        return tqdm(total=self.total_steps, initial=self.step, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)

    def _open_logs(self) -> Any:
        """Rank 0: train.log handler, config.yaml, a SummaryWriter; other ranks get a no-op writer."""
        if not self.main:
            return _NullWriter()
        from torch.utils.tensorboard import SummaryWriter

        self.output.mkdir(parents=True, exist_ok=True)
        for stale in stale_temporaries(self.checkpoint_path):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
        (self.output / "config.yaml").write_text(to_yaml(self.cfg))
        # the killed run's lines of the steps this run replays go (before the log is appended to)
        replayed = drop_replayed_steps(self.log_path, self.step) if self.resume_from is not None else 0
        self._handlers = [logging.FileHandler(self.log_path)]
        if not (self.cfg.train.progress and sys.stderr.isatty()):
            self._handlers.append(logging.StreamHandler(sys.stderr))
        for handler in self._handlers:
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        if self.resume_from is not None:
            logger.info("resumed from %s at step %d%s", self.resume_from, self.step,
                        f" (the killed run's {replayed} log lines of later steps, replayed now, removed)"
                        if replayed else "")
        for note in self._notes:
            logger.warning("%s", note)
        if not self._eval_sets:
            logger.info("no evaluation sets: data.eval_pairs / eval_bins give no held-out pairs for data.name "
                        "%r and no eval_ijb, eval_probes or eval_retrieval is set", self.cfg.data.name)
        if self.init_from is not None:
            logger.info("initialised from %s (model.init_from): backbone and head class weights", self.init_from)
        logger.info(
            "run %s: %d images, %d classes, world size %d, %d steps (%d per epoch, %d images each), device %s, amp %s",
            self.output, len(self.dataset), int(self.dataset.num_classes), self.world_size, self.total_steps,
            self.steps_per_epoch, self.step_images, self.device, self.amp_dtype,
        )
        # a resumed run replays the steps after its checkpoint: TensorBoard drops the killed run's events of them
        purge = self.step + 1 if self.resume_from is not None else None
        return SummaryWriter(log_dir=str(self.output / "tensorboard"), purge_step=purge)

    def _close_logs(self, writer: Any) -> None:
        writer.close()
        for handler in getattr(self, "_handlers", []):
            logger.removeHandler(handler)
            handler.close()
        self._handlers = []


def _parameters_by_key(part: Any) -> dict[str, nn.Parameter]:
    """A part's parameters by their ``state_dict`` key, the key ``row_shards`` names (a sharded head keeps the
    unsharded head's keys, which are not its module paths)."""
    return {k: v for k, v in part.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)}


def _row_sharded_parameters(part: TrainHooks) -> list[nn.Parameter]:
    """The parameters among a part's ``row_shards`` (TrainHooks; the others are buffers)."""
    params = _parameters_by_key(part)
    return [params[key] for key in part.row_shards() if key in params]


def _dense(grad: Tensor) -> Tensor:
    """A gradient as a strided tensor whose in-place scaling scales the gradient: a coalesced sparse one's values."""
    return grad._values() if grad.is_sparse else grad


def _dotted(path: tuple) -> str:
    return ".".join(str(k) for k in path)


def _set_path(state: dict[str, Any], path: tuple, value: Any) -> None:
    """state[path[0]][path[1]]... = value, each dict on the way shallow-copied first (the optimiser's
    ``state_dict`` shares its per-parameter dicts with the live optimiser)."""
    for key in path[:-1]:
        state[key] = dict(state[key])
        state = state[key]
    state[path[-1]] = value


def _sum(terms: Iterable[Tensor]) -> Tensor:
    """The sum of the loss terms (the first term itself when there is one: no ``0 +`` in the graph)."""
    total: Tensor | None = None
    for t in terms:
        total = t if total is None else total + t
    if total is None:
        raise ValueError("the objective returned no loss terms; expected {name: scalar tensor}")
    return total


class _NullWriter:
    """SummaryWriter stand-in on ranks other than 0."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` or'ed over the ranks (itself without torch.distributed)."""
    if not fdist.is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _agreed(build: Callable[[], Any], what: str, device: torch.device) -> Any:
    """``build()`` on every rank; under torch.distributed, when it fails on one rank the others raise too
    (instead of waiting at the next collective), naming ``what``."""
    if not fdist.is_distributed():
        return build()
    error: BaseException | None = None
    try:
        result = build()
    except Exception as e:  # re-raised below, after every rank knows
        error, result = e, None
    failed = torch.tensor([1.0 if error is not None else 0.0], device=device)
    torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise ValueError(f"{what}: another rank's check failed (its error is in its output)")
    return result


def train(cfg: Config, resume: bool = False, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train ``cfg``; with ``resume`` continue from ``cfg.output/last.pt`` (from step 0 if there is none).

    Under torchrun (WORLD_SIZE > 1) this initialises the process group (gloo on CPU, NCCL on CUDA),
    wraps the backbone in DDP (the head's replicated gradients are all-reduced explicitly) and destroys the
    group at the end; rank 0 logs and checkpoints.
    on_step: called with the step number after each optimiser step (and its eval/checkpoint).
    Raises NonFiniteLossError (naming the step) when the loss becomes NaN/inf.
    """
    started_group = not fdist.is_distributed()
    finished = False
    try:
        result = _Run(cfg, resume, on_step).fit()
        finished = True
        return result
    finally:
        if started_group:
            fdist.cleanup(synchronise=finished)
