"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

import numpy as np

__all__ = ["atomic_open", "save_npy"]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit fsync it and rename it to ``path``.

    If the block raises (or the process dies), ``path`` keeps its old content and the temporary file is
    removed (a killed process may leave a ``.<name>.*.tmp`` beside it, which is harmless). ``mode`` is
    ``"wb"`` or ``"w"`` (text, with ``encoding``, default UTF-8).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode={mode!r}: expected 'wb' or 'w'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; give the result ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` to the ``.npy`` file ``path`` atomically (no pickles; the name is kept as given)."""
    with atomic_open(path, "wb") as f:  # a file handle: np.save must not append ".npy" to the name
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
