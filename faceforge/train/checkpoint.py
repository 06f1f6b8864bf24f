"""Checkpoints: atomic writes (a crash never leaves a half-written ``last.pt``) and safe loads.

A checkpoint is a dict of tensors and plain containers (str, int, float, bool, None, list, dict), so
it loads with ``torch.load(..., weights_only=True)``: no pickled classes, no numpy objects.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "save_checkpoint", "load_checkpoint"]

CHECKPOINT_NAME = "last.pt"  # a run's latest checkpoint, in its output folder
THRESHOLD_KEY = "verification_threshold"  # a checkpoint's learned universal threshold (SphereFace2), or None


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated, corrupt or holds something other than a dict."""


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    A process killed at any moment leaves either the old file or the new one at ``path`` (and at worst
    a stray ``.<name>.tmp-<pid>`` beside it, which is harmless). Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
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
