"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one.

The one writer of the project: checkpoints (``train.checkpoint.save_checkpoint``), RecordIO pairs
(``data.recordio.write``, two files), ``.bin`` pair sets, label maps and feature caches all go through
:func:`atomic_files` / :func:`atomic_open`. Each file is written to ``.<name>.tmp-<random>`` beside its
target, flushed and fsynced, and renamed onto the target with ``os.replace`` only when the block exits
cleanly; the folder is then fsynced so that the rename survives a power cut. If the block raises, the
targets keep their old content and the temporary files are removed; a killed process may leave a
``.<name>.tmp-*`` file, which is harmless (``stale_temporaries`` finds them).

No write follows a link. A temporary comes from ``tempfile.mkstemp`` (a new file, ``O_CREAT | O_EXCL``: a
link planted at a guessable name cannot be opened through), and ``os.replace`` renames it over the
destination name itself: a symlink planted at the destination is replaced, its target never touched.
Writers that take a file name rather than a handle (``torch.onnx.export``, onnxruntime's quantizers,
``faiss.write_index``) write into :func:`atomic_path`'s fresh temporary; a file that is updated in place
(an appended log, a memory-mapped cache) is opened with :func:`open_nofollow`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import os
import secrets
import tempfile
from pathlib import Path
from typing import IO, Iterator

import numpy as np
from PIL import Image

__all__ = ["atomic_files", "atomic_open", "atomic_path", "append_text", "installation_key", "is_signed",
           "open_nofollow", "save_image", "save_npy", "sign_file", "stale_temporaries", "write_bytes", "write_text"]

KEY_FILE = "key"  # under $XDG_CACHE_HOME/faceforge (default ~/.cache/faceforge)
SIGNATURE_SUFFIX = ".hmac"


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


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _publish(temporaries: list[str], paths: list[Path]) -> None:
    """Give the finished temporaries ordinary permissions (mkstemp makes 0600 files) and rename each onto its
    path (a link at the path is replaced, not followed); then make the renames durable."""
    umask = _umask()
    for tmp in temporaries:
        os.chmod(tmp, 0o666 & ~umask)
    for tmp, path in zip(temporaries, paths):
        os.replace(tmp, path)
    for folder in dict.fromkeys(p.parent for p in paths):
        _fsync_dir(folder)


def _new_temporary(path: Path) -> tuple[int, str]:
    """``(fd, name)`` of a new, empty file beside ``path`` (folders made): unique, created exclusively."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=_temporary_prefix(path), dir=path.parent)


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
            fd, tmp = _new_temporary(path)
            temporaries.append(tmp)
            paths.append(path)
            handles.append(os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": "\n"} if mode == "w" else {})))
        yield handles
        for f in handles:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        _publish(temporaries, paths)
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


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_open`); returns the path."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, ``"\\n"`` line ends) to ``path`` atomically; returns the path."""
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary file name beside ``path`` for a writer that takes a name (ONNX export, faiss); on a
    clean exit the file it wrote replaces ``path``, on an exception it is removed and ``path`` is untouched.

    The temporary exists (empty, created exclusively by ``mkstemp``) when the block starts: a writer that
    truncates and writes it writes this new file, never a planted link.
    """
    target = Path(path)
    fd, tmp = _new_temporary(target)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:  # durable before the rename
            os.fsync(f.fileno())
        _publish([tmp], [target])
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def open_nofollow(path: str | os.PathLike, mode: str) -> IO:
    """Open ``path`` without following a link at it: ``"ab"``/``"a"`` (append, created if missing), ``"r+b"``
    (update an existing file) or ``"rb"``. A symlink at ``path`` is an OSError (ELOOP) naming it."""
    flags = {"a": os.O_WRONLY | os.O_APPEND | os.O_CREAT, "ab": os.O_WRONLY | os.O_APPEND | os.O_CREAT,
             "r+b": os.O_RDWR, "rb": os.O_RDONLY}.get(mode)
    if flags is None:
        raise ValueError(f"mode={mode!r}: expected 'a', 'ab', 'r+b' or 'rb'")
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        if Path(path).is_symlink():
            raise OSError(e.errno, f"{path}: is a symbolic link; faceforge does not write through links") from None
        raise
    return os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {}))


def save_image(path: str | os.PathLike, image: "np.ndarray | Image.Image") -> Path:
    """Write an image (uint8 ``(H, W)`` / ``(H, W, 3)`` array or PIL image) atomically, in the format its
    suffix names (``.png``, ``.jpg``, ...); returns the path."""
    path = Path(path)
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    formats = Image.registered_extensions()
    if path.suffix.lower() not in formats:
        raise ValueError(f"{path}: unknown image suffix {path.suffix!r}; expected one of .png, .jpg, ...")
    buffer = io.BytesIO()
    picture.save(buffer, format=formats[path.suffix.lower()])
    return write_bytes(path, buffer.getvalue())


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to the log ``path`` (created if missing) without following a link at it."""
    with open_nofollow(path, "a") as f:
        f.write(text)


# --------------------------------------------------------------------------------------------------
# Caches this installation wrote
# --------------------------------------------------------------------------------------------------


def _key_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "faceforge" / KEY_FILE


def installation_key() -> bytes:
    """This installation's secret: 32 random bytes in ``$XDG_CACHE_HOME/faceforge/key`` (default
    ``~/.cache``), made on first use, readable by the user only (0600). It signs the caches faceforge writes,
    so that a cache shipped in someone else's run folder is never taken for one of ours."""
    path = _key_path()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = _new_temporary(path)  # 0600, written whole, then linked in: a reader never sees a short key
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # fails if another process made it first: use theirs
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links: rename (the last writer's key wins)
                os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    with open_nofollow(path, "rb") as f:
        key = f.read()
    if len(key) < 32:
        raise OSError(f"{path}: a faceforge cache key of {len(key)} bytes; expected 32 (delete it to make a new one)")
    return key


def _mac(path: Path) -> str:
    """HMAC-SHA256 (installation key) of the file's name and content."""
    mac = hmac.new(installation_key(), path.name.encode() + b"\0", hashlib.sha256)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            mac.update(chunk)
    return mac.hexdigest()


def _signature_path(path: Path) -> Path:
    return path.with_name(path.name + SIGNATURE_SUFFIX)


def sign_file(path: str | os.PathLike) -> None:
    """Record that this installation wrote ``path``: ``<path>.hmac``, a keyed hash (:func:`installation_key`) of
    its name and content."""
    path = Path(path)
    write_text(_signature_path(path), _mac(path) + "\n")


def is_signed(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file this installation wrote and signed (:func:`sign_file`), unchanged since: a file
    without a signature, with a forged one or a changed content is not."""
    path = Path(path)
    signature = _signature_path(path)
    if not (path.is_file() and signature.is_file()) or path.is_symlink() or signature.is_symlink():
        return False
    try:
        recorded = signature.read_text(encoding="ascii", errors="strict").strip()
    except (OSError, ValueError):
        return False
    return hmac.compare_digest(recorded, _mac(path))
