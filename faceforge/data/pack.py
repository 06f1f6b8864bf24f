"""Build and check training/eval data files: image folders or lists -> ``.rec``/``.idx``, pair lists
-> ``.bin``, and a summary (``inspect``) of any of them.

* :func:`pack_folder` / :func:`pack_list` read images in parallel (threads, results kept in input
  order), check that every image decodes, and write an insightface ``.rec``/``.idx`` with
  :func:`faceforge.data.recordio.write`. JPEG and PNG files are stored byte for byte; other formats
  are re-encoded as PNG. A folder's identities are its sub-folders, sorted by name -> labels
  ``0..C-1``; the map is written to ``PREFIX.labels.json``.
* :func:`pack_pairs` turns a ``path1 path2 0|1`` pair list into an insightface ``.bin``.
* :func:`inspect_path` summarises a ``.rec`` prefix, an image folder or a ``.bin``.

Nothing is skipped silently: an unreadable image is an error naming the file unless ``skip_bad``
is set, and then every skipped file is listed in ``PREFIX.bad.txt``.
"""

from __future__ import annotations

import io
import json
import os
import statistics
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from faceforge.data.source import SourceError, open_source
from faceforge.core.fileio import write_text

_PASS_THROUGH = ("JPEG", "PNG")

T = TypeVar("T")
R = TypeVar("R")


class PackError(ValueError):
    """A problem with the input of a pack/inspect job; the message names the file or folder."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _workers(workers: int | None) -> int:
    if workers is None:
        return max(1, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return int(workers)


def _ordered_map(fn: Callable[[T], R], items: Sequence[T], workers: int, desc: str, progress: bool) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, results in input order, at most ``4 * workers`` in flight."""
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1:
            for item in items:
                yield fn(item)
                bar.update(1)
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            window: deque = deque()
            it = iter(items)
            for item in it:
                window.append(pool.submit(fn, item))
                if len(window) >= 4 * workers:
                    break
            while window:
                result = window.popleft().result()
                nxt = next(it, _SENTINEL)
                if nxt is not _SENTINEL:
                    window.append(pool.submit(fn, nxt))
                bar.update(1)
                yield result
    finally:
        bar.close()


_SENTINEL = object()


@dataclass
class _Loaded:
    path: str
    data: bytes | None  # encoded bytes to store (None when unreadable)
    size: tuple[int, int] | None  # (width, height)
    error: str | None = None


def _read_and_decode(path: str) -> tuple[bytes, np.ndarray, str] | str:
    """``(raw bytes, RGB array, format)`` of an image file (:func:`faceforge.data.images.decode_image`:
    header checked first, EXIF orientation, every mode), or the reason it cannot be read."""
    from faceforge.data.images import BadImageError, decode_image, open_image

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    try:
        with open_image(raw, "image") as im:
            fmt = im.format
        rgb = decode_image(raw, "image")
    except BadImageError as e:
        return str(e).removeprefix("image: ")
    return raw, rgb, fmt


def _load_encoded(path: str) -> _Loaded:
    """Read one image file; check it decodes; return JPEG/PNG bytes unchanged, anything else as PNG."""
    from PIL import Image

    res = _read_and_decode(path)
    if isinstance(res, str):
        return _Loaded(path, None, None, res)
    raw, rgb, fmt = res
    size = (rgb.shape[1], rgb.shape[0])
    if fmt in _PASS_THROUGH:  # stored byte for byte; readers decode them the same way
        return _Loaded(path, raw, size)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return _Loaded(path, buf.getvalue(), size)


def scan_folder(root: str | os.PathLike) -> tuple[list[str], list[list[str]]]:
    """``(identity names, image paths per identity)``: :func:`faceforge.data.folder.scan_identity_folders`,
    its errors raised as :class:`PackError`."""
    from faceforge.data.folder import DatasetError, scan_identity_folders

    try:
        return scan_identity_folders(root)
    except DatasetError as e:
        raise PackError(str(e)) from None


def read_image_list(path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[tuple[str, int]]:
    """``[(path, label), ...]`` of a ``path label`` list file (:func:`faceforge.data.folder.read_image_list`)."""
    from faceforge.data.folder import read_image_list as parse

    return [(image, label) for image, label, _ in parse(path, root)]


# --------------------------------------------------------------------------------------------
# packing .rec
# --------------------------------------------------------------------------------------------


@dataclass
class PackResult:
    """What a pack job wrote."""

    prefix: str
    num_images: int
    num_identities: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, error)
    label_map: str | None = None
    report: str | None = None

    def summary(self) -> str:
        lines = [f"wrote {self.num_images} images of {self.num_identities} identities to {self.prefix}.rec / .idx"]
        if self.label_map:
            lines.append(f"label map: {self.label_map}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable images, listed in {self.report}")
        return "\n".join(lines)


def _pack(
    dest: str | os.PathLike,
    items: list[tuple[str, int]],
    *,
    workers: int | None,
    skip_bad: bool,
    progress: bool,
    num_classes: int | None = None,
) -> PackResult:
    prefix = os.fspath(dest)
    if prefix.endswith(".rec"):
        prefix = prefix[:-4]
    from faceforge.data.recordio import write

    # contiguous identities (stable: keeps each identity's input order)
    items = sorted(items, key=lambda t: t[1])
    labels = [lab for _, lab in items]
    skipped: list[tuple[str, str]] = []
    kept: set[int] = set()
    report = prefix + ".bad.txt"

    def samples() -> Iterator[tuple[bytes, int]]:
        loaded = _ordered_map(_load_encoded, [p for p, _ in items], _workers(workers), "pack", progress)
        for lab, res in zip(labels, loaded):
            if res.error is not None:
                if not skip_bad:
                    raise PackError(f"{res.path}: {res.error} (use --skip-bad to skip unreadable images)")
                skipped.append((res.path, res.error))
                continue
            kept.add(lab)
            yield res.data, lab

    if os.path.exists(report):
        os.unlink(report)  # a stale report would describe another run
    n = write(prefix, samples(), num_classes=num_classes)
    if skipped:
        write_text(report, "".join(f"{p}\t{err}\n" for p, err in skipped))
    return PackResult(prefix, n, len(kept), skipped, None, report if skipped else None)


def pack_folder(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> PackResult:
    """Pack an image folder (one sub-folder per identity) into ``dest.rec`` + ``dest.idx``.

    Identity folders sorted by name get labels ``0..C-1``; ``dest.labels.json`` maps name -> label.
    Images are read with ``workers`` threads (default ``os.cpu_count()``), in a deterministic order
    (identity, then file name). An empty identity folder or (without ``skip_bad``) an unreadable
    image raises :class:`PackError` naming it; with ``skip_bad`` unreadable images are listed in
    ``dest.bad.txt`` instead.
    """
    names, files = scan_folder(src)
    items = [(p, label) for label, paths in enumerate(files) for p in paths]
    result = _pack(dest, items, workers=workers, skip_bad=skip_bad, progress=progress, num_classes=len(names))
    label_map = result.prefix + ".labels.json"
    write_text(label_map, json.dumps({name: i for i, name in enumerate(names)}, indent=1, ensure_ascii=False) + "\n")
    result.label_map = label_map
    return result


def pack_list(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> PackResult:
    """Pack the images of a ``path label`` list file (see :func:`read_image_list`) into ``dest.rec``.

    Samples are ordered by label (stable, so each identity keeps the list's order) because a
    ``.rec`` stores identities as contiguous key ranges. Errors as in :func:`pack_folder`.
    """
    items = read_image_list(src, root)
    return _pack(dest, items, workers=workers, skip_bad=skip_bad, progress=progress)


# --------------------------------------------------------------------------------------------
# .bin pair sets
# --------------------------------------------------------------------------------------------


def pack_pairs(
    pair_list: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> int:
    """Write the pairs of a ``path1 path2 0|1`` list as an insightface ``.bin``; return the pair count.

    Relative paths are joined to ``root``. A missing or unreadable image raises :class:`PackError`
    naming it. Images are never resized silently: without ``size`` they must all have the size of
    the first one; with ``size`` every image that is not ``size x size`` is resized (bilinear).
    JPEG/PNG files that need no resize are stored byte for byte, others are encoded as PNG.
    """
    from PIL import Image

    from faceforge.data.pairs import load_pair_list, write_bin

    p1, p2, issame = load_pair_list(pair_list, root)
    if len(issame) == 0:
        raise PackError(f"{pair_list}: the pair list has no pairs")
    paths = [p for pair in zip(p1, p2) for p in pair]
    target: tuple[int, int] | None = (size, size) if size is not None else None  # (w, h)
    images: list[bytes | np.ndarray] = []
    for i, (path, res) in enumerate(zip(paths, _ordered_map(_read_and_decode, paths, _workers(workers), "pack-pairs", progress))):
        where = f"{path} (pair {i // 2 + 1} of {pair_list})"
        if isinstance(res, str):
            raise PackError(f"{where}: {res}")
        raw, rgb, fmt = res
        wh = (rgb.shape[1], rgb.shape[0])
        if target is None:
            target = wh
            first = path
        if wh != target:
            if size is None:
                raise PackError(
                    f"{where}: image is {wh[0]}x{wh[1]} but {first} is {target[0]}x{target[1]}; "
                    "pass --size to resize every image"
                )
            rgb = np.asarray(Image.fromarray(rgb).resize(target, Image.BILINEAR), dtype=np.uint8)
            images.append(rgb)
        elif fmt in _PASS_THROUGH:
            images.append(raw)
        else:
            images.append(rgb)
    write_bin(dest, images, issame)
    return len(issame)


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


@dataclass
class InspectReport:
    """A summary of a data file or folder; ``str()`` gives the printable text."""

    path: str
    kind: str  # "rec", "folder" or "bin"
    num_images: int = 0
    per_identity: list[int] = field(default_factory=list)  # images per identity (rec/folder)
    declared_identities: int | None = None
    sizes: Counter = field(default_factory=Counter)  # (w, h) -> count, over the images looked at
    sizes_checked: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (key or path, error)
    num_pairs: int | None = None
    num_positive: int | None = None
    decoded: bool = False

    def __str__(self) -> str:
        lines = [f"{self.path} ({self.kind})", f"images:     {self.num_images}"]
        if self.kind == "bin":
            lines.append(f"pairs:      {self.num_pairs} ({self.num_positive} same, {self.num_pairs - self.num_positive} different)")
        else:
            counts = self.per_identity
            nonempty = [c for c in counts if c > 0]
            ids = f"identities: {len(nonempty)}"
            if self.declared_identities is not None and self.declared_identities != len(nonempty):
                ids += f" ({self.declared_identities} declared, {self.declared_identities - len(nonempty)} empty)"
            lines.append(ids)
            if nonempty:
                lines.append(
                    f"images per identity: min {min(nonempty)}, median {statistics.median(nonempty):g}, max {max(nonempty)}"
                )
                lines.append("histogram (images per identity: identities):")
                lines.extend("  " + row for row in histogram(nonempty))
        how = "all decoded" if self.decoded else f"headers of {self.sizes_checked} looked at"
        if self.sizes:
            seen = ", ".join(f"{w}x{h} ({n})" for (w, h), n in self.sizes.most_common())
            lines.append(f"image sizes ({how}): {seen}")
        else:
            lines.append(f"image sizes ({how}): none")
        if self.unreadable:
            lines.append(f"unreadable: {len(self.unreadable)}")
            lines.extend(f"  {where}: {err}" for where, err in self.unreadable)
        else:
            lines.append("unreadable: 0" + ("" if self.decoded else " (run with --decode to decode every image)"))
        return "\n".join(lines)


def histogram(counts: Iterable[int], width: int = 40) -> list[str]:
    """Text histogram of ``counts`` in power-of-two buckets (1, 2-3, 4-7, ...), one line per bucket."""
    counts = [int(c) for c in counts if c > 0]
    if not counts:
        return []
    buckets = Counter(int(c).bit_length() - 1 for c in counts)
    top = max(buckets.values())
    rows = []
    for b in range(min(buckets), max(buckets) + 1):
        lo, hi = 1 << b, (1 << (b + 1)) - 1
        label = f"{lo}" if lo == hi else f"{lo}-{hi}"
        n = buckets.get(b, 0)
        bar = "#" * (max(1, round(width * n / top)) if n else 0)
        rows.append(f"{label:>11} {n:>8} {bar}")
    return rows


def _sample_indices(n: int, k: int) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


def _probe(data: bytes, decode: bool) -> tuple[int, int]:
    """(width, height) from the header, or from a full decode; raises BadImageError on bad data."""
    from faceforge.data.images import decode_image, image_size

    if decode:
        rgb = decode_image(data, "image")
        return rgb.shape[1], rgb.shape[0]
    return image_size(data, "image")


def _inspect_rec(prefix: str, decode: bool, sample: int, progress: bool) -> InspectReport:
    from tqdm import tqdm

    from faceforge.data.recordio import RecordIODataset, RecordIOError

    ds = RecordIODataset(prefix)
    rep = InspectReport(prefix + ".rec", "rec", num_images=len(ds), decoded=decode)
    if decode:  # every header: framing, labels, and labels against the identity records (which raise)
        ds.check_records(on_bad=lambda message: None)  # a corrupt record is listed by the decode below
    if ds.meta is not None:
        ranges = ds.identity_ranges()
        rep.declared_identities = len(ranges)
        rep.per_identity = [e - s for _, (s, e) in sorted(ranges.items())]
    else:
        labels = Counter()
        for i in range(len(ds)):
            try:
                labels[ds.label_of(i)] += 1
            except RecordIOError as e:
                rep.unreadable.append((f"key {ds.keys[i]}", str(e)))
        rep.per_identity = [labels[c] for c in sorted(labels)]
    indices = range(len(ds)) if decode else _sample_indices(len(ds), sample)
    for i in tqdm(indices, desc="inspect", unit="img", disable=not progress or not decode, dynamic_ncols=True):
        key = ds.keys[i]
        try:
            _, data = ds.read_key(key)
            rep.sizes[_probe(data, decode)] += 1
        except Exception as e:
            rep.unreadable.append((f"key {key}", f"{type(e).__name__}: {e}"))
        rep.sizes_checked += 1
    ds.close()
    return rep


def _inspect_folder(root: str, decode: bool, sample: int, progress: bool) -> InspectReport:
    from tqdm import tqdm

    names, files = scan_folder(root)
    paths = [p for ps in files for p in ps]
    rep = InspectReport(root, "folder", num_images=len(paths), decoded=decode)
    rep.per_identity = [len(ps) for ps in files]
    rep.declared_identities = len(names)
    indices = range(len(paths)) if decode else _sample_indices(len(paths), sample)
    for i in tqdm(indices, desc="inspect", unit="img", disable=not progress or not decode, dynamic_ncols=True):
        try:
            with open(paths[i], "rb") as f:
                rep.sizes[_probe(f.read(), decode)] += 1
        except Exception as e:
            rep.unreadable.append((paths[i], f"{type(e).__name__}: {e}"))
        rep.sizes_checked += 1
    return rep


def _inspect_bin(path: str, decode: bool, sample: int) -> InspectReport:
    from faceforge.data.pairs import _restricted_load, decode_entry, entry_size, parse_bin

    bins, issame = parse_bin(_restricted_load(path), path)
    rep = InspectReport(path, "bin", num_images=len(bins), decoded=decode)
    rep.num_pairs, rep.num_positive = len(issame), int(issame.sum())
    if len(bins) != 2 * len(issame):
        rep.unreadable.append(("file", f"{len(bins)} images for {len(issame)} pairs; expected {2 * len(issame)}"))
    indices = range(len(bins)) if decode else _sample_indices(len(bins), sample)
    for i in indices:
        try:
            if decode:
                img = decode_entry(bins[i], i, path)
                rep.sizes[(img.shape[1], img.shape[0])] += 1
            else:
                rep.sizes[entry_size(bins[i], i, path)] += 1
        except ValueError as e:
            rep.unreadable.append((f"image {i}", str(e).removeprefix(f"{path}: image {i}: ")))
        rep.sizes_checked += 1
    return rep


def inspect_path(path: str | os.PathLike, *, decode: bool = False, sample: int = 64, progress: bool = True) -> InspectReport:
    """Summarise a ``.rec`` (prefix, ``.rec`` or ``.idx`` path), an image folder or a ``.bin``.

    Counts images and identities (from the identity records of a ``.rec`` when it has them) and the
    image sizes seen. With ``decode`` every image is decoded and each failure is listed (key or
    path + error); otherwise only the headers of ``sample`` evenly spaced images are read.
    """
    try:
        found = open_source(path)
    except SourceError as e:
        raise PackError(str(e)) from None
    if found.format == "folder":
        return _inspect_folder(found.path, decode, sample, progress)
    if found.format == "bin":
        return _inspect_bin(found.path, decode, sample)
    return _inspect_rec(found.path, decode, sample, progress)


__all__ = [
    "InspectReport",
    "PackError",
    "PackResult",
    "histogram",
    "inspect_path",
    "pack_folder",
    "pack_list",
    "pack_pairs",
    "read_image_list",
    "scan_folder",
]
