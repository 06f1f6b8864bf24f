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
refused too. What the admitted callables build is bounded by the file: ``bytes(2**40)`` is refused (an
int is no encoded image), and all the bytes and arrays they make together may not exceed the file's
size, so a small pickle cannot ask for gigabytes.

Images are checked from their headers before any is decoded (:func:`load_bin`): each at most
``max_pixels`` (:data:`PAIR_MAX_PIXELS`, 1024 x 1024, by default), all of one size (or of the size the
caller expects), and no image object stored twice (a pickle memo reference that would make one small
image fill every slot). Messages quote file data only as its type and a short, truncated value.

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

from faceforge.core.errors import brief
from faceforge.data.images import decode_image, image_size as header_size
from faceforge.core.fileio import atomic_open

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct  # type: ignore[attr-defined]
    from numpy._core.numeric import _frombuffer as _np_frombuffer  # type: ignore[attr-defined]
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct  # type: ignore[no-redef]
    from numpy.core.numeric import _frombuffer as _np_frombuffer  # type: ignore[no-redef]

__all__ = [
    "PAIR_MAX_PIXELS",
    "PairSetError",
    "UnsafePickleError",
    "RestrictedUnpickler",
    "load_bin",
    "load_bins",
    "load_pair_list",
    "write_bin",
]


PAIR_MAX_PIXELS = 1024 * 1024  # a pair set holds face crops (112 x 112 in insightface's); pass max_pixels for more


class PairSetError(ValueError):
    """A pair set (``.bin`` file or pair list) is malformed; the message names the file and the record."""


class UnsafePickleError(pickle.UnpicklingError, PairSetError):
    """A pickle asked for a global (or an object array, or more bytes than the file holds) that a pair-set
    file has no use for. Also a :class:`PairSetError`: a user's file to fix, one line, exit 2."""


# ---------------------------------------------------------------------------------------------------
# Restricted unpickling
# ---------------------------------------------------------------------------------------------------


class _Budget:
    """The bytes the admitted callables may still make: the file's size (what a well-formed pickle needs,
    since every byte they make is spelled out in it), so that memo references cannot multiply it."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self, n: int, what: str) -> None:
        if n > self.left:
            raise UnsafePickleError(f"{what} would make {n} bytes, more than the file holds ({self.left} left "
                                    "of its size): refused")
        self.left -= n


def _is_latin1(encoding: Any) -> bool:
    enc = encoding.decode("ascii", "replace") if isinstance(encoding, bytes) else encoding
    return isinstance(enc, str) and enc.lower().replace("-", "").replace("_", "") in ("latin1", "iso88591")


def _safe_codecs_encode(budget: _Budget, obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Python 3 writes bytes at protocol < 3 as ``_codecs.encode(<latin1 str>, 'latin1')``.
    if not isinstance(obj, str) or not _is_latin1(encoding):
        raise UnsafePickleError(f"_codecs.encode is admitted only for str -> bytes with latin1, got {brief(obj)} / "
                                f"{brief(encoding)}")
    budget.take(len(obj), "_codecs.encode")
    return obj.encode("latin1")


def _safe_bytes_of(kind: type, budget: _Budget, *args: Any) -> bytes | bytearray:
    # Pickles write bytearray(bytes) / bytes() (protocol < 5) and py2 bytearray(unicode, 'latin-1'); an int
    # argument (bytes(2**40): zeros out of nothing) or anything else is refused.
    if not args:
        return kind()
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        data = args[0]
    elif len(args) == 2 and isinstance(args[0], str) and _is_latin1(args[1]):
        data = args[0].encode("latin1")
    else:
        raise UnsafePickleError(f"builtins.{kind.__name__} is admitted only to copy bytes, got "
                                f"({', '.join(brief(a) for a in args[:3])})")
    budget.take(len(data), f"builtins.{kind.__name__}")
    return kind(data)


def _safe_dtype(budget: _Budget, *args: Any) -> np.dtype:
    spec = args[0] if args else None
    if isinstance(spec, bytes):
        spec = spec.decode("latin1")
    if not isinstance(spec, str):
        raise UnsafePickleError(f"numpy.dtype is admitted only with a type string, got {brief(spec)}")
    if spec.lstrip("<>|=").startswith("O"):
        raise UnsafePickleError("numpy arrays of dtype object are refused")
    try:
        return np.dtype(spec, *args[1:])
    except (TypeError, ValueError) as e:
        raise UnsafePickleError(f"numpy.dtype: {brief(spec)}: {e}") from None


class _NDArrayName:
    """What ``numpy.ndarray`` names in a pair-set pickle: the argument of ``_reconstruct``, never callable
    (``ndarray(shape)`` would allocate any size the file asks for)."""


def _safe_reconstruct(budget: _Budget, subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not _NDArrayName:
        raise UnsafePickleError(f"numpy _reconstruct is admitted only for numpy.ndarray, got {brief(subtype)}")
    try:
        dt = np.dtype(dtype)
        count = int(np.prod([int(n) for n in (shape if isinstance(shape, (tuple, list)) else (shape,))], dtype=object))
    except (TypeError, ValueError, OverflowError) as e:
        raise UnsafePickleError(f"numpy _reconstruct: shape {brief(shape)} / dtype {brief(dtype)}: {e}") from None
    budget.take(max(count, 0) * dt.itemsize, "numpy _reconstruct")
    return _np_reconstruct(np.ndarray, shape, dtype)


def _safe_frombuffer(budget: _Budget, buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    # numpy's reduction at pickle protocol 5: a view of bytes already in the file (no new memory).
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError("numpy arrays of dtype object are refused")
    return _np_frombuffer(buf, dtype, shape, order)


_ADMITTED: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _safe_codecs_encode,
    ("builtins", "bytes"): lambda budget, *a: _safe_bytes_of(bytes, budget, *a),
    ("builtins", "bytearray"): lambda budget, *a: _safe_bytes_of(bytearray, budget, *a),
    ("__builtin__", "bytes"): lambda budget, *a: _safe_bytes_of(bytes, budget, *a),
    ("__builtin__", "bytearray"): lambda budget, *a: _safe_bytes_of(bytearray, budget, *a),
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

    def __init__(self, file: Any, *, source: str | os.PathLike | None = None, max_bytes: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._source = str(source) if source is not None else "<pickle>"
        if max_bytes is None:
            try:
                max_bytes = os.fstat(file.fileno()).st_size
            except (AttributeError, OSError, io.UnsupportedOperation):
                max_bytes = len(file.getbuffer()) if hasattr(file, "getbuffer") else 0
        self._budget = _Budget(int(max_bytes))

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("numpy", "ndarray"):
            return _NDArrayName
        fn = _ADMITTED.get((module, name))
        if fn is None:
            raise UnsafePickleError(
                f"{self._source}: refused to load global {module[:80]}.{name[:80]}: a pair-set pickle "
                "may only hold bytes, lists, tuples, bools and numeric numpy arrays"
            )
        budget = self._budget
        return lambda *args: fn(budget, *args)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: persistent ids are not allowed (got {brief(pid)})")


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
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                MemoryError, RecursionError, OverflowError) as e:
            raise PairSetError(f"{source}: not a readable pair-set pickle: {type(e).__name__}: "
                               f"{' '.join(str(e).split())[:200]}") from None
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
            raise PairSetError(f"{source}: issame[{i}] must be a bool or 0/1, got {brief(v)}")
    return out


def parse_bin(obj: Any, source: str) -> tuple[list[Any], np.ndarray]:
    """The ``(bins, issame)`` of an unpickled ``.bin``: ``bins`` a list of ``2N`` entries (encoded images, or
    pixel arrays) and ``issame`` bool ``(N,)``; :class:`PairSetError` for any other structure (a nest too
    deep for Python included)."""
    try:
        if not isinstance(obj, (tuple, list)) or len(obj) != 2:
            raise PairSetError(f"{source}: expected a pickled tuple (bins, issame_list), got {type(obj).__name__}"
                               + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else ""))
        bins, issame_raw = obj
        if isinstance(bins, np.ndarray) and bins.dtype == np.uint8 and bins.ndim == 4:
            bins = list(bins)
        if not isinstance(bins, (list, tuple)):
            raise PairSetError(f"{source}: bins (the first element) must be a list of encoded images, got "
                               f"{brief(bins)}")
        issame = _as_issame(issame_raw, source)
    except RecursionError:
        raise PairSetError(f"{source}: the pickle nests too deep; expected (list of images, list of bools)") from None
    return list(bins), issame


def _entry_bytes(entry: Any, index: int, source: str) -> bytes | np.ndarray:
    """An image entry's encoded bytes, or its pixels when it holds decoded ``(H, W, 3)`` uint8 pixels."""
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
        return entry.tobytes()
    if isinstance(entry, (bytes, bytearray, memoryview)):
        return bytes(entry)
    if isinstance(entry, str):  # a py2 str read with encoding='latin1'
        try:
            return entry.encode("latin1")
        except UnicodeEncodeError:
            raise PairSetError(f"{source}: image {index} is text, not encoded image bytes") from None
    raise PairSetError(f"{source}: image {index} has type {type(entry).__name__}, expected encoded image bytes")


def entry_size(entry: Any, index: int, source: str, max_pixels: int = PAIR_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` of one image entry from its header alone (nothing decoded)."""
    data = _entry_bytes(entry, index, source)
    if isinstance(data, np.ndarray):
        return data.shape[1], data.shape[0]
    return header_size(data, f"{source}: image {index}", max_pixels, error=PairSetError)


def decode_entry(entry: Any, index: int, source: str, max_pixels: int = PAIR_MAX_PIXELS) -> np.ndarray:
    """Return an (H, W, 3) uint8 RGB array for one image entry (:func:`faceforge.data.images.decode_image`)."""
    data = _entry_bytes(entry, index, source)
    if isinstance(data, np.ndarray):
        return data
    return decode_image(data, f"{source}: image {index}", max_pixels, error=PairSetError)


def _check_headers(bins: Sequence[Any], source: str, size: tuple[int, int] | None,
                   expect: tuple[int, int] | None, expect_name: str, max_pixels: int) -> tuple[int, int] | None:
    """Every image's header, before any is decoded: no entry stored twice (a memo reference), at most
    ``max_pixels`` each, and (without a resize ``size``) all of ``expect`` or of image 0's size. Returns
    the ``(H, W)`` of the images that :func:`load_bin` returns (None for no images)."""
    first_index: dict[int, int] = {}
    target = size if size is not None else expect
    for i, entry in enumerate(bins):
        if not (isinstance(entry, (bytes, str)) and len(entry) < 64):  # tiny values are shared by Python itself
            j = first_index.setdefault(id(entry), i)
            if j != i:
                raise PairSetError(f"{source}: image {i} is the same pickled object as image {j} (a pickle memo "
                                   "reference); a pair set stores each image once")
        w, h = entry_size(entry, i, source, max_pixels)
        if size is not None:
            continue
        if target is None:
            target = (h, w)
        elif (h, w) != target and expect is not None:
            side = f"{target[1]}" if target[0] == target[1] else f"{target[1]}x{target[0]}"
            raise PairSetError(f"{source}: verification images are {w}x{h} but {expect_name} is {side} (image {i}, "
                               "refused before decoding)")
        elif (h, w) != target:
            raise PairSetError(f"{source}: image {i} is {w}x{h} but image 0 is {target[1]}x{target[0]}; "
                               "pass image_size= to resize")
    return target


def load_bin(path: str | os.PathLike, image_size: int | Sequence[int] | None = None, *,
             expect_size: int | Sequence[int] | None = None, expect_name: str = "the expected size",
             max_pixels: int = PAIR_MAX_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """Load an insightface verification ``.bin`` file.

    Returns ``(images, issame)``: ``images`` uint8 ``(2N, H, W, 3)`` RGB, pair ``i`` being
    ``images[2i]`` and ``images[2i + 1]``; ``issame`` bool ``(N,)``.

    ``image_size`` (an int or ``(H, W)``): images of another size are resized (bilinear) to it. Without
    it, all images must share one size (``expect_size``, e.g. the model's, named ``expect_name`` in the
    message, when given), or :class:`PairSetError` is raised. Sizes and ``max_pixels`` are checked on
    every image's header before any image is decoded.

    Raises :class:`UnsafePickleError` for a pickle that asks for anything beyond bytes, lists, tuples,
    bools and numeric numpy arrays (nothing in it is run) or for more bytes than the file holds, and
    :class:`PairSetError` for a malformed file (wrong structure, ``2N`` images for ``N`` labels violated,
    bad labels, an image stored twice, undecodable or oversized images).
    """
    source = str(path)
    size = _normalise_size(image_size)
    expect = _normalise_size(expect_size)
    bins, issame = parse_bin(_restricted_load(path), source)
    if len(bins) != 2 * len(issame):
        raise PairSetError(
            f"{source}: {len(bins)} images for {len(issame)} issame entries; expected 2 * {len(issame)} = "
            f"{2 * len(issame)} images"
        )
    _check_headers(bins, source, size, expect, expect_name, max_pixels)
    images: np.ndarray | None = None
    for i, entry in enumerate(bins):
        img = decode_entry(entry, i, source, max_pixels)
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


def load_bins(paths: Sequence[str | os.PathLike], **kwargs: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Several ``.bin`` files (:func:`load_bin`, with ``kwargs``) by name: the file stem, made unique in
    order (``lfw``, then ``lfw_2`` for a second ``lfw.bin``). Returns ``{name: (images, issame)}``."""
    sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for path in paths:
        stem = Path(path).stem
        name, n = stem, 2
        while name in sets:
            name, n = f"{stem}_{n}", n + 1
        sets[name] = load_bin(path, **kwargs)
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
