"""The data source contract: what a training set gives the trainer, and which format a path holds.

- :class:`TrainingSet` (a Protocol): what the trainer reads from any training set, built in or out of tree:
  ``num_classes``, ``len(ds)`` and ``ds[i] -> ((3, S, S) float32 normalised (x - 127.5) / 127.5, int label)``;
  optionally ``describe(i)`` (the item in error messages) and ``labels`` (int ``(N,)``, read once by samplers
  and label noise instead of every item).
- :class:`DecodedImages` (a Protocol): the simpler thing most sources are: ``ds[i] -> (uint8 (S, S, 3) RGB,
  int label)`` with ``num_classes`` and ``len``.
- :class:`TrainImages`: wraps a :class:`DecodedImages` into a :class:`TrainingSet` (size check, normalisation,
  unreadable records named or skipped). An out-of-tree source returns ``TrainImages(my_images, image_size)``.
- :func:`open_source`: decides once whether a path is a RecordIO ``.rec``/``.idx`` prefix, an image folder or an
  insightface ``.bin``; training, evaluation and ``faceforge pack``/``inspect`` all ask it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset

from faceforge.data.transforms import to_tensor
from faceforge.core.fileio import append_text

__all__ = ["BadRecordError", "DataSource", "DecodedImages", "SourceError", "TrainImages", "TrainingSet", "open_source"]


@runtime_checkable
class TrainingSet(Protocol):
    """What the trainer reads from a training set (``DATASETS`` factories return one)."""

    @property
    def num_classes(self) -> int: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


@runtime_checkable
class DecodedImages(Protocol):
    """Decoded images and labels: ``ds[i] -> (uint8 (S, S, 3) RGB, int label)``; wrap it in :class:`TrainImages`."""

    @property
    def num_classes(self) -> int: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


class BadRecordError(ValueError):
    """A training record that cannot be read or decoded (the message names file, key and offset)."""


class DatasetView(Dataset):
    """A dataset seen through a wrapper: length, ``num_classes`` and ``describe`` are the wrapped one's."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    @property
    def num_classes(self) -> int:
        return int(self.dataset.num_classes)

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self, index: int) -> str:
        """Item ``index`` for error messages: the wrapped dataset's own words (file, record), else ``image i``."""
        describe = getattr(self.dataset, "describe", None)
        return describe(index) if describe is not None else f"image {index}"


class TrainImages(DatasetView):
    """A :class:`DecodedImages` (``ds[i] -> (uint8 HWC, label)``) as a :class:`TrainingSet`.

    ``ds[i] -> ((3, S, S) float32 normalised (x - 127.5) / 127.5, label)``; an image that is not
    ``image_size`` square raises ValueError naming the file / record (nothing is resized).

    ``bad_records``: None (default) = an unreadable record raises :class:`BadRecordError` naming it (file,
    key, byte offset); a path (``data.skip_bad``) = it is appended there, one line each, and the next readable
    index takes its place (so batches keep their size and a resumed run reads the same images).
    """

    MAX_SKIPPED_IN_A_ROW = 64

    def __init__(self, dataset: Any, image_size: int, bad_records: Path | None = None) -> None:
        super().__init__(dataset)
        self.image_size = image_size
        self.bad_records = bad_records
        self._reported: set[int] = set()

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        s = self.image_size
        if image.shape != (s, s, 3):
            raise ValueError(
                f"{self.describe(index)}: image is {image.shape[1]}x{image.shape[0]} but data.image_size is {s}; "
                f"images are not resized (align/crop them to {s}x{s} first)"
            )
        return to_tensor(image), int(label)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(self.MAX_SKIPPED_IN_A_ROW):
            i = (index + attempt) % len(self)
            try:
                return self._load(i)
            except (ValueError, OSError) as e:
                message = " ".join(str(e).split())
                if self.bad_records is None:
                    raise BadRecordError(f"data.path: {message}; expected a readable image (data.skip_bad: true "
                                         f"skips such records)") from e
                if i not in self._reported:  # one line per record and process (workers append too)
                    self._reported.add(i)
                    append_text(self.bad_records, f"{message}\n")
        raise BadRecordError(f"data.path: {self.MAX_SKIPPED_IN_A_ROW} unreadable records in a row from "
                             f"{self.describe(index)} (data.skip_bad); expected mostly readable data")


class SourceError(FileNotFoundError):
    """A path that is none of the formats :func:`open_source` knows (the message names it)."""


@dataclass(frozen=True)
class DataSource:
    """Where images live: ``format`` ``"rec"`` (``path`` = the prefix of ``path.rec``/``path.idx``), ``"folder"``
    or ``"bin"`` (``path`` = the file or folder itself)."""

    format: Literal["rec", "folder", "bin"]
    path: str


def open_source(path: str | os.PathLike) -> DataSource:
    """Which format ``path`` holds, decided by one rule everywhere.

    1. ``X.rec`` / ``X.idx`` or a prefix ``X`` whose ``X.rec`` or ``X.idx`` exists: RecordIO with prefix ``X``
       (a missing partner file is the reader's error, naming it);
    2. else a directory: an image folder;
    3. else an existing file ending ``.bin``: an insightface verification ``.bin``.

    Raises :class:`SourceError` (a FileNotFoundError) naming the path when it is none of these. Nothing is read.
    """
    p = os.fspath(path)
    prefix = p[:-4] if p.endswith((".rec", ".idx")) else p
    if os.path.isfile(prefix + ".rec") or os.path.isfile(prefix + ".idx"):
        return DataSource("rec", prefix)
    if os.path.isdir(p):
        return DataSource("folder", p)
    if p.endswith(".bin") and os.path.isfile(p):
        return DataSource("bin", p)
    raise SourceError(f"{p}: not found as an image folder, a .rec/.idx prefix or a .bin file")
