"""Small model files made in a test (nothing shipped as a blob): a registered backbone's ``model.safetensors``
+ ``model.json``, a ``last.pt`` holding a config and the backbone's weights, and a module that leaves a marker
file when it is imported or called (to show that a file's metadata imports nothing)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from faceforge.backbones import build as build_backbone
from faceforge.deploy.modelfile import META_KEY, MODEL_JSON, MODEL_WEIGHTS, ModelInfo

BACKBONE, DIM, SIZE = "mbf", 8, 32  # a small registered backbone, 8-D embeddings of 32 x 32 crops


def backbone(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_backbone(BACKBONE, embedding_size=DIM, input_size=SIZE).eval()


def write_model(folder: Path, name: str | None = None, json_beside: bool = True, seed: int = 0,
                module: torch.nn.Module | None = None, **meta: Any) -> Path:
    """``folder/model.safetensors`` (+ ``model.json``) of ``module`` (default :func:`backbone`), with metadata
    ``meta`` overriding the defaults (``backbone`` may name anything: the file is crafted)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    module = module if module is not None else backbone(seed)
    info = json.loads(ModelInfo(backbone=BACKBONE, embedding_size=DIM, image_size=SIZE, threshold=0.3,
                                name=name or folder.name).to_json())
    info.update(meta)
    text = json.dumps(info)
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(folder / MODEL_WEIGHTS), metadata={META_KEY: text})
    if json_beside:
        (folder / MODEL_JSON).write_text(text)
    return folder / MODEL_WEIGHTS


def write_checkpoint(path: Path, backbone_name: str = BACKBONE, kwargs: dict[str, Any] | None = None,
                     seed: int = 0) -> Path:
    """A ``last.pt``: the config a run would store (its model section crafted) and the backbone's weights."""
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"output": str(path.parent), "head": {"name": "arcface"},
              "model": {"backbone": backbone_name, "embedding_size": DIM, "kwargs": dict(kwargs or {})},
              "data": {"image_size": SIZE}}
    torch.save({"config": config, "backbone": backbone(seed).state_dict(), "step": 1}, path)
    return path


def marker_module(folder: Path) -> tuple[str, Path]:
    """A module in ``folder`` (put it on sys.path) that writes ``marker`` when imported and when its ``Net`` is
    called; ``Net`` builds the registered backbone, so a trusted load works. Returns (module name, marker)."""
    name = f"planted_{uuid.uuid4().hex[:8]}"
    marker = folder / f"{name}.ran"
    (folder / f"{name}.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "def Net(embedding_size, input_size=112, **kwargs):\n"
        f"    pathlib.Path({str(marker)!r}).write_text('called')\n"
        "    from faceforge.backbones import build\n"
        f"    return build({BACKBONE!r}, embedding_size=embedding_size, input_size=input_size, **kwargs)\n")
    return name, marker


def faces(n: int, seed: int = 0) -> np.ndarray:
    """n random uint8 RGB crops (n, SIZE, SIZE, 3)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)


def save_faces(folder: Path, n: int, seed: int = 0, identities: int = 0) -> list[Path]:
    """n random crops as PNGs in ``folder`` (in ``identities`` sub-folders when > 0)."""
    from PIL import Image

    paths = []
    for k, img in enumerate(faces(n, seed)):
        sub = folder / f"id{k % identities}" if identities else folder
        sub.mkdir(parents=True, exist_ok=True)
        paths.append(sub / f"{k:03d}.png")
        Image.fromarray(img).save(paths[-1])
    return paths
