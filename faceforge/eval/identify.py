"""MegaFace-style identification with distractors, streamed so that ``P x M`` never materialises.

Protocol (MegaFace challenge 1, Kemelmacher-Shlizerman et al., CVPR 2016): every probe has its mates
in a (small) gallery; ``M`` distractors (identities disjoint from the probes) are added to the
gallery. A probe's rank is ``1 +`` the number of non-mated entries (other-identity gallery entries and
distractors) scoring ``>=`` its best mate, ties counting against the probe exactly as
:func:`faceforge.eval.metrics.rank_k`. The result equals ``rank_k`` on the concatenated gallery.

Verification on the same scores: positives are the probe-mate pairs, negatives every probe-non-mate
pair (``P x (G - mates) + P x M`` of them, ~1e9 for 1000 probes and 1M distractors). TAR@FAR is exact
(equal to :func:`faceforge.eval.metrics.tar_at_far` on the full score list) without storing the
negatives: at most ``a = floor(far * N_neg)`` negatives may be accepted, so the threshold must lie
strictly above the ``(a + 1)``-th largest negative score, and only the ``a + 1`` largest negatives are
kept, in a streaming top-k.

Memory is ``P x chunk_size`` scores plus one ``chunk_size x D`` block of distractors; distractors may
be an array (or memmap) or an iterable of ``(c, D)`` blocks generated on the fly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from faceforge.eval.metrics import _FAR_RTOL, _check_far

__all__ = ["IdentificationResult", "StreamingFarThreshold", "identify_with_distractors"]


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12).astype(x.dtype, copy=False)


class StreamingFarThreshold:
    """Keeps the ``keep`` largest negative scores seen so far (a streaming top-k).

    ``update`` takes any array of negative scores; values strictly below the current ``keep``-th
    largest can never change it and are dropped with one comparison, so the cost per block is a pass
    over it plus a partition of the few survivors.
    """

    def __init__(self, keep: int):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.keep = int(keep)
        self.count = 0  # negatives seen
        self._top = np.empty(0, dtype=np.float64)

    def update(self, scores: np.ndarray) -> None:
        s = np.asarray(scores).reshape(-1)
        self.count += s.size
        if len(self._top) >= self.keep:
            bar = self._top.min()
            # compare in the scores' own dtype when the bar is exact in it (no float64 upcast of a
            # float32 block); values equal to the current k-th largest cannot change it
            bar_native = s.dtype.type(bar) if np.issubdtype(s.dtype, np.floating) else bar
            s = s[s > (bar_native if bar_native == bar else bar)]
        if s.size == 0:
            return
        merged = np.concatenate((self._top, s.astype(np.float64)))
        if len(merged) > self.keep:
            merged = np.partition(merged, len(merged) - self.keep)[len(merged) - self.keep :]
        self._top = merged

    def kth_largest(self) -> float:
        """The ``keep``-th largest negative, or ``-inf`` when fewer than ``keep`` were seen."""
        return float(self._top.min()) if len(self._top) >= self.keep else -np.inf


@dataclass
class IdentificationResult:
    """``rank_k[k]``: identification rate at rank ``k``; ``tar_at_far[far]``: TAR on probe-vs-(mates +
    distractors) pairs; ``ranks``: ``(P,)`` 1-based rank of each probe's best mate."""

    rank_k: dict[int, float]
    tar_at_far: dict[float, float]
    ranks: np.ndarray
    num_distractors: int
    num_negative_pairs: int
    thresholds: dict[float, float] = field(default_factory=dict)


def _distractor_blocks(
    distractors: np.ndarray | Iterable[np.ndarray], num: int | None, chunk_size: int
) -> Iterator[np.ndarray]:
    """Blocks of at most ``chunk_size`` rows, stopping after ``num`` rows (all when None)."""
    remaining = np.inf if num is None else int(num)
    if isinstance(distractors, np.ndarray):
        if distractors.ndim != 2:
            raise ValueError(f"distractor_feats must be (M, D), got shape {distractors.shape}")
        stop = len(distractors) if num is None else min(int(num), len(distractors))
        if num is not None and num > len(distractors):
            raise ValueError(f"num_distractors={num} exceeds the {len(distractors)} distractors given")
        for start in range(0, stop, chunk_size):
            yield distractors[start : min(start + chunk_size, stop)]
        return
    for block in distractors:
        if remaining <= 0:
            return
        block = np.asarray(block)
        if block.ndim != 2:
            raise ValueError(f"distractor blocks must be (c, D), got shape {block.shape}")
        if block.shape[0] > remaining:
            block = block[: int(remaining)]
        remaining -= block.shape[0]
        for start in range(0, len(block), chunk_size):
            yield block[start : start + chunk_size]
    if num is not None and remaining > 0:
        raise ValueError(f"num_distractors={num} exceeds the {num - remaining} distractors given")


def identify_with_distractors(
    probe_feats: np.ndarray,
    probe_labels: np.ndarray | Sequence,
    gallery_feats: np.ndarray,
    gallery_labels: np.ndarray | Sequence,
    distractor_feats: np.ndarray | Iterable[np.ndarray],
    ks: Sequence[int] = (1,),
    fars: Sequence[float] = (1e-6,),
    num_distractors: int | None = None,
    chunk_size: int = 8192,
) -> IdentificationResult:
    """Rank-k identification rate and TAR@FAR of probes against their mates plus distractors.

    Args:
        probe_feats: ``(P, D)``; gallery_feats: ``(G, D)``; distractor_feats: ``(M, D)`` array / memmap
            or an iterable of ``(c, D)`` blocks. All are L2-normalised here (cosine similarity), block
            by block for the distractors. Computation runs in float32 when every input is float32,
            else float64.
        probe_labels: ``(P,)``; gallery_labels: ``(G,)``. Every probe needs a mate in the gallery.
        ks: ranks to report (>= 1). fars: FARs in (0, 1] for the TAR; the top-k buffer holds
            ``floor(max(far) * N_neg) + 1`` float64 scores (1001 for 1e-6 and 1e9 negatives).
        num_distractors: use only the first ``num_distractors`` distractors (MegaFace's 10 .. 1M
            curve); None = all.
        chunk_size: distractors per block; memory ~ ``P x chunk_size`` scores.
    """
    p_lab = np.asarray(probe_labels)
    g_lab = np.asarray(gallery_labels)
    probe = np.asarray(probe_feats)
    gallery = np.asarray(gallery_feats)
    if probe.ndim != 2 or gallery.ndim != 2 or probe.shape[1] != gallery.shape[1]:
        raise ValueError(f"probe_feats (P, D) and gallery_feats (G, D) needed, got {probe.shape}, {gallery.shape}")
    if p_lab.shape != (len(probe),) or g_lab.shape != (len(gallery),):
        raise ValueError("probe_labels / gallery_labels must be 1-D and match the features")
    ks_arr = np.asarray(ks)
    if ks_arr.ndim != 1 or ks_arr.size == 0 or not np.issubdtype(ks_arr.dtype, np.integer) or (ks_arr < 1).any():
        raise ValueError(f"ks must be a non-empty sequence of integers >= 1, got {ks!r}")
    far_arr = _check_far(np.atleast_1d(np.asarray(fars, dtype=np.float64)))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = np.float32 if probe.dtype == np.float32 and gallery.dtype == np.float32 else np.float64
    probe = _normalise(probe.astype(dtype, copy=False))
    gallery = _normalise(gallery.astype(dtype, copy=False))

    match = p_lab[:, None] == g_lab[None, :]
    if not match.any(axis=1).all():
        raise ValueError(f"every probe needs a mate in the gallery; {int((~match.any(axis=1)).sum())} have none")
    sim_g = probe @ gallery.T  # (P, G): the gallery holds the mate sets, small
    best = np.where(match, sim_g, -np.inf).max(axis=1)  # best mate score per probe
    beaten = (~match & (sim_g >= best[:, None])).sum(axis=1).astype(np.int64)
    pos_scores = sim_g[match].astype(np.float64)

    # the number of negatives is only known at the end for an iterable; the top-k buffer must hold
    # floor(far * N_neg) + 1 values, so size it for the largest possible N_neg, then trim
    n_neg_gallery = int((~match).sum())
    if isinstance(distractor_feats, np.ndarray):
        n_dis_bound = len(distractor_feats) if num_distractors is None else int(num_distractors)
    elif num_distractors is not None:
        n_dis_bound = int(num_distractors)
    else:
        raise ValueError("num_distractors is required when distractor_feats is an iterable of blocks")
    n_neg_bound = n_neg_gallery + len(probe) * n_dis_bound
    allowed_bound = np.floor(far_arr * n_neg_bound * (1 + _FAR_RTOL)).astype(np.int64)
    needed = allowed_bound[allowed_bound < n_neg_bound]  # a FAR admitting every negative needs no bar
    keep = int(needed.max()) + 1 if needed.size else 1
    top = StreamingFarThreshold(keep)
    top.update(sim_g[~match])

    n_dis = 0
    for block in _distractor_blocks(distractor_feats, num_distractors, chunk_size):
        if block.shape[1] != probe.shape[1]:
            raise ValueError(f"distractors have dimension {block.shape[1]}, probes {probe.shape[1]}")
        d = _normalise(block.astype(dtype, copy=False))
        s = probe @ d.T  # (P, c)
        beaten += (s >= best[:, None]).sum(axis=1)
        top.update(s)
        n_dis += len(block)

    ranks = 1 + beaten
    n_neg = n_neg_gallery + len(probe) * n_dis
    # the top-k buffer, descending: the (a + 1)-th largest negative is the bar a mate must beat
    top_desc = np.sort(top._top)[::-1]
    tars: dict[float, float] = {}
    thresholds: dict[float, float] = {}
    for f in far_arr.tolist():
        allowed = int(np.floor(f * n_neg * (1 + _FAR_RTOL)))
        bar = top_desc[allowed] if allowed < min(n_neg, len(top_desc)) else -np.inf
        tars[f] = float(np.mean(pos_scores > bar))
        thresholds[f] = float(bar)
    return IdentificationResult(
        rank_k={int(k): float(np.mean(ranks <= k)) for k in ks_arr},
        tar_at_far=tars,
        ranks=ranks,
        num_distractors=n_dis,
        num_negative_pairs=n_neg,
        thresholds=thresholds,
    )
