"""What a training run checks before its first step, so that no input error surfaces hours later.

- :func:`check_run_folder`: ``output`` already holding a run is refused unless the run is resumed (a new
  run would overwrite ``train.log`` and its checkpoint pruning would delete the old run's files).
- :func:`open_evaluators`: every evaluation set of the config (``data.eval_pairs`` / ``eval_bins``,
  ``eval_ijb``, ``eval_probes`` + ``eval_distractors``, ``eval_retrieval``) opened and read, and the first
  image of each image set checked against ``data.image_size``; an error names the config key and the file.
- :func:`check_init_from`: ``model.init_from`` is a readable ``faceforge train`` checkpoint, or a model file
  (``model.safetensors``, e.g. from ``faceforge import-weights``) of this run's backbone.
- :func:`check_resume`: a resumed run's config against its checkpoint's: a change of a key that
  :data:`faceforge.train.lifecycle.RESUME_POLICY` refuses (embedding size, classes, head, ...) stops here.
- :func:`check_head`: the head factory's own check of ``head.kwargs`` against the run (class count, global
  batch), where the factory has one (``faceforge.heads.base.TrainingCheck``: AttFC's batch and container).

Each raises :class:`faceforge.train.config.ConfigError` (a ValueError) with one line:
``<key>: <file>: <what is wrong, what was expected>``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable

from faceforge.core.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from faceforge.train.config import Config, ConfigError, config_from_dict, to_dict
from faceforge.train.lifecycle import APPLIED, MISSING, ConfigChange, config_diff, resume_policy

__all__ = [
    "RunFolderError", "check_backbone", "check_head", "check_init_from", "check_resume", "check_run_folder",
    "open_evaluators", "run_files",
]


class RunFolderError(ConfigError):
    """``output`` already holds a run and ``--resume`` was not given."""


def run_files(output: Path) -> list[Path]:
    """The files of a run in ``output``: its checkpoints and its ``train.log`` (sorted; empty = no run)."""
    if not output.is_dir():
        return []
    found = [output / name for name in (CHECKPOINT_NAME, "train.log") if (output / name).exists()]
    return found + sorted(output.glob("step_*.pt"))


def check_run_folder(output: Path, resume: bool) -> None:
    """Refuse to start a new run in a folder that holds one (``--resume`` continues it)."""
    if resume:
        return
    found = run_files(output)
    if found:
        raise RunFolderError(
            f"output: {output} already holds a run ({found[0].name}); continue it with --resume, "
            f"or set a new output (output=runs/another)"
        )


def _named(key: str, build: Callable[[], Any]) -> Any:
    """``build()``, its input errors re-raised as a ConfigError prefixed with the config key."""
    try:
        return build()
    except ConfigError:
        raise
    except (ValueError, OSError, LookupError, CheckpointError, pickle.UnpicklingError) as e:
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise ConfigError(f"{key}: {' '.join(text.split())}") from e


def _check_first_image(key: str, image_set: Any, size: int) -> None:
    """The first image of an :class:`faceforge.eval.sets.ImageSet` is ``size`` square (read, not resized)."""
    if len(image_set) == 0:
        raise ConfigError(f"{key}: {image_set.path}: no images; expected at least one")
    image = _named(key, lambda: image_set.dataset[0][0])
    if tuple(image.shape) != (size, size, 3):
        raise ConfigError(
            f"{key}: {image_set.describe(0)}: image is {image.shape[1]}x{image.shape[0]} but data.image_size is "
            f"{size}; expected {size}x{size} RGB images (align them first)"
        )


def open_evaluators(cfg: Config) -> list[Any]:
    """Every evaluation set of ``cfg`` (``faceforge.eval.sets.EvalSet``), read and checked now.

    The held-out verification sets (data.name's own pairs, then ``data.eval_bins``, whose image size is
    checked when read; with ``eval.degraded`` each followed by its degraded copy), ``data.eval_ijb``,
    ``data.eval_probes`` among ``data.eval_distractors`` and ``data.eval_retrieval``, in that order; every one
    embeds with the test-time flip unless ``eval.flip`` is false.
    """
    from faceforge.eval.sets import DistractorSet, IJBSet, PairSet, RetrievalSet, degraded_pair_set
    from faceforge.train.data import build_verification_sets

    d, size, flip = cfg.data, cfg.data.image_size, cfg.eval.flip
    key = "data.eval_bins" if d.eval_bins else "data.eval_pairs"
    pairs = [PairSet(name, images, issame, fars=(1e-3, 1e-4), flip=flip)
             for name, (images, issame) in _named(key, lambda: build_verification_sets(cfg)).items()]
    if cfg.eval.degraded and not pairs:
        raise ConfigError(f"eval.degraded = true: data.name {d.name!r} has no held-out pairs and data.eval_bins is "
                          "empty; expected a pair set to degrade (synthetic / glyph pairs or a .bin)")
    sets: list[Any] = [t for p in pairs for t in ((p, degraded_pair_set(p)) if cfg.eval.degraded else (p,))]
    if d.eval_ijb:
        sets.append(_named("data.eval_ijb", lambda: IJBSet(d.eval_ijb, d.eval_ijb_name, flip=flip)))
    if d.eval_probes:
        # data.eval_probes and data.eval_distractors come together (checked when the config was read)
        ident = _named("data.eval_probes", lambda: DistractorSet(d.eval_probes, d.eval_distractors,
                                                                  name="identification", flip=flip))
        _check_first_image("data.eval_probes", ident.probe_set, size)
        _check_first_image("data.eval_distractors", ident.distractor_set, size)
        sets.append(ident)
    if d.eval_retrieval:
        retrieval = _named("data.eval_retrieval", lambda: RetrievalSet(d.eval_retrieval, name="retrieval", flip=flip))
        _check_first_image("data.eval_retrieval", retrieval.images, size)
        sets.append(retrieval)
    return sets


def check_init_from(cfg: Config) -> dict[str, Any] | None:
    """``model.init_from`` read (``weights_only``) as a checkpoint holding a backbone and a head, or as a model
    file (``.safetensors``: ``{"backbone": tensors, "head": None}``, the head starting fresh); None if unset."""
    path = cfg.model.init_from
    if not path:
        return None
    if Path(path).suffix == ".safetensors":
        return {"backbone": _named("model.init_from", lambda: _model_file_backbone(cfg, Path(path))), "head": None}
    state = _named("model.init_from", lambda: load_checkpoint(path))
    missing = [k for k in ("backbone", "head") if not isinstance(state.get(k), dict)]
    if missing:
        raise ConfigError(f"model.init_from: {path}: no {' or '.join(missing)} state in it; expected a checkpoint "
                          f"written by `faceforge train` or a model file (.safetensors)")
    return state


def _model_file_backbone(cfg: Config, path: Path) -> dict[str, Any]:
    """The tensors of a model file whose metadata names this run's backbone and embedding size (safetensors:
    data only, nothing unpickled)."""
    from safetensors.torch import load_file

    from faceforge.deploy.modelfile import ModelFileError, read_safetensors_info

    if not path.is_file():
        raise ConfigError(f"model.init_from: {path}: model file not found")
    info = read_safetensors_info(path)
    m = cfg.model
    if (info.backbone, info.embedding_size) != (m.backbone, m.embedding_size):
        raise ConfigError(f"model.init_from: {path}: a {info.backbone} with embedding size {info.embedding_size}; "
                          f"expected this run's model.backbone {m.backbone} with embedding size {m.embedding_size}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ModelFileError(f"{path}: cannot read safetensors weights: {e}") from None


def check_head(cfg: Config, num_classes: int, world_size: int) -> None:
    """``head.kwargs`` checked by the head factory's ``check_training`` (``faceforge.heads.base.TrainingCheck``),
    if it has one, against ``num_classes`` and the global batch ``data.batch_size x world_size``."""
    from faceforge.heads import HEADS
    from faceforge.heads.base import HeadKwargError, TrainingCheck

    factory = _named("head.name", lambda: HEADS.get(cfg.head.name))
    if not isinstance(factory, TrainingCheck):
        return
    try:
        factory.check_training(dict(cfg.head.kwargs), num_classes=num_classes,
                               global_batch=cfg.data.batch_size * world_size)
    except HeadKwargError as e:
        raise ConfigError(f"head.kwargs.{e}") from None


def check_resume(cfg: Config, checkpoint: Path, saved: dict[str, Any]) -> list[ConfigChange]:
    """The changes of ``cfg`` since ``saved`` (the checkpoint's config dict) that a resumed run applies; the first
    change that :func:`faceforge.train.lifecycle.resume_policy` refuses raises ConfigError naming the key and both
    values. A key the checkpoint's config lacks (written by an older faceforge) is applied."""
    try:  # a checkpoint of an older faceforge: its flat data keys read as data.kwargs, like a user's old YAML
        saved = to_dict(config_from_dict(saved, str(checkpoint)))
    except ConfigError:
        pass  # compared as written: every differing key is then named by the policy below
    changes = config_diff(saved, to_dict(cfg))
    for change in changes:
        rule = resume_policy(change.key)
        if rule.policy != APPLIED and change.old is not MISSING:
            raise ConfigError(
                f"{change.key}: {checkpoint} was trained with {change.old!r}, this run asks for {change.new!r}; "
                f"expected the same value on --resume ({rule.why}); to change it, start a new run (model.init_from "
                f"keeps the weights)"
            )
    return changes


def check_backbone(cfg: Config) -> None:
    """``model.backbone`` names a registered backbone (or imports as ``package.module:callable``)."""
    from faceforge.backbones import BACKBONES

    _named("model.backbone", lambda: BACKBONES.get(cfg.model.backbone))
