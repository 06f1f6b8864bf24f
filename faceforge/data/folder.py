"""Image folders and image lists as map-style datasets: ``ds[i] -> (image, label)``.

* :class:`ImageFolderDataset`: ``root/<identity>/<image>``, one sub-folder per identity. Labels are
  the sorted folder names' positions (``0 .. C-1``) unless a ``class_to_label`` mapping (a dict or a
  JSON file written by :meth:`ImageFolderDataset.save_label_map`) is given, so that a resumed or an
  evaluation run uses the labels of the run it continues.
* :class:`ImageListDataset`: a text file of ``path label`` lines.

Images are decoded by :mod:`faceforge.data.images` (EXIF orientation applied, every mode read at its
range, transparency on white): without a ``transform`` an item's image is a
uint8 ``(H, W, 3)`` numpy array. Image files are those ending in .jpg, .jpeg, .png, .bmp or .webp
(any case); other files are ignored. Every error names the path (folder, file or ``file:line``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from faceforge.core.fileio import atomic_open

__all__ = [
    "IMAGE_EXTENSIONS",
    "scan_identity_folders",
    "DatasetError",
    "ImageFolderDataset",
    "ImageListDataset",
    "decode_image",
    "load_label_map",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


class DatasetError(ValueError):
    """A malformed image folder / list, label map or image; the message names the path."""


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def scan_identity_folders(root: str | os.PathLike) -> tuple[list[str], list[list[str]]]:
    """``(identity names, image paths per identity)`` of an image folder, both sorted by name.

    Identities are the non-hidden sub-folders of ``root``; their images are the non-hidden files with an
    image extension (any case) directly inside them. Raises :class:`DatasetError` for a missing root,
    a root without sub-folders, or an identity folder without images (naming it). ``faceforge pack``
    and :class:`ImageFolderDataset` both scan with this, so they agree on every identity and image.
    """
    root = os.fspath(root)
    if not os.path.exists(root):
        raise DatasetError(f"{root}: image folder not found")
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: not a folder (expected one sub-folder per identity)")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DatasetError(f"{root}: no identity folders (expected one sub-folder per identity)")
    files = []
    for name in names:
        folder = os.path.join(root, name)
        images = sorted(e.name for e in os.scandir(folder) if _is_image(e.name) and e.is_file())
        if not images:
            raise DatasetError(
                f"{folder}: identity folder has no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)})"
            )
        files.append([os.path.join(folder, f) for f in images])
    return names, files


def decode_image(path: str | os.PathLike, where: str | None = None) -> np.ndarray:
    """Decode an image file -> uint8 RGB ``(H, W, 3)`` (:func:`faceforge.data.images.decode_image`: header
    checked first, EXIF orientation, every mode); :class:`DatasetError` naming the file."""
    from faceforge.data.images import decode_image as decode

    return decode(path, where or os.fspath(path), error=DatasetError)


def load_label_map(path: str | os.PathLike) -> dict[str, int]:
    """Read a ``{folder name: label}`` JSON file (as written by ``save_label_map``)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: label map not found") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read label map (expected a JSON object name -> label): {e}") from None
    return _check_label_map(data, path)


def _check_label_map(data: Any, source: str) -> dict[str, int]:
    if not isinstance(data, Mapping):
        raise DatasetError(f"{source}: label map must map folder names to int labels, got {type(data).__name__}")
    out: dict[str, int] = {}
    for name, label in data.items():
        if not isinstance(name, str) or isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
            raise DatasetError(f"{source}: label map entry {name!r}: {label!r}: expected a folder name -> int >= 0")
        out[name] = int(label)
    if len(set(out.values())) != len(out):
        seen: dict[int, str] = {}
        for name, label in out.items():
            if label in seen:
                raise DatasetError(f"{source}: label map gives label {label} to both {seen[label]!r} and {name!r}")
            seen[label] = name
    return out


class _LabelledImages:
    """Shared behaviour: ``samples`` = [(path, label)], decoding, sampler helpers."""

    samples: list[tuple[str, int]]
    transform: Callable[[np.ndarray], Any] | None
    _num_classes: int

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def labels(self) -> np.ndarray:
        """int64 ``(N,)`` label of every item."""
        return np.fromiter((label for _, label in self.samples), dtype=np.int64, count=len(self.samples))

    def describe(self, index: int) -> str:
        """Where item ``index`` comes from (its file), for error messages."""
        return self.samples[index][0]

    def path_of(self, index: int) -> str:
        return self.samples[index][0]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {self._source} with {n} images")
        index %= n
        path, label = self.samples[index]
        image = decode_image(path, self.describe(index))
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def identity_index(self) -> dict[int, list[int]]:
        """``{label: [dataset indices]}``, labels ascending (what identity samplers need)."""
        out: dict[int, list[int]] = {}
        for i, (_, label) in enumerate(self.samples):
            out.setdefault(label, []).append(i)
        return dict(sorted(out.items()))

    def images_per_identity(self) -> dict[int, int]:
        """``{label: number of images}``, labels ascending."""
        return {label: len(idx) for label, idx in self.identity_index().items()}

    @property
    def _source(self) -> str:
        raise NotImplementedError


class ImageFolderDataset(_LabelledImages):
    """``root/<identity>/<image file>``: one sub-folder per identity, images directly inside it.

    ``class_to_label``: ``{folder name: label}`` (or the path of a JSON file holding one); every
    identity folder must be in it (folders in the map but absent from ``root`` are allowed, and
    ``num_classes`` is then ``max label + 1``). Without it, labels follow the sorted folder names.
    Hidden entries (names starting with ``.``) are skipped.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[np.ndarray], Any] | None = None,
        class_to_label: Mapping[str, int] | str | os.PathLike | None = None,
    ) -> None:
        self.root = os.fspath(root)
        self.transform = transform
        classes, files = scan_identity_folders(self.root)
        if class_to_label is None:
            mapping = {name: i for i, name in enumerate(classes)}
        elif isinstance(class_to_label, (str, os.PathLike)):
            mapping = load_label_map(class_to_label)
        else:
            mapping = _check_label_map(class_to_label, "class_to_label")
        missing = [c for c in classes if c not in mapping]
        if missing:
            raise DatasetError(
                f"{os.path.join(self.root, missing[0])}: identity folder not in the label map "
                f"({len(missing)} folder(s) missing from it); the map fixes the labels of an earlier run"
            )
        self.classes = classes
        self.class_to_label = dict(mapping)
        self._num_classes = (max(mapping.values()) + 1) if mapping else 0
        samples = [(path, mapping[name]) for name, paths in zip(classes, files) for path in paths]
        self.samples = samples

    @property
    def _source(self) -> str:
        return self.root

    def save_label_map(self, path: str | os.PathLike) -> None:
        """Write ``class_to_label`` as JSON (atomically); pass the path back as ``class_to_label``."""
        with atomic_open(path, "w") as f:
            json.dump(dict(sorted(self.class_to_label.items(), key=lambda kv: kv[1])), f, indent=1)
            f.write("\n")


def read_image_list(list_file: str | os.PathLike, root: str | os.PathLike | None = None) -> list[tuple[str, int, int]]:
    """Parse a list file of ``path label`` lines: ``[(path, label, line_number), ...]`` in file order.

    The label is the last field (an int >= 0), so a path may contain spaces. Blank lines and ``#``
    comment lines are skipped. Relative paths are joined to ``root``, or to the list file's folder when
    ``root`` is None. Errors (:class:`DatasetError`) name ``list_file:line``; an empty list is an error.
    """
    source = os.fspath(list_file)
    base = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(source))
    try:
        with open(source, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DatasetError(f"{source}: image list not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{source}: cannot read image list: {e}") from None
    entries = []
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise DatasetError(f"{where}: expected 'path label', got {raw!r}")
        rel, text = parts
        try:
            label = int(text)
        except ValueError:
            raise DatasetError(f"{where}: label {text!r} is not an int") from None
        if label < 0:
            raise DatasetError(f"{where}: negative label {label}")
        entries.append((rel if os.path.isabs(rel) else os.path.join(base, rel), label, lineno))
    if not entries:
        raise DatasetError(f"{source}: no images listed (expected 'path label' lines)")
    return entries


class ImageListDataset(_LabelledImages):
    """A list file of ``path label`` lines (blank lines and ``#`` comments skipped).

    The path may contain spaces (the label is the last field). Relative paths are joined to ``root``,
    or to the list file's folder when ``root`` is None. Labels are ints >= 0; ``num_classes`` is
    ``max label + 1``. Errors name ``list_file:line``.
    """

    def __init__(
        self,
        list_file: str | os.PathLike,
        root: str | os.PathLike | None = None,
        transform: Callable[[np.ndarray], Any] | None = None,
    ) -> None:
        self.list_file = os.fspath(list_file)
        self.root = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(self.list_file))
        self.transform = transform
        entries = read_image_list(self.list_file, self.root)
        for path, _, lineno in entries:
            if not os.path.isfile(path):
                raise DatasetError(f"{self.list_file}:{lineno}: image file not found: {path}")
        samples = [(path, label) for path, label, _ in entries]
        self._lines = [lineno for _, _, lineno in entries]
        self.samples = samples
        self._num_classes = max(label for _, label in samples) + 1

    @property
    def _source(self) -> str:
        return self.list_file

    def describe(self, index: int) -> str:
        return f"{self.list_file}:{self._lines[index]}: {self.samples[index][0]}"
