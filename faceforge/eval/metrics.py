"""Verification, identification and retrieval metrics, exact and vectorised (numpy).

Verification inputs are pair scores and pair labels:

- ``scores``: float ``(N,)``, higher = more similar (cosine similarities);
- ``labels``: bool or 0/1 int ``(N,)``, 1 = the two images show the same identity.

A pair is *accepted* (predicted "same") when ``score >= threshold``. Every verification metric reads
one :class:`PairCounts`: the scores sorted once and counted per distinct score, so tied scores are
always accepted or rejected together and no Python loop runs over thresholds or pairs.
:func:`faceforge.eval.verify.evaluate_scores` builds one ``PairCounts`` and reads every metric from it.
Two accuracies are offered because the literature reports both:

- :func:`verification_accuracy`: insightface's LFW protocol, 10-fold cross-validated (ArcFace, AttFC,
  BigFace tables);
- :func:`best_threshold_accuracy`: one threshold tuned on all pairs (OpenSphere / SphereFace2 tables);
  slightly optimistic, because the threshold is chosen on the test pairs.

Identification and retrieval (:func:`rank_k`, :func:`recall_at_k`) take a similarity matrix or
embeddings; :func:`tpir_at_fpir` is open-set identification (the IJB-B/C 1:N protocol).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

import numpy as np

# Relative slack when comparing a false-positive count with ``far * n_negatives``, so that e.g.
# far = 1e-3 with 3000 negatives admits exactly 3 false positives despite float rounding.
_FAR_RTOL = 1e-9

# Candidate thresholds per block when the 10-fold search bounds which blocks can hold a fold's best.
_BLOCK = 4096


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _as_labels(labels: np.ndarray | Sequence, name: str = "labels") -> np.ndarray:
    """Bool ``(N,)`` from bool or 0/1 values; any other value is an error."""
    y = np.asarray(labels)
    if y.dtype == bool:
        return y
    if y.size and not np.isin(y, (0, 1)).all():
        bad = y[~np.isin(y, (0, 1))][:5]
        raise ValueError(f"{name} must be bool or 0/1, got values such as {bad.tolist()}")
    return y.astype(bool)


def _check_pairs(scores: np.ndarray | Sequence, labels: np.ndarray | Sequence) -> tuple[np.ndarray, np.ndarray]:
    """:func:`check_pairs`, but float32 scores stay float32 (exact, and they sort faster)."""
    s = np.asarray(scores)
    if s.dtype != np.float32:
        s = s.astype(np.float64, copy=False)
    y = _as_labels(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D (N,), got shapes {s.shape} and {y.shape}")
    if len(s) != len(y):
        raise ValueError(f"scores and labels must have the same length, got {len(s)} and {len(y)}")
    if not np.isfinite(s).all():
        n_bad = int((~np.isfinite(s)).sum())
        raise ValueError(f"scores must be finite, got {n_bad} NaN or infinite value(s) out of {len(s)}")
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == len(y):
        raise ValueError(
            f"need both positive and negative pairs, got {n_pos} positive and {len(y) - n_pos} negative"
        )
    return s, y


def check_pairs(scores: np.ndarray | Sequence, labels: np.ndarray | Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Validate pair scores and labels; returns float64 scores ``(N,)`` and bool labels ``(N,)``.

    Errors: not 1-D, different lengths, NaN or infinite scores, labels other than bool / 0 / 1, no
    positive or no negative pair.
    """
    s, y = _check_pairs(scores, labels)
    return s.astype(np.float64, copy=False), y


def _check_far(far: float | Sequence[float]) -> np.ndarray:
    f = np.asarray(far, dtype=np.float64)
    if f.ndim > 1 or f.size == 0:
        raise ValueError(f"far must be a float or a 1-D sequence of floats, got shape {f.shape}")
    if not ((f > 0) & (f <= 1)).all():
        raise ValueError(f"far must lie in (0, 1], got {f.tolist()}")
    return f


# --------------------------------------------------------------------------------------------------
# PairCounts: the one sort every verification metric shares
# --------------------------------------------------------------------------------------------------


def _count_dtype(n: int) -> type:
    """int32 counts (half the memory traffic) when they cannot overflow."""
    return np.int32 if n < 2**31 else np.int64


def _positives_are_minority(n_pos: int, n_pairs: int) -> bool:
    """Which class the counts place among the other (the smaller one; positives on a tie)."""
    return 2 * n_pos <= n_pairs


def _descending_counts(
    s: np.ndarray, y: np.ndarray, n_pos: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(keys, tps, fps, minority)`` for ``M`` distinct scores, from two plain sorts (no argsort).

    ``keys = -values`` ``(M,)``: the distinct scores negated, ascending (so ``values`` descend);
    ``tps[j]`` / ``fps[j]`` ``(M,)``: positive / negative pairs with ``score >= values[j]``;
    ``minority``: the group of each pair of the smaller label class (positives on ties), ascending.
    All scores are sorted once; only the smaller class is sorted again and placed among the distinct
    scores (``searchsorted``). numpy's SIMD sort makes this about 10 x faster than one ``argsort``.
    """
    count = _count_dtype(len(s))
    keys = np.negative(s)
    keys.sort()
    last = np.empty(len(keys), dtype=bool)  # the last pair of each group of equal scores
    last[-1] = True
    np.not_equal(keys[1:], keys[:-1], out=last[:-1])
    if last.all():  # all scores distinct, the usual case for float64 cosines
        n_ge = np.arange(1, len(keys) + 1, dtype=count)
    else:
        ends = np.flatnonzero(last)
        keys = keys[ends]
        n_ge = np.add(ends, 1, dtype=count)  # pairs with score >= values[j]: all groups 0..j
    minority_positive = _positives_are_minority(n_pos, len(s))
    minority = np.negative(s[y] if minority_positive else s[~y])
    minority.sort()
    # m_ge[j] = minority pairs in groups 0..j: a step function, +1 at each minority pair's group
    groups = np.searchsorted(keys, minority)
    m_ge = np.repeat(np.arange(len(minority) + 1, dtype=count), np.diff(groups, prepend=0, append=len(keys)))
    return (keys, m_ge, n_ge - m_ge, groups) if minority_positive else (keys, n_ge - m_ge, m_ge, groups)


def _count_le(keys: np.ndarray, x: float) -> int:
    """Entries of the ascending ``keys`` that are ``<= x``, exact for float32 keys without a float64 copy."""
    x_k = keys.dtype.type(x)  # the nearest key value; none lies strictly between it and x
    return int(np.searchsorted(keys, x_k, side="right" if float(x_k) <= float(x) else "left"))


def _midpoint(upper: float, lower: float) -> float:
    """The threshold between two consecutive distinct scores; the upper one if the midpoint rounds
    onto the lower (which it would then accept)."""
    mid = (float(upper) + float(lower)) / 2
    return mid if mid > float(lower) else float(upper)


@dataclass(frozen=True, eq=False)
class PairCounts:
    """Pair scores sorted once and counted at each distinct score: what every verification metric reads.

    Build it with :meth:`of`. ``values`` ``(M,)``: the distinct scores, descending; ``tps[j]`` /
    ``fps[j]``: positive / negative pairs with ``score >= values[j]`` (non-decreasing, ending at
    ``n_pos`` / ``n_neg``). ``scores`` / ``labels``: the checked pairs in their original order (the
    folds of :meth:`verification_accuracy` are consecutive blocks of it). ``correct[c]``: pairs
    classified right when the ``c`` highest distinct scores are accepted (``c = 0``: reject all).
    ``minority``: the group (index into ``values``) of each pair of the smaller label class.
    """

    scores: np.ndarray
    labels: np.ndarray
    keys: np.ndarray
    tps: np.ndarray
    fps: np.ndarray
    minority: np.ndarray
    n_pos: int
    n_neg: int

    @classmethod
    def of(cls, scores: np.ndarray | Sequence, labels: np.ndarray | Sequence) -> "PairCounts":
        """Check ``(N,)`` scores and labels (:func:`check_pairs`) and count them; one sort of the scores."""
        s, y = _check_pairs(scores, labels)
        n_pos = int(np.count_nonzero(y))
        return cls(s, y, *_descending_counts(s, y, n_pos), n_pos, len(y) - n_pos)

    @property
    def values(self) -> np.ndarray:
        """The distinct scores, descending, float64 ``(M,)``."""
        return np.negative(self.keys, dtype=np.float64)

    @cached_property
    def correct(self) -> np.ndarray:
        """``(M + 1,)``: ``correct[0] = n_neg`` (reject all), ``correct[j + 1] = tps[j] + n_neg - fps[j]``."""
        out = np.empty(len(self.tps) + 1, dtype=self.tps.dtype)
        out[0] = 0
        np.subtract(self.tps, self.fps, out=out[1:])
        out += self.n_neg
        return out

    def rates(self) -> tuple[np.ndarray, np.ndarray]:
        """``(fpr, tpr)``, float64 ``(M + 1,)``: the ROC points of :func:`roc`, without the thresholds."""
        fpr = np.empty(len(self.fps) + 1)
        tpr = np.empty(len(self.tps) + 1)
        fpr[0] = tpr[0] = 0.0
        np.divide(self.fps, self.n_neg, out=fpr[1:])
        np.divide(self.tps, self.n_pos, out=tpr[1:])
        return fpr, tpr

    def roc(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(fpr, tpr, thresholds)`` as :func:`roc` returns them."""
        return (*self.rates(), np.concatenate(([np.inf], self.values)))

    def auc(self) -> float:
        """Area under the ROC by the trapezoidal rule, summed exactly in integers over the smaller class.

        The trapezoids are ``sum_j dfp_j (tp_(j-1) + tp_j) / 2``: each negative pair of group ``j`` adds
        the positives above it plus half those tied with it (the Mann-Whitney statistic); symmetrically
        each positive adds the negatives above it plus half the tied ones to ``1 - AUC``.
        """
        j = self.minority
        positives = _positives_are_minority(self.n_pos, self.n_pos + self.n_neg)  # which class `minority` holds
        other = self.fps if positives else self.tps  # the counts of the larger class
        above = np.where(j > 0, other[np.maximum(j - 1, 0)], 0)
        twice = int(above.sum(dtype=np.int64)) + int(other[j].sum(dtype=np.int64))
        area = twice / (2 * self.n_pos * self.n_neg)
        return 1.0 - area if positives else area

    def tar_at_far(self, far: float | Sequence[float]) -> float | np.ndarray:
        """:func:`tar_at_far` of these pairs."""
        f = _check_far(far)
        # the false positives allowed, an integer in fps's dtype (no float copy of fps to search it)
        fp_allowed = np.floor(f * self.n_neg * (1 + _FAR_RTOL)).astype(self.fps.dtype)
        # fps is non-decreasing: the last ROC point within budget has the largest TPR
        idx = np.searchsorted(self.fps, fp_allowed, side="right") - 1
        tar = np.where(idx >= 0, self.tps[np.maximum(idx, 0)] / self.n_pos, 0.0)
        return float(tar) if f.ndim == 0 else tar

    def threshold_at_far(self, far: float) -> float:
        """The threshold of :meth:`tar_at_far` (one FAR): accepting ``score >= threshold`` gives that TAR with at
        most ``floor(far * n_neg)`` false accepts; above every score (nothing accepted) when even the highest
        score has more negatives at it."""
        f = float(_check_far(far))
        fp_allowed = np.floor(f * self.n_neg * (1 + _FAR_RTOL)).astype(self.fps.dtype)
        idx = int(np.searchsorted(self.fps, fp_allowed, side="right")) - 1
        values = self.values
        return float(values[idx]) if idx >= 0 else float(np.nextafter(values[0], np.inf))

    def tar_at_far_nearest(self, far: float | Sequence[float]) -> float | np.ndarray:
        """insightface's IJB convention: the TPR of the ROC point whose FPR is nearest ``far`` (possibly above
        it), on scikit-learn's ``roc_curve`` points (the origin, then only the corners: collinear points are
        dropped, ``drop_intermediate=True``); the first such point on a tie."""
        f = _check_far(far)
        fps, tps = self.fps.astype(np.float64), self.tps.astype(np.float64)
        if len(fps) > 2:  # sklearn's drop_intermediate: keep the ends and where the slope changes
            keep = np.r_[True, np.logical_or(np.diff(fps, 2) != 0, np.diff(tps, 2) != 0), True]
            fps, tps = fps[keep], tps[keep]
        fpr, tpr = np.r_[0.0, fps] / self.n_neg, np.r_[0.0, tps] / self.n_pos  # then the origin, as sklearn
        idx = np.abs(fpr[None, :] - np.atleast_1d(f)[:, None]).argmin(axis=1)
        tar = tpr[idx]
        return float(tar[0]) if f.ndim == 0 else tar.reshape(f.shape)

    def _point(self, c: int) -> tuple[float, float]:
        """``(fpr, tpr)`` of ROC point ``c`` (``c = 0`` is the origin)."""
        if c == 0:
            return 0.0, 0.0
        return self.fps[c - 1] / self.n_neg, self.tps[c - 1] / self.n_pos

    def eer(self) -> float:
        """:func:`eer` of these pairs: a binary search for the crossing, then linear interpolation."""
        def gap(c: int) -> float:  # FNR - FPR, non-increasing in c: 1 at the origin, -1 at the end
            fpr, tpr = self._point(c)
            return (1 - tpr) - fpr

        i = bisect.bisect_left(range(len(self.tps) + 1), True, key=lambda c: gap(c) <= 0)  # i >= 1
        g0, g1 = gap(i - 1), gap(i)
        (f0, _), (f1, _) = self._point(i - 1), self._point(i)
        return float(f0 + g0 / (g0 - g1) * (f1 - f0))

    def best_threshold(self) -> tuple[int, float]:
        """``(n_correct, threshold)`` of :func:`best_threshold_accuracy`; ties go to the highest threshold."""
        correct = self.correct
        c = int(np.argmax(correct))  # first maximum = highest threshold
        return int(correct[c]), self._threshold(c, c)

    def accuracy_at(self, threshold: float) -> float:
        """:func:`accuracy_at_threshold` of these pairs."""
        c = _count_le(self.keys, -threshold)  # groups with value >= threshold
        n_correct = self.n_neg if c == 0 else int(self.tps[c - 1]) + self.n_neg - int(self.fps[c - 1])
        return n_correct / (self.n_pos + self.n_neg)

    def _threshold(self, c: int, lower: int) -> float:
        """The threshold that accepts the ``c`` highest distinct scores, placed between ``values[c - 1]``
        and ``values[lower]`` (the next lower candidate score; ``lower = M``: none, accept all)."""
        if c == 0:
            return float("inf")
        if lower >= len(self.keys):
            return float("-inf")
        return _midpoint(-self.keys[c - 1], -self.keys[lower])

    def verification_accuracy(self, folds: int = 10) -> np.ndarray:
        """Per-fold accuracies ``(folds,)`` of :func:`verification_accuracy` (insightface's protocol).

        Candidate ``c`` (accept the ``c`` highest distinct scores, ``c = 0..M``) classifies
        ``correct[c] - correct_k[c]`` of the other folds' pairs right, where fold ``k``'s own count
        ``correct_k`` only changes at the fold's scores. Fold ``k`` is sorted on its own (a tenth of the
        pairs), and only the blocks of candidates that could match the other folds' score of the best
        candidate on all pairs are searched exactly (:meth:`_fold_accuracy`): no pass over all pairs
        per fold.
        """
        bounds = np.concatenate(([0], np.cumsum(_fold_sizes(len(self.scores), folds))))
        block_max = np.maximum.reduceat(self.correct, np.arange(0, len(self.correct), _BLOCK)).astype(np.int64)
        c0 = int(np.argmax(self.correct))  # the best candidate on all pairs
        return np.array([self._fold_accuracy(a, b, c0, block_max) for a, b in zip(bounds[:-1], bounds[1:])])

    def _fold_accuracy(self, a: int, b: int, c0: int, block_max: np.ndarray) -> float:
        """Accuracy on pairs ``a:b`` at the threshold that is best on all the other pairs.

        The other folds' score of candidate ``c`` is ``correct[c] - correct_k[c]``. Blocks of candidates
        that cannot beat ``c0``'s are skipped (:meth:`_live_blocks`); the others are searched exactly:
        ``correct_k`` is constant between the fold's own scores, so their best candidate is a segmented
        maximum of ``correct`` (``reduceat``). Among equal scores the first candidate (the highest
        threshold) wins, as in :meth:`best_threshold`.
        """
        s_k, y_k = self.scores[a:b], self.labels[a:b]
        keys_k, tps_k, fps_k, _ = _descending_counts(s_k, y_k, int(np.count_nonzero(y_k)))
        # the fold's positives / negatives accepted with its i highest distinct scores, i = 0..L
        pos_k = np.concatenate(([0], tps_k)).astype(np.int64)
        neg_k = np.concatenate(([0], fps_k)).astype(np.int64)
        correct_k = neg_k[-1] + pos_k - neg_k
        correct = self.correct

        def fold_groups(c: np.ndarray | int) -> np.ndarray | int:  # fold groups that candidate c accepts
            return np.searchsorted(keys_k, self._key(c))

        best, c = int(correct[c0]) - int(correct_k[fold_groups(c0)]), c0
        starts = np.arange(0, len(correct), _BLOCK)
        live = self._live_blocks(starts, len(correct), c0, best, block_max, pos_k, neg_k, fold_groups)
        for run in np.split(live, np.flatnonzero(np.diff(live) > 1) + 1):
            c1, c2 = int(starts[run[0]]), min(int(starts[run[-1]]) + _BLOCK, len(correct))  # candidates [c1, c2)
            i1, i2 = int(fold_groups(c1)), int(fold_groups(c2 - 1))
            # correct_k changes after each fold group g in [c1, c2 - 1): at candidate g + 1
            g = c1 + np.searchsorted(self.keys[c1 : c2 - 1], keys_k[i1:i2])
            seg = np.concatenate(([c1], g + 1))
            scores = np.maximum.reduceat(correct[c1:c2], seg - c1) - correct_k[i1 : i1 + len(seg)]
            m = int(np.argmax(scores))
            if scores[m] > best or (scores[m] == best and seg[m] <= c):
                stop = int(seg[m + 1]) if m + 1 < len(seg) else c2
                found = int(seg[m] + np.argmax(correct[seg[m] : stop]))
                if scores[m] > best or found < c:
                    best, c = int(scores[m]), found
        threshold = self._threshold(c, self._next_other_fold_group(c, keys_k, pos_k + neg_k))
        # fold pairs with score >= threshold: its first n_acc distinct scores
        return float(correct_k[_count_le(keys_k, -threshold)]) / (b - a)

    @staticmethod
    def _live_blocks(starts: np.ndarray, n_cand: int, c0: int, best: int, block_max: np.ndarray,
                     pos_k: np.ndarray, neg_k: np.ndarray, fold_groups: Callable) -> np.ndarray:
        """The blocks ``[s, s + B)`` of the ``n_cand`` candidates whose other-fold score may reach
        ``best`` (``c0``'s); ``pos_k[i]`` / ``neg_k[i]``: fold pairs in its ``i`` highest groups.

        From ``c0`` to ``c``, ``correct_k`` gains one per fold positive newly accepted (``c > c0``) or
        negative newly rejected (``c < c0``) and loses one per fold negative accepted / positive
        rejected; so on a block the other folds score at most ``max correct - correct_k(c0) +`` (the
        fold negatives accepted up to its far end ``-`` the positives accepted up to its near end), or
        symmetrically before ``c0``.
        """
        ends = np.minimum(starts + _BLOCK, n_cand) - 1
        p, n = (lambda c: pos_k[fold_groups(c)]), (lambda c: neg_k[fold_groups(c)])
        p0, n0 = p(c0), n(c0)
        after = (n(ends) - n0) - (p(np.maximum(starts, c0)) - p0)  # blocks reaching past c0
        before = (p0 - p(starts)) - (n0 - n(np.minimum(ends, c0)))  # blocks starting before c0
        none = -len(pos_k) - len(neg_k)  # below any count difference
        gain = np.maximum(np.where(ends >= c0, after, none), np.where(starts <= c0, before, none))
        return np.flatnonzero(block_max - (neg_k[-1] + p0 - n0) + gain >= best)

    def _key(self, c: np.ndarray | int) -> np.ndarray | float:
        """``keys[c]``; ``+inf`` for ``c = M`` (the candidate that accepts every group)."""
        c = np.asarray(c)
        return np.where(c < len(self.keys), self.keys[np.minimum(c, len(self.keys) - 1)], np.inf)

    def _group_size(self, j: np.ndarray) -> np.ndarray:
        """Pairs scoring exactly ``values[j]``, ``j`` an int array."""
        before = np.maximum(j - 1, 0)
        return self.tps[j] + self.fps[j] - np.where(j > 0, self.tps[before] + self.fps[before], 0)

    def _next_other_fold_group(self, c: int, keys_k: np.ndarray, accepted_k: np.ndarray, width: int = 32) -> int:
        """The first global group at or after ``c`` holding a pair of the other folds (``M``: none).

        ``keys_k``: the fold's distinct keys; ``accepted_k[i]``: its pairs in its groups ``0..i-1``. A
        global group holds only fold pairs when the fold has a group of that score and of that size.
        Windows of ``width`` groups, doubling, are checked at once.
        """
        n_groups = len(self.keys)
        while c < n_groups:
            j = np.arange(c, min(c + width, n_groups))
            i = np.searchsorted(keys_k, self.keys[j])
            in_fold = keys_k[np.minimum(i, len(keys_k) - 1)] == self.keys[j]
            fold_size = accepted_k[np.minimum(i + 1, len(keys_k))] - accepted_k[i]
            only = in_fold & (fold_size == self._group_size(j))
            if not only.all():
                return c + int(np.argmin(only))
            c, width = int(j[-1]) + 1, 2 * width
        return n_groups


# --------------------------------------------------------------------------------------------------
# Verification (1:1) metrics
# --------------------------------------------------------------------------------------------------


def roc(scores: np.ndarray | Sequence, labels: np.ndarray | Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact ROC curve: every distinct score is a threshold, accept when ``score >= threshold``.

    Same points as ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)``.

    Args:
        scores: ``(N,)`` pair similarities, higher = more alike.
        labels: ``(N,)`` bool / 0-1, 1 = same identity.

    Returns:
        ``(fpr, tpr, thresholds)``, each ``(M + 1,)`` for ``M`` distinct scores. ``thresholds`` is
        descending and starts at ``+inf`` (the point ``fpr = tpr = 0``); ``fpr`` and ``tpr`` are
        non-decreasing and end at 1.
    """
    return PairCounts.of(scores, labels).roc()


def auc(fpr: np.ndarray | Sequence, tpr: np.ndarray | Sequence) -> float:
    """Area under a ROC curve by the trapezoidal rule; ``fpr`` must be monotonic, shapes ``(M,)``."""
    x = np.asarray(fpr, dtype=np.float64)
    t = np.asarray(tpr, dtype=np.float64)
    if x.shape != t.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"fpr and tpr must be 1-D with the same length >= 2, got {x.shape} and {t.shape}")
    dx = np.diff(x)
    if (dx < 0).any() and (dx > 0).any():
        raise ValueError("fpr must be monotonic (as returned by roc)")
    return float(abs(np.dot(dx, t[1:] + t[:-1]) / 2))


def tar_at_far(
    scores: np.ndarray | Sequence, labels: np.ndarray | Sequence, far: float | Sequence[float]
) -> float | np.ndarray:
    """True accept rate at a false accept rate: the largest TPR on the exact ROC with ``FPR <= far``.

    The IJB-B/C "TAR@FAR" protocol without interpolation: tied scores are accepted or rejected together,
    so the result can be lower than a per-pair (or interpolated) ROC gives. When no threshold accepts
    any pair within the budget, the answer is 0.

    Args:
        scores: ``(N,)`` pair similarities. labels: ``(N,)`` 1 = same identity.
        far: a float in (0, 1], or a sequence of them.

    Returns:
        A float for a float ``far``; an array shaped like ``far`` for a sequence.
    """
    _check_far(far)  # before the sort
    return PairCounts.of(scores, labels).tar_at_far(far)


def eer(scores: np.ndarray | Sequence, labels: np.ndarray | Sequence) -> float:
    """Equal error rate: where ``FPR = FNR`` on the ROC, linearly interpolated between its two points.

    ``FNR = 1 - TPR``. Perfectly separable scores give 0.
    """
    return PairCounts.of(scores, labels).eer()


def best_threshold_accuracy(scores: np.ndarray | Sequence, labels: np.ndarray | Sequence) -> tuple[float, float]:
    """Accuracy at the one threshold that maximises it on all pairs (OpenSphere's reporting).

    ``ACC = max_t (TP(t) + TN(t)) / N``, searched exactly over the midpoints between consecutive distinct
    scores plus ``+inf`` (reject all) and ``-inf`` (accept all); among equal accuracies the highest
    threshold wins. Optimistic: the threshold is tuned on the pairs it is measured on.

    Returns:
        ``(accuracy, threshold)``; accuracy in [0, 1], accept when ``score >= threshold``.
    """
    counts = PairCounts.of(scores, labels)
    n_correct, threshold = counts.best_threshold()
    return n_correct / len(counts.scores), threshold


def accuracy_at_threshold(scores: np.ndarray | Sequence, labels: np.ndarray | Sequence, threshold: float) -> float:
    """Accuracy at a threshold fixed in advance (e.g. one learned in training, as SphereFace2's):
    the fraction of pairs with ``(score >= threshold) == label``. No tuning on the test pairs."""
    if not isinstance(threshold, (int, float, np.integer, np.floating)) or np.isnan(threshold):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    return PairCounts.of(scores, labels).accuracy_at(float(threshold))


def fold_ids(n: int, folds: int = 10) -> np.ndarray:
    """Fold index of each of ``n`` pairs: consecutive blocks, the first ``n % folds`` one larger.

    Identical to ``sklearn.model_selection.KFold(folds, shuffle=False)`` (and ``np.array_split``);
    for LFW's 6,000 pairs, fold k is pairs ``[600 k, 600 (k + 1))``.
    """
    return np.repeat(np.arange(folds), _fold_sizes(n, folds))


def _fold_sizes(n: int, folds: int) -> np.ndarray:
    """Pairs per fold ``(folds,)`` of :func:`fold_ids`; errors for ``folds < 2`` or ``n < folds``."""
    if not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if n < folds:
        raise ValueError(f"need at least folds={folds} pairs, got {n}")
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    return sizes


def verification_accuracy(
    scores: np.ndarray | Sequence, labels: np.ndarray | Sequence, folds: int = 10
) -> tuple[float, float]:
    """Cross-validated verification accuracy: insightface's LFW / CFP-FP / AgeDB-30 protocol.

    The pairs are split into ``folds`` consecutive folds (:func:`fold_ids`, sklearn ``KFold`` without
    shuffling). For each fold, the threshold maximising accuracy on the other folds is found exactly
    (as in :func:`best_threshold_accuracy`, on those folds' scores only) and the accuracy is measured on
    the held-out fold. insightface searches a fixed grid of squared-L2 distances (0 to 4, step 0.01);
    the exact search here can only match or beat that grid on the training folds.

    Returns:
        ``(mean, std)`` of the per-fold accuracies, in [0, 1]; std is ``np.std`` (ddof=0), as insightface.
    """
    accuracies = PairCounts.of(scores, labels).verification_accuracy(folds)
    return float(accuracies.mean()), float(accuracies.std())
# --------------------------------------------------------------------------------------------------
# Identification (1:N) and retrieval
# --------------------------------------------------------------------------------------------------


def _first_match_rank(similarity: np.ndarray, match: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Rank (1-based) of each row's best-scoring match: ``1 +`` the non-matches scoring ``>=`` it.

    Ties between a match and a non-match count against the match (pessimistic), so the result never
    depends on sort order. Rows with no valid match get rank ``valid columns + 1``.
    ``similarity``, ``match``, ``valid``: ``(Q, G)``.
    """
    if valid is None:
        valid = np.ones_like(match, dtype=bool)
    best = np.where(match & valid, similarity, -np.inf).max(axis=1, keepdims=True)
    has_match = np.isfinite(best[:, 0])
    beaten = (~match & valid & (similarity >= best)).sum(axis=1)
    return np.where(has_match, 1 + beaten, valid.sum(axis=1) + 1)


def _check_k(k: int | Sequence[int], upper: int) -> np.ndarray:
    ks = np.asarray(k)
    if ks.ndim > 1 or ks.size == 0 or not np.issubdtype(ks.dtype, np.integer):
        raise ValueError(f"k must be an integer or a 1-D sequence of integers, got {k!r}")
    if (ks < 1).any() or (ks > upper).any():
        raise ValueError(f"k must lie in [1, {upper}], got {ks.tolist()}")
    return ks


def rank_k(
    similarity: np.ndarray,
    probe_labels: np.ndarray | Sequence,
    gallery_labels: np.ndarray | Sequence,
    k: int | Sequence[int] = 1,
) -> float | np.ndarray:
    """Closed-set identification rate at rank ``k`` (one point of the CMC curve, e.g. MegaFace rank-1).

    A probe is identified at rank ``k`` when its best-scoring mated gallery entry is among the ``k``
    highest scores of its row; ties with non-mated entries count against the probe. Closed set: every
    probe must have at least one mate in the gallery.

    Args:
        similarity: ``(P, G)`` probe-to-gallery similarities, higher = more alike.
        probe_labels: ``(P,)`` identities. gallery_labels: ``(G,)`` identities.
        k: an int in ``[1, G]`` or a sequence of them.

    Returns:
        The identification rate in [0, 1]: a float for an int ``k``, an array for a sequence.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    p = np.asarray(probe_labels)
    g = np.asarray(gallery_labels)
    if sim.ndim != 2 or sim.shape != (len(p), len(g)):
        raise ValueError(f"similarity must be (P, G) = ({len(p)}, {len(g)}), got shape {sim.shape}")
    if np.isnan(sim).any():
        raise ValueError("similarity contains NaN")
    ks = _check_k(k, len(g))
    match = p[:, None] == g[None, :]
    unmated = ~match.any(axis=1)
    if unmated.any():
        raise ValueError(
            f"closed-set identification needs a gallery mate for every probe; {int(unmated.sum())} probe(s) "
            f"have none, e.g. label {p[unmated][0]!r}"
        )
    ranks = _first_match_rank(sim, match)
    rates = (ranks[:, None] <= ks.reshape(-1)[None, :]).mean(axis=0)
    return float(rates[0]) if ks.ndim == 0 else rates


def _unit_embeddings(embeddings: np.ndarray, labels: np.ndarray | Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Checked float64 ``(N, D)`` embeddings, L2-normalised (cosine similarity), and labels ``(N,)``."""
    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"embeddings must be (N, D) and labels (N,), got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), y


def recall_at_k(
    embeddings: np.ndarray,
    labels: np.ndarray | Sequence,
    k: int | Sequence[int] = 1,
    chunk_size: int = 1024,
) -> float | np.ndarray:
    """Retrieval Recall@K (Song et al., CVPR 2016; BroadFace's SOP / In-shop tables).

    Every item queries all the *other* items by cosine similarity; a query scores 1 when at least one of
    its ``k`` nearest neighbours shares its label. Ties with other-label items count against the query;
    a query whose label occurs nowhere else always scores 0.

    Args:
        embeddings: ``(N, D)``; L2-normalised here (cosine similarity).
        labels: ``(N,)`` class of each item.
        k: an int in ``[1, N - 1]`` or a sequence of them.
        chunk_size: queries per block, so memory is ``chunk_size x N`` rather than ``N x N``.

    Returns:
        Recall in [0, 1]: a float for an int ``k``, an array for a sequence.
    """
    x, y = _unit_embeddings(embeddings, labels)
    ks = _check_k(k, len(x) - 1)
    ranks = np.empty(len(x), dtype=np.int64)
    for start in range(0, len(x), chunk_size):  # a loop over query blocks, bounded memory
        rows = np.arange(start, min(start + chunk_size, len(x)))
        sim = x[rows] @ x.T
        valid = np.ones_like(sim, dtype=bool)
        valid[np.arange(len(rows)), rows] = False  # a query never retrieves itself
        ranks[rows] = _first_match_rank(sim, y[rows, None] == y[None, :], valid)
    rates = (ranks[:, None] <= ks.reshape(-1)[None, :]).mean(axis=0)
    return float(rates[0]) if ks.ndim == 0 else rates


# How IJB numbers are read off the curves: "faceforge" (exact: the largest TAR with FPR <= FAR, floor(FPIR N)
# false alarms) or "insightface" (the ROC point nearest the FAR, ceil(FPIR N) - 1 false alarms).
IJB_PROTOCOLS = ("faceforge", "insightface")


def tpir_at_fpir(
    similarity: np.ndarray,
    probe_labels: np.ndarray | Sequence,
    gallery_labels: np.ndarray | Sequence,
    fpir: float | Sequence[float],
    rank: int = 1,
    protocol: str = "faceforge",
) -> float | np.ndarray:
    """Open-set identification: TPIR at a given FPIR (the IJB-B/C 1:N protocol, Grother et al.).

    Probes with a mate in the gallery are *mated*, the others *non-mated*. At threshold ``t`` a
    non-mated probe is a false alarm when its top score is ``>= t``; a mated probe is identified when
    its best mate is within the top ``rank`` (ties count against it) and scores ``>= t``. The threshold
    is the lowest one whose FPIR is ``<= fpir``, tied scores rejected together, so TPIR is exact: with N
    non-mated probes, ``floor(fpir N)`` false alarms are allowed.

    ``protocol="insightface"``: insightface's convention, one false alarm fewer: the threshold is the
    ``k``-th highest non-mated top score, ``k = ceil(fpir N)``, and a mate must score above it.

    Args:
        similarity: ``(P, G)`` probe-to-gallery similarities. probe_labels: ``(P,)``; gallery_labels: ``(G,)``.
        fpir: a float in (0, 1] or a sequence of them. rank: 1-based rank, default 1.
        protocol: "faceforge" (default) or "insightface".

    Returns:
        TPIR in [0, 1]: a float for a float ``fpir``, an array for a sequence.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    p = np.asarray(probe_labels)
    g = np.asarray(gallery_labels)
    if sim.ndim != 2 or sim.shape != (len(p), len(g)):
        raise ValueError(f"similarity must be (P, G) = ({len(p)}, {len(g)}), got shape {sim.shape}")
    if np.isnan(sim).any():
        raise ValueError("similarity contains NaN")
    f = _check_far(fpir)
    _check_k(rank, len(g))
    match = p[:, None] == g[None, :]
    mated = match.any(axis=1)
    if mated.all() or not mated.any():
        raise ValueError(
            f"need both mated and non-mated probes, got {int(mated.sum())} mated and {int((~mated).sum())} non-mated"
        )
    nonmated_top = np.sort(sim[~mated].max(axis=1))[::-1]  # descending
    ranks = _first_match_rank(sim[mated], match[mated])
    mate_score = np.where(match[mated], sim[mated], -np.inf).max(axis=1)
    mate_score = np.where(ranks <= rank, mate_score, -np.inf)
    if protocol not in IJB_PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: expected one of {', '.join(IJB_PROTOCOLS)}")
    # the (a + 1)-th highest non-mated score and everything tied with it must be rejected
    allowed = np.floor(f * len(nonmated_top) * (1 + _FAR_RTOL)).astype(np.int64)
    if protocol == "insightface":  # the k-th highest, k = ceil(fpir N), is the bar: k - 1 false alarms
        allowed = np.maximum(np.ceil(f * len(nonmated_top) * (1 - _FAR_RTOL)).astype(np.int64) - 1, 0)
    bar = np.where(allowed < len(nonmated_top), nonmated_top[np.minimum(allowed, len(nonmated_top) - 1)], -np.inf)
    tpir = np.where(
        allowed < len(nonmated_top),
        (mate_score[None, :] > bar.reshape(-1, 1)).mean(axis=1).reshape(bar.shape),
        np.isfinite(mate_score).mean(),
    )
    return float(tpir) if f.ndim == 0 else tpir


def mean_average_precision(
    embeddings: np.ndarray,
    labels: np.ndarray | Sequence,
    chunk_size: int = 256,
) -> float:
    """Retrieval mAP: every item queries all the *other* items by cosine similarity.

    A query's average precision is the mean, over its same-label items, of the precision at each one's
    position in the ranking. Ties with other-label items count against the query (other-label items
    are ranked first among equal scores), as in :func:`recall_at_k`. Queries whose label occurs
    nowhere else have no relevant item and are left out of the mean.

    Args:
        embeddings: ``(N, D)``; L2-normalised here. labels: ``(N,)``.
        chunk_size: queries per block; memory ~ ``chunk_size x N``.

    Returns:
        mAP in [0, 1].
    """
    x, y = _unit_embeddings(embeddings, labels)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    total, n_queries = 0.0, 0
    positions = np.arange(1, len(x) + 1)
    for start in range(0, len(x), chunk_size):  # a loop over query blocks, bounded memory
        rows = np.arange(start, min(start + chunk_size, len(x)))
        sim = x[rows] @ x.T
        rel = y[rows, None] == y[None, :]
        sim[np.arange(len(rows)), rows] = -np.inf  # the query itself goes last and is not relevant
        rel[np.arange(len(rows)), rows] = False
        n_rel = rel.sum(axis=1)
        # descending score; among equal scores the non-relevant (False) first
        order = np.lexsort((rel, -sim), axis=-1)
        rel_sorted = np.take_along_axis(rel, order, axis=1)
        precision = np.cumsum(rel_sorted, axis=1) / positions
        has = n_rel > 0
        ap = (precision * rel_sorted).sum(axis=1)[has] / n_rel[has]
        total += float(ap.sum())
        n_queries += int(has.sum())
    if n_queries == 0:
        raise ValueError("no query has a same-label item: mAP is undefined")
    return total / n_queries


__all__ = [
    "IJB_PROTOCOLS",
    "PairCounts",
    "accuracy_at_threshold",
    "auc",
    "best_threshold_accuracy",
    "check_pairs",
    "eer",
    "fold_ids",
    "mean_average_precision",
    "rank_k",
    "recall_at_k",
    "roc",
    "tar_at_far",
    "tpir_at_fpir",
    "verification_accuracy",
]
