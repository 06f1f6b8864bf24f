"""The worked data-source example of ``docs/extending.md``: a training set written outside faceforge, named in a
config as ``data: {name: "_extending_data:Stripes", kwargs: {classes: 4, per_class: 8}}`` (no faceforge edit).

Class ``c`` is stripes of period ``c + 2`` pixels at a random phase and colour: a task a tiny network learns.
It uses only the public data contract (``faceforge.data``): :class:`StripeImages` is a ``DecodedImages``
(uint8 ``(S, S, 3)`` images and int labels); :class:`Stripes` wraps it in ``TrainImages`` (size check,
normalisation, unreadable items named or skipped), so it is a ``TrainingSet``.
"""

from __future__ import annotations

import numpy as np

from faceforge.data import TrainImages


class StripeImages:
    """``classes x per_class`` striped images, ``ds[i] -> (uint8 (S, S, 3), i // per_class)``, drawn from ``seed``."""

    def __init__(self, classes: int, per_class: int, image_size: int, seed: int) -> None:
        if classes < 1 or per_class < 1:
            raise ValueError(f"classes and per_class must be >= 1, got {classes} and {per_class}")
        self.num_classes, self.per_class, self.size = classes, per_class, image_size
        self.labels = np.repeat(np.arange(classes, dtype=np.int64), per_class)  # read by samplers, label noise
        rng = np.random.default_rng(seed)
        self._phase = rng.integers(0, 1 << 16, len(self.labels))
        self._colour = rng.integers(64, 256, (len(self.labels), 3))

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, index: int) -> str:
        return f"stripes item {index}"

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        label = int(self.labels[index])
        rows = (np.arange(self.size) + self._phase[index]) % (label + 2) == 0  # (S,) True on a stripe row
        image = np.zeros((self.size, self.size, 3), np.uint8)
        image[rows] = self._colour[index].astype(np.uint8)
        return image, label


class Stripes(TrainImages):
    """The training set: its own kwargs (``classes``, ``per_class``, checked against this signature) and the run
    facts it names (``image_size``, ``seed``; the trainer passes those, never the whole config)."""

    def __init__(self, *, image_size: int, seed: int, classes: int = 4, per_class: int = 8) -> None:
        super().__init__(StripeImages(classes, per_class, image_size, seed), image_size)
