"""IJB-B / IJB-C as insightface distributes them: meta files, aligned images, template features.

A release root (``IJB_release/IJBC`` or ``.../IJBB``) holds::

    meta/ijbc_face_tid_mid.txt          image_name template_id media_id            (one line per image)
    meta/ijbc_template_pair_label.txt   template1 template2 label                  (one line per 1:1 pair)
    meta/ijbc_name_5pts_score.txt       image_name x1 y1 ... x5 y5 faceness_score  (same images, same order)
    loose_crop/<image_name>             the loosely cropped photos

(``ijbb_*`` for IJB-B.) Fields are separated by white space; blank lines are skipped. The five points
are in the loose crop's pixels, in the ArcFace order (eyes, nose tip, mouth corners), and are mapped
onto the ArcFace template with :func:`faceforge.data.align.align_face`, the similarity transform
insightface's ``eval_ijbc.py`` uses (its 96x112 template shifted by +8 in x is our 112x112 template).

This module reads (meta files, aligned images); the scoring (template features, pair scores, the 1:1
and 1:N protocols) is :mod:`faceforge.eval.ijb`'s. The 1:N gallery/probe CSV files are read there too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, NamedTuple

import numpy as np
from .align import TEMPLATE_SIZE, align_face
from .images import decode_image

__all__ = ["IJBMeta", "IJBBatch", "meta_paths", "iter_aligned"]

_NAMES = ("IJBB", "IJBC")


def _prefix(name: str) -> str:
    key = str(name).upper().replace("-", "")
    if key not in _NAMES:
        raise ValueError(f"name must be one of {_NAMES} (IJB-B or IJB-C), got {name!r}")
    return key.lower()


def meta_paths(root: str | Path, name: str = "IJBC") -> dict[str, Path]:
    """The three meta files of release ``root``: keys ``face_tid_mid``, ``pair_label``, ``name_5pts``."""
    meta, p = Path(root) / "meta", _prefix(name)
    return {
        "face_tid_mid": meta / f"{p}_face_tid_mid.txt",
        "pair_label": meta / f"{p}_template_pair_label.txt",
        "name_5pts": meta / f"{p}_name_5pts_score.txt",
    }


def _open_lines(path: Path) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: IJB meta file not found")
    rows = []
    with open(path, "r", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if fields:
                rows.append((number, fields))
    return rows


INT64_MAX = 2**63 - 1


def _number(path: Path, number: int, value: str, kind: type, what: str):
    try:
        out = kind(value)
    except ValueError:
        raise ValueError(f"{path}:{number}: {what} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {value[:40]!r}") from None
    if kind is int and not 0 <= out <= INT64_MAX:
        raise ValueError(f"{path}:{number}: {what} {value[:40]} is out of range; expected an integer in 0..2**63-1")
    return out


def check_image_name(path: Path, number: int, name: str) -> str:
    """An image name of a meta file, confined to the release: a relative path without ``..`` (an absolute
    name or ``../../x`` would read outside the release folder); a ValueError naming ``file:line`` otherwise."""
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise ValueError(f"{path}:{number}: image name {name[:80]!r} leaves the release folder; expected a "
                         "relative path inside it, without '..'")
    return name


def _read_face_tid_mid(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    names, templates, medias = [], [], []
    for number, fields in _open_lines(path):
        if len(fields) != 3:
            raise ValueError(f"{path}:{number}: expected 'image_name template_id media_id' (3 fields), "
                             f"got {len(fields)} fields")
        names.append(check_image_name(path, number, fields[0]))
        templates.append(_number(path, number, fields[1], int, "template_id"))
        medias.append(_number(path, number, fields[2], int, "media_id"))
    return np.array(names, dtype=str), np.array(templates, dtype=np.int64), np.array(medias, dtype=np.int64)


def _read_name_5pts(path: Path) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    names, numbers, values = [], [], []
    for number, fields in _open_lines(path):
        if len(fields) != 12:
            raise ValueError(f"{path}:{number}: expected 'image_name' + 10 landmark coordinates + "
                             f"faceness_score (12 fields), got {len(fields)} fields")
        row = [_number(path, number, v, float, "landmark coordinates and faceness_score") for v in fields[1:]]
        if not np.isfinite(row).all():
            raise ValueError(f"{path}:{number}: landmark coordinates and faceness_score must be finite, got {fields[1:]}")
        names.append(fields[0])
        numbers.append(number)
        values.append(row)
    table = np.array(values, dtype=np.float64).reshape(-1, 11)
    return names, numbers, table[:, :10].reshape(-1, 5, 2).astype(np.float32), table[:, 10].astype(np.float32)


def _read_pairs(path: Path) -> np.ndarray:
    """``(P, 3)`` int64; a fast C parse first, the line-by-line parse to name a malformed line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: IJB meta file not found")
    try:
        table = np.loadtxt(path, dtype=np.int64, comments=None, ndmin=2)
        if table.size == 0:
            return np.zeros((0, 3), dtype=np.int64)
        if table.shape[1] == 3 and np.isin(table[:, 2], (0, 1)).all():
            return table
    except (ValueError, OverflowError):
        pass
    rows = []
    for number, fields in _open_lines(path):
        if len(fields) != 3:
            raise ValueError(f"{path}:{number}: expected 'template1 template2 label' (3 fields), got {len(fields)} fields")
        row = [_number(path, number, v, int, w) for v, w in zip(fields, ("template1", "template2", "label"))]
        if row[2] not in (0, 1):
            raise ValueError(f"{path}:{number}: label must be 0 (impostor) or 1 (genuine), got {fields[2]!r}")
        rows.append(row)
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


@dataclass
class IJBMeta:
    """The parsed meta files of an IJB-B / IJB-C release.

    Attributes (``N`` images, ``P`` pairs): ``image_names`` str ``(N,)``; ``templates``, ``medias`` int64
    ``(N,)``; ``landmarks`` float32 ``(N, 5, 2)`` ``(x, y)`` in the loose crop; ``faceness`` float32 ``(N,)``;
    ``p1``, ``p2`` int64 ``(P,)`` template ids; ``labels`` int64 ``(P,)`` (1 genuine, 0 impostor).
    """

    name: str
    image_names: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray
    faceness: np.ndarray
    p1: np.ndarray
    p2: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.image_names)

    @classmethod
    def load(cls, root: str | Path, name: str = "IJBC") -> "IJBMeta":
        """Parse ``root/meta/{ijbb,ijbc}_*.txt``.

        Errors name the file and line of a malformed line (wrong field count, a non-numeric field), an
        image of ``face_tid_mid`` with no line in ``name_5pts_score``, and a landmark file whose images
        are not exactly those of ``face_tid_mid`` in the same order.
        """
        paths = meta_paths(root, name)
        names, templates, medias = _read_face_tid_mid(paths["face_tid_mid"])
        lm_names, lm_lines, landmarks, faceness = _read_name_5pts(paths["name_5pts"])
        _cross_check(paths, names, lm_names, lm_lines)
        pairs = _read_pairs(paths["pair_label"])
        labels = pairs[:, 2]
        return cls(name=_prefix(name).upper(), image_names=names, templates=templates, medias=medias,
                   landmarks=landmarks, faceness=faceness, p1=pairs[:, 0].copy(), p2=pairs[:, 1].copy(),
                   labels=labels.copy())


def _cross_check(paths: dict[str, Path], names: np.ndarray, lm_names: list[str], lm_lines: list[int]) -> None:
    tid, pts = paths["face_tid_mid"], paths["name_5pts"]
    if len(names) == len(lm_names) and all(a == b for a, b in zip(names.tolist(), lm_names)):
        return
    have = set(lm_names)
    missing = [n for n in names.tolist() if n not in have]
    if missing:
        raise ValueError(f"{pts}: no landmarks for {len(missing)} image(s) listed in {tid}, "
                         f"first {missing[:5]}")
    for i, (a, b) in enumerate(zip(names.tolist(), lm_names)):
        if a != b:
            raise ValueError(f"{pts}:{lm_lines[i]}: image {b!r} is out of order: record {i} of {tid} is {a!r} "
                             f"(the two files must list the same images in the same order)")
    extra = lm_names[len(names)]
    raise ValueError(f"{pts}:{lm_lines[len(names)]}: image {extra!r} is not in {tid} "
                     f"({len(lm_names)} landmark lines for {len(names)} images)")


class IJBBatch(NamedTuple):
    """One batch of :func:`iter_aligned`: uint8 ``images (B, size, size, 3)`` and ``(B,)`` metadata."""

    images: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    faceness: np.ndarray


def _load_image(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: IJB image not found")
    return decode_image(path, f"{path}: IJB image")


def iter_aligned(meta: IJBMeta, root: str | Path, size: int = TEMPLATE_SIZE, batch_size: int = 128,
                 image_dir: str = "loose_crop") -> Iterator[IJBBatch]:
    """Yield the images of ``meta`` aligned to ``size x size`` crops, in file order, in batches.

    Each image ``root/loose_crop/<name>`` is warped with its five landmarks by
    :func:`~faceforge.data.align.align_face`. A missing or undecodable image is an error naming it.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    folder = Path(root) / image_dir
    for start in range(0, len(meta), batch_size):
        stop = min(start + batch_size, len(meta))
        images = np.empty((stop - start, size, size, 3), dtype=np.uint8)
        for k, i in enumerate(range(start, stop)):
            images[k] = align_face(_load_image(folder / meta.image_names[i]), meta.landmarks[i], size)
        yield IJBBatch(images, meta.templates[start:stop], meta.medias[start:stop], meta.faceness[start:stop])
