"""Verification pair sets: insightface ``.bin`` files and plain-text pair lists.

``.bin`` files (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...) are pickles of the tuple
``(bins, issame_list)``: ``bins`` holds ``2N`` encoded images (JPEG or PNG bytes; pair ``i`` is
``bins[2i]``, ``bins[2i + 1]``) and ``issame_list`` holds ``N`` bools. The files distributed with
insightface were written by Python 2, so their images are py2 ``str`` objects; others were written by
Python 3 (bytes, or 1-D uint8 numpy arrays of encoded bytes in some variants).

A pickle can run arbitrary code when loaded, and these files are downloaded from third parties, so
:func:`load_bin` never calls :func:`pickle.load` directly: :class:`RestrictedUnpickler` admits only the
few globals needed to rebuild bytes, lists, tuples, bools and numpy arrays, and refuses everything else
(``os.system``, ``builtins.eval``, ...) *before* it can run. Numpy arrays of dtype ``object`` are
refused too.

Py2 ``str`` entries are read with ``encoding="latin1"``: a py2 ``str`` becomes a Python 3 ``str`` whose
code points are exactly its bytes, and :func:`load_bin` turns it back into the original bytes with
``.encode("latin1")``, losslessly. This is the encoding numpy recommends for py2 pickles holding arrays
(``encoding="bytes"``, which insightface uses, breaks those).

Pair lists are text files of lines ``path1 path2 0|1`` (see :func:`load_pair_list`).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from faceforge.fileio import atomic_open

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct  # type: ignore[attr-defined]
    from numpy._core.numeric import _frombuffer as _np_frombuffer  # type: ignore[attr-defined]
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct  # type: ignore[no-redef]
    from numpy.core.numeric import _frombuffer as _np_frombuffer  # type: ignore[no-redef]

__all__ = [
    "PairSetError",
    "UnsafePickleError",
    "RestrictedUnpickler",
    "load_bin",
    "load_bins",
    "load_pair_list",
    "write_bin",
]


class PairSetError(ValueError):
    """A pair set (``.bin`` file or pair list) is malformed; the message names the file and the record."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global (or an object array) that a pair-set file has no use for."""


# ---------------------------------------------------------------------------------------------------
# Restricted unpickling
# ---------------------------------------------------------------------------------------------------


def _safe_codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Python 3 writes bytes at protocol < 3 as ``_codecs.encode(<latin1 str>, 'latin1')``.
    enc = encoding.decode("ascii") if isinstance(encoding, bytes) else encoding
    if not isinstance(obj, str) or enc.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise UnsafePickleError(f"_codecs.encode is admitted only for str -> bytes with latin1, got {type(obj).__name__}/{encoding!r}")
    return obj.encode("latin1")


def _safe_dtype(*args: Any) -> np.dtype:
    spec = args[0] if args else None
    if isinstance(spec, bytes):
        spec = spec.decode("latin1")
    if not isinstance(spec, str):
        raise UnsafePickleError(f"numpy.dtype is admitted only with a type string, got {spec!r}")
    if spec.lstrip("<>|=").startswith("O"):
        raise UnsafePickleError("numpy arrays of dtype object are refused")
    return np.dtype(spec, *args[1:])


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"numpy _reconstruct is admitted only for numpy.ndarray, got {subtype!r}")
    return _np_reconstruct(np.ndarray, shape, dtype)


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    # numpy's reduction at pickle protocol 5.
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError("numpy arrays of dtype object are refused")
    return _np_frombuffer(buf, dtype, shape, order)


_ADMITTED: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _safe_codecs_encode,
    ("builtins", "bytes"): bytes,
    ("builtins", "bytearray"): bytearray,
    ("__builtin__", "bytes"): bytes,
    ("__builtin__", "bytearray"): bytearray,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only bytes, str, numbers, bools, lists, tuples and numeric numpy arrays.

    Every other global is refused with :class:`UnsafePickleError` naming ``module.name`` (and the file,
    when given), before anything in the pickle is called.
    """

    def __init__(self, file: Any, *, source: str | os.PathLike | None = None, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._source = str(source) if source is not None else "<pickle>"

    def find_class(self, module: str, name: str) -> Any:
        obj = _ADMITTED.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                f"{self._source}: refused to load global {module}.{name}: a pair-set pickle may only hold "
                "bytes, lists, tuples, bools and numeric numpy arrays"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: persistent ids are not allowed (got {pid!r})")


def _check_no_object_arrays(obj: Any, source: str, depth: int = 0) -> None:
    if depth > 4:
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise UnsafePickleError(f"{source}: numpy arrays of dtype object are refused")
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _check_no_object_arrays(item, source, depth + 1)


def _restricted_load(path: str | os.PathLike) -> Any:
    source = str(path)
    with open(path, "rb") as f:
        try:
            obj = RestrictedUnpickler(f, source=source, encoding="latin1").load()
        except UnsafePickleError as e:
            if str(e).startswith(source):
                raise
            raise UnsafePickleError(f"{source}: {e}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
            raise PairSetError(f"{source}: not a readable pair-set pickle: {type(e).__name__}: {e}") from e
    _check_no_object_arrays(obj, source)
    return obj


# ---------------------------------------------------------------------------------------------------
# .bin reading
# ---------------------------------------------------------------------------------------------------


def _normalise_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)):
        h = w = int(image_size)
    else:
        h, w = (int(v) for v in image_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return h, w


def _as_issame(raw: Any, source: str) -> np.ndarray:
    if isinstance(raw, np.ndarray):
        if raw.ndim != 1:
            raise PairSetError(f"{source}: issame must be 1-D, got an array of shape {raw.shape}")
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        raise PairSetError(f"{source}: issame must be a list of bools, got {type(raw).__name__}")
    out = np.empty(len(raw), dtype=bool)
    for i, v in enumerate(raw):
        if isinstance(v, (bool, np.bool_)):
            out[i] = bool(v)
        elif isinstance(v, (int, np.integer)) and int(v) in (0, 1):
            out[i] = bool(int(v))
        else:
            raise PairSetError(f"{source}: issame[{i}] must be a bool or 0/1, got {v!r}")
    return out


def _decode_entry(entry: Any, index: int, source: str) -> np.ndarray:
    """Return an (H, W, 3) uint8 RGB array for one image entry."""
    if isinstance(entry, np.ndarray):
        if entry.dtype != np.uint8:
            raise PairSetError(f"{source}: image {index} is a numpy array of dtype {entry.dtype}, expected uint8")
        if entry.ndim == 3 and entry.shape[2] == 3:
            return np.ascontiguousarray(entry)  # already decoded pixels (taken as RGB)
        if entry.ndim != 1:
            raise PairSetError(
                f"{source}: image {index} is a uint8 array of shape {entry.shape}; expected 1-D encoded bytes "
                "or (H, W, 3) pixels"
            )
        data = entry.tobytes()
    elif isinstance(entry, (bytes, bytearray, memoryview)):
        data = bytes(entry)
    elif isinstance(entry, str):  # a py2 str read with encoding='latin1'
        try:
            data = entry.encode("latin1")
        except UnicodeEncodeError:
            raise PairSetError(f"{source}: image {index} is text, not encoded image bytes") from None
    else:
        raise PairSetError(f"{source}: image {index} has type {type(entry).__name__}, expected encoded image bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = im.convert("RGB")
    except Exception as e:  # Pillow raises many types for bad data
        raise PairSetError(f"{source}: image {index} could not be decoded ({len(data)} bytes): {type(e).__name__}: {e}") from None
    return np.asarray(rgb, dtype=np.uint8)


def load_bin(path: str | os.PathLike, image_size: int | Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load an insightface verification ``.bin`` file.

    Returns ``(images, issame)``: ``images`` uint8 ``(2N, H, W, 3)`` RGB, pair ``i`` being
    ``images[2i]`` and ``images[2i + 1]``; ``issame`` bool ``(N,)``.

    ``image_size`` (an int or ``(H, W)``): images of another size are resized (bilinear) to it. Without
    it, all images must share one size, or :class:`PairSetError` is raised.

    Raises :class:`UnsafePickleError` for a pickle that asks for anything beyond bytes, lists, tuples,
    bools and numeric numpy arrays (nothing in it is run), and :class:`PairSetError` for a malformed
    file (wrong structure, ``2N`` images for ``N`` labels violated, bad labels, undecodable images).
    """
    source = str(path)
    size = _normalise_size(image_size)
    obj = _restricted_load(path)
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise PairSetError(f"{source}: expected a pickled tuple (bins, issame_list), got {type(obj).__name__}"
                           + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else ""))
    bins, issame_raw = obj
    if isinstance(bins, np.ndarray) and bins.dtype == np.uint8 and bins.ndim == 4:
        bins = list(bins)
    if not isinstance(bins, (list, tuple)):
        raise PairSetError(f"{source}: bins must be a list of encoded images, got {type(bins).__name__}")
    issame = _as_issame(issame_raw, source)
    if len(bins) != 2 * len(issame):
        raise PairSetError(
            f"{source}: {len(bins)} images for {len(issame)} issame entries; expected 2 * {len(issame)} = "
            f"{2 * len(issame)} images"
        )
    images: np.ndarray | None = None
    for i, entry in enumerate(bins):
        img = _decode_entry(entry, i, source)
        h, w = img.shape[:2]
        if size is not None and (h, w) != size:
            img = np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BILINEAR), dtype=np.uint8)
        if images is None:
            images = np.empty((len(bins),) + img.shape, dtype=np.uint8)
        elif img.shape != images.shape[1:]:
            raise PairSetError(
                f"{source}: image {i} is {img.shape[0]}x{img.shape[1]} but image 0 is "
                f"{images.shape[1]}x{images.shape[2]}; pass image_size= to resize"
            )
        images[i] = img
    if images is None:
        h, w = size if size is not None else (112, 112)
        images = np.empty((0, h, w, 3), dtype=np.uint8)
    return images, issame


def load_bins(paths: Sequence[str | os.PathLike]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Several ``.bin`` files (:func:`load_bin`) by name: the file stem, made unique in order
    (``lfw``, then ``lfw_2`` for a second ``lfw.bin``). Returns ``{name: (images, issame)}``."""
    sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for path in paths:
        stem = Path(path).stem
        name, n = stem, 2
        while name in sets:
            name, n = f"{stem}_{n}", n + 1
        sets[name] = load_bin(path)
    return sets


# ---------------------------------------------------------------------------------------------------
# .bin writing
# ---------------------------------------------------------------------------------------------------


def _encode_image(img: Any, index: int, fmt: str, quality: int) -> bytes:
    if isinstance(img, (bytes, bytearray, memoryview)):
        return bytes(img)
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise ValueError(f"image {index}: expected uint8 pixels, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"image {index}: expected an (H, W, 3) or (H, W) uint8 array, got shape {arr.shape}")
    buf = io.BytesIO()
    im = Image.fromarray(np.ascontiguousarray(arr))
    if fmt == "png":
        im.save(buf, format="PNG")
    else:
        im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_bin(
    path: str | os.PathLike,
    images: np.ndarray | Sequence[Any],
    issame: Sequence[Any] | np.ndarray,
    *,
    format: str = "png",
    quality: int = 95,
) -> None:
    """Write an insightface-compatible ``.bin`` pair set, atomically (temporary file + rename).

    ``images``: ``2N`` images, each a uint8 ``(H, W, 3)`` RGB (or ``(H, W)``) array, encoded as PNG
    (lossless, the default) or JPEG (``format="jpeg"``, ``quality``), or already-encoded bytes, which
    are written as they are. ``issame``: ``N`` bools (or 0/1). The file is a protocol-4 pickle of
    ``(list_of_bytes, list_of_bools)``, which insightface's ``pickle.load`` reads.
    """
    fmt = format.lower()
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in ("png", "jpeg"):
        raise ValueError(f"format must be 'png' or 'jpeg', got {format!r}")
    labels = _as_issame(list(np.asarray(issame).tolist()) if isinstance(issame, np.ndarray) else list(issame), "issame")
    n_images = len(images)
    if n_images != 2 * len(labels):
        raise ValueError(f"{n_images} images for {len(labels)} issame entries; expected {2 * len(labels)} images")
    bins = [_encode_image(images[i], i, fmt, quality) for i in range(n_images)]
    payload = (bins, [bool(v) for v in labels])

    with atomic_open(path, "wb") as f:
        pickle.dump(payload, f, protocol=4)


# ---------------------------------------------------------------------------------------------------
# Plain-text pair lists
# ---------------------------------------------------------------------------------------------------


def load_pair_list(
    path: str | os.PathLike, root: str | os.PathLike | None = None
) -> tuple[list[str], list[str], np.ndarray]:
    """Read a pair list: one pair per line, ``path1 path2 label`` with label ``0`` or ``1``.

    Fields are separated by whitespace (so paths may not contain spaces). Blank lines and lines whose
    first non-blank character is ``#`` are skipped, as is anything after a field that starts with
    ``#``. Relative paths are joined to ``root`` when given. A malformed line raises
    :class:`PairSetError` naming the file and the line number.

    Returns ``(paths1, paths2, issame)`` with ``issame`` a bool array.
    """
    source = str(path)
    paths1: list[str] = []
    paths2: list[str] = []
    labels: list[bool] = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            for k, field in enumerate(fields):
                if field.startswith("#"):
                    fields = fields[:k]
                    break
            if not fields:
                continue
            if len(fields) != 3:
                raise PairSetError(
                    f"{source}:{lineno}: expected 'path1 path2 0|1' (3 fields), got {len(fields)}: {line.strip()!r}"
                )
            p1, p2, lab = fields
            if lab not in ("0", "1"):
                raise PairSetError(f"{source}:{lineno}: label must be 0 or 1, got {lab!r}")
            if root is not None:
                p1 = os.path.join(root, p1)
                p2 = os.path.join(root, p2)
            paths1.append(p1)
            paths2.append(p2)
            labels.append(lab == "1")
    return paths1, paths2, np.asarray(labels, dtype=bool)
