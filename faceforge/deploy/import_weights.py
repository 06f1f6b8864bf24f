"""``faceforge import-weights``: an arcface_torch backbone checkpoint -> a faceforge model file.

    faceforge import-weights model.pt --backbone r100 --out runs/arcface_r100
    faceforge eval runs/arcface_r100/model.safetensors --bin lfw.bin

arcface_torch saves its backbone as a plain state dict (``model.pt``, ``torch.save(backbone.state_dict())``)
and, while training, inside ``checkpoint_gpu_<rank>.pt`` under ``state_dict_backbone``; both are read
(``torch.load(weights_only=True)``: tensors only, nothing unpickled runs), and a ``module.`` prefix (a
DDP-wrapped save) is dropped. faceforge's IResNet, MobileFaceNet and ViT carry arcface_torch's module
names, so the keys map one to one; the file must hold exactly the keys of the backbone named, with its
shapes, or nothing is written and one line names the keys that do not map. The result,
``OUT/model.safetensors`` + ``OUT/model.json`` (:func:`faceforge.deploy.modelfile.write_model_files`), is what
``faceforge eval / embed / verify / search / export`` and :func:`faceforge.load_model` take.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # torch loads when a command runs, not when the command line is parsed
    import torch
    from torch import nn

__all__ = ["add_command", "arcface_torch_state_dict", "import_weights", "map_state_dict"]

BACKBONE_KEY = "state_dict_backbone"  # arcface_torch's training checkpoints (checkpoint_gpu_<rank>.pt)
DDP_PREFIX = "module."
SHOWN = 5  # keys named per kind of mismatch in the one-line error


def arcface_torch_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The backbone tensors of an arcface_torch ``.pt`` / ``.pth``: a plain state dict or a training
    checkpoint's ``state_dict_backbone``; a ``module.`` prefix on every key is dropped."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint not found")
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of a file that is not a torch save, or holds more than tensors
        raise ValueError(f"{p}: not a torch state dict of tensors ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if isinstance(data, dict) and isinstance(data.get(BACKBONE_KEY), dict):
        data = data[BACKBONE_KEY]
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{p}: expected an arcface_torch backbone state dict (or a checkpoint with "
                         f"{BACKBONE_KEY!r}), got {type(data).__name__}{' (empty)' if isinstance(data, dict) else ''}")
    bad = [str(k) for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{p}: {bad[0]}: not a tensor; expected a state dict of tensors only")
    if all(k.startswith(DDP_PREFIX) for k in data):
        data = {k[len(DDP_PREFIX):]: v for k, v in data.items()}
    return data


def map_state_dict(state: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """``state`` checked against ``model.state_dict()``: the same keys, each with the model's shape, cast
    to the model's dtype. Otherwise a ValueError naming, in one line, the keys only the file has, the keys
    it lacks and the keys whose shapes differ."""
    target = model.state_dict()
    extra = [k for k in state if k not in target]
    missing = [k for k in target if k not in state]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:SHOWN])}{', ...' if len(keys) > SHOWN else ''}"
                for what, keys in (("not in the backbone", extra), ("missing from the file", missing),
                                   ("shape file vs backbone", shapes)) if keys]
    if problems:
        raise ValueError(f"{source}: keys that do not map: {'; '.join(problems)}")
    return {k: state[k].to(target[k].dtype) for k in target}


def import_weights(path: str | os.PathLike, backbone: str, output: str | os.PathLike,
                   embedding_size: int = 512, image_size: int = 112, backbone_kwargs: dict[str, Any] | None = None,
                   ) -> tuple[Path, Path]:
    """Write ``output/model.safetensors`` and ``output/model.json`` holding the arcface_torch checkpoint
    ``path`` as faceforge's registered ``backbone`` (``r100``, ``mbf``, ``vit_b``, ...) of
    ``embedding_size`` at ``image_size``. Everything is checked before anything is written. Returns
    both paths."""
    from faceforge.build import build_backbone
    from faceforge.deploy.modelfile import write_model_files
    from faceforge.core.config import parse_config

    out = Path(output)
    cfg, _ = parse_config({
        "output": str(out), "head": {"name": "arcface"},
        "model": {"backbone": backbone, "embedding_size": embedding_size, "kwargs": dict(backbone_kwargs or {})},
        "data": {"image_size": image_size},
    }, source="command line")
    state = arcface_torch_state_dict(path)
    model = build_backbone(cfg)
    model.load_state_dict(map_state_dict(state, model, f"{path} as {backbone} ({embedding_size}-D)"), strict=True)
    return write_model_files(out, model.eval(), cfg)


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    weights, meta = import_weights(args.checkpoint, args.backbone, args.out, embedding_size=args.embedding_size)
    print(f"weights: {weights}")
    print(f"model:   {meta} ({args.backbone}, {args.embedding_size}-D, 112x112)")
    return 0


def add_command(sub: Any, commands: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add ``import-weights`` to the ``faceforge`` subcommands ``sub``."""
    p = sub.add_parser("import-weights", help="an arcface_torch backbone checkpoint (.pt/.pth) -> model.safetensors + model.json",
                       description="Read an arcface_torch backbone state dict (model.pt, or a training checkpoint's "
                                   "state_dict_backbone) into a faceforge model file that eval, embed, verify, search "
                                   "and export take. The keys must map one to one; those that do not are named.")
    p.add_argument("checkpoint", help="arcface_torch .pt / .pth (loaded with weights_only=True)")
    p.add_argument("--backbone", required=True,
                   help="the faceforge backbone it is: r18/r34/r50/r100/r200, mbf, mbf_large, vit_t/vit_s/vit_b/vit_l, ... (required, no default)")
    p.add_argument("--out", required=True, help="folder for model.safetensors and model.json (required, no default)")
    p.add_argument("--embedding-size", type=int, default=512, help="the checkpoint's num_features (default 512)")
    commands["import-weights"] = _run
