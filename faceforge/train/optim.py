"""Optimisers and learning-rate schedules.

Parameter groups: the backbone's parameters, and the head's in a group of their own (``head_lr`` and
``head_weight_decay`` when set). With ``no_decay_bn_bias`` the backbone's parameters that weight decay
should not pull to zero get weight decay 0 in a group of their own (:func:`no_decay_parameters`): those of
normalisation layers and PReLU slopes (found by module type), every module's ``bias``, and what the backbone
declares through ``no_weight_decay()`` (:class:`DeclaresNoWeightDecay`: a ViT's position embeddings and mask
token). Off by default, as in insightface where weight decay touches every parameter; the ViT recipe (AdamW,
weight decay 0.1) turns it on. Frozen parameters (``requires_grad=False``) are left out.

The schedule is a pure function of the optimiser step, :func:`lr_at`, wrapped in ``LambdaLR`` so that
it resumes from ``state_dict`` and reproduces exactly. Steps are optimiser steps, not micro-batches:
``t`` is the index of the update about to be made (0 for the first).
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Protocol, Sequence, runtime_checkable

from torch import Tensor

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from faceforge.core.registry import Registry
from faceforge.core.config import Config, OptimConfig, ScheduleConfig

__all__ = [
    "DeclaresNoWeightDecay", "LazyRowSGD", "NO_DECAY_MODULES", "OPTIMIZERS", "SCHEDULES", "no_decay_parameters",
    "param_groups", "build_optimizer", "linear_scaled_lr", "sharded", "decay_factor",
    "lr_at", "warmup_steps", "build_scheduler",
]


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


@runtime_checkable
class DeclaresNoWeightDecay(Protocol):
    """A backbone naming parameters that weight decay must not touch besides norms and biases (timm's method)."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names as ``named_parameters()`` gives them (a ViT: ``{"pos_embed", "mask_token"}``)."""
        ...


# the module types whose every parameter is exempt from weight decay: normalisation layers (their scales and
# shifts set a feature's range, decaying them shrinks it) and PReLU's slopes (insightface's 1-d parameters)
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm, nn.PReLU,
)


def no_decay_parameters(module: nn.Module) -> set[str]:
    """The names of ``module``'s parameters that get no weight decay under ``optim.no_decay_bn_bias``: those of
    the :data:`NO_DECAY_MODULES` types, each submodule's ``bias``, and ``module.no_weight_decay()`` when the
    module declares it (:class:`DeclaresNoWeightDecay`)."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        dotted = f"{prefix}." if prefix else ""
        for name, _ in sub.named_parameters(recurse=False):
            if isinstance(sub, NO_DECAY_MODULES) or name == "bias":
                names.add(dotted + name)
    if isinstance(module, DeclaresNoWeightDecay):
        declared = set(module.no_weight_decay())
        unknown = declared - dict(module.named_parameters()).keys()
        if unknown:
            raise ValueError(f"{type(module).__name__}.no_weight_decay() names {sorted(unknown)}, which are not its "
                             "parameters; expected names from named_parameters()")
        names |= declared
    return names


def param_groups(cfg: OptimConfig, backbone: nn.Module, head: nn.Module) -> list[dict]:
    """The optimiser's groups: ``backbone`` (and ``backbone_no_decay``), then ``head``; each has a ``name``.

    ``backbone_no_decay`` (with ``optim.no_decay_bn_bias``): :func:`no_decay_parameters`, weight decay 0."""
    groups = []
    if cfg.no_decay_bn_bias:
        exempt = no_decay_parameters(backbone)
        named = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if n not in exempt]
        no_decay = [p for n, p in named if n in exempt]
        groups.append({"name": "backbone", "params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
        groups.append({"name": "backbone_no_decay", "params": no_decay, "lr": cfg.lr, "weight_decay": 0.0})
    else:
        groups.append({"name": "backbone", "params": _trainable(backbone), "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    groups.append({
        "name": "head",
        "params": _trainable(head),
        "lr": cfg.lr if cfg.head_lr is None else cfg.head_lr,
        "weight_decay": cfg.weight_decay if cfg.head_weight_decay is None else cfg.head_weight_decay,
    })
    return [g for g in groups if g["params"]]


# optim.name -> factory(param groups, OptimConfig) -> torch.optim.Optimizer
OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer")
# The optimiser-specific OptimConfig keys each registered optimiser reads: a key another one reads, set away
# from its default, is refused for this one (train/config.py) instead of being recorded and ignored.
OPTIMIZER_KEYS: dict[str, tuple[str, ...]] = {
    "sgd": ("momentum", "nesterov"),
    "adamw": ("betas", "eps"),
    "lars": ("momentum", "trust_coefficient"),
}


@OPTIMIZERS.register("sgd")
def _sgd(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch's SGD; row-sparse gradients (a Partial FC head's sampled rows) updated lazily (:class:`LazyRowSGD`)."""
    return LazyRowSGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("lars")
def _lars(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    from faceforge.train.lars import LARS

    return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                trust_coefficient=cfg.trust_coefficient)


def linear_scaled_lr(lr: float, global_batch: int, reference_batch: int | None) -> float:
    """``lr * global_batch / reference_batch`` (linear scaling rule, Goyal et al. 2017); ``lr`` when no reference."""
    return lr if reference_batch is None else lr * global_batch / reference_batch


def sharded(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimiser (class, groups, defaults) inside ``torch.distributed.optim.ZeroRedundancyOptimizer``.

    Each rank then keeps the state of its share of the parameters (needs a process group); its
    ``state_dict`` needs ``consolidate_state_dict(to=0)`` on every rank first. No state exists yet to lose.
    """
    import inspect

    from torch.distributed.optim import ZeroRedundancyOptimizer

    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    groups = [dict(g) for g in optimizer.param_groups]
    return ZeroRedundancyOptimizer(groups, optimizer_class=cls, **defaults)


def build_optimizer(
    cfg: Config | OptimConfig, backbone: nn.Module, head: nn.Module, global_batch: int | None = None,
    zero: bool = False,
) -> torch.optim.Optimizer:
    """``optim.name`` (SGD, AdamW, LARS or a registered factory) over :func:`param_groups`.

    With ``optim.reference_batch`` set, every group's lr is scaled linearly to ``global_batch`` (images
    per optimiser step, all ranks), which must then be given. ``zero``: the optimiser :func:`sharded`
    across ranks (ZeRO).
    """
    optim_cfg = cfg.optim if isinstance(cfg, Config) else cfg
    if not OPTIMIZERS.is_known(optim_cfg.name):
        raise ValueError(f"optim.name = {optim_cfg.name!r}: expected {OPTIMIZERS.expected()}")
    groups = param_groups(optim_cfg, backbone, head)
    if not groups:
        raise ValueError("no trainable parameters in the backbone or the head")
    if optim_cfg.reference_batch is not None:
        if global_batch is None:
            raise ValueError("optim.reference_batch is set: build_optimizer needs the global batch size")
        for group in groups:
            group["lr"] = linear_scaled_lr(group["lr"], global_batch, optim_cfg.reference_batch)
    optimizer = OPTIMIZERS.get(optim_cfg.name)(groups, optim_cfg)
    return sharded(optimizer) if zero else optimizer


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


# --- SGD with lazily updated row-sparse gradients (Partial FC, faceforge.heads.parallel) ---------------------


class LazyRowSGD(torch.optim.SGD):
    """``torch.optim.SGD``, plus parameters whose gradient is a sparse COO tensor of rows (dim 0), as a Partial FC
    head gives for its sampled class rows. Such a parameter's step touches only the rows in its gradient:

    1. catch-up: the steps a row skipped since it was last updated are applied now, exactly as dense SGD would
       have applied them with a zero gradient. Per skipped step t, with its recorded lr_t, (w, v) goes through
       ``w <- (1 - lr_t wd) w - lr_t mu v``, ``v <- wd w_old + mu v``, i.e. the 2 x 2 matrix
       M_t = [[1 - lr_t wd, -lr_t mu], [wd, mu]]; the rows last updated at step s get M_now ... M_{s+1} (one
       product per distinct s, computed once per step in float64);
    2. the usual update on those rows: ``g += wd w; v = mu v + g; w -= lr v`` (torch's order of operations).

    So after :meth:`catch_up` of every row, the weights and momenta are those of dense SGD on the same loss,
    where an unsampled row's gradient is 0 (insightface's PartialFC_V2 with its dense optimiser state), up to the
    rounding of the matrix products. A head that reads rows calls ``catch_up(param, rows)`` first (the trainer
    hands it the optimiser: ``TrainHooks.use_optimizer``), so its forward sees what dense SGD would have. The cost
    of a step is that of its rows (times the number of distinct catch-up intervals, a few 2 x 2 products each).

    State per such parameter: ``momentum_buffer`` (rows, ...), ``last_step`` (rows,) int64 (the step each row is
    up to date with), ``step`` (steps since the state was made) and ``lr_history`` (the lr of each of them).
    Sparse rows need ``dampening = 0`` and ``nesterov = False``; dense parameters get torch's SGD unchanged.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        sparse: list[tuple[dict, nn.Parameter, Tensor]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    sparse.append((group, p, p.grad))
                    p.grad = None  # torch's SGD steps the dense parameters only
        try:
            loss = super().step(closure)
        finally:
            for _, p, grad in sparse:
                p.grad = grad
        gradients = {id(p): grad for _, p, grad in sparse}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in gradients:
                    self._init_lazy(group, p)
                state = self.state.get(p)
                if state is None or "last_step" not in state:
                    continue
                state["step"] += 1
                state["lr_history"].append(float(group["lr"]))
                if id(p) in gradients:
                    self._sparse_update(group, p, gradients[id(p)].coalesce())
        return loss

    def _init_lazy(self, group: dict, p: nn.Parameter) -> None:
        state = self.state[p]
        if "last_step" in state:
            return
        if group.get("nesterov") or group.get("dampening", 0.0) != 0.0 or group.get("maximize"):
            raise ValueError("row-sparse gradients (head.sample_rate < 1) need SGD without nesterov, dampening or "
                             "maximize")
        state["momentum_buffer"] = torch.zeros_like(p) if "momentum_buffer" not in state else state["momentum_buffer"]
        state["last_step"] = torch.zeros(p.shape[0], dtype=torch.long, device=p.device)
        state["step"] = 0
        state["lr_history"] = []

    def _sparse_update(self, group: dict, p: nn.Parameter, grad: Tensor) -> None:
        rows = grad.indices()[0]
        state = self.state[p]
        state["step"] -= 1  # catch up to the step before this one
        self.catch_up(p, rows)
        state["step"] += 1
        mu, wd, lr = group["momentum"], group["weight_decay"], group["lr"]
        w, g = p.index_select(0, rows), grad.values().to(p.dtype)
        if wd != 0:
            g = g.add(w, alpha=wd)
        if mu != 0:
            v = state["momentum_buffer"].index_select(0, rows).mul_(mu).add_(g)
            state["momentum_buffer"].index_copy_(0, rows, v)
            g = v
        p.index_copy_(0, rows, w.add_(g, alpha=-lr))
        state["last_step"].index_fill_(0, rows, state["step"])

    @torch.no_grad()
    def catch_up(self, param: Tensor, rows: Tensor) -> None:
        """Bring ``rows`` (K,) of a lazily updated parameter up to the last completed step (a no-op for a
        parameter without row-sparse state, or rows already up to date)."""
        state = self.state.get(param)
        if not state or "last_step" not in state:
            return
        now = state["step"]
        last = state["last_step"].index_select(0, rows)
        behind = last < now
        if not bool(behind.any()):
            return
        if not bool(behind.all()):
            rows, last = rows[behind], last[behind]
        group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
        mu, wd = float(group["momentum"]), float(group["weight_decay"])
        if mu != 0 or wd != 0:
            starts = torch.unique(last).tolist()[::-1]  # descending
            products, q, j = {}, (1.0, 0.0, 0.0, 1.0), now
            for s in starts:  # q = M_now ... M_{j+1}, extended down to s + 1
                while j > s:
                    lr = state["lr_history"][j - 1]
                    m = (1.0 - lr * wd, -lr * mu, wd, mu)  # M_j, row-major
                    q = (q[0] * m[0] + q[1] * m[2], q[0] * m[1] + q[1] * m[3],
                         q[2] * m[0] + q[3] * m[2], q[2] * m[1] + q[3] * m[3])
                    j -= 1
                products[s] = q
            table = torch.tensor([products[s] for s in starts[::-1]], dtype=torch.float64, device=param.device)
            which = torch.searchsorted(torch.tensor(starts[::-1], device=param.device), last)
            coef = table[which].to(param.dtype).reshape(-1, 4, *([1] * (param.dim() - 1)))
            w, v = param.index_select(0, rows), state["momentum_buffer"].index_select(0, rows)
            param.index_copy_(0, rows, coef[:, 0] * w + coef[:, 1] * v)
            state["momentum_buffer"].index_copy_(0, rows, coef[:, 2] * w + coef[:, 3] * v)
        state["last_step"].index_fill_(0, rows, now)
