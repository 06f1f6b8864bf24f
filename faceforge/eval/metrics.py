"""Verification, identification and retrieval metrics, exact and vectorised (numpy).

Verification inputs are pair scores and pair labels:

- ``scores``: float ``(N,)``, higher = more similar (cosine similarities);
- ``labels``: bool or 0/1 int ``(N,)``, 1 = the two images show the same identity.

A pair is *accepted* (predicted "same") when ``score >= threshold``. Every metric sorts the scores once
and works on cumulative counts, so tied scores are always accepted or rejected together and no Python
loop runs over thresholds. Two accuracies are offered because the literature reports both:

- :func:`verification_accuracy`: insightface's LFW protocol, 10-fold cross-validated (ArcFace, AttFC,
  BigFace tables);
- :func:`best_threshold_accuracy`: one threshold tuned on all pairs (OpenSphere / SphereFace2 tables);
  slightly optimistic, because the threshold is chosen on the test pairs.

Identification and retrieval (:func:`rank_k`, :func:`recall_at_k`) take a similarity matrix or
embeddings; :func:`tpir_at_fpir` is open-set identification (the IJB-B/C 1:N protocol).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Relative slack when comparing a false-positive count with ``far * n_negatives``, so that e.g.
# far = 1e-3 with 3000 negatives admits exactly 3 false positives despite float rounding.
_FAR_RTOL = 1e-9


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


def check_pairs(scores: np.ndarray | Sequence, labels: np.ndarray | Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Validate pair scores and labels; returns float64 scores ``(N,)`` and bool labels ``(N,)``.

    Errors: not 1-D, different lengths, NaN or infinite scores, labels other than bool / 0 / 1, no
    positive or no negative pair.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = _as_labels(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D (N,), got shapes {s.shape} and {y.shape}")
    if len(s) != len(y):
        raise ValueError(f"scores and labels must have the same length, got {len(s)} and {len(y)}")
    if not np.isfinite(s).all():
        n_bad = int((~np.isfinite(s)).sum())
        raise ValueError(f"scores must be finite, got {n_bad} NaN or infinite value(s) out of {len(s)}")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise ValueError(
            f"need both positive and negative pairs, got {n_pos} positive and {len(y) - n_pos} negative"
        )
    return s, y


def _check_far(far: float | Sequence[float]) -> np.ndarray:
    f = np.asarray(far, dtype=np.float64)
    if f.ndim > 1 or f.size == 0:
        raise ValueError(f"far must be a float or a 1-D sequence of floats, got shape {f.shape}")
    if not ((f > 0) & (f <= 1)).all():
        raise ValueError(f"far must lie in (0, 1], got {f.tolist()}")
    return f


# --------------------------------------------------------------------------------------------------
# Cumulative counts: the one sort every verification metric shares
# --------------------------------------------------------------------------------------------------


def _sorted_groups(s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores in descending order, grouped by value: ``(order, values, ends)``.

    ``order`` sorts the scores descending; ``values`` ``(M,)`` are the distinct scores, descending, and
    ``ends[j]`` is the position (in sorted order) of the last score equal to ``values[j]``. Every metric
    below counts at group ends, so the order among tied scores never matters and numpy's default
    (unstable, about 3 x faster than stable) argsort is enough.
    """
    order = np.argsort(-s)
    s_desc = s[order]
    ends = np.append(np.flatnonzero(s_desc[1:] != s_desc[:-1]), len(s_desc) - 1)
    return order, s_desc[ends], ends


def _cumulative_counts(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs accepted at each distinct score: ``(values, tps, fps)``, each ``(M,)``.

    ``values`` are the distinct scores, descending; ``tps[j]`` / ``fps[j]`` = positives / negatives with
    ``score >= values[j]``.
    """
    order, values, ends = _sorted_groups(s)
    tps = np.cumsum(y[order], dtype=np.int64)[ends]
    return values, tps, ends + 1 - tps


def _best_threshold(values: np.ndarray, tps: np.ndarray, fps: np.ndarray, n_pos: int, n_neg: int) -> tuple[int, float]:
    """The accuracy-maximising threshold over all candidates, from :func:`_cumulative_counts`.

    Candidates (descending): ``+inf`` (reject all), the midpoints between consecutive distinct scores,
    ``-inf`` (accept all). Ties in accuracy go to the highest threshold (the strictest), as insightface's
    ``argmax`` over ascending distance thresholds does. Returns ``(n_correct, threshold)``.
    """
    # correct[0]: reject all; correct[j + 1]: accept the groups 0..j (j = M - 1: accept all)
    correct = np.concatenate(([n_neg], tps + (n_neg - fps)))
    mids = (values[:-1] + values[1:]) / 2
    # a midpoint that rounds onto the lower value would accept it too; fall back to the upper value
    mids = np.where(mids > values[1:], mids, values[:-1])
    thresholds = np.concatenate(([np.inf], mids, [-np.inf]))
    best = int(np.argmax(correct))
    return int(correct[best]), float(thresholds[best])


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
    s, y = check_pairs(scores, labels)
    values, tps, fps = _cumulative_counts(s, y)
    fpr = np.concatenate(([0.0], fps / fps[-1]))
    tpr = np.concatenate(([0.0], tps / tps[-1]))
    return fpr, tpr, np.concatenate(([np.inf], values))


def auc(fpr: np.ndarray | Sequence, tpr: np.ndarray | Sequence) -> float:
    """Area under a ROC curve by the trapezoidal rule; ``fpr`` must be monotonic, shapes ``(M,)``."""
    x = np.asarray(fpr, dtype=np.float64)
    t = np.asarray(tpr, dtype=np.float64)
    if x.shape != t.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"fpr and tpr must be 1-D with the same length >= 2, got {x.shape} and {t.shape}")
    dx = np.diff(x)
    if (dx < 0).any() and (dx > 0).any():
        raise ValueError("fpr must be monotonic (as returned by roc)")
    return float(abs(np.sum(dx * (t[1:] + t[:-1]) / 2)))


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
    s, y = check_pairs(scores, labels)
    f = _check_far(far)
    _, tps, fps = _cumulative_counts(s, y)
    n_pos, n_neg = tps[-1], fps[-1]
    fp_allowed = f * n_neg * (1 + _FAR_RTOL)
    # fps is non-decreasing: the last ROC point within budget has the largest TPR
    idx = np.searchsorted(fps, fp_allowed, side="right") - 1
    tar = np.where(idx >= 0, tps[np.maximum(idx, 0)] / n_pos, 0.0)
    return float(tar) if f.ndim == 0 else tar


def eer(scores: np.ndarray | Sequence, labels: np.ndarray | Sequence) -> float:
    """Equal error rate: where ``FPR = FNR`` on the ROC, linearly interpolated between its two points.

    ``FNR = 1 - TPR``. Perfectly separable scores give 0.
    """
    fpr, tpr, _ = roc(scores, labels)
    gap = (1 - tpr) - fpr  # decreasing from 1 (first point) to -1 (last point)
    i = int(np.argmax(gap <= 0))  # first point at or past the crossing; i >= 1
    g0, g1 = gap[i - 1], gap[i]
    w = g0 / (g0 - g1)
    return float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))


def best_threshold_accuracy(scores: np.ndarray | Sequence, labels: np.ndarray | Sequence) -> tuple[float, float]:
    """Accuracy at the one threshold that maximises it on all pairs (OpenSphere's reporting).

    ``ACC = max_t (TP(t) + TN(t)) / N``, searched exactly over the midpoints between consecutive distinct
    scores plus ``+inf`` (reject all) and ``-inf`` (accept all); among equal accuracies the highest
    threshold wins. Optimistic: the threshold is tuned on the pairs it is measured on.

    Returns:
        ``(accuracy, threshold)``; accuracy in [0, 1], accept when ``score >= threshold``.
    """
    s, y = check_pairs(scores, labels)
    n_pos = int(y.sum())
    n_correct, threshold = _best_threshold(*_cumulative_counts(s, y), n_pos, len(y) - n_pos)
    return n_correct / len(s), threshold


def fold_ids(n: int, folds: int = 10) -> np.ndarray:
    """Fold index of each of ``n`` pairs: consecutive blocks, the first ``n % folds`` one larger.

    Identical to ``sklearn.model_selection.KFold(folds, shuffle=False)`` (and ``np.array_split``);
    for LFW's 6,000 pairs, fold k is pairs ``[600 k, 600 (k + 1))``.
    """
    if not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if n < folds:
        raise ValueError(f"need at least folds={folds} pairs, got {n}")
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    return np.repeat(np.arange(folds), sizes)


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
    s, y = check_pairs(scores, labels)
    fold = fold_ids(len(s), folds)
    order, values, ends = _sorted_groups(s)  # one sort serves every fold
    y_desc, fold_desc = y[order], fold[order]
    tps = np.cumsum(y_desc, dtype=np.int64)[ends]
    fps = ends + 1 - tps
    accuracies = np.empty(folds)
    for k in range(folds):  # a loop over folds; the threshold search inside is vectorised
        test = fold == k
        # the other folds' counts = all pairs' - this fold's, at the same distinct scores
        in_fold = fold_desc == k
        test_tps = np.cumsum(y_desc & in_fold, dtype=np.int64)[ends]
        test_fps = np.cumsum(in_fold, dtype=np.int64)[ends] - test_tps
        train_tps, train_fps = tps - test_tps, fps - test_fps
        # keep only the scores that occur in the other folds (the candidates of a search on them alone)
        added = np.diff(train_tps + train_fps, prepend=0) > 0
        n_pos = int(train_tps[-1])
        _, threshold = _best_threshold(
            values[added], train_tps[added], train_fps[added], n_pos, int(train_fps[-1])
        )
        accuracies[k] = np.mean((s[test] >= threshold) == y[test])
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


def tpir_at_fpir(
    similarity: np.ndarray,
    probe_labels: np.ndarray | Sequence,
    gallery_labels: np.ndarray | Sequence,
    fpir: float | Sequence[float],
    rank: int = 1,
) -> float | np.ndarray:
    """Open-set identification: TPIR at a given FPIR (the IJB-B/C 1:N protocol, Grother et al.).

    Probes with a mate in the gallery are *mated*, the others *non-mated*. At threshold ``t`` a
    non-mated probe is a false alarm when its top score is ``>= t``; a mated probe is identified when
    its best mate is within the top ``rank`` (ties count against it) and scores ``>= t``. The threshold
    is the lowest one whose FPIR is ``<= fpir``, tied scores rejected together, so TPIR is exact.

    Args:
        similarity: ``(P, G)`` probe-to-gallery similarities. probe_labels: ``(P,)``; gallery_labels: ``(G,)``.
        fpir: a float in (0, 1] or a sequence of them. rank: 1-based rank, default 1.

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
    # the (a + 1)-th highest non-mated score and everything tied with it must be rejected
    allowed = np.floor(f * len(nonmated_top) * (1 + _FAR_RTOL)).astype(np.int64)
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
