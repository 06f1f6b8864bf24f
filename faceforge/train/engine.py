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

What a checkpoint holds, how it is written and how a run resumes or starts from another run's weights is
``faceforge.train.checkpointing``; ``train.log``, the terminal and TensorBoard are ``faceforge.train.runlog``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from faceforge.build import FaceModel, build_backbone, build_head, wrap_ddp
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
from faceforge.heads.base import TrainHooks
from faceforge.train import distributed as fdist
from faceforge.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from faceforge.train.checkpointing import Checkpointer, RunParts, parameters_by_key
from faceforge.train.config import Config
from faceforge.train.data import build_dataset, build_unlabelled, dataset_labels
from faceforge.train.device import check_device, configure_backends, dist_backend, prepare_backbone, run_device
from faceforge.train.ema import ModelEMA, build_ema
from faceforge.train.lifecycle import StopSignals, TrainingInterrupted
from faceforge.train.preflight import check_backbone, check_head, check_resume, check_run_folder, open_evaluators
from faceforge.train.runlog import LOG_NAME, RunLog
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
        check_device(cfg.train.device)  # train.device = cuda without CUDA: one error line, before any work
        self.dist = fdist.init_distributed(backend=dist_backend(cfg.train.device), timeout_s=cfg.train.dist_timeout)
        self.device = run_device(cfg.train.device, self.dist.device)
        configure_backends(cfg.train.cudnn_benchmark)
        self.world_size = self.dist.world_size
        self.rank = self.dist.rank
        self.main = self.dist.is_main
        self.output = Path(cfg.output)
        self.log_path = self.output / LOG_NAME
        t = cfg.train
        self._notes: list[str] = []  # warnings found before train.log is open (resume), logged once it is
        check_run_folder(self.output, resume)
        check_backbone(cfg)
        # a resumed run's checkpoint is read first: a change the resume policy refuses stops here, before any work
        self.checkpoint_path = self.output / CHECKPOINT_NAME
        saved = load_checkpoint(self.checkpoint_path) if resume and self.checkpoint_path.is_file() else None
        changes = check_resume(cfg, self.checkpoint_path, saved.get("config", {})) if saved is not None else []
        # every evaluation set read and checked now (rank 0 evaluates), not at the first evaluation
        self._eval_sets: list[Any] = _agreed(
            lambda: open_evaluators(cfg) if self.main else [], "evaluation sets", self.device)
        self.evaluates = _any_rank(bool(self._eval_sets), self.device)  # the same on every rank

        torch.manual_seed(cfg.seed)
        self.dataset = build_dataset(cfg)
        num_classes = int(self.dataset.num_classes)
        check_head(cfg, num_classes, self.world_size)  # the head factory's own check, before anything is built
        self.backbone = prepare_backbone(build_backbone(cfg), channels_last=t.channels_last, compile=cfg.model.compile)
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
        self.ema: ModelEMA | None = build_ema(t.ema, self.backbone)  # train.ema: a TrainHooks part (faceforge.train.ema)
        if self.ema is not None:
            self.hooks["ema"] = self.ema
        self.checkpoints = Checkpointer(RunParts(
            cfg=cfg, output=self.output, backbone=self.backbone, head=self.head, objective=self.objective,
            hooks=self.hooks, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            sampler=self.sampler, device=self.device, world_size=self.world_size, main=self.main, zero=self.zero,
            steps_per_epoch=self.steps_per_epoch, ema=self.ema,
        ))
        self.log = RunLog(cfg, self.main, self.total_steps, self.steps_per_epoch)
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.metrics_step: int | None = None
        self.losses: list[float] = []
        self.resume_from: Path | None = None
        if resume and saved is None:
            self._notes.append(f"resume: no checkpoint at {self.checkpoint_path}; starting from step 0")
        if saved is not None:
            resumed = self.checkpoints.resume(saved, changes)
            self.step, self.metrics, self.metrics_step = resumed.step, resumed.metrics, resumed.metrics_step
            self._notes += resumed.notes
            self.resume_from = self.checkpoint_path
        del saved
        self.init_from = Path(cfg.model.init_from) if cfg.model.init_from and self.resume_from is None else None
        if self.init_from is not None:
            self.checkpoints.init_from(self.init_from, num_classes)
        if self.ema is not None:
            self.ema.start()  # the average starts from the weights the run starts from (unless resumed)
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

    # --- checkpoints ---

    def save(self, announce: bool = True) -> None:
        """A checkpoint of this step (``Checkpointer.save``, every rank), and its line in the log."""
        self.checkpoints.save(self.step, self.metrics, self.metrics_step)
        if announce:
            self.log.checkpoint(self.checkpoint_path, self.step)

    # --- evaluation ---

    def evaluate(self) -> None:
        """Every evaluation set (rank 0: held-out pairs, IJB, identification, retrieval), logged; the
        others wait at a barrier."""
        if self.main:
            metrics: dict[str, float] = {}
            backbone = self.ema.module if self.ema is not None else self.backbone  # train.ema: the average
            for s in self._eval_sets:
                numbers = s.evaluate(backbone, self.cfg.data.image_size,
                                     batch_size=self.cfg.data.eval_batch_size, device=self.device)
                prefix = f"{s.name}/" if s.name else ""
                metrics.update({f"{prefix}{k}": float(v) for k, v in numbers.items()})
            if self._eval_sets:
                self.metrics = metrics
                self.log.evaluation(self.step, self.metrics)
        if self.evaluates:
            self.metrics_step = self.step
        fdist.barrier()

    # --- diagnostics ---

    def diagnose(self) -> None:
        """Rank 0: the parts' ``diagnostics(embed_fn)`` (BroadFace Fig. 5a), to train.log and TensorBoard."""
        if not self.main:
            return
        values: dict[str, float] = {}
        for h in self.hooks.values():
            if h.provides_diagnostics:
                values.update(h.diagnostics(self._embed_samples))
        self.log.diagnostics(self.step, values)

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
        self._open_log()
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
                    self.log.step(self.step, window, grad_norm, lr, images_seen / max(train_time, 1e-9))
                    if t.diagnostics_every and self.step % t.diagnostics_every == 0:
                        self.diagnose()
                    done = self.step == self.total_steps
                    self._save_and_evaluate(
                        save=done or bool(t.checkpoint_every and self.step % t.checkpoint_every == 0),
                        evaluate=done or bool(t.eval_every and self.step % t.eval_every == 0),
                    )
                    self.log.skipped_records()
                    if self.on_step is not None:
                        self.on_step(self.step)
                    if self._stop_requested(stop) and not done:
                        self._interrupt(stop.name)
                del batches
            if self._last_saved != self.step:  # resumed at the very end: nothing left to train
                self._save_and_evaluate(save=True, evaluate=True)
            elif self.evaluates and self.metrics_step != self.step:  # its final evaluation failed: run it again
                self._save_and_evaluate(save=True, evaluate=True)
            ips = self.log.done(self.step, images_seen, train_time)  # before the log handlers close
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
            self.log.close()
        return TrainResult(
            output=self.output, checkpoint=self.checkpoint_path, log=self.log_path, step=self.step,
            epoch=self.step // self.steps_per_epoch, metrics=dict(self.metrics), images_per_second=ips,
            losses=list(self.losses),
        )

    def _save_and_evaluate(self, save: bool, evaluate: bool) -> None:
        """Checkpoint first, then evaluate: a failing evaluation never loses the steps. When both fall on this
        step the checkpoint is written again after the evaluation, so that it holds the metrics."""
        again = save and evaluate and self.evaluates  # announced once, when written the second time
        if save:
            self.save(announce=not again)
            self._last_saved = self.step
        if evaluate:
            self.evaluate()
            if again:
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
            f"with `faceforge train {self.output / 'config.yaml'} --resume`"
        )

    def _open_log(self) -> None:
        """Rank 0: the stale temporaries of a killed checkpoint write go; the run log opens, with the resume
        notes and what this run is."""
        if self.main:
            for stale in stale_temporaries(self.checkpoint_path):  # left by a run killed mid-write
                stale.unlink(missing_ok=True)
        lines = []
        if not self._eval_sets:
            lines.append(f"no evaluation sets: data.eval_pairs / eval_bins give no held-out pairs for data.name "
                         f"{self.cfg.data.name!r} and no eval_ijb, eval_probes or eval_retrieval is set")
        if self.init_from is not None:
            lines.append(f"initialised from {self.init_from} (model.init_from): {self.checkpoints.init_from_parts}")
        if self.ema is not None:
            lines.append(f"train.ema: decay {self.ema.decay:g} every {self.ema.every} step(s); evaluations and "
                         f"model.safetensors use the averaged backbone (the raw one stays in {CHECKPOINT_NAME})")
        lines.append(
            f"run {self.output}: {len(self.dataset)} images, {int(self.dataset.num_classes)} classes, world size "
            f"{self.world_size}, {self.total_steps} steps ({self.steps_per_epoch} per epoch, {self.step_images} images "
            f"each), device {self.device}, amp {self.amp_dtype}"
        )
        self.log.open(self.step, self.resume_from, self._notes, lines)


def _row_sharded_parameters(part: TrainHooks) -> list[nn.Parameter]:
    """The parameters among a part's ``row_shards`` (TrainHooks; the others are buffers)."""
    params = parameters_by_key(part)
    return [params[key] for key in part.row_shards() if key in params]


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
