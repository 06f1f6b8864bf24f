"""The training loop: `train(cfg, resume=False) -> TrainResult`.

One run = one output folder holding ``config.yaml`` (the resolved config), ``train.log``,
``tensorboard/`` and the checkpoints ``last.pt`` (+ ``step_XXXXXXX.pt`` when ``keep_checkpoints``).

Determinism (what makes a killed-and-resumed CPU run bit-identical to an uninterrupted one):

* data order: the permutation of epoch ``e`` is a function of ``(seed, e)`` only. Optimiser step
  ``s`` of the epoch reads the ``grad_accum`` consecutive global micro-batches
  ``perm[(s*A + a)*B*W : (s*A + a + 1)*B*W]``, and rank ``r`` takes every W-th image of each,
  starting at ``r``. So 2 ranks x batch B/2 see the same images per step as 1 rank x batch B, and
  grad_accum=2 x B/2 the same as grad_accum=1 x B. A resumed run builds its sampler at the next
  micro-batch; nothing is re-read.
* flips: ``B*W*A`` uniforms per optimiser step from a dedicated ``torch.Generator`` (checkpointed),
  sliced exactly like the images, in the main process (DataLoader workers never draw).
* the global torch RNG (dropout) is checkpointed; the DataLoader gets its own generator so that
  starting an epoch's iterator does not draw from it.

Steps are optimiser steps, counted from 1 in logs and checkpoints: "step 5" = five updates done.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from faceforge.modelfile import write_model_files
from faceforge.train import distributed as fdist
from faceforge.train.checkpoint import CHECKPOINT_NAME, THRESHOLD_KEY, load_checkpoint, save_checkpoint
from faceforge.train.config import Config, to_dict, to_yaml
from faceforge.train.data import WithIndices, build_dataset, build_evaluators
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
    "train",
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
# Building the parts from the registries


def _from_spec(spec: str, registry_build: Callable[..., nn.Module], **kwargs: Any) -> nn.Module:
    """``"name"`` -> ``registry_build(name, **kwargs)``; ``"pkg.module:callable"`` -> ``callable(**kwargs)``."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import {spec!r} (expected 'package.module:callable'): {e}") from e
        return factory(**kwargs)
    return registry_build(spec, **kwargs)


def build_backbone(cfg: Config) -> nn.Module:
    """``faceforge.backbones.build(model.backbone, embedding_size, input_size=data.image_size, **model.kwargs)``."""
    from faceforge import backbones

    kwargs = {"input_size": cfg.data.image_size, **cfg.model.kwargs}
    return _from_spec(cfg.model.backbone, backbones.build, embedding_size=cfg.model.embedding_size, **kwargs)


def build_head(cfg: Config, num_classes: int) -> nn.Module:
    """``faceforge.heads.build(head.name, num_classes=..., embedding_size=..., **head.kwargs)``."""
    from faceforge import heads

    return _from_spec(
        cfg.head.name, heads.build, num_classes=num_classes, embedding_size=cfg.model.embedding_size, **cfg.head.kwargs
    )


class FaceModel(nn.Module):
    """Backbone + head as one module (what DDP wraps): ``loss = model(images (B,3,H,W), labels (B,))``.

    With ``amp_dtype`` the backbone runs under autocast; the head always sees float32 embeddings.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, amp_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.amp_dtype = amp_dtype

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's embeddings (B, D) of images (B, 3, H, W), under autocast when ``amp_dtype`` is set."""
        with torch.autocast(images.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            return self.backbone(images)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images).float(), labels)


def wrap_ddp(model: FaceModel, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)``, except that the head's buffers are not broadcast from rank 0: a head
    keeps per-rank state there (BroadFace's queue) and synchronises it itself where it must."""
    head_buffers = [f"head.{name}" for name, _ in model.head.named_buffers()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, head_buffers)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _classifier(head: nn.Module) -> nn.Module:
    """The module holding the class weights: a wrapper head (BroadFace) keeps the head it wraps at ``.head``."""
    inner = getattr(head, "head", None)
    return inner if isinstance(inner, nn.Module) else head


def _classifier_state(head_state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's head state without a wrapper's own entries (BroadFace's queue): its ``head.*`` part, if any."""
    inner = {key.removeprefix("head."): value for key, value in head_state.items() if key.startswith("head.")}
    return inner or head_state


def _load_part(module: nn.Module, state: Any, what: str) -> None:
    """``module.load_state_dict(state)``; a mismatch is a ValueError naming ``what`` (file and part)."""
    if not isinstance(state, dict):
        raise ValueError(f"{what}: no state dict in the checkpoint; expected a `faceforge train` checkpoint")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{what} does not fit this run's {type(module).__name__}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Data order


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """``(num_samples,)`` int64 permutation, a function of ``(seed, epoch)`` only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


def rank_positions(micro: int, batch_size: int, world_size: int, rank: int) -> range:
    """Positions in the epoch's permutation of rank ``rank``'s share of global micro-batch ``micro``.

    The global micro-batch is ``[micro*B*W, (micro+1)*B*W)``; the rank takes every W-th from ``rank``.
    """
    start = micro * batch_size * world_size
    return range(start + rank, start + batch_size * world_size, world_size)


class EpochBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches ``start_micro .. num_micro - 1`` of one epoch (drop_last)."""

    def __init__(
        self, num_samples: int, batch_size: int, world_size: int, rank: int, seed: int, epoch: int,
        start_micro: int, num_micro: int,
    ) -> None:
        self.num_samples, self.batch_size, self.world_size, self.rank = num_samples, batch_size, world_size, rank
        self.seed, self.epoch, self.start_micro, self.num_micro = seed, epoch, start_micro, num_micro

    def __iter__(self) -> Iterator[list[int]]:
        perm = epoch_permutation(self.num_samples, self.seed, self.epoch)
        for micro in range(self.start_micro, self.num_micro):
            positions = rank_positions(micro, self.batch_size, self.world_size, self.rank)
            yield perm[positions.start : positions.stop : positions.step].tolist()

    def __len__(self) -> int:
        return max(0, self.num_micro - self.start_micro)


def _flip(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Horizontally flip the images ``(B,3,H,W)`` where ``mask (B,)`` is True."""
    return torch.where(mask[:, None, None, None], images.flip(-1), images)


def encode_sample_ids(indices: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    """The id a head is told for each training image: ``2 * dataset index + (1 if flipped)``, int64 ``(B,)``."""
    return indices.long() * 2 + flipped.long()


def decode_sample_ids(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dataset indices (K,), flipped (K,) bool)`` of :func:`encode_sample_ids`' ids."""
    return ids // 2, (ids % 2).bool()


# ----------------------------------------------------------------------------------------------
# The run


class _Run:
    """The state of one training run; `train()` builds it and calls `fit()`."""

    def __init__(self, cfg: Config, resume: bool, on_step: Callable[[int], None] | None) -> None:
        self.cfg = cfg
        self.on_step = on_step
        self.dist = fdist.init_distributed()
        self.device = self.dist.device
        self.world_size = self.dist.world_size
        self.rank = self.dist.rank
        self.main = self.dist.is_main
        self.output = Path(cfg.output)
        self.checkpoint_path = self.output / CHECKPOINT_NAME
        self.log_path = self.output / "train.log"
        t = cfg.train

        torch.manual_seed(cfg.seed)
        self.dataset = build_dataset(cfg)
        num_classes = int(self.dataset.num_classes)
        self.backbone = build_backbone(cfg)
        self.head = build_head(cfg, num_classes)
        if t.diagnostics_every and not callable(getattr(self.head, "diagnostics", None)):
            raise ValueError(
                f"train.diagnostics_every = {t.diagnostics_every}: head {cfg.head.name!r} ({type(self.head).__name__}) "
                f"has no diagnostics; expected 0 (off) or a head that has them (broadface)"
            )
        self.amp_dtype = self._amp_dtype()
        self.model = FaceModel(self.backbone, self.head, self.amp_dtype).to(self.device)
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
        self.optimizer = build_optimizer(cfg.optim, self.backbone, self.head)
        self.scheduler = build_scheduler(cfg.schedule, self.optimizer, self.total_steps, self.steps_per_epoch)
        self.flip_generator = torch.Generator().manual_seed(cfg.seed + 0x5EED)
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.losses: list[float] = []
        self._eval_sets: list[Any] | None = None  # faceforge.eval.sets.EvalSet, built at the first evaluation
        self.resume_from = self._resume() if resume else None
        self.init_from = Path(cfg.model.init_from) if cfg.model.init_from and self.resume_from is None else None
        if self.init_from is not None:
            self._init_from(self.init_from)
        self.ddp = wrap_ddp(self.model, self.device) if self.world_size > 1 else self.model

    # --- setup ---

    def _amp_dtype(self) -> torch.dtype | None:
        amp = self.cfg.train.amp
        on = self.device.type == "cuda" if amp == "auto" else bool(amp)
        if on and self.device.type != "cuda":
            logger.warning("train.amp = %r ignored: mixed precision runs on CUDA only; training in float32", amp)
            return None
        return AMP_DTYPES[self.cfg.train.amp_dtype] if on else None

    def _resume(self) -> Path | None:
        if not self.checkpoint_path.is_file():
            logger.warning("resume: no checkpoint at %s; starting from step 0", self.checkpoint_path)
            return None
        state = load_checkpoint(self.checkpoint_path)
        self.backbone.load_state_dict(state["backbone"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.flip_generator.set_state(rng["flip"])
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step = int(state["step"])
        self.metrics = dict(state.get("metrics", {}))
        if state.get("steps_per_epoch") != self.steps_per_epoch:
            logger.warning(
                "resume: %s was written with %s steps per epoch, this run has %s; the data order changes",
                self.checkpoint_path, state.get("steps_per_epoch"), self.steps_per_epoch,
            )
        saved, current = state.get("config", {}), to_dict(self.cfg)
        changed = [k for k in current if saved.get(k) != current[k]]
        if changed:
            logger.warning("resume: config sections changed since the checkpoint: %s", ", ".join(changed))
        return self.checkpoint_path

    def _init_from(self, path: Path) -> None:
        """model.init_from: start from another run's backbone and head class weights (not its optimiser or queue)."""
        state = load_checkpoint(path)
        _load_part(self.backbone, state.get("backbone"), f"model.init_from {path}: the backbone")
        head_state = state.get("head")
        _load_part(
            _classifier(self.head), _classifier_state(head_state) if isinstance(head_state, dict) else head_state,
            f"model.init_from {path}: the head (num_classes {int(self.dataset.num_classes)} from the data here)",
        )

    # --- checkpoints ---

    def _state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "flip": self.flip_generator.get_state(), "cuda": None}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": 1,
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "batch": (self.step % self.steps_per_epoch) * self.cfg.train.grad_accum,  # next micro-batch of the epoch
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.world_size,
            "backbone": self.backbone.state_dict(),
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "config": to_dict(self.cfg),
            "metrics": dict(self.metrics),
            # the head's learned decision boundary in cosine terms (SphereFace2), for `faceforge eval`
            THRESHOLD_KEY: (
                self.head.verification_threshold() if hasattr(self.head, "verification_threshold") else None
            ),
        }

    def save(self) -> None:
        """Rank 0 writes last.pt atomically (and a step_XXXXXXX.pt link when keep_checkpoints > 0), and the
        backbone a user takes away: model.safetensors + model.json (:mod:`faceforge.modelfile`)."""
        if self.main:
            state = self._state()
            save_checkpoint(self.checkpoint_path, state)
            write_model_files(self.output, self.backbone, self.cfg, self.metrics, state[THRESHOLD_KEY], self.step)
            self._keep_older()
            logger.info("checkpoint: %s (step %d)", self.checkpoint_path, self.step)
        fdist.barrier()

    def _keep_older(self) -> None:
        keep = self.cfg.train.keep_checkpoints
        if keep <= 0:
            return
        named = self.output / f"step_{self.step:07d}.pt"
        named.unlink(missing_ok=True)
        try:
            named.hardlink_to(self.checkpoint_path)  # the same bytes; survives the next os.replace of last.pt
        except OSError:
            save_checkpoint(named, self._state())
        for old in sorted(self.output.glob("step_*.pt"))[:-keep]:
            old.unlink(missing_ok=True)

    # --- evaluation ---

    def evaluate(self, writer: Any) -> None:
        """Every evaluation set (rank 0: held-out pairs, IJB, identification, retrieval), logged; the
        others wait at a barrier."""
        if self.main:
            if self._eval_sets is None:
                self._eval_sets = build_evaluators(self.cfg)  # data read once
                if not self._eval_sets:
                    logger.info("no evaluation sets: data.eval_pairs / eval_bins give no held-out pairs for data.name "
                                "%r and no eval_ijb, eval_probes or eval_retrieval is set", self.cfg.data.name)
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
        fdist.barrier()

    # --- diagnostics ---

    def diagnose(self, writer: Any) -> None:
        """Rank 0: the head's ``diagnostics(embed_fn)`` (BroadFace Fig. 5a), to train.log and TensorBoard."""
        if not self.main:
            return
        values = self.head.diagnostics(self._embed_samples)
        logger.info("diagnostics step %d: %s", self.step, " ".join(f"{k} {v:.5g}" for k, v in values.items()) or "none")
        for k, v in values.items():
            writer.add_scalar(f"diagnostics/{k}", v, self.step)

    def _embed_samples(self, ids: torch.Tensor) -> torch.Tensor:
        """Current embeddings (K, D) float32 of the training images named by sample ids (:func:`encode_sample_ids`):
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
                    images = _flip(images, flipped[part.start : part.stop]).to(self.device)
                    embeddings.append(self.model.embed(images).float())
        finally:
            self.backbone.train(was_training)
        return torch.cat(embeddings)

    # --- one optimiser step ---

    def _loss_value(self, loss: torch.Tensor) -> float:
        """The loss averaged over ranks (every rank learns of a NaN on any rank)."""
        value = loss.detach().float().clone()
        if self.world_size > 1:
            torch.distributed.all_reduce(value)
            value /= self.world_size
        return float(value)

    def _non_finite(self, what: str, value: float, micro: int) -> NonFiniteLossError:
        last = f"{self.checkpoint_path} (step {self._last_saved})" if self._last_saved is not None else "none written"
        return NonFiniteLossError(
            f"non-finite {what} {value} at step {self.step + 1} (epoch {self.step // self.steps_per_epoch}, "
            f"micro-batch {micro + 1} of {self.cfg.train.grad_accum}); stopped without updating the weights "
            f"or saving this step; last good checkpoint: {last}"
        )

    def train_step(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float, float]:
        """Forward/backward ``grad_accum`` micro-batches, clip, update. Returns (mean loss, grad norm, lr used)."""
        accum = self.cfg.train.grad_accum
        flips = torch.rand(self.step_images, generator=self.flip_generator) if self.cfg.data.flip else None
        total = 0.0
        for micro in range(accum):
            images, labels, indices = next(batches)
            flipped = torch.zeros(len(indices), dtype=torch.bool)
            if flips is not None:
                positions = rank_positions(micro, self.batch, self.world_size, self.rank)
                flipped = flips[positions.start : positions.stop : positions.step] < 0.5
                images = _flip(images, flipped)
            observe = getattr(self.head, "observe_sample_ids", None)
            if observe is not None:  # a head that keeps past samples (BroadFace) learns whose rows these are
                observe(encode_sample_ids(indices, flipped))
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            last = micro == accum - 1
            sync = self.ddp.no_sync() if (self.world_size > 1 and not last) else contextlib.nullcontext()
            with sync:
                loss = self.ddp(images, labels)
                value = self._loss_value(loss)
                if not math.isfinite(value):
                    raise self._non_finite("loss", value, micro)
                self.scaler.scale(loss / accum).backward()  # mean over the accumulated micro-batches
            total += value / accum
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = nn.utils.get_total_norm([p.grad for p in params])
        if not self.scaler.is_enabled() and not torch.isfinite(norm):
            raise self._non_finite("gradient norm", float(norm), accum - 1)
        if self.cfg.train.clip_grad_norm > 0:
            nn.utils.clip_grads_with_norm_(params, self.cfg.train.clip_grad_norm, norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return total, float(norm), lr

    # --- the loop ---

    def _loader(self, epoch: int, start_micro: int) -> DataLoader:
        sampler = EpochBatchSampler(
            len(self.dataset), self.batch, self.world_size, self.rank, self.cfg.seed, epoch,
            start_micro, self.steps_per_epoch * self.cfg.train.grad_accum,
        )
        return DataLoader(
            WithIndices(self.dataset), batch_sampler=sampler, num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def fit(self) -> TrainResult:
        t = self.cfg.train
        self._last_saved = self.step if self.resume_from is not None else None
        writer = self._open_logs()
        bar = self._progress_bar()
        train_time, images_seen, window = 0.0, 0, []
        try:
            while self.step < self.total_steps:
                epoch = self.step // self.steps_per_epoch
                first = self.step % self.steps_per_epoch
                batches = iter(self._loader(epoch, first * t.grad_accum))
                for _ in range(first, self.steps_per_epoch):
                    if self.step >= self.total_steps:
                        break
                    start = time.perf_counter()
                    loss, grad_norm, lr = self.train_step(batches)
                    train_time += time.perf_counter() - start
                    images_seen += self.step_images
                    self.step += 1
                    self.losses.append(loss)
                    window.append(loss)
                    self._log_step(writer, bar, window, grad_norm, lr, images_seen / max(train_time, 1e-9))
                    if t.diagnostics_every and self.step % t.diagnostics_every == 0:
                        self.diagnose(writer)
                    done = self.step == self.total_steps
                    if done or (t.eval_every and self.step % t.eval_every == 0):
                        self.evaluate(writer)
                    if done or (t.checkpoint_every and self.step % t.checkpoint_every == 0):
                        self.save()
                        self._last_saved = self.step
                    if self.on_step is not None:
                        self.on_step(self.step)
                del batches
            if self._last_saved != self.step:  # resumed at the very end: nothing left to train
                self.evaluate(writer)
                self.save()
            ips = images_seen / train_time if train_time > 0 else 0.0
            logger.info("done: step %d, %.1f images/s", self.step, ips)  # before the log handlers close
        except NonFiniteLossError as e:
            logger.error("%s", e)
            raise
        finally:
            bar.close()
            self._close_logs(writer)
        return TrainResult(
            output=self.output, checkpoint=self.checkpoint_path, log=self.log_path, step=self.step,
            epoch=self.step // self.steps_per_epoch, metrics=dict(self.metrics), images_per_second=ips,
            losses=list(self.losses),
        )

    def _log_step(self, writer: Any, bar: Any, window: list[float], grad_norm: float, lr: float, ips: float) -> None:
        """Every log_every steps: mean loss since the last line, the lr this step used, grad norm, images/s."""
        bar.update(1)
        if self.step % self.cfg.train.log_every and self.step != self.total_steps:
            return
        loss = sum(window) / len(window)
        window.clear()
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
        if self.main:
            logger.info(
                "step %d/%d epoch %d loss %.5f lr %.4e grad_norm %.4f images/s %.1f",
                self.step, self.total_steps, (self.step - 1) // self.steps_per_epoch, loss, lr, grad_norm, ips,
            )
            writer.add_scalar("train/loss", loss, self.step)
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
        for stale in self.output.glob(f".{CHECKPOINT_NAME}.tmp-*"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
        (self.output / "config.yaml").write_text(to_yaml(self.cfg))
        self._handlers = [logging.FileHandler(self.log_path)]
        if not (self.cfg.train.progress and sys.stderr.isatty()):
            self._handlers.append(logging.StreamHandler(sys.stderr))
        for handler in self._handlers:
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        if self.resume_from is not None:
            logger.info("resumed from %s at step %d", self.resume_from, self.step)
        if self.init_from is not None:
            logger.info("initialised from %s (model.init_from): backbone and head class weights", self.init_from)
        logger.info(
            "run %s: %d images, %d classes, world size %d, %d steps (%d per epoch, %d images each), device %s, amp %s",
            self.output, len(self.dataset), int(self.dataset.num_classes), self.world_size, self.total_steps,
            self.steps_per_epoch, self.step_images, self.device, self.amp_dtype,
        )
        return SummaryWriter(log_dir=str(self.output / "tensorboard"))

    def _close_logs(self, writer: Any) -> None:
        writer.close()
        for handler in getattr(self, "_handlers", []):
            logger.removeHandler(handler)
            handler.close()
        self._handlers = []


class _NullWriter:
    """SummaryWriter stand-in on ranks other than 0."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def train(cfg: Config, resume: bool = False, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train ``cfg``; with ``resume`` continue from ``cfg.output/last.pt`` (from step 0 if there is none).

    Under torchrun (WORLD_SIZE > 1) this initialises the process group (gloo on CPU, NCCL on CUDA),
    wraps backbone + head in DDP and destroys the group at the end; rank 0 logs and checkpoints.
    on_step: called with the step number after each optimiser step (and its eval/checkpoint).
    Raises NonFiniteLossError (naming the step) when the loss becomes NaN/inf.
    """
    started_group = not fdist.is_distributed()
    try:
        return _Run(cfg, resume, on_step).fit()
    finally:
        if started_group:
            fdist.cleanup()
