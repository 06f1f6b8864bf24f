"""Optimisers and learning-rate schedules.

Parameter groups: the backbone's parameters, and the head's in a group of their own (``head_lr`` and
``head_weight_decay`` when set). With ``no_decay_bn_bias`` the backbone's 1-d parameters (BN / PReLU
scales, biases) get weight decay 0 in a third group; off by default, as in insightface where weight
decay touches every parameter. Frozen parameters (``requires_grad=False``) are left out.

The schedule is a pure function of the optimiser step, :func:`lr_at`, wrapped in ``LambdaLR`` so that
it resumes from ``state_dict`` and reproduces exactly. Steps are optimiser steps, not micro-batches:
``t`` is the index of the update about to be made (0 for the first).
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from faceforge.registry import Registry
from faceforge.train.config import Config, OptimConfig, ScheduleConfig

__all__ = ["OPTIMIZERS", "SCHEDULES", "param_groups", "build_optimizer", "decay_factor", "lr_at", "warmup_steps", "build_scheduler"]


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def param_groups(cfg: OptimConfig, backbone: nn.Module, head: nn.Module) -> list[dict]:
    """The optimiser's groups: ``backbone`` (and ``backbone_no_decay``), then ``head``; each has a ``name``."""
    backbone_params = _trainable(backbone)
    groups = []
    if cfg.no_decay_bn_bias:
        decay = [p for p in backbone_params if p.ndim > 1]
        no_decay = [p for p in backbone_params if p.ndim <= 1]
        groups.append({"name": "backbone", "params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
        groups.append({"name": "backbone_no_decay", "params": no_decay, "lr": cfg.lr, "weight_decay": 0.0})
    else:
        groups.append({"name": "backbone", "params": backbone_params, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    groups.append({
        "name": "head",
        "params": _trainable(head),
        "lr": cfg.lr if cfg.head_lr is None else cfg.head_lr,
        "weight_decay": cfg.weight_decay if cfg.head_weight_decay is None else cfg.head_weight_decay,
    })
    return [g for g in groups if g["params"]]


# optim.name -> factory(param groups, OptimConfig) -> torch.optim.Optimizer
OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def _sgd(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def build_optimizer(cfg: Config | OptimConfig, backbone: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay, optional Nesterov) or AdamW over :func:`param_groups`."""
    optim_cfg = cfg.optim if isinstance(cfg, Config) else cfg
    if not OPTIMIZERS.is_known(optim_cfg.name):
        raise ValueError(f"optim.name = {optim_cfg.name!r}: expected {OPTIMIZERS.expected()}")
    groups = param_groups(optim_cfg, backbone, head)
    if not groups:
        raise ValueError("no trainable parameters in the backbone or the head")
    return OPTIMIZERS.get(optim_cfg.name)(groups, optim_cfg)


# --- schedules: decay(p, t, cfg) in [0, 1] after warm-up; p = progress through the decay in [0, 1) ------

# schedule.name -> decay(p, t, ScheduleConfig) -> float in [0, 1]
SCHEDULES: Registry[float] = Registry("schedule")


@SCHEDULES.register("poly")
def _poly(p: float, t: int, cfg: ScheduleConfig) -> float:
    return (1.0 - p) ** cfg.power  # arcface_torch PolynomialLRWarmup (power 1 = linear to min_lr)


@SCHEDULES.register("cosine")
def _cosine(p: float, t: int, cfg: ScheduleConfig) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * p))  # SGDR (Loshchilov & Hutter), one cycle


@SCHEDULES.register("step")
def _step(p: float, t: int, cfg: ScheduleConfig) -> float:
    return cfg.gamma ** bisect.bisect_right(sorted(cfg.milestones), t)  # x gamma at each milestone reached


@SCHEDULES.register("constant")
def _constant(p: float, t: int, cfg: ScheduleConfig) -> float:
    return 1.0


def decay_factor(cfg: ScheduleConfig, t: int, total_steps: int, warmup: int) -> float:
    """The decay in [0, 1] at optimiser step ``t >= warmup``; ``p = (t - warmup) / (total_steps - warmup)``."""
    _check_schedule(cfg)
    p = min(1.0, (t - warmup) / max(1, total_steps - warmup))
    return SCHEDULES.get(cfg.name)(p, t, cfg)


def _check_schedule(cfg: ScheduleConfig) -> None:
    if not SCHEDULES.is_known(cfg.name):
        raise ValueError(f"schedule.name = {cfg.name!r}: expected {SCHEDULES.expected()}")


def lr_at(cfg: ScheduleConfig, t: int, base_lr: float, total_steps: int, warmup: int) -> float:
    """Learning rate of update ``t`` (0-based optimiser step).

    Warm-up (``t < warmup``): ``base_lr * (t + 1) / warmup``, reaching base_lr at update ``warmup - 1``.
    After: ``min_lr + (base_lr - min_lr) * decay(t)`` with decay from :func:`decay_factor`.
    """
    if t < warmup:
        return base_lr * (t + 1) / warmup
    return cfg.min_lr + (base_lr - cfg.min_lr) * decay_factor(cfg, t, total_steps, warmup)


def warmup_steps(cfg: ScheduleConfig, steps_per_epoch: int) -> int:
    """``warmup_steps`` if set, else ``round(warmup_epochs * steps_per_epoch)``."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(round(cfg.warmup_epochs * steps_per_epoch))


def build_scheduler(
    cfg: Config | ScheduleConfig, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int = 1
) -> LambdaLR:
    """``LambdaLR`` whose factor for each group is ``lr_at(t, group's initial lr) / initial lr``.

    Call ``scheduler.step()`` once per optimiser step. total_steps: optimiser steps in the run.
    steps_per_epoch: converts ``warmup_epochs`` to steps.
    """
    sched_cfg = cfg.schedule if isinstance(cfg, Config) else cfg
    _check_schedule(sched_cfg)
    SCHEDULES.get(sched_cfg.name)  # a "package.module:callable" that does not import fails here, not at step 1
    if total_steps < 1:
        raise ValueError(f"total_steps = {total_steps!r}: expected an int >= 1")
    warmup = warmup_steps(sched_cfg, steps_per_epoch)

    def factor_for(base_lr: float) -> Callable[[int], float]:
        def factor(t: int) -> float:
            return lr_at(sched_cfg, t, base_lr, total_steps, warmup) / base_lr if base_lr > 0 else 0.0

        return factor

    base_lrs: Sequence[float] = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
    return LambdaLR(optimizer, [factor_for(lr) for lr in base_lrs])
