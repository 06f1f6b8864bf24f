"""The configuration as a run reads it: :mod:`faceforge.core.config` (the dataclasses, YAML, overrides, types,
ranges) plus the checks that need the parts' registries, when the config is read and before any work:

- the names that select a registered part (``data.name``, ``data.sampler``, ``optim.name``, ``schedule.name``,
  ``objective.name``);
- ``model.kwargs`` and ``head.kwargs`` against their factory's signature and type hints, and the margins and scale
  a head declares (``KWARG_RANGES``);
- ``data.kwargs`` against the data source's factories, completed with their defaults (so ``config.yaml`` records
  every value the run uses).

Every public name of :mod:`faceforge.core.config` is importable from here too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from faceforge.backbones import BACKBONES
from faceforge.core.config import (
    FLAT_DATA_KEYS,
    Config,
    ConfigError,
    DataConfig,
    EmaConfig,
    EvalConfig,
    HeadConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    check_value,
    factory_keywords,
    factory_parameters,
    is_checkable_hint,
    parse_config,
    read_config,
    to_dict,
    to_yaml,
)
from faceforge.core.errors import bounded_repr
from faceforge.data.samplers import SAMPLERS
from faceforge.heads import HEADS
from faceforge.heads.base import HeadKwargError, check_kwarg_ranges
from faceforge.train import distillation  # noqa: F401  registers the 'distillation' objective in OBJECTIVES
from faceforge.train.data import DATASETS, resolve_data_kwargs
from faceforge.train.objectives import OBJECTIVES
from faceforge.train.optim import OPTIMIZER_KEYS, OPTIMIZERS, SCHEDULES

__all__ = [
    "FLAT_DATA_KEYS", "Config", "ConfigError", "DataConfig", "EmaConfig", "EvalConfig", "HeadConfig", "ModelConfig",
    "ObjectiveConfig", "OptimConfig", "ScheduleConfig", "TrainConfig", "apply_overrides", "check_value",
    "config_from_dict", "factory_keywords", "factory_parameters", "load_config", "to_dict", "to_yaml",
]


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    """Validate a nested dict (as read from YAML or a checkpoint) into a :class:`Config`: ``parse_config`` and the
    checks against the parts' registries. Raises :class:`ConfigError` naming the file and the key."""
    cfg, spelled = parse_config(data, source)
    _check_names(cfg, source)
    _check_kwargs(cfg, source)
    _check_data_kwargs(cfg, source, spelled)
    _check_optimizer_keys(cfg, source)
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply dotted overrides, validate (:func:`config_from_dict`). Raises :class:`ConfigError`."""
    return config_from_dict(read_config(path, overrides), str(path))


def _check_names(cfg: Config, source: str) -> None:
    """The names that select a registered part (``faceforge.core.registry.Registry``): a registered name or
    ``"package.module:callable"`` (imported when the part is built). Heads and backbones are checked when built."""
    for key, value, registry in (
        ("data.name", cfg.data.name, DATASETS), ("data.sampler", cfg.data.sampler, SAMPLERS),
        ("optim.name", cfg.optim.name, OPTIMIZERS), ("schedule.name", cfg.schedule.name, SCHEDULES),
        ("objective.name", cfg.objective.name, OBJECTIVES),
    ):
        if not registry.is_known(value):
            raise ConfigError(f"{source}: {key} = {value!r}: expected {registry.expected()}")


def _check_kwargs(cfg: Config, source: str) -> None:
    """``model.kwargs`` and ``head.kwargs`` keys against the signature of the registered factory they go to
    (``"package.module:callable"`` factories are checked when built). The arguments the trainer passes itself
    (``embedding_size``, ``num_classes``) are not kwargs."""
    for section, name, kwargs, registry, given in (
        ("model", cfg.model.backbone, cfg.model.kwargs, BACKBONES, {"embedding_size"}),
        ("head", cfg.head.name, cfg.head.kwargs, HEADS, {"num_classes", "embedding_size"}),
    ):
        if ":" in name or name not in registry:
            continue
        params = factory_parameters(registry.get(name))
        accepted = None if params is None else set(params)
        for key, value in kwargs.items():
            if key in given:
                raise ConfigError(f"{source}: {section}.kwargs.{key}: set by the trainer (from model.embedding_size "
                                  f"and the data); remove it from {section}.kwargs")
            if accepted is not None and key not in accepted:
                raise ConfigError(
                    f"{source}: {section}.kwargs.{key}: not an argument of {registry.kind} {name!r}; expected one of: "
                    f"{', '.join(sorted(accepted - given - {'self'}))}"
                )
            if params is not None and key in params and is_checkable_hint(params[key]):
                check_value(value, params[key], f"{section}.kwargs.{key}", source)  # a string for a float names its key
    if ":" not in cfg.head.name and cfg.head.name in HEADS:  # the margins and scale the head declares (KWARG_RANGES)
        try:
            check_kwarg_ranges(HEADS.get(cfg.head.name), cfg.head.kwargs)
        except HeadKwargError as e:
            raise ConfigError(f"{source}: head.kwargs.{e}") from None


def _check_optimizer_keys(cfg: Config, source: str) -> None:
    """An optimiser-specific ``optim`` key (``OPTIMIZER_KEYS``: SGD's momentum, AdamW's betas, ...) away from its
    default while ``optim.name`` is an optimiser that does not read it: refused, not ignored."""
    if cfg.optim.name not in OPTIMIZER_KEYS:
        return  # "package.module:callable": it reads the whole OptimConfig
    reads = set(OPTIMIZER_KEYS[cfg.optim.name])
    defaults = OptimConfig()
    for key in sorted({k for keys in OPTIMIZER_KEYS.values() for k in keys} - reads):
        value = getattr(cfg.optim, key)
        if value != getattr(defaults, key):
            raise ConfigError(f"{source}: optim.{key} = {bounded_repr(value)}: optim.name {cfg.optim.name!r} does not "
                              f"use it; expected it left out (the {cfg.optim.name} keys: {', '.join(sorted(reads))})")


def _check_data_kwargs(cfg: Config, source: str, spelled: dict[str, str]) -> None:
    """``data.kwargs`` of a registered ``data.name`` checked and completed with its factories' defaults
    (``faceforge.train.data.resolve_data_kwargs``); an old flat key the source does not take is dropped only
    while it holds its old default."""
    if ":" in cfg.data.name or cfg.data.name not in DATASETS:
        return
    kwargs = dict(cfg.data.kwargs)
    accepted = resolve_data_kwargs(cfg.data.name, {}, source)  # the defaults: the keys the source takes
    for key in [k for k in spelled if k not in accepted]:
        value = kwargs.pop(key)
        if not (type(value) is type(FLAT_DATA_KEYS[key]) and value == FLAT_DATA_KEYS[key]):
            logging.getLogger("faceforge").warning("%s: data.%s = %r is ignored: data source %r does not take it",
                                                   source, key, value, cfg.data.name)
    cfg.data.kwargs = resolve_data_kwargs(cfg.data.name, kwargs, source, spelled)
