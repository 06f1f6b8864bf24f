"""Training: config (YAML -> dataclasses), optimiser and schedule, the loop, checkpoints, torch.distributed.

    >>> from faceforge.train import load_config, train
    >>> result = train(load_config("configs/synthetic_r18_arcface.yaml", ["optim.lr=0.05"]))

`train` and the other engine names load on first use, so that importing the config costs nothing more.
"""

from __future__ import annotations

from typing import Any

from faceforge.train.config import Config, ConfigError, config_from_dict, load_config, to_dict, to_yaml

__all__ = [
    "Config",
    "ConfigError",
    "config_from_dict",
    "load_config",
    "to_dict",
    "to_yaml",
    "train",
    "TrainResult",
    "NonFiniteLossError",
    "save_checkpoint",
    "load_checkpoint",
    "build_optimizer",
    "build_scheduler",
]

_LAZY = {
    "train": "faceforge.train.engine",
    "TrainResult": "faceforge.train.engine",
    "NonFiniteLossError": "faceforge.train.engine",
    "save_checkpoint": "faceforge.core.checkpoint",
    "load_checkpoint": "faceforge.core.checkpoint",
    "build_optimizer": "faceforge.train.optim",
    "build_scheduler": "faceforge.train.optim",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
