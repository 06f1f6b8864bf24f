"""Model EMA (``train.ema``): an exponential moving average of the backbone's weights.

``ema <- decay * ema + (1 - decay) * weights`` after every ``every``-th optimiser step (Polyak & Juditsky
1992; the "model EMA" of timm and of arcface_torch's ViT recipes); buffers (BatchNorm's running statistics)
are copied, not averaged. The average starts as the backbone the run starts from: its initialisation, the
weights of ``model.init_from``, or, on ``--resume``, the checkpoint's average (or the resumed weights when
the checkpoint has none: EMA turned on at the resume).

:class:`ModelEMA` is a part that acts after the optimiser step (``faceforge.heads.base.TrainHooks``), so the
trainer calls it, checkpoints it and resumes it as it does a head's hooks: ``last.pt`` holds the average under
``extra.ema.backbone`` (beside the raw backbone under ``backbone``), restored bit for bit. The trainer
evaluates the average and writes it to ``model.safetensors`` (the model file holds the weights whose metrics
``model.json`` reports); the raw weights stay in ``last.pt``. Only the backbone is averaged: a head (sharded by
class or not) keeps its raw weights, which only training uses.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from faceforge.heads.base import TrainHooks
from faceforge.core.config import EmaConfig

__all__ = ["ModelEMA", "build_ema"]


class ModelEMA(nn.Module, TrainHooks):
    """The average of ``backbone`` (``module``: a copy, in eval mode, without gradients).

    decay: weight of the old average per update, in [0, 1). every: optimiser steps between updates.
    Call :meth:`start` once the backbone holds the weights the run starts from (after ``model.init_from``).
    """

    def __init__(self, backbone: nn.Module, decay: float, every: int = 1) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0 or every < 1:
            raise ValueError(f"ModelEMA: decay {decay!r}, every {every!r}: expected decay in [0, 1) and every >= 1")
        self.module = copy.deepcopy(backbone).eval().requires_grad_(False)
        self.decay, self.every = float(decay), int(every)
        self._source = (backbone,)  # a tuple: not registered as a submodule (not in this module's state)
        self._loaded = False

    @property
    def source(self) -> nn.Module:
        """The backbone being averaged."""
        return self._source[0]

    @torch.no_grad()
    def start(self) -> None:
        """The average := the backbone's current weights, unless a checkpoint's average was loaded."""
        if not self._loaded:
            self.module.load_state_dict(self.source.state_dict())

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average: the parameters lerp towards the backbone's by ``1 - decay``
        (``torch._foreach_lerp_``: ``ema + (1 - decay) (w - ema)``); the buffers are copied."""
        averaged = list(self.module.parameters())
        if averaged:
            torch._foreach_lerp_(averaged, [p.detach() for p in self.source.parameters()], 1.0 - self.decay)
        for mine, theirs in zip(self.module.buffers(), self.source.buffers()):
            mine.copy_(theirs)

    # --- TrainHooks ---

    def after_optimizer_step(self, step: int) -> None:
        if step % self.every == 0:
            self.update()

    def extra_state(self) -> dict[str, Any]:
        return {"backbone": dict(self.module.state_dict()), "decay": self.decay, "every": self.every}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["backbone"])
        self._loaded = True

    def train(self, mode: bool = True) -> "ModelEMA":
        """The average stays in eval mode (no dropout, no token masking, BatchNorm on its copied statistics)."""
        return super().train(False)


def build_ema(cfg: EmaConfig, backbone: nn.Module) -> ModelEMA | None:
    """``train.ema``: the :class:`ModelEMA` of ``backbone``, or None when ``decay`` is 0 (off)."""
    return ModelEMA(backbone, cfg.decay, cfg.every) if cfg.decay > 0 else None
