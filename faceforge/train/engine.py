"""The training loop: `train(cfg, resume=False) -> TrainResult`.

One run = one output folder holding ``config.yaml`` (the resolved config), ``train.log``,
``tensorboard/`` and the checkpoints ``last.pt`` (+ ``step_XXXXXXX.pt`` when ``keep_checkpoints``).

The loop meets its parts through written seams only (``docs/extending.md``):

* a sampler (``data.sampler``, ``faceforge.data.samplers.SAMPLERS``) yields this rank's typed ``Batch`` es;
* an objective (``objective.name``, ``faceforge.train.objectives.OBJECTIVES``) maps a batch to named loss
  terms; the step sums them and stops on a non-finite one, naming it; the loop logs each;
* the head and the objective may opt into ``faceforge.heads.base.TrainHooks`` (checked once, when the parts
  are built);
* DDP wraps the backbone only; one optimiser step (accumulation, AMP, the head's replicated gradients
  all-reduced, row-sharded and row-sparse gradients, clipping, ZeRO) is ``faceforge.train.step``; the parts
  are built by ``faceforge.train.parts``.

Determinism (what makes a killed-and-resumed CPU run bit-identical to an uninterrupted one): the data
order and flips are the sampler's (``faceforge.data.samplers``: a function of seed, epoch and world size,
its generators in ``state_dict``, checkpointed); the global torch RNG (dropout) is checkpointed; a resumed
run starts the sampler at the next micro-batch, and nothing is re-read.

Steps are optimiser steps, counted from 1 in logs and checkpoints: "step 5" = five updates done.

What a checkpoint holds, how it is written and how a run resumes or starts from another run's weights is
``faceforge.train.checkpointing``; ``train.log``, the terminal and TensorBoard are ``faceforge.train.runlog``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from faceforge.build import FaceModel, build_backbone, build_head, wrap_ddp
from faceforge.data.samplers import (
    EpochBatchSampler,
    decode_sample_ids,
    encode_sample_ids,
    epoch_permutation,
    rank_positions,
)
from faceforge.core.fileio import stale_temporaries
from faceforge.train import distributed as fdist
from faceforge.core.checkpoint import CHECKPOINT_NAME, load_checkpoint
from faceforge.train.checkpointing import Checkpointer
from faceforge.core.config import Config
from faceforge.train.data import build_dataset
from faceforge.train.device import check_device, configure_backends, dist_backend, run_device
from faceforge.train.evaluation import RunEvaluation, embed_training_images
from faceforge.train.lifecycle import StopSignals, TrainingInterrupted
from faceforge.train.parts import build_parts
from faceforge.train.preflight import check_backbone, check_resume, check_run_folder
from faceforge.train.runlog import LOG_NAME, RunLog
from faceforge.train.step import GradientStep, NonFiniteLossError, broadcast_replicated

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


# ----------------------------------------------------------------------------------------------
# The run


class _Run:
    """The state of one training run; `train()` builds it and calls `fit()`."""

    def __init__(self, cfg: Config, resume: bool, on_step: Callable[[int], None] | None) -> None:
        self.cfg = cfg
        self.on_step = on_step
        check_device(cfg.train.device)  # train.device = cuda without CUDA: one error line, before any work
        dist = fdist.init_distributed(backend=dist_backend(cfg.train.device), timeout_s=cfg.train.dist_timeout)
        dist = dataclasses.replace(dist, device=run_device(cfg.train.device, dist.device))
        configure_backends(cfg.train.cudnn_benchmark)
        self.device, self.world_size, self.main = dist.device, dist.world_size, dist.is_main
        self.output = Path(cfg.output)
        self.log_path = self.output / LOG_NAME
        self._notes: list[str] = []  # warnings found before train.log is open (resume), logged once it is
        check_run_folder(self.output, resume)
        check_backbone(cfg)
        # a resumed run's checkpoint is read first: a change the resume policy refuses stops here, before any work
        self.checkpoint_path = self.output / CHECKPOINT_NAME
        saved = load_checkpoint(self.checkpoint_path) if resume and self.checkpoint_path.is_file() else None
        changes = check_resume(cfg, self.checkpoint_path, saved.get("config", {})) if saved is not None else []
        # every evaluation set read and checked now (rank 0 evaluates), not at the first evaluation
        self.evaluation = RunEvaluation(cfg, self.main, self.device)

        self.parts = parts = build_parts(cfg, dist)
        self.backbone, self.objective, self.dataset = parts.backbone, parts.objective, parts.dataset
        self.evaluated_backbone = parts.backbone if parts.ema is None else parts.ema.module  # train.ema: the average
        self.steps_per_epoch, self.total_steps = parts.steps_per_epoch, parts.total_steps
        self.checkpoints = Checkpointer(parts)
        self.log = RunLog(cfg, self.main, self.total_steps, self.steps_per_epoch)
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.metrics_step: int | None = None
        self.losses: list[float] = []
        self.resume_from: Path | None = None
        self._last_saved: int | None = None
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
            self.checkpoints.init_from(self.init_from, int(self.dataset.num_classes))
        if parts.ema is not None:
            parts.ema.start()  # the average starts from the weights the run starts from (unless resumed)
        self.train_step = GradientStep(
            objective=self.objective, optimizer=parts.optimizer, scheduler=parts.scheduler, scaler=parts.scaler,
            params=parts.params, hooks=list(parts.hooks.values()), grad_accum=cfg.train.grad_accum,
            clip_grad_norm=cfg.train.clip_grad_norm, device=self.device, world_size=self.world_size,
            steps_per_epoch=self.steps_per_epoch, ddp=self._wrap_backbone() if self.world_size > 1 else None,
            comm_hook=cfg.train.ddp_comm_hook, last_checkpoint=self._last_checkpoint,
        )

    def _wrap_backbone(self) -> nn.Module:
        """DDP around the backbone only (it broadcasts the backbone from rank 0); the head's replicated
        parameters are broadcast here once, and their gradients averaged by the GradientStep."""
        ddp = nn.parallel.DistributedDataParallel(
            self.backbone, device_ids=[self.device] if self.device.type == "cuda" else None)
        fdist.register_compression(ddp, self.cfg.train.ddp_comm_hook)  # train.ddp_comm_hook: fp16 / bf16 / none
        broadcast_replicated(self.parts.params.head_replicated)
        self.objective.set_encoder(ddp)
        return ddp

    def _last_checkpoint(self) -> str:
        """The last checkpoint this run wrote (or resumed from), in words."""
        return f"{self.checkpoint_path} (step {self._last_saved})" if self._last_saved is not None else "none written"

    # --- checkpoints ---

    def save(self, announce: bool = True) -> None:
        """A checkpoint of this step (``Checkpointer.save``, every rank), and its line in the log."""
        self.checkpoints.save(self.step, self.metrics, self.metrics_step)
        if announce:
            self.log.checkpoint(self.checkpoint_path, self.step)

    # --- evaluation and diagnostics ---

    def evaluate(self) -> None:
        """Rank 0 evaluates every set (``RunEvaluation``) and logs it; the others wait at a barrier."""
        if self.main and self.evaluation.sets:
            self.metrics = self.evaluation.evaluate(self.evaluated_backbone)
            self.log.evaluation(self.step, self.metrics)
        if self.evaluation.runs:
            self.metrics_step = self.step
        fdist.barrier()

    def diagnose(self) -> None:
        """Rank 0: the parts' ``diagnostics(embed_fn)`` (BroadFace Fig. 5a), to train.log and TensorBoard."""
        if not self.main:
            return
        embed = functools.partial(embed_training_images, backbone=self.backbone, embed=self.objective.embed,
                                  dataset=self.dataset, batch_size=self.cfg.data.eval_batch_size, device=self.device)
        values: dict[str, float] = {}
        for h in self.parts.hooks.values():
            if h.provides_diagnostics:
                values.update(h.diagnostics(embed))
        self.log.diagnostics(self.step, values)

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
                batches = iter(self.parts.sampler.batches(epoch, first * t.grad_accum))
                for _ in range(first, self.steps_per_epoch):
                    if self.step >= self.total_steps:
                        break
                    start = time.perf_counter()
                    loss, terms, grad_norm, lr = self.train_step(batches, self.step + 1)
                    train_time += time.perf_counter() - start
                    images_seen += self.parts.step_images
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
            elif self.evaluation.runs and self.metrics_step != self.step:  # its final evaluation failed: run it again
                self._save_and_evaluate(save=True, evaluate=True)
            ips = self.log.done(self.step, images_seen, train_time)  # before the log handlers close
        except (NonFiniteLossError, TrainingInterrupted) as e:
            logger.error("%s", e)
            raise
        except Exception as e:  # the run stops; say which checkpoint survives it
            logger.error("stopped after step %d: %s; last checkpoint: %s", self.step, e, self._last_checkpoint())
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
        again = save and evaluate and self.evaluation.runs  # announced once, when written the second time
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
        if not self.evaluation.sets:
            lines.append(f"no evaluation sets: data.eval_pairs / eval_bins give no held-out pairs for data.name "
                         f"{self.cfg.data.name!r} and no eval_ijb, eval_probes or eval_retrieval is set")
        if self.init_from is not None:
            lines.append(f"initialised from {self.init_from} (model.init_from): {self.checkpoints.init_from_parts}")
        if self.parts.ema is not None:
            lines.append(f"train.ema: decay {self.parts.ema.decay:g} every {self.parts.ema.every} step(s); evaluations "
                         f"and model.safetensors use the averaged backbone (the raw one stays in {CHECKPOINT_NAME})")
        lines.append(f"head: {' '.join(repr(self.parts.head).split())}")  # one line: its sizes (AttFC's container)
        lines.append(
            f"run {self.output}: {len(self.dataset)} images, {int(self.dataset.num_classes)} classes, world size "
            f"{self.world_size}, {self.total_steps} steps ({self.steps_per_epoch} per epoch, {self.parts.step_images} images "
            f"each), device {self.device}, amp {self.parts.amp_dtype}"
        )
        self.log.open(self.step, self.resume_from, self._notes, lines)


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
