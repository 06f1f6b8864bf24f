"""A run's parts, built from its config: :func:`build_parts` -> :class:`RunParts`.

The dataset, backbone, head and objective (and which of them opted into ``TrainHooks``), the trained
parameters split by the parts' ``row_shards`` declarations, the optimiser, schedule and AMP scaler, the
sampler, and the run's sizes (images per step, steps per epoch, total steps). Every check that needs the
built parts runs here, before step 1.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from faceforge.build import build_backbone, build_head
from faceforge.data.samplers import SamplerContext, build_sampler
from faceforge.heads.base import TrainHooks
from faceforge.core.config import Config
from faceforge.train.data import build_dataset, build_unlabelled, dataset_labels
from faceforge.train.distributed import DistInfo
from faceforge.train.device import prepare_backbone
from faceforge.train.ema import ModelEMA, build_ema
from faceforge.train.objectives import Objective, build_objective
from faceforge.train.optim import build_optimizer, build_scheduler
from faceforge.train.preflight import check_head
from faceforge.train.step import TrainedParameters, amp_dtype, split_parameters, use_zero

__all__ = ["RunParts", "build_parts"]


@dataclass
class RunParts:
    """Everything a run trains, checkpoints and steps with (:func:`build_parts`)."""

    cfg: Config
    output: Path
    dataset: Any  # a faceforge.train.data training dataset (len, num_classes, [i] -> (image, label))
    backbone: nn.Module
    head: nn.Module
    objective: Objective
    hooks: dict[str, TrainHooks]  # the parts that opted into TrainHooks, by their checkpoint key
    params: TrainedParameters
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    sampler: Any  # a faceforge.data.samplers sampler (batches, state_dict / load_state_dict)
    amp_dtype: torch.dtype | None
    device: torch.device
    world_size: int
    main: bool
    zero: bool
    step_images: int  # images per optimiser step, all ranks and micro-batches
    steps_per_epoch: int
    total_steps: int
    ema: ModelEMA | None = None  # train.ema: its module is the evaluated backbone and the model file's


def build_parts(cfg: Config, dist: DistInfo) -> RunParts:
    """The parts of ``cfg`` on this rank (``dist``), seeded by ``cfg.seed``; raises ValueError (one line naming
    the config key) for a combination that cannot train."""
    t, device, world_size = cfg.train, dist.device, dist.world_size
    torch.manual_seed(cfg.seed)
    dataset = build_dataset(cfg)
    num_classes = int(dataset.num_classes)
    check_head(cfg, num_classes, world_size)  # the head factory's own check, before anything is built
    backbone = prepare_backbone(build_backbone(cfg), channels_last=t.channels_last, compile=cfg.model.compile)
    head = build_head(cfg, num_classes, global_batch=cfg.data.batch_size * world_size)
    amp = amp_dtype(t.amp, t.amp_dtype, device)
    objective: Objective = build_objective(
        cfg.objective.name, cfg.objective.kwargs, backbone=backbone, head=head, amp_dtype=amp
    ).to(device)
    # the parts that opted into TrainHooks, by their checkpoint key; checked once, here
    hooks: dict[str, TrainHooks] = {
        key: part for key, part in (("objective", objective), ("head", head)) if isinstance(part, TrainHooks)
    }
    if t.diagnostics_every and not any(h.provides_diagnostics for h in hooks.values()):
        raise ValueError(
            f"train.diagnostics_every = {t.diagnostics_every}: head {cfg.head.name!r} ({type(head).__name__}) "
            f"has no diagnostics; expected 0 (off) or a head that has them (broadface)"
        )
    params = split_parameters(backbone, head, objective.learned, hooks.values())
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    batch = cfg.data.batch_size
    step_images = batch * world_size * t.grad_accum
    steps_per_epoch = len(dataset) // step_images
    if steps_per_epoch < 1:
        raise ValueError(
            f"{len(dataset)} training images give no full step of {step_images} images "
            f"(data.batch_size {batch} x world size {world_size} x train.grad_accum {t.grad_accum})"
        )
    total_steps = t.steps if t.steps is not None else t.epochs * steps_per_epoch
    zero = use_zero(t.zero, world_size, params.sharded, cfg.head.name)
    optimizer = build_optimizer(cfg.optim, backbone, nn.ModuleList([head, objective.learned]), step_images, zero=zero)
    for part in hooks.values():
        part.use_optimizer(optimizer)
    scheduler = build_scheduler(cfg.schedule, optimizer, total_steps, steps_per_epoch)
    unlabelled = build_unlabelled(cfg)
    if unlabelled is not None and not objective.uses_unlabelled:
        raise ValueError(f"data.unlabelled = {cfg.data.unlabelled!r}: objective {cfg.objective.name!r} does not read "
                         "unlabelled images; expected an objective that does (distillation) or no data.unlabelled")
    context = SamplerContext(
        dataset=dataset, batch_size=batch, world_size=world_size, rank=dist.rank,
        seed=cfg.seed, grad_accum=t.grad_accum, micro_per_epoch=steps_per_epoch * t.grad_accum,
        flip=cfg.data.flip, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
        labels=functools.cache(lambda: torch.from_numpy(dataset_labels(dataset))),
        mask_ratio=cfg.data.mask_ratio, augment=dataclasses.asdict(cfg.data.augment), unlabelled=unlabelled,
        unlabelled_per_batch=max(1, round(cfg.data.unlabelled_ratio * batch)) if unlabelled is not None else 0,
    )
    sampler = build_sampler(cfg.data.sampler, context, cfg.data.sampler_kwargs,
                            needs=objective.needs_extras, needed_by=f"objective {cfg.objective.name}")
    objective.bind(context)
    ema = build_ema(t.ema, backbone)  # train.ema: a TrainHooks part (faceforge.train.ema), after the optimiser step
    if ema is not None:
        hooks["ema"] = ema
    return RunParts(
        cfg=cfg, output=Path(cfg.output), dataset=dataset, backbone=backbone, head=head, objective=objective,
        hooks=hooks, params=params, optimizer=optimizer, scheduler=scheduler, scaler=scaler, sampler=sampler,
        amp_dtype=amp, device=device, world_size=world_size, main=dist.is_main, zero=zero, step_images=step_images,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, ema=ema,
    )
