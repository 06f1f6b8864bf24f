"""Row-sharded tensors in checkpoints: one logical (N, ...) tensor, written by the ranks that hold its rows.

A class-sharded head (``faceforge.heads.parallel``) holds rows [c0, c1) of W on each rank, and the optimiser
holds the same rows of its state (SGD's momentum, Adam's moments). A checkpoint keeps each such tensor as ONE
logical tensor, so that a run with any world size (or one process, or ``faceforge eval``) reads back the rows
it needs:

- the tensor's rows go into a raw file ``shards/step_XXXXXXX/<name>.bin`` beside the checkpoint (row-major,
  the tensor's dtype, native byte order); rank 0 creates it at its full size and every rank writes its own
  rows at their byte offset (``os.pwrite``): nothing is gathered on one rank;
- in the checkpoint dict the tensor is replaced by a placeholder ``{"__row_shard__": "<file, relative to the
  checkpoint's folder>", "shape": [N, ...], "dtype": "float32"}`` (plain containers: the checkpoint still loads
  with ``weights_only=True``);
- :func:`resolve` replaces the placeholders of a loaded checkpoint with tensors: every row, or only the rows a
  rank holds (``rows_of``).

The shard files of a step are written (and fsync'ed) before ``last.pt`` names them, and a folder is deleted
only when no checkpoint file names its step any more, so a run killed at any moment leaves ``last.pt``
readable with the files it names.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from faceforge.core.fileio import atomic_path, open_nofollow

__all__ = ["PLACEHOLDER_KEY", "SHARDS_FOLDER", "RowShard", "confined", "is_placeholder", "placeholder", "prune", "read_rows", "resolve",
           "shard_file", "write_rows"]

PLACEHOLDER_KEY = "__row_shard__"
SHARDS_FOLDER = "shards"

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16,
                                                     torch.int64, torch.int32, torch.uint8, torch.bool)}


class RowShard(NamedTuple):
    """This rank's rows [start, stop) of a logical tensor of ``total`` rows (a class-sharded head's W, parallel.py).

    A checkpoint writes each rank's rows of such a tensor into one logical (total, ...) tensor, and a run with
    another world size reads back the rows it holds (``faceforge.core.checkpoint``)."""

    start: int
    stop: int
    total: int


def shard_file(step: int, name: str) -> str:
    """The shard file of tensor ``name`` at ``step``, relative to the checkpoint's folder."""
    return f"{SHARDS_FOLDER}/step_{step:07d}/{name}.bin"


def placeholder(file: str, shard: RowShard, tensor: Tensor) -> dict[str, Any]:
    """What the checkpoint holds instead of this rank's rows ``tensor`` of a logical (shard.total, ...) tensor."""
    return {PLACEHOLDER_KEY: file, "shape": [shard.total, *tensor.shape[1:]], "dtype": _dtype_name(tensor.dtype)}


def is_placeholder(value: Any) -> bool:
    return isinstance(value, dict) and PLACEHOLDER_KEY in value


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"a row-sharded tensor of dtype {dtype}; expected one of {sorted(_DTYPES)}")
    return name


def _row_bytes(shape: list[int], dtype: torch.dtype) -> int:
    return int(np.prod(shape[1:], dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()


def create(folder: Path, file: str, shape: list[int], dtype: torch.dtype) -> None:
    """Rank 0: make the (empty, full-size) shard file, before any rank writes into it."""
    with atomic_path(folder / file) as tmp:  # a new file: a link planted at the name is replaced, not followed
        os.truncate(tmp, shape[0] * _row_bytes(shape, dtype))


def write_rows(folder: Path, file: str, shard: RowShard, tensor: Tensor) -> None:
    """Write this rank's rows [shard.start, shard.stop) into the logical tensor's file at their byte offset."""
    data = tensor.detach().contiguous().cpu()
    raw = data.view(torch.uint8) if data.dtype != torch.bool else data.to(torch.uint8)
    buffer = raw.numpy().tobytes() if data.numel() else b""
    offset = shard.start * _row_bytes([shard.total, *data.shape[1:]], data.dtype)
    with open_nofollow(folder / file, "r+b") as f:
        fd, written = f.fileno(), 0
        while written < len(buffer):
            written += os.pwrite(fd, buffer[written:], offset + written)
        os.fsync(fd)


def confined(folder: Path, name: Any) -> Path:
    """``folder / name`` for a shard file a checkpoint names: a relative name inside the checkpoint's own folder
    (no absolute path, no ``..``, no link out of it), so that a checkpoint cannot make faceforge read any file.
    ValueError naming the entry otherwise."""
    shown = repr(name)[:200]
    if not isinstance(name, str) or not name or "\0" in name:
        raise ValueError(f"{folder}: row shard {shown}: expected a file name relative to the checkpoint's folder")
    parts = Path(name).parts
    if Path(name).is_absolute() or "\\" in name or ".." in parts or (parts and ":" in parts[0]):
        raise ValueError(f"{folder}: row shard {shown}: expected a relative file name inside the checkpoint's folder "
                         "(no absolute path, no '..'); a checkpoint may name only its own shard files")
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{folder}: row shard {shown} leads out of the checkpoint's folder (a link); expected a file "
                         "inside it")
    return path


def read_rows(folder: Path, entry: dict[str, Any], start: int = 0, stop: int | None = None) -> Tensor:
    """Rows [start, stop) (default all) of the logical tensor a placeholder names, read from its file."""
    shape, dtype = entry.get("shape"), _DTYPES.get(str(entry.get("dtype", "")))
    if not (isinstance(shape, (list, tuple)) and shape and all(type(n) is int and n >= 0 for n in shape)):
        raise ValueError(f"{folder}: row shard {str(entry[PLACEHOLDER_KEY])[:200]!r}: shape {repr(shape)[:100]}; "
                         "expected a list of ints >= 0")
    shape = list(shape)
    if dtype is None:
        raise ValueError(f"{folder}: row shard {entry[PLACEHOLDER_KEY]!r} of dtype {entry.get('dtype')!r}; "
                         f"expected one of {sorted(_DTYPES)}")
    stop = shape[0] if stop is None else stop
    if not 0 <= start <= stop <= shape[0]:
        raise ValueError(f"rows [{start}, {stop}) of {entry[PLACEHOLDER_KEY]!r}, which has {shape[0]} rows")
    path = confined(folder, entry[PLACEHOLDER_KEY])
    row_bytes = _row_bytes(shape, dtype)
    if not path.is_file() or path.stat().st_size != shape[0] * row_bytes:
        raise FileNotFoundError(
            f"{path}: the rows of a row-sharded tensor {tuple(shape)} {entry['dtype']}; expected a file of "
            f"{shape[0] * row_bytes} bytes beside the checkpoint"
        )
    with open(path, "rb") as f:
        f.seek(start * row_bytes)
        raw = bytearray(f.read((stop - start) * row_bytes))
    flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    if dtype == torch.bool:
        return flat.to(torch.bool).reshape(stop - start, *shape[1:])
    return flat.view(dtype).reshape(stop - start, *shape[1:])


def resolve(state: Any, folder: Path, rows_of: Callable[[str], tuple[int, int] | None] | None = None) -> Any:
    """``state`` with every placeholder replaced by its tensor: the rows ``rows_of(dotted key)`` (a rank's
    shard) where that gives a range, else every row. A plain tensor where ``rows_of`` gives a range is a whole
    logical tensor (an unsharded run's W): its rows are taken too, so a checkpoint moves to a sharded run. Keys are dotted paths from the top: "head.head.weight",
    "optimizer.state.3.momentum_buffer"."""

    def walk(value: Any, key: str) -> Any:
        if is_placeholder(value):
            rows = rows_of(key) if rows_of is not None else None
            return read_rows(folder, value, *(rows or (0, None)))
        if torch.is_tensor(value) and value.dim() >= 1 and rows_of is not None and (rows := rows_of(key)):
            return value[rows[0] : rows[1]]  # a whole logical tensor, written by an unsharded run: this rank's rows
        if isinstance(value, dict):
            return {k: walk(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(value)]
        return value

    return walk(state, "")


def prune(folder: Path, keep_steps: set[int]) -> None:
    """Delete the shard folders of steps no checkpoint names any more."""
    root = folder / SHARDS_FOLDER
    if not root.is_dir():
        return
    for step_folder in root.glob("step_*"):
        try:
            step = int(step_folder.name.removeprefix("step_"))
        except ValueError:
            continue
        if step not in keep_steps:
            shutil.rmtree(step_folder, ignore_errors=True)
