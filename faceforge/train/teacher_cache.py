"""A memory-mapped cache of teacher embeddings, so that a big teacher embeds each training view once.

A *view* is a training image as the student sees it without a mask: dataset index i, flipped or not
(``Batch.view_ids``: ``2 i + flipped``); there are ``2 (N + M)`` of them for N labelled and M unlabelled
images, whatever the seed draws, so one cache serves every epoch. A masked image is a new view each
epoch (``faceforge.data.masks``) and is embedded by the teacher every time; with ``data.mask_ratio`` 0.35
the cache saves 65% of the teacher's work after the first pass over the data.

Files, in ``folder``: ``teacher-<key>.npy`` (``2 (N + M) x D`` float32, ``numpy.lib.format.open_memmap``),
``teacher-<key>.filled.npy`` (one byte per view: written) and ``teacher-<key>.json`` (the key in words).
The key hashes the teacher file (path, size, modification time, dtype), the training set (type, length,
classes, first and last item as the dataset names them), the unlabelled set and the run's
augmentation seed: another teacher, data set or seed gets another cache. Ranks of one host share the files
(rank 0 creates them; the others open them after a barrier; each writes only the rows of its own images).

A cached row was computed with the other images of the micro-batch it first appeared in; on CPU a
convolution's result can depend on the batch in the last float32 bits, so a run with the cache matches one
without it to ~1e-6, not bit for bit. A resumed run reads what the uninterrupted one wrote: resume stays
bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from faceforge.core.fileio import atomic_path, open_nofollow, write_text

__all__ = ["TeacherCache", "dataset_fingerprint"]


def dataset_fingerprint(dataset: Any) -> dict[str, Any] | None:
    """What identifies a data set cheaply: type, length, classes, and its first and last items' names."""
    if dataset is None:
        return None
    n = len(dataset)
    describe = getattr(dataset, "describe", None)
    names = [describe(0), describe(n - 1)] if describe is not None and n else []
    return {"type": type(dataset).__name__, "length": n, "classes": int(getattr(dataset, "num_classes", 0)), "items": names}


def _create(path: Path, dtype: type, shape: tuple[int, ...]) -> None:
    """A zero-filled ``.npy`` of ``shape`` made in a fresh temporary and renamed onto ``path`` (no link followed)."""
    with atomic_path(path) as tmp:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape).flush()


def _open(path: Path) -> np.memmap:
    """The ``.npy`` at ``path`` memory-mapped for update; a symlink there is refused (``open_nofollow``)."""
    with open_nofollow(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        return np.memmap(f, dtype=dtype, mode="r+", offset=f.tell(), shape=shape, order="F" if fortran else "C")


class TeacherCache:
    """``rows`` teacher embeddings of width ``dim`` in memory-mapped files under ``folder`` (module doc)."""

    def __init__(self, folder: str | os.PathLike, key: dict[str, Any], rows: int, dim: int) -> None:
        from faceforge.train import distributed as fdist

        self.folder = Path(folder)
        self.key = {**key, "rows": rows, "dim": dim, "format": 1}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.base = self.folder / f"teacher-{digest}"
        emb_path, flag_path = self.base.with_suffix(".npy"), Path(f"{self.base}.filled.npy")
        if fdist.is_main():
            self.folder.mkdir(parents=True, exist_ok=True)
            if not (emb_path.is_file() and flag_path.is_file()):
                _create(emb_path, np.float32, (rows, dim))
                _create(flag_path, np.uint8, (rows,))
                write_text(f"{self.base}.json", json.dumps(self.key, indent=1, sort_keys=True))
        fdist.barrier()
        self.embeddings = _open(emb_path)
        self.filled = _open(flag_path)
        if self.embeddings.shape != (rows, dim) or self.filled.shape != (rows,):
            raise ValueError(f"{emb_path}: cache shaped {self.embeddings.shape}, expected ({rows}, {dim}); delete it")
        self.hits = 0
        self.misses = 0

    def lookup(self, views: Tensor) -> tuple[Tensor, Tensor]:
        """``(found (K,) bool, embeddings (K, D) float32 with zeros where not found)`` of view ids (K,)."""
        idx = views.cpu().numpy()
        found = self.filled[idx].astype(bool)
        out = np.zeros((len(idx), self.embeddings.shape[1]), dtype=np.float32)
        out[found] = self.embeddings[idx[found]]
        self.hits += int(found.sum())
        self.misses += int((~found).sum())
        return torch.from_numpy(found), torch.from_numpy(out)

    def store(self, views: Tensor, embeddings: Tensor) -> None:
        """Write the rows of ``views`` (K,), then mark them written."""
        idx = views.cpu().numpy()
        self.embeddings[idx] = embeddings.detach().float().cpu().numpy()
        self.filled[idx] = 1
