"""IJB-B / IJB-C evaluation: image features, 1:1 verification (TAR@FAR) and 1:N identification.

Features follow insightface's ``eval_ijbc.py`` (reference notes, section 1.6):

* each aligned image and its horizontal flip are embedded and the two outputs are **added** ("F2");
* the sum is **not** L2-normalised per image ("N1": the norm is kept, so confident images weigh more);
* optionally the feature is multiplied by the detector's faceness score ("D1", ``faceness_weight``);
* templates: images averaged within each media, medias summed, the sum L2-normalised
  (:func:`template_features`); scores are cosine similarities.

So :func:`ijb_embeddings` returns raw (un-normalised) flip-sums; do not feed it
:func:`faceforge.eval.verify.embed`, which normalises each image.

Differences from insightface, by convention (``protocol="faceforge"``, the default): TAR@FAR is
:func:`faceforge.eval.metrics.tar_at_far` (the largest TPR on the exact ROC with ``FPR <= far``;
insightface takes the ROC point whose FPR is closest to ``far``, which may exceed it), and TPIR allows
``floor(FPIR N)`` false alarms (insightface one fewer). ``protocol="insightface"`` reads the numbers as
insightface does (``faceforge.eval.metrics.IJB_PROTOCOLS``). 1:N TPIR@FPIR and rank-k use
:mod:`faceforge.eval.metrics`. (The readers of the meta files and images are :mod:`faceforge.data.ijb`.)

The 1:N gallery / probe CSVs (``ijbc_1N_gallery_G1.csv``, ``ijbc_1N_probe_mixed.csv``, ...) have a
header ``TEMPLATE_ID,SUBJECT_ID,FILENAME,...`` and one row per image; :func:`read_1n_gallery` and
:func:`read_1n_probes` reduce them to ``{template_id: subject_id}``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from faceforge.data.align import TEMPLATE_SIZE
from faceforge.data.ijb import INT64_MAX, IJBMeta, iter_aligned
from faceforge.eval import metrics
from faceforge.eval.verify import embed_batches
from faceforge.core.fileio import save_npy

__all__ = [
    "ijb_embeddings",
    "ijb_identification",
    "ijb_templates",
    "ijb_verification",
    "read_1n_gallery",
    "read_1n_probes",
    "template_features",
    "verification_scores",
]


# --------------------------------------------------------------------------------------------------
# Templates and pair scores (insightface's eval_ijbc.py)
# --------------------------------------------------------------------------------------------------


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their norm; an all-zero row stays zero (as ``sklearn.preprocessing.normalize``)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def _group_sum(x: np.ndarray, group: np.ndarray, count: int) -> np.ndarray:
    """``out[g] = sum of x[i] over group[i] == g`` in float64 (torch's index_add_, far faster than np.add.at)."""
    out = torch.zeros((count, x.shape[1]), dtype=torch.float64)
    out.index_add_(0, torch.from_numpy(np.ascontiguousarray(group, dtype=np.int64)),
                   torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)))
    return out.numpy()


def template_features(image_features, templates, medias, faceness=None) -> tuple[np.ndarray, np.ndarray]:
    """Template features by the IJB protocol of insightface's ``eval_ijbc.py``.

    ``image_features`` ``(N, D)`` (numpy or a tensor; times ``faceness[:, None]`` when given) are
    averaged within each ``(template, media)``; a template's media features are summed, and the sum is
    L2-normalised (an all-zero sum stays zero). Returns ``(unique_templates int64 (T,) sorted,
    features (T, D))``, float64 for float64 input, float32 otherwise.
    """
    if isinstance(image_features, torch.Tensor):
        image_features = image_features.detach().cpu().numpy()
    feats = np.asarray(image_features)
    if feats.ndim != 2:
        raise ValueError(f"image_features must be (N, D), got shape {feats.shape}")
    n = len(feats)
    templates, medias = np.asarray(templates).ravel(), np.asarray(medias).ravel()
    if len(templates) != n or len(medias) != n:
        raise ValueError(f"templates and medias must have one entry per image ({n}), got {len(templates)} and {len(medias)}")
    out_dtype = np.float64 if feats.dtype == np.float64 else np.float32
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, feats.shape[1]), dtype=out_dtype)
    feats = np.asarray(feats, dtype=np.float64)
    if faceness is not None:
        faceness = np.asarray(faceness, dtype=np.float64).ravel()
        if len(faceness) != n:
            raise ValueError(f"faceness must have one score per image ({n}), got {len(faceness)}")
        feats = feats * faceness[:, None]
    order = np.lexsort((medias, templates))
    t, m = templates[order], medias[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (t[1:] != t[:-1]) | (m[1:] != m[:-1])
    group = np.empty(n, dtype=np.int64)
    group[order] = np.cumsum(new_group) - 1  # (template, media) group of each image, in file order
    starts = np.flatnonzero(new_group)
    media_means = _group_sum(feats, group, len(starts)) / np.bincount(group, minlength=len(starts))[:, None]
    group_t = t[starts]
    new_template = np.ones(len(starts), dtype=bool)
    new_template[1:] = group_t[1:] != group_t[:-1]
    t_starts = np.flatnonzero(new_template)
    sums = _group_sum(media_means, np.cumsum(new_template) - 1, len(t_starts))
    return group_t[t_starts].astype(np.int64), _l2_normalize(sums).astype(out_dtype)


def verification_scores(template_ids, template_feats, p1, p2, chunk_size: int = 8192) -> np.ndarray:
    """Cosine similarity of each pair ``(p1[i], p2[i])`` of template ids, computed ``chunk_size`` pairs at a time.

    ``template_ids`` ``(T,)`` name the rows of ``template_feats`` ``(T, D)`` (any order, no repeats).
    A pair naming a template that has no features is an error naming it. Returns float64 ``(P,)``.
    """
    ids = np.asarray(template_ids).ravel()
    feats = np.asarray(template_feats)
    if feats.ndim != 2 or len(feats) != len(ids):
        raise ValueError(f"template_feats must be (T, D) with T = len(template_ids) = {len(ids)}, got {feats.shape}")
    p1, p2 = np.asarray(p1).ravel(), np.asarray(p2).ravel()
    if len(p1) != len(p2):
        raise ValueError(f"p1 and p2 must have the same length, got {len(p1)} and {len(p2)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    sorter = np.argsort(ids, kind="stable")
    sorted_ids = ids[sorter]
    if len(ids) > 1 and (sorted_ids[1:] == sorted_ids[:-1]).any():
        dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][0]
        raise ValueError(f"template_ids must not repeat, got {dup} more than once")
    feats = _l2_normalize(feats.astype(np.float64))

    def rows(p: np.ndarray, which: str, offset: int) -> np.ndarray:
        if len(ids) == 0:
            if len(p):
                raise ValueError(f"{which} names template {p[0]}, which has no features (none given)")
            return p.astype(np.int64)
        pos = np.clip(np.searchsorted(sorted_ids, p), 0, len(ids) - 1)
        bad = sorted_ids[pos] != p
        if bad.any():
            raise ValueError(f"{which} names {int(bad.sum())} pair(s) whose template has no features, "
                             f"first template {p[bad][0]} (pair {offset + int(np.argmax(bad))})")
        return sorter[pos]

    scores = np.empty(len(p1), dtype=np.float64)
    for start in range(0, len(p1), chunk_size):
        stop = start + chunk_size
        a = feats[rows(p1[start:stop], "p1", start)]
        b = feats[rows(p2[start:stop], "p2", start)]
        scores[start:stop] = np.einsum("ij,ij->i", a, b)
    return scores


# --------------------------------------------------------------------------------------------------
# Image features
# --------------------------------------------------------------------------------------------------


def _load_cache(path: Path, meta: IJBMeta) -> np.ndarray:
    try:
        feats = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read cached IJB features: {e}") from e
    if feats.ndim != 2 or len(feats) != len(meta):
        raise ValueError(f"{path}: cached IJB features have shape {feats.shape}, expected ({len(meta)}, D) "
                         f"for the {len(meta)} images of {meta.name}; delete the file to recompute")
    if not np.issubdtype(feats.dtype, np.floating):
        raise ValueError(f"{path}: cached IJB features must be floating point, got {feats.dtype}")
    return feats.astype(np.float32, copy=False)


def ijb_embeddings(model: nn.Module, meta: IJBMeta, root: str | Path, batch_size: int = 128, flip: bool = True,
                   progress: bool = False, cache: str | Path | None = None, size: int = TEMPLATE_SIZE,
                   device: torch.device | str | None = None) -> np.ndarray:
    """Image features of every image of ``meta``, in file order: ``f(x) + f(flip(x))``, **not** normalised.

    Images are read from ``root/loose_crop`` and aligned to ``size x size`` by
    :func:`faceforge.data.ijb.iter_aligned`, normalised as ``(x - 127.5) / 127.5``, and run through
    ``model`` in eval mode (restored afterwards) under ``torch.no_grad()``. With ``flip=False`` only
    ``f(x)``. The per-image norm is kept, as insightface's "N1" mode; templates normalise later.

    ``cache``: a ``.npy`` path. If it exists its array is returned without running the model; it must be
    2-D with one row per image of ``meta`` (otherwise ``ValueError`` naming the file). If it does not
    exist the features are computed and written there.

    Returns float32 ``(N, D)``.
    """
    cache_path = Path(cache) if cache is not None else None
    if cache_path is not None and cache_path.exists():
        return _load_cache(cache_path, meta)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if len(meta) == 0:
        raise ValueError("meta lists no images")
    batches = iter_aligned(meta, root, size=size, batch_size=batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=math.ceil(len(meta) / batch_size), desc=f"{meta.name} features",
                       unit="batch")
    feats = embed_batches(model, (batch.images for batch in batches), flip, device, normalize=False)
    if cache_path is not None:
        save_npy(cache_path, feats)
    return feats


def _check_features(image_features, meta: IJBMeta) -> np.ndarray:
    if isinstance(image_features, torch.Tensor):
        image_features = image_features.detach().cpu().numpy()
    feats = np.asarray(image_features)
    if feats.ndim != 2 or len(feats) != len(meta):
        raise ValueError(f"image_features must be (N, D) with N = {len(meta)} images of {meta.name}, "
                         f"got shape {feats.shape}")
    return feats


def ijb_templates(image_features, meta: IJBMeta, faceness_weight: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(template ids int64 (T,) sorted, template features float64 (T, D))`` of ``meta`` from its image
    features ``(N, D)``: :func:`template_features`, faceness-weighted if asked. Compute
    it once and pass it as ``templates=`` to :func:`ijb_verification` and :func:`ijb_identification`."""
    feats = _check_features(image_features, meta)
    return template_features(feats, meta.templates, meta.medias, meta.faceness if faceness_weight else None)


# --------------------------------------------------------------------------------------------------
# 1:1 verification
# --------------------------------------------------------------------------------------------------


def ijb_verification(image_features, meta: IJBMeta, faceness_weight: bool = False,
                     fars: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
                     templates: tuple[np.ndarray, np.ndarray] | None = None, protocol: str = "faceforge") -> dict:
    """The IJB 1:1 protocol on ``meta``'s template pairs.

    ``image_features`` ``(N, D)`` from :func:`ijb_embeddings`; with ``faceness_weight`` each is multiplied
    by its faceness score (insightface "D1"). Templates by :func:`template_features`,
    pair scores by cosine. ``templates``: their :func:`ijb_templates`, when already computed (then
    ``image_features`` and ``faceness_weight`` are not used).

    ``protocol``: "faceforge" (default; TAR exact, the largest with ``FPR <= far``) or "insightface" (the ROC
    point whose FPR is nearest ``far``, possibly above it: ``PairCounts.tar_at_far_nearest``).

    Returns a dict: ``tar_at_far`` ``{far: TAR}`` (by ``protocol``; see the module notes),
    ``auc``, ``scores`` float64 ``(P,)``, ``labels`` int64 ``(P,)``, ``counts`` (their
    :class:`~faceforge.eval.metrics.PairCounts`: ``counts.rates()`` is the ROC, without another sort).
    """
    ids, tfeats = templates if templates is not None else ijb_templates(image_features, meta, faceness_weight)
    scores = verification_scores(ids, tfeats, meta.p1, meta.p2)
    labels = np.asarray(meta.labels, dtype=np.int64)
    fars = [float(f) for f in fars]
    counts = metrics.PairCounts.of(scores, labels)  # one sort for every number
    if protocol not in metrics.IJB_PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: expected one of {', '.join(metrics.IJB_PROTOCOLS)}")
    read = counts.tar_at_far_nearest if protocol == "insightface" else counts.tar_at_far
    tars = np.atleast_1d(read(fars)) if fars else np.zeros(0)
    return {
        "tar_at_far": {far: float(tar) for far, tar in zip(fars, tars)},
        "auc": counts.auc(),
        "scores": scores,
        "labels": labels,
        "counts": counts,
    }


# --------------------------------------------------------------------------------------------------
# 1:N identification
# --------------------------------------------------------------------------------------------------


def _read_1n_csv(path: str | Path, what: str) -> dict[int, int]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: IJB 1:N {what} file not found")
    out: dict[int, int] = {}
    first_line: dict[int, int] = {}
    with open(path, "r", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True)
        header = None
        for row in _csv_rows(reader, path):
            number = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip().upper() for cell in row]
                missing = [c for c in ("TEMPLATE_ID", "SUBJECT_ID") if c not in header]
                if missing:
                    raise ValueError(f"{path}:{number}: header must name TEMPLATE_ID and SUBJECT_ID columns, "
                                     f"missing {missing} in {row}")
                t_col, s_col = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
                continue
            if len(row) <= max(t_col, s_col):
                raise ValueError(f"{path}:{number}: expected at least {max(t_col, s_col) + 1} fields "
                                 f"(header has {len(header)}), got {len(row)}")
            values = []
            for col, name in ((t_col, "TEMPLATE_ID"), (s_col, "SUBJECT_ID")):
                try:
                    value = int(row[col].strip())
                except ValueError:
                    raise ValueError(f"{path}:{number}: {name} must be an integer, got {row[col][:40]!r}") from None
                if not 0 <= value <= INT64_MAX:  # checked here, before any feature is computed
                    raise ValueError(f"{path}:{number}: {name} {row[col].strip()[:40]} is out of range; expected an "
                                     "integer in 0..2**63-1")
                values.append(value)
            template, subject = values
            if template in out and out[template] != subject:
                raise ValueError(f"{path}:{number}: template {template} has subject {subject}, but subject "
                                 f"{out[template]} on line {first_line[template]}")
            if template not in out:
                out[template], first_line[template] = subject, number
    if header is None:
        raise ValueError(f"{path}: empty IJB 1:N {what} file (no header)")
    if not out:
        raise ValueError(f"{path}: IJB 1:N {what} file has a header but no rows")
    return out


def _csv_rows(reader: Any, path: Path) -> Iterator[list[str]]:
    """The reader's rows; a malformed CSV (an unterminated quote, a field over the csv module's 128 KiB
    limit, a NUL byte) is a ValueError naming ``file:line``, not ``_csv.Error``."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as e:
            raise ValueError(f"{path}:{reader.line_num}: not a readable CSV line: {' '.join(str(e).split())[:120]}; "
                             "expected TEMPLATE_ID,SUBJECT_ID,... rows") from None
        yield row


def read_1n_gallery(path: str | Path) -> dict[int, int]:
    """``{template_id: subject_id}`` of a gallery CSV (``ijbc_1N_gallery_G1.csv`` / ``_G2.csv``).

    The header names the columns (``TEMPLATE_ID``, ``SUBJECT_ID`` required, any order, case-insensitive,
    others ignored); rows are images, so a template repeats. Errors name ``file:line`` for a missing
    column, a short row, a non-integer id, or a template given two subjects.
    """
    return _read_1n_csv(path, "gallery")


def read_1n_probes(path: str | Path) -> dict[int, int]:
    """``{template_id: subject_id}`` of a probe CSV (``ijbc_1N_probe_mixed.csv``); as :func:`read_1n_gallery`."""
    return _read_1n_csv(path, "probe")


def _select(ids: np.ndarray, feats: np.ndarray, wanted: dict, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not wanted:
        raise ValueError(f"{what} is empty")
    keys = np.array(sorted(int(k) for k in wanted), dtype=np.int64)
    pos = np.clip(np.searchsorted(ids, keys), 0, max(len(ids) - 1, 0))
    found = (ids[pos] == keys) if len(ids) else np.zeros(len(keys), dtype=bool)
    if not found.all():
        missing = keys[~found]
        raise ValueError(f"{what}: {len(missing)} of its {len(keys)} templates have no images in the meta file, "
                         f"first {missing[:5].tolist()}; expected every template of it in the meta file")
    labels = np.array([int(wanted[k]) for k in keys.tolist()], dtype=np.int64)
    return feats[pos].astype(np.float64), labels


def ijb_identification(image_features, meta: IJBMeta, gallery: dict[int, int], probes: dict[int, int],
                       fpirs: Sequence[float] = (1e-2, 1e-1), ranks: Sequence[int] = (1, 5, 10),
                       faceness_weight: bool = False,
                       templates: tuple[np.ndarray, np.ndarray] | None = None, protocol: str = "faceforge",
                       gallery_name: str = "gallery", probes_name: str = "probes") -> dict:
    """The IJB 1:N protocol: probe templates searched against gallery templates.

    ``gallery`` / ``probes``: ``{template_id: subject_id}`` (:func:`read_1n_gallery`,
    :func:`read_1n_probes`; ``gallery_name`` / ``probes_name``, their files, name them in errors); every
    template must have images in ``meta`` (else a ValueError naming the file and how many are missing).
    ``protocol``: how TPIR is read (:func:`~faceforge.eval.metrics.tpir_at_fpir`). Template features as in
    :func:`ijb_verification` (or ``templates``, as there); similarity = cosine ``(P, G)``. A probe is *mated* when its subject has a
    gallery template.

    Returns a dict: ``tpir_at_fpir`` ``{fpir: TPIR}`` at rank 1 (:func:`~faceforge.eval.metrics.tpir_at_fpir`
    on all probes; NaN when every probe is mated or none is, as open-set needs both), ``rank``
    ``{k: rate}`` (:func:`~faceforge.eval.metrics.rank_k` over the mated probes; ``k`` larger than the
    gallery is clipped to it), ``mated`` / ``non_mated`` counts, ``similarity`` ``(P, G)``,
    ``probe_templates`` / ``gallery_templates`` (sorted ids, the rows / columns), ``probe_labels`` /
    ``gallery_labels``.
    """
    ids, tfeats = templates if templates is not None else ijb_templates(image_features, meta, faceness_weight)
    g_feats, g_labels = _select(ids, tfeats, gallery, gallery_name)
    p_feats, p_labels = _select(ids, tfeats, probes, probes_name)
    similarity = p_feats @ g_feats.T  # rows already L2-normalised (zero rows stay zero)
    mated = np.isin(p_labels, g_labels)
    n_mated, n_non = int(mated.sum()), int((~mated).sum())
    fpirs = [float(f) for f in fpirs]
    if n_mated and n_non and fpirs:
        tpirs = np.atleast_1d(metrics.tpir_at_fpir(similarity, p_labels, g_labels, fpirs, rank=1, protocol=protocol))
    else:
        tpirs = np.full(len(fpirs), np.nan)
    ranks = [int(k) for k in ranks]
    if any(k < 1 for k in ranks):
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    if n_mated and ranks:
        clipped = [min(k, len(g_labels)) for k in ranks]
        rates = np.atleast_1d(metrics.rank_k(similarity[mated], p_labels[mated], g_labels, clipped))
    else:
        rates = np.full(len(ranks), np.nan)
    return {
        "tpir_at_fpir": {f: float(t) for f, t in zip(fpirs, tpirs)},
        "rank": {k: float(r) for k, r in zip(ranks, rates)},
        "mated": n_mated,
        "non_mated": n_non,
        "similarity": similarity,
        "probe_templates": np.array(sorted(int(k) for k in probes), dtype=np.int64),
        "gallery_templates": np.array(sorted(int(k) for k in gallery), dtype=np.int64),
        "probe_labels": p_labels,
        "gallery_labels": g_labels,
    }
