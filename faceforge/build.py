"""Builders shared by train, eval, demo and export: backbones and heads from a config, models from checkpoints.

- :func:`build_backbone` (``model.backbone``, ``model.embedding_size``, ``data.image_size``, ``model.kwargs``);
- :func:`build_head` (``head.name``, ``head.kwargs``, the number of classes of the training data);
- :func:`load_backbone`: a ``faceforge train`` checkpoint -> ``(backbone with its weights, Config)``;
- :func:`load_class_weights`: another run's head weights into this run's head (``model.init_from``), across a
  wrapper head (BroadFace keeps the head it wraps as ``head``; its checkpoint entries are ``head.*``);
- :class:`FaceModel` and :func:`wrap_ddp`: backbone + head as one module, in one DDP (for benchmarks and
  tests; the trainer wraps the backbone only, ``faceforge.train.engine``).

Backbones and heads are named as their registries name them, or as ``"package.module:callable"``.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from faceforge.heads import HEADS
from faceforge.heads.base import (
    ClassRows,
    HeadKwargError,
    HeadWrapper,
    check_kwarg_ranges,
    unopted_hooks,
    with_run_facts,
)
from faceforge.heads.parallel import build_sharded, seed_class_rows
from faceforge.core.registry import untrusted
from faceforge.core.checkpoint import load_checkpoint
from faceforge.core.config import Config, ConfigError, parse_config

__all__ = ["ENCODERS", "FaceModel", "build_backbone", "build_head", "check_shapes", "load_backbone", "load_class_weights",
           "wrap_ddp"]


def build_backbone(cfg: Config) -> nn.Module:
    """``faceforge.backbones.build(model.backbone, embedding_size, input_size=data.image_size, **model.kwargs)``,
    with ``set_grad_checkpointing`` as ``model.grad_checkpointing`` says."""
    from faceforge.backbones import BACKBONES

    kwargs = {"input_size": cfg.data.image_size, **cfg.model.kwargs}
    factory = BACKBONES.get(cfg.model.backbone)  # an unknown or refused (untrusted import) name is no kwargs error
    with _naming_kwargs("model", cfg.model.backbone):
        backbone = factory(embedding_size=cfg.model.embedding_size, **kwargs)
    mode = cfg.model.grad_checkpointing
    if mode:
        if not callable(getattr(backbone, "set_grad_checkpointing", None)):
            raise ValueError(f"model.grad_checkpointing = {mode!r}: backbone {cfg.model.backbone!r} has no "
                             "set_grad_checkpointing(enable, granularity); expected false for it")
        backbone.set_grad_checkpointing(True, granularity="block" if mode is True else mode)
    return backbone


def build_head(cfg: Config, num_classes: int, global_batch: int | None = None) -> nn.Module:
    """``faceforge.heads.build(head.name, num_classes=..., embedding_size=..., **head.kwargs)``; with ``head.shard``
    the class-sharded ``faceforge.heads.parallel.build_sharded(head.name, ...)`` (its rows seeded by ``seed``).

    Before it is built, ``head.kwargs`` are checked against the ranges the head declares (``KWARG_RANGES``,
    ``heads.base.check_kwarg_ranges``); once built, a head (or a head it wraps) that defines a ``TrainHooks``
    member without opting in, or a margin hook no strategy applies, is refused. Each a ``ConfigError`` naming
    ``head.kwargs.<key>`` or ``head.name``. Building it draws nothing from the global torch RNG (forked), so the
    backbone's random draws are the same with ``head.shard`` true or false. ``global_batch`` (images per forward
    over all ranks) is a run fact
    passed to a head that declares it (``heads.base.TakesRunFacts``: AttFC's ``batch_size``) when the config
    leaves it out, and so is the run's ``seed`` (ElasticFace's ``margin_seed``, the key of its margin draw)."""
    factory = HEADS.get(cfg.head.name)
    try:
        check_kwarg_ranges(factory, cfg.head.kwargs)
    except HeadKwargError as e:
        raise ConfigError(f"head.kwargs.{e}") from None
    kwargs = with_run_facts(factory, cfg.head.kwargs, {"global_batch": global_batch, "seed": cfg.seed})
    # the head's own init draws (then overwritten by (seed, row)) differ with its rows: sharded or not, they must not
    # move the global torch RNG, from which the backbone later draws (dropout, drop path, ViT token masking)
    with torch.random.fork_rng(devices=[]):
        if cfg.head.shard:
            with _naming_kwargs("head", cfg.head.name):
                head = build_sharded(cfg.head.name, num_classes, cfg.model.embedding_size, seed=cfg.seed,
                                     sample_rate=cfg.head.sample_rate, **kwargs)
        else:
            with _naming_kwargs("head", cfg.head.name):
                head = HEADS.build(cfg.head.name, num_classes=num_classes, embedding_size=cfg.model.embedding_size,
                                   **kwargs)
            seed_every_class_row(head, cfg.seed)
    check_built_head(head, cfg.head.name)
    return head


def seed_every_class_row(head: nn.Module, seed: int) -> None:
    """The class rows of an unsharded head (or of the head a wrapper holds) from (seed, row), as a class-sharded
    run seeds its shards (``heads.parallel.seed_class_rows``): ``head.shard`` true or false, any world size,
    starts from the same W. A head without class rows (``heads.base.ClassRows``) keeps its own init."""
    part: Any = head
    while True:
        if isinstance(part, ClassRows):
            with torch.no_grad():
                seed_class_rows(part, (0, int(part.weight.shape[0])), seed)
        if not isinstance(part, HeadWrapper):
            return
        part = part.head


def check_built_head(head: nn.Module, name: str) -> None:
    """Refuse (ConfigError naming ``head.name`` and the member) a head, or a head it wraps, that defines a
    ``TrainHooks`` member without subclassing ``TrainHooks`` (the trainer would never call it)."""
    part: Any = head
    while True:
        members = unopted_hooks(part)
        if members:
            raise ConfigError(
                f"head.name: {name!r}: {type(part).__name__}.{members[0]} is a TrainHooks member, but "
                f"{type(part).__name__} does not subclass faceforge.heads.base.TrainHooks, so the trainer would never "
                f"call it; expected class {type(part).__name__}(nn.Module, TrainHooks)"
            )
        if not isinstance(part, HeadWrapper):
            return
        part = part.head


@contextlib.contextmanager
def _naming_kwargs(section: str, name: str) -> Iterator[None]:
    """A factory's TypeError about a keyword argument (unknown, or given twice: ArcFace sets ``m2`` from ``m``)
    as a ConfigError naming ``<section>.kwargs.<key>``; its ValueError (a value out of range) naming the section."""
    try:
        yield
    except TypeError as e:
        match = re.search(r"keyword argument '(\w+)'", str(e))
        if match is None:
            raise
        raise ConfigError(f"{section}.kwargs.{match.group(1)}: {name!r} does not take it here ({e})") from None
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        if isinstance(e, HeadKwargError):  # a nested kwarg a head names itself (broadface's head_kwargs.m)
            raise ConfigError(f"{section}.kwargs.{e}") from None
        raise ConfigError(f"{section}.kwargs ({section} {name!r}): {e}") from None


# `faceforge eval --encoder` names -> load_backbone's encoder: the trained backbone, or AttFC's momentum class
# encoder (the objective-owned module "momentum", a MomentumEncoder whose backbone copy is "momentum.encoder")
ENCODERS: dict[str, str] = {"query": "backbone", "momentum": "momentum.encoder"}


def load_backbone(
    checkpoint: str | Path | dict[str, Any], map_location: str | torch.device = "cpu", source: str | None = None,
    encoder: str = "backbone", trust_code: bool = False,
) -> tuple[nn.Module, Config]:
    """The backbone of a ``faceforge train`` checkpoint, with its weights, and the run's config.

    checkpoint: a path (read with ``weights_only=True``) or an already loaded checkpoint dict; ``source``
    names it in errors (default: the path). ``encoder``: ``"backbone"`` (the trained one, default) or the
    name of a module the run's objective owned with the backbone's architecture (a momentum encoder, saved
    under the checkpoint's ``objective`` key as ``<name>.*``; "query" and "momentum" are AttFC's names,
    :data:`ENCODERS`). The checkpoint is data: its config may name only registered backbones
    (``faceforge.core.registry.untrusted``) unless ``trust_code``. The weights' shapes are compared with the
    backbone built on the meta device before it is built for real (:func:`check_shapes`). Raises
    ``CheckpointError`` for an unreadable file and ValueError (naming the file) for one without ``config`` /
    ``backbone`` entries, without that encoder, naming an import, or whose weights do not fit the backbone
    its config names.
    """
    source = source or ("<checkpoint>" if isinstance(checkpoint, dict) else str(checkpoint))
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, map_location)
    if "config" not in state or "backbone" not in state:
        raise ValueError(f"{source}: not a `faceforge train` checkpoint (no 'config' / 'backbone' entry)")
    cfg, _ = parse_config(state["config"], source=source)  # the model section is what it reads
    encoder = ENCODERS.get(encoder, encoder)
    if encoder == "backbone":
        weights = state["backbone"]
    else:
        prefix = f"{encoder}."
        owned = state.get("objective", {})
        weights = {key.removeprefix(prefix): value for key, value in owned.items() if key.startswith(prefix)}
        if not weights:
            names = sorted({key.split(".", 1)[0] for key in owned})
            raise ValueError(f"{source}: no encoder {encoder!r}; expected 'backbone' or one the objective owned: "
                             f"{', '.join(names) or 'none'}")
    what = f"{source}: the {encoder}"
    _require_state_dict(weights, what)
    with untrusted(f"{source}: model.backbone", trust_code):
        check_shapes(lambda: build_backbone(cfg), {k: tuple(v.shape) for k, v in weights.items()
                                                    if isinstance(v, torch.Tensor)}, what)
        backbone = build_backbone(cfg)  # random init, then every weight loaded
    load_part(backbone, weights, what)
    return backbone, cfg


def check_shapes(build: Any, shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """Compare the state dict of ``build()`` -- run on the meta device, so nothing is allocated whatever sizes a
    file claims -- with ``shapes`` (name -> shape of the weights in the file). ValueError naming ``what`` and
    the first missing, unexpected or mismatched tensor."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [k for k in expected if k in shapes and expected[k] != tuple(shapes[k])]
    if missing or unexpected or wrong:
        first = (f"{wrong[0]} is {list(shapes[wrong[0]])} in the file, the backbone needs {list(expected[wrong[0]])}"
                 if wrong else f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}")
        raise ValueError(f"{what}: the weights do not fit the backbone the metadata describes: {first} ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(wrong)} of another shape)")


def load_part(module: nn.Module, state: Any, what: str) -> None:
    """``module.load_state_dict(state)``; a mismatch is a ValueError naming ``what`` (file and part)."""
    _require_state_dict(state, what)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{what} does not fit this run's {type(module).__name__}: {e}") from None


def _require_state_dict(state: Any, what: str) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"{what}: no state dict in the checkpoint; expected a `faceforge train` checkpoint")


def _classifier(head: nn.Module) -> nn.Module:
    """The module that holds the class weights: a wrapper head's ``head`` (``heads.base.HeadWrapper``), else ``head``."""
    return head.head if isinstance(head, HeadWrapper) else head


def load_class_weights(head: nn.Module, head_state: Any, what: str) -> None:
    """Load a checkpoint's head class weights into ``head`` (not a wrapper's own state, e.g. BroadFace's queue).

    Works across wrappers: an ArcFace run starts a BroadFace(ArcFace) run and back. ``what`` names the source
    in errors (ValueError).
    """
    if isinstance(head_state, dict):
        inner = {key.removeprefix("head."): value for key, value in head_state.items() if key.startswith("head.")}
        head_state = inner or head_state
    load_part(_classifier(head), head_state, what)


class FaceModel(nn.Module):
    """Backbone + head as one module: ``loss = model(images (B, 3, H, W), labels (B,))``.

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
