"""The weights a user takes away from a run: ``model.safetensors`` (the backbone only) and ``model.json``.

Every checkpoint save of ``faceforge train`` also writes these two files beside ``last.pt``
(:func:`write_model_files`). ``model.json`` (:class:`ModelInfo`) says how to rebuild and feed the
backbone: its registry name and kwargs, the embedding size, the image size and normalisation, whether
the test-time flip is summed in, and the verification threshold of the run with where it came from
and its false accept rate when known. The same JSON is stored in the safetensors header (key
``faceforge``), so ``model.safetensors`` alone is enough.

Nothing here unpickles: safetensors holds tensors only, and checkpoints load with ``weights_only=True``.
Nothing here imports code a file names: ``model.json``, the header and a checkpoint's config may name only
registered backbones unless the caller passes ``trust_code=True`` (:mod:`faceforge.core.registry`). Sizes are
bounded and the weights' shapes are compared with the metadata before the backbone is built.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from faceforge.core.fileio import atomic_files

__all__ = [
    "FORMAT",
    "META_KEY",
    "MODEL_JSON",
    "MODEL_WEIGHTS",
    "ModelFileError",
    "ModelInfo",
    "backbone_from_checkpoint",
    "build_backbone_from_info",
    "head_norm_is_quality",
    "load_backbone",
    "model_info_from_config",
    "quality_note",
    "read_safetensors_info",
    "write_model_files",
]

MODEL_WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"
META_KEY = "faceforge"  # the safetensors header / ONNX metadata key that holds model.json
FORMAT = "faceforge-model/1"
# Bounds on what a model file may claim, far above any face model (512-D embeddings, 112..224 px crops; the
# largest published recognition embeddings are 4096-D), far below what would exhaust memory when built.
MAX_EMBEDDING_SIZE = 16384
MAX_IMAGE_SIZE = 1024
# The smallest std: (x - mean) in float32 carries a rounding error of up to eps32 * 255 / 2 for pixel values
# near 255; divided by a std below eps32 * 255 (3.0e-5) that error alone exceeds 1/2 in normalised units.
MIN_STD = float(np.finfo(np.float32).eps) * 255.0


class ModelFileError(ValueError):
    """A model file that is missing, not ours, or whose metadata is incomplete; the message names it."""


@dataclass
class ModelInfo:
    """How to rebuild and feed a backbone (the content of ``model.json``).

    backbone / backbone_kwargs / embedding_size: ``faceforge.backbones.build(backbone, embedding_size,
    input_size=image_size, **backbone_kwargs)`` (or ``"package.module:callable"``). image_size: side S of
    the aligned square crop, pixels. mean / std: per-channel, in the 0..255 scale of ``channel_order``
    ("RGB" or "BGR"): the network sees ``(x - mean) / std``. flip_test: embeddings are
    ``f(x) + f(flip(x))`` (then L2-normalised). threshold: cosine at or above which a pair is "same";
    threshold_source: how it was obtained; threshold_far: its false accept rate there, when known.
    step: the optimiser step of the weights. name: a label for reports. head: the training head's name (None when
    unknown: a foreign or older file); norm_is_quality: that head trains the raw embedding's norm as an image-quality
    score (MagFace's magnitude, AdaFace's norm; :func:`head_norm_is_quality`), read by ``Recognizer.quality``.
    """

    backbone: str
    embedding_size: int
    image_size: int = 112
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)
    channel_order: str = "RGB"
    flip_test: bool = True
    threshold: float | None = None
    threshold_source: str | None = None
    threshold_far: float | None = None
    step: int | None = None
    name: str = ""
    head: str | None = None
    norm_is_quality: bool = False
    format: str = FORMAT

    def to_json(self) -> str:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return json.dumps(d, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "ModelInfo":
        """Validate a dict (``model.json``, a safetensors header, ONNX metadata); errors name ``source`` and the key."""
        if not isinstance(data, dict):
            raise ModelFileError(f"{source}: expected a JSON object with faceforge model metadata, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelFileError(f"{source}: {unknown[0]}: unknown key (expected one of {', '.join(sorted(known))})")
        for key in ("backbone", "embedding_size"):
            if key not in data:
                raise ModelFileError(f"{source}: {key}: missing (faceforge model metadata needs backbone, embedding_size)")
        info = cls(**data)
        _check(info, source)
        return info


def _check(info: ModelInfo, source: str) -> None:
    def bad(key: str, expected: str) -> ModelFileError:
        return ModelFileError(f"{source}: {key}: got {getattr(info, key)!r}, expected {expected}")

    if not isinstance(info.backbone, str) or not info.backbone:
        raise bad("backbone", "a backbone name")
    for key, top in (("embedding_size", MAX_EMBEDDING_SIZE), ("image_size", MAX_IMAGE_SIZE)):
        v = getattr(info, key)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
            raise bad(key, f"an int in [1, {top}]")
    if not isinstance(info.backbone_kwargs, dict):
        raise bad("backbone_kwargs", "a JSON object")
    for key in ("mean", "std"):
        v = getattr(info, key)
        if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(_is_number(x) and math.isfinite(x) for x in v):
            raise bad(key, "3 finite numbers (per channel, 0..255 scale)")
        setattr(info, key, tuple(float(x) for x in v))
    if not all(0.0 <= m <= 255.0 for m in info.mean):
        raise bad("mean", "3 numbers in [0, 255] (per channel, 0..255 scale)")
    if not all(s >= MIN_STD for s in info.std):
        raise bad("std", f"3 numbers >= {MIN_STD:.3g} (float32 resolution of the 0..255 scale)")
    if info.channel_order not in ("RGB", "BGR"):
        raise bad("channel_order", "'RGB' or 'BGR'")
    if not isinstance(info.flip_test, bool):
        raise bad("flip_test", "true or false")
    if not isinstance(info.norm_is_quality, bool):
        raise bad("norm_is_quality", "true or false")
    if info.head is not None and not isinstance(info.head, str):
        raise bad("head", "a head name or null")
    for key in ("threshold", "threshold_far"):
        v = getattr(info, key)
        if v is not None and not (_is_number(v) and math.isfinite(v)):
            raise bad(key, "a finite number or null")
    if info.format != FORMAT:
        raise bad("format", repr(FORMAT))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------------------
# From a training config and its evaluation
# --------------------------------------------------------------------------------------------------


def threshold_from_run(metrics: dict[str, float] | None, learned: float | None) -> tuple[float | None, str | None, float | None]:
    """``(threshold, source, far)`` of a run: the head's learned threshold (SphereFace2) when it has one,
    else the best-threshold-accuracy threshold of the first evaluation set (``<set>/threshold`` or
    ``threshold`` in the run's metrics), with its false accept rate when the metrics carry it
    (``threshold_far``)."""
    metrics = metrics or {}
    if learned is not None:
        return float(learned), "learned by the head (SphereFace2)", None
    for key, value in metrics.items():
        if key == "threshold" or key.endswith("/threshold"):
            prefix = key[: -len("threshold")]
            where = prefix.rstrip("/") or "held-out pairs"
            far = metrics.get(f"{prefix}threshold_far")
            return float(value), f"best-threshold accuracy on {where}", None if far is None else float(far)
    return None, None, None


def head_norm_is_quality(name: Any, kwargs: Any) -> bool:
    """Whether the registered head ``name`` trains the raw embedding's norm as a quality score: its class attribute
    ``norm_is_quality`` (MagFace, AdaFace). A head that wraps another by name (``broadface``: ``kwargs["head"]``,
    ``kwargs["head_kwargs"]``) answers for its inner head. An imported head (``"package.module:Class"``) is never
    imported here: False."""
    from faceforge.heads import HEADS

    if not isinstance(name, str) or name not in HEADS:
        return False
    flag = getattr(HEADS.get(name), "norm_is_quality", None)
    if flag is not None:
        return bool(flag)
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    return head_norm_is_quality(kwargs.get("head"), kwargs.get("head_kwargs"))


def quality_note(info: ModelInfo) -> str | None:
    """None for a model whose head trains its norm as a quality (``info.norm_is_quality``), else the one-line note that
    its embedding norm is not a calibrated quality score (it is still returned: a note, not an error)."""
    if info.norm_is_quality:
        return None
    head = f"head {info.head!r}" if info.head else "an unknown head (its metadata names none)"
    return (f"{info.name or 'model'}: the norm of a model trained with {head} is not a calibrated quality score "
            "(only a norm-aware head, magface or adaface, trains it as one)")


def model_info_from_config(cfg: Any, metrics: dict[str, float] | None = None, learned_threshold: float | None = None,
                           step: int | None = None) -> ModelInfo:
    """The :class:`ModelInfo` of a training :class:`~faceforge.train.config.Config` and its run's metrics."""
    threshold, source, far = threshold_from_run(metrics, learned_threshold)
    kwargs = dict(cfg.model.kwargs)
    image_size = kwargs.get("input_size", cfg.data.image_size)  # the backbone's input_size wins, as in build_backbone
    return ModelInfo(
        backbone=cfg.model.backbone, embedding_size=cfg.model.embedding_size,
        image_size=image_size if isinstance(image_size, int) else cfg.data.image_size, backbone_kwargs=kwargs,
        flip_test=cfg.eval.flip,  # the run's evaluations (and so its threshold) embed this way
        threshold=threshold, threshold_source=source, threshold_far=far, step=step,
        name=Path(str(cfg.output)).name, head=cfg.head.name,
        norm_is_quality=head_norm_is_quality(cfg.head.name, cfg.head.kwargs),
    )


def _tensors(backbone: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in backbone.state_dict().items()}


def write_model_files(output: str | os.PathLike, backbone: nn.Module, cfg: Any, metrics: dict[str, float] | None = None,
                      learned_threshold: float | None = None, step: int | None = None) -> tuple[Path, Path]:
    """Write ``output/model.safetensors`` (the backbone's state_dict, the metadata in its header) and
    ``output/model.json``, atomically and together. Returns both paths. Called at every checkpoint save."""
    from safetensors.torch import save

    info = model_info_from_config(cfg, metrics, learned_threshold, step)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    weights, meta = out / MODEL_WEIGHTS, out / MODEL_JSON
    with atomic_files((weights, "wb"), (meta, "w")) as (fw, fm):  # both or neither
        fw.write(save(_tensors(backbone), metadata={META_KEY: info.to_json()}))
        fm.write(info.to_json())
    return weights, meta


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_safetensors_info(path: Path) -> ModelInfo:
    """The metadata of ``model.safetensors``: ``model.json`` beside it if there, else the file's header."""
    from safetensors import safe_open

    beside = path.with_name(MODEL_JSON)
    if beside.is_file():
        try:
            data = json.loads(beside.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelFileError(f"{beside}: cannot read JSON: {e}") from None
        return ModelInfo.from_dict(data, str(beside))
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ModelFileError(f"{path}: not a safetensors file: {e}") from None
    if META_KEY not in header:
        raise ModelFileError(f"{path}: no faceforge metadata (no {MODEL_JSON} beside it and no {META_KEY!r} key in "
                             "its header); expected a model.safetensors written by faceforge")
    try:
        data = json.loads(header[META_KEY])
    except ValueError as e:
        raise ModelFileError(f"{path}: header key {META_KEY!r}: not JSON: {e}") from None
    return ModelInfo.from_dict(data, f"{path} (header)")


def build_backbone_from_info(info: ModelInfo) -> nn.Module:
    """A freshly initialised backbone as ``info`` describes it (``faceforge train``'s own builder). Called by
    the loaders inside ``faceforge.core.registry.untrusted``, so that a file's metadata names no import."""
    from faceforge.build import build_backbone
    from faceforge.core.config import parse_config

    cfg, _ = parse_config({
        "output": info.name or "model", "head": {"name": "arcface"},
        "model": {"backbone": info.backbone, "embedding_size": info.embedding_size, "kwargs": dict(info.backbone_kwargs)},
        "data": {"image_size": info.image_size},
    }, source=f"model metadata of {info.name or 'a model'}")
    return build_backbone(cfg)


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The model file a user named: a run folder gives its ``model.safetensors``, else its ``last.pt``;
    a file is returned as it is. Raises ModelFileError when the folder holds neither or the file is missing."""
    p = Path(path)
    if p.is_dir():
        for name in (MODEL_WEIGHTS, "last.pt"):
            if (p / name).is_file():
                return p / name
        raise ModelFileError(f"{path}: no {MODEL_WEIGHTS} or last.pt in this folder (expected a `faceforge train` run)")
    if not p.is_file():
        raise ModelFileError(f"{p}: model file not found")
    return p


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in a safetensors file, from its header (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ModelFileError(f"{path}: not a safetensors file: {e}") from None


def load_backbone(path: str | os.PathLike, trust_code: bool = False) -> tuple[nn.Module, ModelInfo]:
    """``(backbone in eval mode, info)`` from ``model.safetensors`` (+ ``model.json``).

    The metadata may name only a registered backbone unless ``trust_code``; the file's tensor shapes are
    compared with the backbone built on the meta device before anything is allocated."""
    from safetensors.torch import load_file

    from faceforge.build import check_shapes
    from faceforge.core.registry import untrusted

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    info = read_safetensors_info(path)
    shapes = _safetensors_shapes(path)
    with untrusted(f"{path}: backbone", trust_code):
        try:
            check_shapes(lambda: build_backbone_from_info(info), shapes, str(path))
        except ValueError as e:  # the message names the file
            raise ModelFileError(str(e)) from None
        backbone = build_backbone_from_info(info)
    try:
        state = load_file(str(path))
    except Exception as e:
        raise ModelFileError(f"{path}: cannot read safetensors weights: {e}") from None
    _load_state(backbone, state, path)
    return backbone.eval(), info


def _load_state(backbone: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        backbone.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ModelFileError(f"{path}: weights do not fit the backbone its metadata describes: "
                             f"{' '.join(line.strip() for line in first[:3])}") from None


def backbone_from_checkpoint(path: str | os.PathLike, trust_code: bool = False) -> tuple[nn.Module, ModelInfo]:
    """``(backbone in eval mode, info)`` from a ``faceforge train`` checkpoint (``weights_only`` load); its
    config may name only a registered backbone unless ``trust_code``."""
    from faceforge.build import load_backbone as load_checkpoint_backbone
    from faceforge.core.checkpoint import THRESHOLD_KEY, CheckpointError, load_checkpoint

    path = Path(path)
    try:
        state = load_checkpoint(path)
        backbone, cfg = load_checkpoint_backbone(state, source=str(path), trust_code=trust_code)
    except (CheckpointError, ValueError) as e:  # ConfigError is a ValueError
        raise ModelFileError(str(e)) from None
    info = model_info_from_config(cfg, state.get("metrics"), state.get(THRESHOLD_KEY), state.get("step"))
    info.name = path.parent.name or path.stem
    return backbone.eval(), info
