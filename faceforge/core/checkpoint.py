"""Checkpoints: atomic writes (a crash never leaves a half-written ``last.pt``) and safe loads.

A checkpoint is a dict of tensors and plain containers (str, int, float, bool, None, list, dict), so
it loads with ``torch.load(..., weights_only=True)``: no pickled classes, no numpy objects.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from faceforge.core.fileio import atomic_open

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "save_checkpoint", "load_checkpoint"]

CHECKPOINT_NAME = "last.pt"  # a run's latest checkpoint, in its output folder
THRESHOLD_KEY = "verification_threshold"  # a checkpoint's learned universal threshold (SphereFace2), or None


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated, corrupt or holds something other than a dict."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (``faceforge.core.fileio.atomic_open``: temp file in the same folder,
    fsync, ``os.replace``, fsync of the folder).

    A process killed at any moment leaves either the old file or the new one at ``path`` (and at worst
    a stray ``.<name>.tmp-*`` beside it, which is harmless). Returns ``path``.
    """
    path = Path(path)
    with atomic_open(path, "wb") as f:
        torch.save(state, f)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; tensors go to ``map_location`` (default CPU).

    Raises :class:`CheckpointError` naming the file when it is missing, empty, truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint is empty (0 bytes)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as e:
        raise CheckpointError(
            f"{path}: cannot read checkpoint (truncated or corrupt, or it holds objects other than "
            f"tensors and plain containers): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(state).__name__}")
    return state
