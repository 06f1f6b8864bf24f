"""A tiny untrained `faceforge train`-style run folder for the eval path/trust/link tests (importable as
`_tiny_run`): ``last.pt`` (registered backbone r18 at quarter width, 32x32, 16-D), ``model.safetensors`` +
``model.json`` with the same metrics, and a small ``.bin`` of synthetic pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from faceforge.data.pairs import write_bin
from faceforge.data.synthetic import synthetic_pairs
from faceforge.deploy.modelfile import write_model_files
from faceforge.core.checkpoint import save_checkpoint
from faceforge.train.config import config_from_dict, to_dict

SIZE = 32
STEP = 7
METRICS = {"threshold": 0.3, "threshold_far": 0.01, "accuracy": 0.5}  # what a run's last evaluation logged

CONFIG: dict[str, Any] = {
    "seed": 0,
    "output": "unused",
    "model": {"backbone": "r18", "embedding_size": 16, "kwargs": {"width": 0.25}},
    "head": {"name": "arcface"},
    "data": {"name": "synthetic", "num_identities": 8, "images_per_identity": 4, "image_size": SIZE,
             "batch_size": 16, "eval_pairs": 40, "eval_identities": 20},
    "train": {"steps": 1, "progress": False},
}


def tiny_run(folder: Path, seed: int = 0, model_files: bool = True, **data: Any) -> Path:
    """``folder/last.pt`` (and ``model.safetensors`` / ``model.json``) of an untrained backbone; ``data``
    overrides the config's data section. Returns the checkpoint path."""
    from faceforge.build import build_backbone

    cfg = config_from_dict({**CONFIG, "output": str(folder), "data": {**CONFIG["data"], **data}})
    torch.manual_seed(seed)
    backbone = build_backbone(cfg).eval()
    state = {"config": to_dict(cfg), "backbone": backbone.state_dict(), "step": STEP, "metrics": dict(METRICS)}
    ckpt = save_checkpoint(folder / "last.pt", state)
    if model_files:
        write_model_files(folder, backbone, cfg, dict(METRICS), None, STEP)
    return ckpt


def pairs_bin(path: Path, pairs: int = 24, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A ``.bin`` of ``pairs`` synthetic test pairs at 32x32: ``(path, issame)``."""
    images, issame = synthetic_pairs(pairs, num_identities=50, image_size=SIZE, split="test", seed=seed)
    write_bin(path, images, issame)
    return path, np.asarray(issame, dtype=bool)
