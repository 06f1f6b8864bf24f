"""Unlabelled images for semi-supervised distillation (BigFace: "Semi-Supervised KD" on images without labels).

``data.unlabelled`` names an image folder (every image file under it, any depth, sorted by path) or an
insightface RecordIO prefix (its labels ignored). Each training micro-batch then carries, after its B
labelled images, ``U = round(data.unlabelled_ratio * B)`` unlabelled ones with label -1; an objective that
reads them (``Objective.uses_unlabelled``, the distillation) feeds them to the distillation term only.

Which unlabelled images a micro-batch gets is a function of ``(seed, global micro-batch number)`` only:
the unlabelled set is read as an endless stream of permutations (permutation ``k`` of ``M`` images from
``(seed, k)``), global micro-batch ``g`` takes stream positions ``[g U W, (g + 1) U W)`` and rank ``r``
every W-th of them, as the labelled images are shared. Their flips come from ``(seed, g)`` as well, so
there is no state to checkpoint and a resumed run draws the same images.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from faceforge.data.folder import DatasetError, _is_image, decode_image

__all__ = ["UNLABELLED", "UnlabelledFolder", "Unlabelled", "stream_indices", "stream_flips"]

UNLABELLED = -1  # the label of an unlabelled image in a Batch
_SALT = 0x0B5E55ED


class UnlabelledFolder:
    """Every image file under ``root`` (any depth, sorted by path): ``ds[i] -> (uint8 HWC RGB, -1)``."""

    def __init__(self, root: str | os.PathLike) -> None:
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DatasetError(f"{root}: unlabelled image folder not found (expected a folder of images)")
        self.root = root
        self.paths = sorted(
            os.path.join(dirpath, name)
            for dirpath, dirnames, names in os.walk(root)
            for name in names
            if _is_image(name) and not any(part.startswith(".") for part in os.path.relpath(dirpath, root).split(os.sep) if part != ".")
        )
        if not self.paths:
            raise DatasetError(f"{root}: no images in the unlabelled folder")
        self.num_classes = 0

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return self.paths[index]

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return decode_image(self.paths[index], self.paths[index]), UNLABELLED


class Unlabelled:
    """A labelled dataset seen without its labels: ``ds[i] -> (image, -1)`` (a RecordIO set as unlabelled)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.num_classes = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self, index: int) -> str:
        describe = getattr(self.dataset, "describe", None)
        return describe(index) if describe is not None else f"unlabelled image {index}"

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.dataset[index][0], UNLABELLED


def _permutation(num: int, seed: int, k: int) -> Tensor:
    generator = torch.Generator().manual_seed((seed * 1_000_003 + k) ^ _SALT)
    return torch.randperm(num, generator=generator)


def stream_indices(global_micro: int, per_batch: int, world_size: int, rank: int, num: int, seed: int) -> Tensor:
    """(per_batch,) int64 indices of rank ``rank``'s unlabelled images in global micro-batch ``global_micro``."""
    positions = torch.arange(global_micro * per_batch * world_size + rank, (global_micro + 1) * per_batch * world_size,
                             world_size)
    out = torch.empty(len(positions), dtype=torch.long)
    cycles = positions // num
    for k in cycles.unique().tolist():
        where = cycles == k
        out[where] = _permutation(num, seed, k)[positions[where] % num]
    return out


def stream_flips(global_micro: int, per_batch: int, world_size: int, rank: int, seed: int) -> Tensor:
    """(per_batch,) bool: which of those images are flipped (p = 0.5, from ``(seed, global_micro)``)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + global_micro) ^ (_SALT + 1))
    return torch.rand(per_batch * world_size, generator=generator)[rank::world_size] < 0.5
