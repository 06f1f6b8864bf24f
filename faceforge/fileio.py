"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one.

The one writer of the project: checkpoints (``train.checkpoint.save_checkpoint``), RecordIO pairs
(``data.recordio.write``, two files), ``.bin`` pair sets, label maps and feature caches all go through
:func:`atomic_files` / :func:`atomic_open`. Each file is written to ``.<name>.tmp-<random>`` beside its
target, flushed and fsynced, and renamed onto the target with ``os.replace`` only when the block exits
cleanly; the folder is then fsynced so that the rename survives a power cut. If the block raises, the
targets keep their old content and the temporary files are removed; a killed process may leave a
``.<name>.tmp-*`` file, which is harmless (``stale_temporaries`` finds them).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

import numpy as np

__all__ = ["atomic_files", "atomic_open", "save_npy", "stale_temporaries"]


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


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporary files a killed writer of ``path`` may have left beside it."""
    path = Path(path)
    return sorted(path.parent.glob(f"{_temporary_prefix(path)}*"))


@contextlib.contextmanager
def atomic_files(*targets: tuple[str | os.PathLike, str]) -> Iterator[list[IO]]:
    """Write several files as one: ``with atomic_files((a, "wb"), (b, "w")) as (fa, fb): ...``.

    Each target is ``(path, mode)`` with mode ``"wb"`` or ``"w"`` (text: UTF-8, ``"\\n"`` line ends). On a
    clean exit every file is fsynced and renamed into place, in the order given; on an exception none is.
    New files get ordinary permissions (``0o666`` less the umask), as ``open`` would give them.
    """
    paths: list[Path] = []
    temporaries: list[str] = []
    handles: list[IO] = []
    try:
        for target, mode in targets:
            if mode not in ("wb", "w"):
                raise ValueError(f"mode={mode!r}: expected 'wb' or 'w'")
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), dir=path.parent)
            temporaries.append(tmp)
            paths.append(path)
            handles.append(os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": "\n"} if mode == "w" else {})))
        yield handles
        for f in handles:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        umask = os.umask(0)
        os.umask(umask)
        for tmp in temporaries:  # mkstemp makes 0600 files
            os.chmod(tmp, 0o666 & ~umask)
        for tmp, path in zip(temporaries, paths):
            os.replace(tmp, path)
        for folder in dict.fromkeys(p.parent for p in paths):
            _fsync_dir(folder)
    except BaseException:
        for f in handles:
            with contextlib.suppress(OSError):
                f.close()
        for tmp in temporaries:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path`` (:func:`atomic_files`).

    ``mode`` is ``"wb"`` or ``"w"`` (text, UTF-8).
    """
    with atomic_files((path, mode)) as (f,):
        yield f


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` to the ``.npy`` file ``path`` atomically (no pickles; the name is kept as given)."""
    with atomic_open(path, "wb") as f:  # a file handle: np.save must not append ".npy" to the name
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
