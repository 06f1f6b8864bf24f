"""Error versus reject: how much a quality score helps verification (ISO/IEC 29794-1's EDC, MagFace Fig. 5).

For a pair set with scores, labels and a quality per image (a pair's quality is the lower of its two images',
:func:`pair_quality`):

1. the decision threshold is fixed on ALL pairs, before any rejection: the threshold of TAR@FAR at each FMR of
   :data:`QUALITY_FMRS` (:meth:`faceforge.eval.metrics.PairCounts.threshold_at_far`; a pair matches when its score is
   ``>= threshold``);
2. the lowest-quality fraction ``r`` of the genuine (mated) pairs is rejected, ``k = floor(r n_genuine)`` of them,
   and the FNMR is measured on the genuine pairs kept: ``(false non-matches kept) / (n_genuine - k)``
   (:func:`fnmr_after_rejection`). Pairs of equal quality are rejected as a group on average: within a tie the
   false non-matches rejected grow linearly (the expectation over every order of the tied pairs), so a constant
   quality gives exactly the random-rejection line;
3. at the table's fractions :data:`REJECT_FRACTIONS` (0, 10, 20, 30 %) and on the curve's finer grid
   :data:`CURVE_FRACTIONS` (0 to 30 % in steps of 1 %), whose area (trapezoids, in FNMR x fraction) is the summary:
   smaller is better;
4. against random rejection, whose expectation is exactly the FNMR at 0 % at every fraction (rejecting k of n genuine
   pairs uniformly keeps each false non-match with probability (n - k) / n: the expected kept count is
   FN (n - k) / n, over n - k pairs), so its area is FNMR(0) times the curve's width.

Pure functions of float64 arrays; no model, no files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from faceforge.eval.metrics import PairCounts
from faceforge.eval.report import far_resolved

__all__ = ["CURVE_FRACTIONS", "QUALITY_FMRS", "REJECT_FRACTIONS", "RejectCurve", "error_versus_reject",
           "fnmr_after_rejection", "pair_quality"]

QUALITY_FMRS = (1e-3, 1e-2)
REJECT_FRACTIONS = (0.0, 0.1, 0.2, 0.3)
CURVE_FRACTIONS = tuple(i / 100 for i in range(31))  # 0 .. 30 % in steps of 1 %


def pair_quality(image_quality: np.ndarray | Sequence[float], name: str = "quality") -> np.ndarray:
    """float64 ``(N,)``: ``min(q[2k], q[2k + 1])`` of per-image qualities ``(2N,)`` in the pair layout of ``.bin``
    files. ValueError (naming ``name``) when not 1-D of even length or not finite."""
    q = np.asarray(image_quality, dtype=np.float64)
    if q.ndim != 1 or len(q) % 2:
        raise ValueError(f"{name}: expected one quality per image, (2N,) for N pairs; got shape {q.shape}")
    _check_finite(q, name)
    return np.minimum(q[0::2], q[1::2])


def _check_finite(q: np.ndarray, name: str) -> None:
    if not np.isfinite(q).all():
        bad = int(np.flatnonzero(~np.isfinite(q))[0])
        raise ValueError(f"{name}: value {bad} is {q[bad]}; expected finite quality scores")


def _kept_fraction_ks(n: int, fractions: Sequence[float]) -> np.ndarray:
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or not ((f >= 0) & (f < 1)).all():
        raise ValueError(f"rejected fractions must lie in [0, 1), got {f.tolist()}")
    return np.floor(f * n + 1e-9).astype(np.int64)  # 1e-9: 0.3 * 10 is 2.9999999999999996 in binary


def fnmr_after_rejection(scores: np.ndarray, labels: np.ndarray, quality: np.ndarray, threshold: float,
                         fractions: Sequence[float]) -> np.ndarray:
    """float64 ``(F,)``: the FNMR at ``threshold`` (a genuine pair is a false non-match when its score is below it)
    after rejecting the lowest-quality fraction of the genuine pairs, for each of ``fractions`` (module notes, 2).

    scores, labels, quality: ``(N,)`` per pair (labels bool, True = genuine; quality finite)."""
    s, y, q = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool), np.asarray(quality, np.float64)
    if not (s.shape == y.shape == q.shape) or s.ndim != 1:
        raise ValueError(f"scores, labels and quality must be (N,) each, got {s.shape}, {y.shape}, {q.shape}")
    _check_finite(q, "quality")
    order = np.argsort(q[y], kind="stable")
    qs, false = q[y][order], s[y][order] < threshold
    n = len(qs)
    if n == 0:
        raise ValueError("error versus reject needs genuine pairs; there are none")
    rejected = np.concatenate(([0.0], np.cumsum(false, dtype=np.float64)))  # false non-matches among the first j
    starts = np.flatnonzero(np.r_[True, qs[1:] != qs[:-1]])  # the groups of equal quality
    ends = np.r_[starts[1:], n]
    k = _kept_fraction_ks(n, fractions)
    g = np.searchsorted(starts, k, side="right") - 1  # the group the cut falls in (k = n never: fractions < 1)
    a, b = starts[g], ends[g]
    expected = rejected[a] + (rejected[b] - rejected[a]) * (k - a) / (b - a)  # a tie rejected on average
    return (rejected[n] - expected) / (n - k)


@dataclass
class RejectCurve:
    """Error versus reject at one FMR (module notes).

    fmr / threshold: the FMR and the threshold fixed on all pairs (score ``>= threshold`` matches); resolved: the
    negatives resolve that FMR (``faceforge.eval.report.far_resolved``); fnmr: ``{fraction rejected: FNMR}`` at
    :data:`REJECT_FRACTIONS`; fractions / curve: the curve's grid and FNMRs; area: the curve's area (trapezoids);
    random_fnmr / random_area: random rejection's FNMR (the same at every fraction) and area.
    """

    fmr: float
    threshold: float
    negative_pairs: int
    resolved: bool
    fnmr: dict[float, float]
    fractions: np.ndarray = field(repr=False)
    curve: np.ndarray = field(repr=False)
    area: float
    random_fnmr: float
    random_area: float

    def as_record(self) -> dict:
        """JSON-ready: every number, the curve as lists."""
        return {"fmr": self.fmr, "threshold": self.threshold, "negative_pairs": self.negative_pairs,
                "resolved": self.resolved, "fnmr": {f"{r:.2f}": v for r, v in self.fnmr.items()},
                "curve": {"rejected": self.fractions.tolist(), "fnmr": self.curve.tolist()},
                "area": self.area, "random_fnmr": self.random_fnmr, "random_area": self.random_area}


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def error_versus_reject(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[bool],
                        quality: np.ndarray | Sequence[float], fmrs: Sequence[float] = QUALITY_FMRS,
                        fractions: Sequence[float] = REJECT_FRACTIONS,
                        curve: Sequence[float] = CURVE_FRACTIONS) -> list[RejectCurve]:
    """One :class:`RejectCurve` per FMR of ``fmrs`` for pairs ``(N,)``: scores, labels (True = genuine) and the
    pairs' quality (e.g. :func:`pair_quality`). The curve's grid ``curve`` must start at 0 and rise."""
    counts = PairCounts.of(scores, labels)
    q = np.asarray(quality, dtype=np.float64)
    if q.shape != counts.scores.shape:
        raise ValueError(f"quality: {q.shape[0] if q.ndim == 1 else q.shape} values for {len(counts.scores)} pairs; "
                         "expected one per pair")
    grid = np.asarray(curve, dtype=np.float64)
    if grid.ndim != 1 or len(grid) < 2 or grid[0] != 0 or not (np.diff(grid) > 0).all():
        raise ValueError(f"curve: expected rising rejected fractions from 0, got {grid.tolist()}")
    out = []
    for fmr in fmrs:
        t = counts.threshold_at_far(fmr)
        table = fnmr_after_rejection(counts.scores, counts.labels, q, t, fractions)
        line = fnmr_after_rejection(counts.scores, counts.labels, q, t, grid)
        at_zero = float(np.mean(counts.scores[counts.labels] < t))
        out.append(RejectCurve(
            fmr=float(fmr), threshold=t, negative_pairs=counts.n_neg, resolved=far_resolved(fmr, counts.n_neg),
            fnmr={float(r): float(v) for r, v in zip(fractions, table)}, fractions=grid, curve=line,
            area=_trapezoid(grid, line), random_fnmr=at_zero, random_area=at_zero * float(grid[-1] - grid[0])))
    return out
