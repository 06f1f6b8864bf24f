"""The configuration: YAML validated into dataclasses, with dotted command-line overrides (the bottom floor:
it knows no part; ``faceforge.train.config`` adds the checks against the parts' registries).

A config file is a YAML mapping whose sections mirror the dataclasses below::

    seed: 0
    output: runs/r18_arcface
    model: {backbone: r18, embedding_size: 512, kwargs: {width: 0.5}}
    head: {name: arcface, kwargs: {s: 64.0, m: 0.5}}
    data: {name: synthetic, kwargs: {num_identities: 1000, images_per_identity: 20}, batch_size: 128}
    optim: {name: sgd, lr: 0.1}
    schedule: {name: poly, warmup_epochs: 1}
    train: {epochs: 20}

Every field has a default except ``output``, ``model.backbone`` and ``head.name``. Validation is
generic: it reads the dataclasses' type hints, so a new field needs only a typed line here. A wrong
key, a wrong type (a string for ``optim.lr``, a float for an int field, a bool for a number) or a
missing required field raises :class:`ConfigError` naming the file, the dotted key, the value and
the expected type. Numbers are range-checked (no float may be inf or nan). ``kwargs`` sections go to the
backbone / head factories: their keys are checked against the factory's signature (``model.kwargs.widht``
is an error naming the key and the accepted ones), their values by the factory when the run starts.

Overrides are ``dotted.key=value`` strings whose value is parsed as a YAML scalar or flow
collection: ``optim.lr=0.05``, ``train.amp=false``, ``model.kwargs.layers=[1,1,1,1]``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import yaml

from faceforge.core.errors import bounded_repr, brief

__all__ = [
    "ConfigError",
    "Config",
    "ModelConfig",
    "HeadConfig",
    "ObjectiveConfig",
    "DataConfig",
    "AugmentConfig",
    "OptimConfig",
    "ScheduleConfig",
    "EmaConfig",
    "EvalConfig",
    "TrainConfig",
    "read_config",
    "parse_config",
    "factory_keywords",
    "factory_parameters",
    "is_checkable_hint",
    "check_value",
    "FLAT_DATA_KEYS",
    "apply_overrides",
    "to_dict",
    "to_yaml",
]


class ConfigError(ValueError):
    """A config file or override that does not match the dataclasses (names file, key, value, type)."""


@dataclass
class ModelConfig:
    """The backbone: ``faceforge.backbones.build(backbone, embedding_size, **kwargs)``.

    ``backbone`` may also be ``"package.module:callable"`` for a backbone defined outside faceforge.
    ``kwargs.input_size`` defaults to ``data.image_size``.
    ``init_from``: a ``faceforge train`` checkpoint whose backbone and head class weights start this run
    (fine-tuning, e.g. BroadFace from an ArcFace model); ``--resume`` from this run's own checkpoint wins.
    ``grad_checkpointing``: activation checkpointing of the backbone while training, ``false`` (off),
    ``block`` or ``stage`` (``true`` = ``block``): ``backbone.set_grad_checkpointing(True, granularity)``.
    """

    backbone: str
    embedding_size: int = 512
    kwargs: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    grad_checkpointing: bool | Literal["block", "stage"] = False
    # GPUs (faceforge.train.device): torch.compile the backbone's forward in place (same loss as eager)
    compile: bool = False


@dataclass
class HeadConfig:
    """The loss head: ``faceforge.heads.build(name, num_classes, embedding_size, **kwargs)``.

    ``name`` may also be ``"package.module:callable"``; num_classes comes from the dataset.

    ``shard``: hold the class weights sharded by class over the ranks (``faceforge.heads.parallel.ShardedHead``:
    rank r holds rows [c0, c1) of W; embeddings all-gathered; checkpoints hold W as one logical tensor, so a
    run resumes at any world size). For the margin heads, softmax and sphereface2; broadface (its queue's W rows
    with their shard) and attfc (its container split by slot) too (``faceforge.heads.parallel.build_sharded``).

    ``sample_rate`` r < 1 (Partial FC, needs ``shard``): each step every rank computes the loss on the positives
    of the global batch that it holds plus uniformly drawn negatives, ceil(r x its rows) in all; the optimiser
    (``optim.name: sgd``) updates only those rows, catching up the skipped steps' decay and momentum lazily.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    shard: bool = False
    sample_rate: float = 1.0  # Partial FC (with shard): the positives + uniform negatives up to this fraction of rows


@dataclass
class ObjectiveConfig:
    """What the trainer minimises: ``faceforge.train.objectives.OBJECTIVES.build(name, backbone=..., head=...,
    amp_dtype=..., **kwargs)``, named loss terms of a batch. ``classification`` (the default) is backbone +
    head; ``name`` may also be ``"package.module:callable"`` (``docs/extending.md``).
    """

    name: str = "classification"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class AugmentConfig:
    """AdaFace's training augmentations (``faceforge.data.augment``): the probability that a training image gets
    each, 0 = off (the default); AdaFace trains with 0.2 each. Drawn anew each epoch, deterministically in
    ``(seed, epoch, index)``, after the mask (``mask_ratio``) and before the flip.

    ``crop``: a random box (area 0.2 to 1 of the image's, aspect 3/4 to 4/3) kept in place, the rest black.
    ``low_res``: down to a random 0.2 to 1 of the side and back up, each resize with a random interpolation.
    ``photometric``: brightness, contrast and saturation each by a factor in [0.5, 1.5], in a random order.
    """

    crop: float = 0.0
    low_res: float = 0.0
    photometric: float = 0.0


@dataclass
class DataConfig:
    """Training data and the held-out verification pairs.

    batch_size is per process and per micro-batch: one optimiser step sees
    ``batch_size * world_size * train.grad_accum`` images. Images are ``image_size`` pixels square.

    name: a ``faceforge.train.data.DATASETS`` name or ``"package.module:callable"``; ``kwargs``: that source's
    own keyword arguments, checked against its factory's signature, type hints and declared ranges when the
    config is read (registered names; an out-of-tree one when it is built), the factory's defaults filling the
    rest. ``synthetic`` (built-in identities): ``num_identities``, ``images_per_identity``, ``difficulty``,
    ``cache``, ``eval_pairs``, ``eval_identities``. ``recordio`` (``path`` = the ``.rec``/``.idx`` prefix) and
    ``folder`` (``path`` = a folder with one sub-folder per identity): none. Any ``name`` evaluates the
    ``eval_bins`` (insightface ``.bin`` files, each named after its file), beside its own held-out pairs.
    The old flat keys (``data.num_identities``, ``data.glyph_charset``, ...) still work: they are moved into
    ``kwargs`` with a one-line deprecation note (:data:`FLAT_DATA_KEYS`).

    ``glyphs`` (rendered font glyphs, ``faceforge.data.glyphs``): ``path`` = a fonts folder (default
    ``/usr/share/fonts``); kwargs ``num_identities`` training and ``eval_identities`` test characters (disjoint),
    each drawn in every font; ``eval_pairs`` pairs of test characters;
    ``glyph_charset``, ``glyph_held_out_families`` (font families kept for the test pairs only; 0 = the
    test pairs use the training fonts), ``glyph_variants`` (images per character and font: 1 = clean,
    more adds jittered copies) and ``glyph_min_coverage`` (drop fonts that map fewer than this fraction of
    the best font's characters, default 0.25; raise it to share more characters among fewer fonts: at 0.35
    the Debian fonts of ``install_fonts.sh`` keep 23 fonts sharing 7,244 CJK characters, at 0.25 27 sharing
    3,331).

    The keys here are those every source shares: where images are (``path``), how they are batched, sized,
    flipped, masked and sampled, the evaluation sets any source can have, unlabelled images, label noise and
    bad-record handling.

    Beside those held-out sets, any ``data.name`` can evaluate ``eval_ijb`` (an IJB-B/C release,
    ``eval_ijb_name``), ``eval_probes`` among ``eval_distractors`` (identification) and ``eval_retrieval``
    every ``train.eval_every`` steps (``faceforge.eval.sets``; ``docs/evaluation.md``).

    ``mask_ratio``: this fraction of training images gets a synthetic face mask (BigFace: 0.35;
    ``faceforge.data.masks``), drawn anew each epoch, deterministically in ``(seed, epoch, index)``.

    ``augment``: AdaFace's crop / low-resolution / photometric augmentations, each with its own probability
    (:class:`AugmentConfig`; ``{crop: 0.2, low_res: 0.2, photometric: 0.2}`` is the paper's).

    ``unlabelled``: an image folder (any depth) or a RecordIO prefix of images without labels, for
    semi-supervised distillation: each micro-batch gets ``round(unlabelled_ratio * batch_size)`` of them
    after its labelled images (label -1), which only an objective that reads them takes (``distillation``;
    ``faceforge.data.unlabelled``).

    ``label_noise``: this fraction of every class's training labels is shuffled within the training set
    (SphereFace2 Sec. 4.3), deterministically from ``seed``; any ``name``; held-out pairs are untouched.

    ``skip_bad``: a training image that cannot be read or decoded mid-run stops the run, naming the file,
    the record and its offset (default, False; the last checkpoint is kept); with True it is skipped (the
    next readable image takes its place in the batch), counted in ``train.log`` and listed in
    ``bad_records.txt`` in the run folder.
    """

    name: str = "synthetic"
    kwargs: dict[str, Any] = field(default_factory=dict)  # the source's own arguments (see above)
    path: str | None = None
    eval_bins: list[str] = field(default_factory=list)
    eval_ijb: str | None = None  # an IJB-B/C release root: 1:1 TAR@FAR (+ 1:N when its CSVs are there)
    eval_ijb_name: str = "IJBC"  # IJBB or IJBC
    eval_probes: str | None = None  # identification: these probes (folder / .rec) among eval_distractors
    eval_distractors: str | None = None
    eval_retrieval: str | None = None  # Recall@K and mAP on this labelled image set (folder / .rec)
    image_size: int = 112
    batch_size: int = 128
    num_workers: int = 0
    flip: bool = True  # random horizontal flip, p = 0.5, drawn in the main process
    sampler: str = "epoch"  # faceforge.data.samplers.SAMPLERS name, or "package.module:callable"
    sampler_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_batch_size: int = 256
    label_noise: float = 0.0
    mask_ratio: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    unlabelled: str | None = None
    unlabelled_ratio: float = 0.5
    skip_bad: bool = False


@dataclass
class OptimConfig:
    """Optimiser. ``head_lr`` / ``head_weight_decay`` (None = same as the backbone) set the head's group.

    ``no_decay_bn_bias``: no weight decay on 1-d parameters (BN/PReLU scales, biases), default off
    as in insightface, where weight decay applies to every parameter.

    ``lars`` (BigFace): LARS with ``momentum`` and ``trust_coefficient`` (eta); 1-d parameters are neither
    adapted nor decayed (``faceforge.train.lars``).
    ``reference_batch``: linear LR scaling (Goyal et al. 2017): ``lr`` and ``head_lr`` are the rates for a
    global batch of ``reference_batch`` images, multiplied by ``global batch / reference_batch``
    (global batch = data.batch_size x world size x train.grad_accum); null = no scaling.
    """

    name: str = "sgd"  # faceforge.train.optim.OPTIMIZERS: sgd, adamw, lars, or "package.module:callable"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    head_lr: float | None = None
    head_weight_decay: float | None = None
    no_decay_bn_bias: bool = False
    trust_coefficient: float = 0.001
    reference_batch: int | None = None


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, counted in optimiser steps: linear warm-up, then a decay to ``min_lr``.

    warmup_steps (if set) wins over warmup_epochs. milestones (for ``step``) are optimiser steps.
    min_lr is an absolute learning rate (default 0).
    """

    name: str = "poly"  # faceforge.train.optim.SCHEDULES: poly, cosine, step, constant, or "package.module:callable"
    warmup_steps: int | None = None
    warmup_epochs: float = 0.0
    power: float = 1.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    min_lr: float = 0.0


@dataclass
class EmaConfig:
    """Model EMA of the backbone (``faceforge.train.ema.ModelEMA``); ``decay`` 0 = off (the default).

    Every ``every`` optimiser steps the average moves towards the backbone: ``ema = decay * ema + (1 - decay) *
    weights`` (buffers, e.g. BatchNorm statistics, copied). With it on, the evaluations during training and
    ``model.safetensors`` use the averaged weights; ``last.pt`` holds both (the raw backbone under ``backbone``,
    the average under ``extra.ema``). A class-sharded head's rows are not averaged: the EMA is the backbone's.
    """

    decay: float = 0.0
    every: int = 1


@dataclass
class TrainConfig:
    """The loop. ``steps`` (optimiser steps, if set) wins over ``epochs``.

    amp: "auto" = autocast on iff CUDA; amp_dtype bfloat16 or float16 (float16 adds a GradScaler).
    clip_grad_norm: max global L2 norm of all gradients, 0 = off.
    checkpoint_every / eval_every / log_every: in optimiser steps, 0 = only at the end (never for log).
    keep_checkpoints: older ``step_XXXXXXX.pt`` kept beside ``last.pt`` (0 = last.pt only).
    diagnostics_every: in optimiser steps, call the head's ``diagnostics`` (BroadFace's queue error), 0 = off.
    zero: with more than one process, shard the optimiser state across ranks
    (``torch.distributed.optim.ZeroRedundancyOptimizer``); same updates as without it.
    ddp_comm_hook: ``fp16`` / ``bf16`` compress the gradients DDP all-reduces (DDP's default compression
    hooks: cast, all-reduce, divide, cast back); ``none`` sends float32.
    dist_timeout: seconds that connecting the ranks, and then any collective, waits for the other ranks
    before raising (default 1800, torch's); under ``torchrun --max-restarts`` the agent then restarts the
    group from the last checkpoint. Ranks wait at a barrier while rank 0 evaluates or writes a checkpoint:
    keep it above the longest of those.
    """

    epochs: int = 1
    steps: int | None = None
    grad_accum: int = 1
    clip_grad_norm: float = 0.0
    amp: bool | Literal["auto"] = "auto"
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    log_every: int = 10
    checkpoint_every: int = 0
    eval_every: int = 0
    keep_checkpoints: int = 0
    diagnostics_every: int = 0
    progress: bool = True
    zero: bool = False
    ddp_comm_hook: Literal["none", "fp16", "bf16"] = "none"
    dist_timeout: float = 1800.0
    # GPUs (faceforge.train.device): "auto" = CUDA when present; "cuda" without one is an error before any work;
    # channels_last: NHWC backbone weights and inputs; cudnn_benchmark: torch.backends.cudnn.benchmark
    device: Literal["auto", "cpu", "cuda"] = "auto"
    channels_last: bool = False
    cudnn_benchmark: bool = False
    ema: EmaConfig = field(default_factory=EmaConfig)


@dataclass
class EvalConfig:
    """How the run's evaluation sets are embedded and which copies of them are scored (``faceforge.eval.sets``).

    flip: embeddings are ``f(x) + f(flip(x))`` (the test-time flip, default on as in ArcFace / insightface); off:
    ``f(x)`` only. It also sets ``flip_test`` in ``model.json``, so that a deployed model embeds as the run chose its
    threshold. degraded: every held-out / ``.bin`` pair set is also scored with the second image of each pair
    degraded (``faceforge.data.degrade``: low resolution and blur at fixed levels), as ``"<set> (degraded)"``.
    ``faceforge eval`` has its own switches, ``--no-flip`` and ``--degraded``.
    """

    flip: bool = True
    degraded: bool = False


@dataclass
class Config:
    """A whole training run; ``output`` is the run folder (checkpoints, train.log, tensorboard/)."""

    output: str
    model: ModelConfig
    head: HeadConfig
    seed: int = 0
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# YAML loading: PyYAML follows YAML 1.1, where `1e-3` is a string; floats without a dot are floats here.

class _Loader(yaml.SafeLoader):
    pass


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "-+0123456789.":
    _Loader.yaml_implicit_resolvers[_first] = [
        (tag, rx) for tag, rx in _Loader.yaml_implicit_resolvers.get(_first, []) if tag != "tag:yaml.org,2002:float"
    ]
    _Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, [_first])


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None


# ---------------------------------------------------------------------------------------------
# Generic validation from type hints


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the type hint ``tp`` and return it (dataclasses built, tuples made)."""

    def fail() -> ConfigError:
        return ConfigError(f"{source}: {key} = {bounded_repr(value)}: expected {_type_name(tp)}")

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        return _build(tp, value, key, source)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        for option in args:
            try:
                return _convert(value, option, key, source)
            except ConfigError:
                continue
        raise fail()
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise fail()
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise fail()
        return [_convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail()
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise fail()
        return tuple(_convert(v, t, f"{key}[{i}]", source) for i, (v, t) in enumerate(zip(value, item_types)))
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise fail()
        return {k: _convert(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
    if tp is type(None):
        if value is None:
            return None
        raise fail()
    if tp is float:  # an int is a valid float (lr: 1), a bool is not
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if tp is int or tp is str or tp is bool:
        if type(value) is tp:
            return value
        raise fail()
    raise TypeError(f"config field {key}: unsupported type hint {tp!r}")


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = f"{prefix}." if prefix else ""
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {where}{unknown[0]} = {bounded_repr(data[unknown[0]])}; "
            f"expected one of: {', '.join(fields)}"
        )
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _convert(data[name], hints[name], f"{where}{name}", source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {where}{name} (expected {_type_name(hints[name])})")
    return cls(**values)


# ---------------------------------------------------------------------------------------------
# Overrides, loading, saving


def apply_overrides(data: dict, overrides: Sequence[str], source: str = "<overrides>") -> dict:
    """Set ``dotted.key=value`` overrides (values parsed as YAML) in a nested dict, in place; returns it.

    Intermediate mappings are created where missing; a key that does not exist in the dataclasses is
    caught by validation afterwards.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{source}: override {item!r}: expected dotted.key=value, e.g. optim.lr=0.05")
        value = _parse_yaml(text, f"{source}: override {item!r}") if text.strip() else ""
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"{source}: override {item!r}: {'.'.join(parts[: i + 1])} = {child!r} is not a section"
                )
            node = child
        node[parts[-1]] = value
    return data


def parse_config(data: dict, source: str = "<dict>") -> tuple[Config, dict[str, str]]:
    """Validate a nested dict (as read from YAML or a checkpoint) into a :class:`Config`: every key and type,
    the value ranges and the pairings. Returns the config and the old flat data keys it moved into
    ``data.kwargs`` (``{key: "data.<key>"}``, as the user wrote them). The names of registered parts and their
    kwargs are checked one floor up, where the registries are (``faceforge.train.config.config_from_dict``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {brief(data)}")
    data, spelled = _map_flat_data_keys(data, source)
    cfg = _build(Config, data, "", source)
    _check_ranges(cfg, source)
    _check_pairings(cfg, source)
    return cfg, spelled


# The largest learning rate and weight decay accepted: SGD at lr 100 already diverges in a step on these models,
# and a larger one (1e308) overflows float32 inside the optimiser instead of naming the key.
MAX_LR = 100.0
MAX_WEIGHT_DECAY = 1.0

# dotted key -> (test, what is expected); types are already checked, these are the value ranges.
_RANGES: dict[str, tuple[Any, str]] = {
    "data.batch_size": (lambda v: v >= 1, "an int >= 1"),
    "head.sample_rate": (lambda v: 0.0 < v <= 1.0, "a float in (0, 1]"),
    "data.num_workers": (lambda v: v >= 0, "an int >= 0"),
    "data.label_noise": (lambda v: 0.0 <= v <= 1.0, "a float in [0, 1]"),
    "data.mask_ratio": (lambda v: 0.0 <= v <= 1.0, "a float in [0, 1]"),
    "data.augment.crop": (lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1] (0 = off)"),
    "data.augment.low_res": (lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1] (0 = off)"),
    "data.augment.photometric": (lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1] (0 = off)"),
    "data.unlabelled_ratio": (lambda v: v > 0, "a float > 0 (unlabelled images per labelled image)"),
    "model.embedding_size": (lambda v: v >= 1, "an int >= 1"),
    "optim.lr": (lambda v: 0 <= v <= MAX_LR, f"a float in [0, {MAX_LR:g}]"),
    "optim.trust_coefficient": (lambda v: v > 0, "a float > 0"),
    "optim.reference_batch": (lambda v: v is None or v >= 1, "null or an int >= 1"),
    "optim.momentum": (lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "optim.weight_decay": (lambda v: 0 <= v <= MAX_WEIGHT_DECAY, f"a float in [0, {MAX_WEIGHT_DECAY:g}]"),
    "optim.head_lr": (lambda v: v is None or 0 <= v <= MAX_LR, f"null (= optim.lr) or a float in [0, {MAX_LR:g}]"),
    "optim.head_weight_decay": (lambda v: v is None or 0 <= v <= MAX_WEIGHT_DECAY,
                                f"null (= optim.weight_decay) or a float in [0, {MAX_WEIGHT_DECAY:g}]"),
    "optim.eps": (lambda v: v > 0, "a float > 0"),
    "optim.betas": (lambda v: all(0 <= b < 1 for b in v), "two floats in [0, 1)"),
    "data.eval_batch_size": (lambda v: v >= 1, "an int >= 1"),
    "data.image_size": (lambda v: v >= 1, "an int >= 1"),
    "schedule.power": (lambda v: v >= 0, "a float >= 0"),
    "schedule.gamma": (lambda v: v >= 0, "a float >= 0"),
    "schedule.min_lr": (lambda v: 0 <= v <= MAX_LR, f"a float in [0, {MAX_LR:g}]"),
    "train.epochs": (lambda v: v >= 1, "an int >= 1"),
    "train.steps": (lambda v: v is None or v >= 1, "null or an int >= 1"),
    "train.grad_accum": (lambda v: v >= 1, "an int >= 1"),
    "train.clip_grad_norm": (lambda v: v >= 0, "a float >= 0 (0 = off)"),
    "train.log_every": (lambda v: v >= 1, "an int >= 1"),
    "train.checkpoint_every": (lambda v: v >= 0, "an int >= 0 (0 = only at the end)"),
    "train.eval_every": (lambda v: v >= 0, "an int >= 0 (0 = only at the end)"),
    "train.keep_checkpoints": (lambda v: v >= 0, "an int >= 0"),
    "train.diagnostics_every": (lambda v: v >= 0, "an int >= 0 (0 = off)"),
    "train.dist_timeout": (lambda v: v > 0, "seconds > 0"),
    "schedule.warmup_steps": (lambda v: v is None or v >= 0, "null or an int >= 0"),
    "schedule.warmup_epochs": (lambda v: v >= 0, "a float >= 0"),
    "train.ema.decay": (lambda v: 0 <= v < 1, "a float in [0, 1) (0 = off)"),
    "train.ema.every": (lambda v: v >= 1, "an int >= 1 (optimiser steps between updates)"),
}


# dotted key -> (when it applies, in words, test, what is expected): ranges that hold for some configs only.
_CONDITIONAL_RANGES: dict[str, tuple[Any, str, Any, str]] = {
    "data.image_size": (lambda c: c.data.name == "synthetic", "data.name 'synthetic'",
                        lambda v: v >= 16, "an int >= 16 (the smallest face the renderer draws)"),
}


def _non_finite(value: Any, key: str) -> str | None:
    """The dotted key of the first inf/nan float in ``value`` (nested dicts, lists, dataclasses), else None.
    ``kwargs`` sections are the factories' to check (a test objective may want a NaN on purpose)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else key
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if not f.name.endswith("kwargs")}
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for name, v in items:
        found = _non_finite(v, f"{key}{name}" if str(name).startswith("[") else (f"{key}.{name}" if key else name))
        if found:
            return found
    return None


def _lookup(cfg: Any, key: str) -> Any:
    """The value at a dotted key with ``[i]`` indices (as :func:`_non_finite` names them)."""
    value = cfg
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        if part.startswith("["):
            value = value[int(part[1:-1])]
        else:
            value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def _check_ranges(cfg: Config, source: str) -> None:
    bad = _non_finite(cfg, "")
    if bad:
        raise ConfigError(f"{source}: {bad} = {_lookup(cfg, bad)!r}: expected a finite number (not inf or nan)")
    for key, (ok, expected) in _RANGES.items():
        value = _lookup(cfg, key)
        if not ok(value):
            raise ConfigError(f"{source}: {key} = {value!r}: expected {expected}")
    for key, (applies, when, ok, expected) in _CONDITIONAL_RANGES.items():
        value = _lookup(cfg, key)
        if applies(cfg) and not ok(value):
            raise ConfigError(f"{source}: {key} = {value!r}: expected {expected} with {when}")


def _check_pairings(cfg: Config, source: str) -> None:
    """Keys that only make sense together: checked when the config is read, not when the first evaluation
    runs (which may be the end of training)."""
    if cfg.head.sample_rate < 1.0 and not cfg.head.shard:
        raise ConfigError(f"{source}: head.sample_rate = {cfg.head.sample_rate!r} needs head.shard = true (Partial FC "
                          f"samples the rows of a class-sharded head)")
    if cfg.head.sample_rate < 1.0 and (cfg.optim.name != "sgd" or cfg.optim.nesterov):
        raise ConfigError(f"{source}: head.sample_rate = {cfg.head.sample_rate!r} needs optim.name = 'sgd' without "
                          f"nesterov (the lazy row-sparse update); got {cfg.optim.name!r}")
    d = cfg.data
    if (d.eval_probes is None) != (d.eval_distractors is None):
        raise ConfigError(f"{source}: data.eval_probes and data.eval_distractors go together, got "
                          f"{d.eval_probes!r} and {d.eval_distractors!r}")


def factory_keywords(factory: Any) -> set[str] | None:
    """The keyword arguments ``factory`` (a class or a function) accepts, or None when it takes any
    (``**kwargs`` that cannot be followed). A class's ``**kwargs`` are followed to its base's ``__init__``."""
    params = factory_parameters(factory)
    return None if params is None else set(params)


def _hints(function: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(function)
    except Exception:  # a hint that does not resolve: no type checks for this factory  # noqa: BLE001
        return {}


def factory_parameters(factory: Any) -> dict[str, Any] | None:
    """{keyword argument: its type hint (``Any`` when none)} of ``factory``, as :func:`factory_keywords` follows
    it, or None when it takes any keyword."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    hints = _hints(factory.__init__ if isinstance(factory, type) else factory)
    names = {p.name: hints.get(p.name, Any) for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        return names
    if not isinstance(factory, type):
        return None
    for base in factory.__mro__[1:]:
        if "__init__" in vars(base):
            if base.__module__.startswith(("torch.", "builtins")):
                return None
            inherited = factory_parameters(base)
            return None if inherited is None else {**inherited, **names}
    return None


_SIMPLE = (float, int, str, bool, type(None))


def is_checkable_hint(hint: Any) -> bool:
    """A hint :func:`_convert` checks as the factory would want: float, int, str, bool, None or a union of them."""
    return hint in _SIMPLE or (_is_union(hint) and all(a in _SIMPLE for a in typing.get_args(hint)))


# the data keys that were flat fields of DataConfig before data.kwargs, and their old defaults: such a key is moved
# into data.kwargs (with a one-line note, once per process), where it is checked as a kwarg; it wins over the same
# key in data.kwargs (so a command line ``data.num_identities=30`` still overrides a config's kwargs). One the source
# does not take was ignored before (``eval_pairs: 0`` for recordio): it is dropped, with a note unless it holds its
# old default (a config saved by an older version lists every field)
FLAT_DATA_KEYS: dict[str, Any] = {
    "num_identities": 1000, "images_per_identity": 20, "difficulty": 1.0, "cache": False, "eval_pairs": 1000,
    "eval_identities": 200, "glyph_charset": "cjk", "glyph_held_out_families": 0, "glyph_variants": 1,
    "glyph_min_coverage": 0.25,
}
_noted_flat_keys: set[str] = set()


def _map_flat_data_keys(data: dict, source: str) -> tuple[dict, dict[str, str]]:
    """``data.<old flat key>`` moved into ``data.kwargs`` (a new dict; ``data`` is not changed).

    Returns ``(data, {key: "data.<key>"})``, the second naming the moved keys as the user wrote them."""
    section = data.get("data")
    if not isinstance(section, dict) or not any(k in FLAT_DATA_KEYS for k in section):
        return data, {}
    section = dict(section)
    kwargs = section.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        return data, {}  # _build names the wrong type of data.kwargs
    kwargs = dict(kwargs)
    spelled = {}
    for key in [k for k in section if k in FLAT_DATA_KEYS]:
        if key in kwargs and kwargs[key] != section[key]:
            logging.getLogger("faceforge").warning("%s: data.%s = %r overrides data.kwargs.%s = %r", source, key,
                                                   section[key], key, kwargs[key])
        kwargs[key] = section.pop(key)
        spelled[key] = f"data.{key}"
        if key not in _noted_flat_keys:
            _noted_flat_keys.add(key)
            logging.getLogger("faceforge").warning("%s: data.%s is deprecated; it now reads data.kwargs.%s",
                                                   source, key, key)
    section["kwargs"] = kwargs
    return {**data, "data": section}, spelled


def _drop_overridden_flat_keys(data: dict, overrides: Sequence[str]) -> None:
    """A ``data.kwargs.<key>=`` override supersedes the config file's old flat ``data.<key>`` (removed, in place),
    which would otherwise win when it is moved into ``data.kwargs``."""
    section = data.get("data")
    if not isinstance(section, dict):
        return
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.startswith("data.kwargs.") and key.removeprefix("data.kwargs.") in FLAT_DATA_KEYS:
            section.pop(key.removeprefix("data.kwargs."), None)


def check_value(value: Any, tp: Any, key: str, source: str) -> Any:
    """``value`` checked (and converted, e.g. an int for a float) against the type hint ``tp``, as config fields
    are; raises :class:`ConfigError` naming ``key``. For the parts' kwargs (``data.kwargs``)."""
    return _convert(value, tp, key, source)


def read_config(path: str | Path, overrides: Sequence[str] = ()) -> dict:
    """Read a YAML config and apply dotted overrides: the dict :func:`parse_config` validates. Raises
    :class:`ConfigError`."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read config file: {e}") from None
    data = _parse_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {brief(data)}")
    _drop_overridden_flat_keys(data, overrides)
    apply_overrides(data, list(overrides), source)
    return data


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so the dict is plain YAML and loads with weights_only=True."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: Config) -> dict[str, Any]:
    """A plain nested dict (str, int, float, bool, None, list, dict) that `config_from_dict` reads back."""
    return _plain(dataclasses.asdict(cfg))


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (fields in declaration order)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
