"""faceforge.eval.metrics against independent computations: scikit-learn and plain loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import KFold

from faceforge.eval import metrics as M


def tied_pairs(n: int, seed: int, decimals: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping positive/negative cosines rounded so that many scores tie."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.45
    scores = np.clip(np.round(rng.normal(0.1 + 0.4 * labels, 0.25), decimals), -1, 1)
    return scores, labels


# ---------------------------------------------------------------- plain-loop references


def loop_accuracy(scores, labels, t) -> float:
    """Fraction of pairs classified right when accepting score >= t."""
    return sum((s >= t) == bool(y) for s, y in zip(scores, labels)) / len(scores)


def loop_best_threshold(scores, labels) -> tuple[float, float]:
    """Max accuracy over -inf, midpoints of sorted unique scores, +inf; ties -> highest threshold."""
    u = sorted(set(float(s) for s in scores))
    candidates = [-math.inf] + [(a + b) / 2 for a, b in zip(u[:-1], u[1:])] + [math.inf]
    best_acc, best_t = -1.0, None
    for t in candidates:
        acc = loop_accuracy(scores, labels, t)
        if acc > best_acc or (acc == best_acc and t > best_t):
            best_acc, best_t = acc, t
    return best_acc, best_t


def loop_tar_at_far(scores, labels, far) -> float:
    """Largest TPR over thresholds t in {+inf} U scores (accept s >= t) with FPR <= far."""
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    best = 0.0
    for t in [math.inf] + sorted(set(float(s) for s in scores)):
        tp = sum(1 for s, y in zip(scores, labels) if y and s >= t)
        fp = sum(1 for s, y in zip(scores, labels) if not y and s >= t)
        if fp / n_neg <= far:
            best = max(best, tp / n_pos)
    return best


# ---------------------------------------------------------------- roc / auc


@pytest.mark.parametrize("decimals", [1, 3, 12])
def test_roc_matches_sklearn_with_ties(decimals):
    scores, labels = tied_pairs(500, seed=decimals, decimals=decimals)
    fpr, tpr, thr = M.roc(scores, labels)
    ref_fpr, ref_tpr, ref_thr = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(thr, ref_thr)
    assert M.auc(fpr, tpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_ties_move_together():
    # two pairs tied at 0.5 (one positive, one negative): no ROC point separates them
    fpr, tpr, thr = M.roc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.5, 0.1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])


def test_roc_large_n_is_vectorised():
    rng = np.random.default_rng(0)
    n = 2_000_000  # a Python loop over 2M thresholds x 2M pairs could never finish
    labels = rng.random(n) < 0.5
    scores = rng.random(n).astype(np.float32)
    fpr, tpr, thr = M.roc(scores, labels)
    assert fpr[-1] == tpr[-1] == 1.0 and len(thr) == len(np.unique(scores)) + 1
    assert M.auc(fpr, tpr) == pytest.approx(0.5, abs=2e-3)
    # vectorised: the Python lines it executes (counted by a tracer) do not grow with n; a loop over pairs or
    # thresholds executes at least one per element: >= 2M here against the 1,000 pairs' count (measured: 244
    # events at 1,000, 271 at 2M, from branches taken on ties and sizes)
    small, large = python_lines(M.roc, scores[:1000], labels[:1000]), python_lines(M.roc, scores, labels)
    assert large <= 2 * small, (small, large)


def python_lines(f, *args) -> int:
    """How many Python lines and calls ``f(*args)`` executes, every iteration of a loop counted (``sys.settrace``)."""
    import sys

    count = 0

    def trace(frame, event, arg):
        nonlocal count
        count += 1
        return trace

    sys.settrace(trace)
    try:
        f(*args)
    finally:
        sys.settrace(None)
    return count


# ---------------------------------------------------------------- tar_at_far


@pytest.mark.parametrize("seed", [0, 1])
def test_tar_at_far_matches_loop_with_ties(seed):
    scores, labels = tied_pairs(300, seed=seed, decimals=2)
    fars = [1e-2, 0.05, 0.1, 0.3, 1.0]
    got = M.tar_at_far(scores, labels, fars)
    want = [loop_tar_at_far(scores, labels, f) for f in fars]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert isinstance(M.tar_at_far(scores, labels, 0.1), float)


def test_tar_at_far_tie_lowers_tar():
    # 10 negatives; the top score 0.9 is shared by one negative and three positives.
    scores = [0.9, 0.9, 0.9, 0.9, 0.5, 0.05] + [0.1] * 9
    labels = [0, 1, 1, 1, 1, 1] + [0] * 9
    # FAR 0.05 admits 0 of 10 negatives: the tie at 0.9 cannot be split, so nothing is accepted
    assert M.tar_at_far(scores, labels, 0.05) == 0.0
    # FAR 0.1 admits 1 negative: >= 0.9 -> 3/5; >= 0.5 still 1 negative -> 4/5; 0.05 needs all 10
    assert M.tar_at_far(scores, labels, 0.1) == pytest.approx(0.8)
    assert M.tar_at_far(scores, labels, 0.1) == loop_tar_at_far(scores, labels, 0.1)


def test_tar_at_far_exact_budget_despite_rounding():
    # 29 false positives among 50 negatives is exactly FAR 0.58, although 0.58 * 50 < 29 in floats
    assert 0.58 * 50 < 29 and 29 / 50 == 0.58
    labels = np.r_[np.ones(10, bool), np.zeros(50, bool)]
    scores = np.r_[np.full(10, 0.5), np.full(29, 0.9), np.zeros(21)]
    assert M.tar_at_far(scores, labels, 0.58) == 1.0 == loop_tar_at_far(scores, labels, 0.58)
    assert M.tar_at_far(scores, labels, 0.57) == 0.0 == loop_tar_at_far(scores, labels, 0.57)


# ---------------------------------------------------------------- accuracies


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_threshold_accuracy_matches_loop(seed):
    scores, labels = tied_pairs(200, seed=seed, decimals=2)
    acc, thr = M.best_threshold_accuracy(scores, labels)
    ref_acc, ref_thr = loop_best_threshold(scores, labels)
    assert acc == pytest.approx(ref_acc, abs=1e-12)
    assert thr == pytest.approx(ref_thr, abs=1e-12)


def loop_ten_fold(scores, labels, folds):
    """insightface's protocol written plainly: sklearn KFold, loop over folds and thresholds."""
    accs = []
    for train, test in KFold(n_splits=folds, shuffle=False).split(scores):
        _, t = loop_best_threshold(scores[train], labels[train])
        accs.append(loop_accuracy(scores[test], labels[test], t))
    return float(np.mean(accs)), float(np.std(accs))


@pytest.mark.parametrize("n, folds", [(240, 10), (253, 10), (61, 4)])
def test_verification_accuracy_matches_loop(n, folds):
    scores, labels = tied_pairs(n, seed=n, decimals=2)
    mean, std = M.verification_accuracy(scores, labels, folds=folds)
    ref_mean, ref_std = loop_ten_fold(scores, labels, folds)
    assert mean == pytest.approx(ref_mean, abs=1e-12)
    assert std == pytest.approx(ref_std, abs=1e-12)


def test_fold_ids_match_sklearn_kfold():
    for n in (20, 6000, 1003):
        ids = M.fold_ids(n, 10)
        for k, (_, test) in enumerate(KFold(n_splits=10).split(np.zeros(n))):
            np.testing.assert_array_equal(np.flatnonzero(ids == k), test)


def test_perfectly_separable():
    rng = np.random.default_rng(3)
    labels = np.arange(100) % 2 == 0
    scores = np.where(labels, rng.uniform(0.5, 1.0, 100), rng.uniform(-0.5, 0.3, 100))
    assert M.verification_accuracy(scores, labels) == (1.0, 0.0)
    acc, thr = M.best_threshold_accuracy(scores, labels)
    assert acc == 1.0 and scores[~labels].max() < thr < scores[labels].min()
    assert M.eer(scores, labels) == 0.0
    assert M.tar_at_far(scores, labels, 1e-4) == 1.0
    fpr, tpr, _ = M.roc(scores, labels)
    assert M.auc(fpr, tpr) == 1.0


def test_best_threshold_hand_example():
    # sorted: 0.9+ 0.8- 0.7+ 0.6+ 0.2- ; best: accept >= 0.4 (between 0.6 and 0.2): 4/5 correct.
    # accept >= 0.85 gives 3/5 (0.9 right, 0.8 right, 0.7/0.6 wrong, 0.2 right) -> 0.6
    acc, thr = M.best_threshold_accuracy([0.9, 0.8, 0.7, 0.6, 0.2], [1, 0, 1, 1, 0])
    assert acc == pytest.approx(0.8) and thr == pytest.approx(0.4)


# ---------------------------------------------------------------- eer


def loop_eer(fpr, tpr) -> float:
    """Walk the ROC polyline; return the FPR where it meets the line FPR = 1 - TPR."""
    for i in range(1, len(fpr)):
        g0 = (1 - tpr[i - 1]) - fpr[i - 1]
        g1 = (1 - tpr[i]) - fpr[i]
        if g0 > 0 >= g1:
            return fpr[i - 1] + (fpr[i] - fpr[i - 1]) * g0 / (g0 - g1)
    raise AssertionError("no crossing")


def test_eer_hand_example():
    # ROC points: (0,0) (0,.5) (.5,.5) (.5,1) (1,1); FNR = FPR = 0.5 at the third point
    assert M.eer([0.9, 0.7, 0.6, 0.2], [1, 0, 1, 0]) == pytest.approx(0.5)
    # pos 0.9, 0.3; neg 0.5, 0.1 -> ROC (0,0) (0,.5) (.5,.5) (.5,1) (1,1) too
    # pos 0.9, 0.8, 0.3; neg 0.5 -> points (0,0) (0,1/3) (0,2/3) (1,2/3) (1,1): crossing on the
    # segment (0,2/3)-(1,2/3) where FPR = 1 - 2/3
    assert M.eer([0.9, 0.8, 0.5, 0.3], [1, 1, 0, 1]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_eer_matches_polyline_walk(seed):
    scores, labels = tied_pairs(400, seed=seed, decimals=2)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    assert M.eer(scores, labels) == pytest.approx(loop_eer(fpr, tpr), abs=1e-12)


# ---------------------------------------------------------------- identification / retrieval


def test_rank_k_matches_loop():
    rng = np.random.default_rng(5)
    gallery = np.arange(20) % 8
    probes = rng.integers(0, 8, size=30)
    sim = np.round(rng.normal(size=(30, 20)), 1)  # ties
    got = M.rank_k(sim, probes, gallery, k=[1, 2, 5, 20])
    want = []
    for k in (1, 2, 5, 20):
        hits = 0
        for i in range(30):
            best_mate = max(sim[i, j] for j in range(20) if gallery[j] == probes[i])
            beaten = sum(1 for j in range(20) if gallery[j] != probes[i] and sim[i, j] >= best_mate)
            hits += 1 + beaten <= k
        want.append(hits / 30)
    np.testing.assert_allclose(got, want)
    assert M.rank_k(np.eye(3), [0, 1, 2], [0, 1, 2]) == 1.0


def test_recall_at_k_matches_loop():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(40, 4))
    y = rng.integers(0, 10, size=40)
    got = M.recall_at_k(x, y, k=[1, 4], chunk_size=7)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    for k, g in zip((1, 4), got):
        hits = 0
        for i in range(40):
            others = sorted((j for j in range(40) if j != i), key=lambda j: -xn[i] @ xn[j])
            hits += any(y[j] == y[i] for j in others[:k])
        assert g == pytest.approx(hits / 40)


def test_tpir_at_fpir_matches_loop():
    rng = np.random.default_rng(7)
    gallery = np.arange(10)
    probes = rng.integers(0, 16, size=60)  # labels 10..15 are not enrolled: non-mated probes
    sim = np.round(rng.normal(size=(60, 10)) + 1.5 * (probes[:, None] == gallery[None, :]), 1)
    mated = probes < 10
    for fpir in (0.05, 0.2, 1.0):
        got = M.tpir_at_fpir(sim, probes, gallery, fpir)
        best = 0.0
        for t in [math.inf] + sorted(set(sim.ravel().tolist())):
            fp = sum(1 for i in range(60) if not mated[i] and sim[i].max() >= t)
            if fp / (~mated).sum() > fpir:
                continue
            hit = 0
            for i in np.flatnonzero(mated):
                mate = sim[i, probes[i]]
                rank1 = all(sim[i, j] < mate for j in range(10) if j != probes[i])
                hit += rank1 and mate >= t
            best = max(best, hit / mated.sum())
        assert got == pytest.approx(best), fpir


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "scores, labels, match",
    [
        ([0.1, 0.2, 0.3], [1, 0], "same length"),
        ([0.1, 0.2], [1, 1], "0 negative"),
        ([0.1, 0.2], [0, 0], "0 positive"),
        ([0.1, float("nan")], [1, 0], "NaN"),
        ([0.1, 0.2], [1, 2], "0/1"),
        ([[0.1, 0.2]], [[1, 0]], "1-D"),
    ],
)
def test_bad_pairs_raise(scores, labels, match):
    for fn in (M.roc, M.eer, M.best_threshold_accuracy):
        with pytest.raises(ValueError, match=match):
            fn(scores, labels)


@pytest.mark.parametrize("far", [0.0, -0.1, 1.5, [1e-3, 2.0]])
def test_far_out_of_range_raises(far):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        M.tar_at_far([0.1, 0.9], [0, 1], far)


def test_bad_folds_raise():
    with pytest.raises(ValueError, match="at least folds=10"):
        M.verification_accuracy([0.1, 0.9, 0.5], [0, 1, 1])
    with pytest.raises(ValueError, match="folds must be an integer"):
        M.verification_accuracy([0.1, 0.9, 0.5], [0, 1, 1], folds=1)


def test_unmated_probe_raises_for_closed_set():
    with pytest.raises(ValueError, match="gallery mate"):
        M.rank_k(np.zeros((2, 2)), [0, 5], [0, 1])


# ---------------------------------------------------------------- PairCounts: one sort for every metric


def test_float32_scores_match_the_loops_on_their_exact_values():
    scores, labels = tied_pairs(240, seed=11, decimals=3)
    s32 = scores.astype(np.float32)
    exact = s32.astype(np.float64)  # what the loops see: the float32 values, exactly
    assert M.verification_accuracy(s32, labels) == pytest.approx(loop_ten_fold(exact, labels, 10), abs=1e-12)
    acc, thr = M.best_threshold_accuracy(s32, labels)
    assert (acc, thr) == pytest.approx(loop_best_threshold(exact, labels), abs=1e-12)
    for far in (0.05, 0.2):
        assert M.tar_at_far(s32, labels, far) == loop_tar_at_far(exact, labels, far)


@pytest.mark.parametrize("order", ["random", "by_score", "by_label"])
def test_verification_accuracy_with_small_search_blocks(monkeypatch, order):
    """Blocks of 3 candidates make the fold search skip most blocks; sorting the pairs by score gives
    folds that own runs of 40 consecutive scores (more than the 32 that the search for the next score of
    the other folds checks one by one)."""
    monkeypatch.setattr(M, "_BLOCK", 3)
    scores, labels = tied_pairs(160, seed=7, decimals=3)
    if order == "by_score":
        scores = np.sort(scores)
    elif order == "by_label":
        labels = np.sort(labels)
    for folds in (4, 10):
        mean, std = M.verification_accuracy(scores, labels, folds=folds)
        ref_mean, ref_std = loop_ten_fold(scores, labels, folds)
        assert mean == pytest.approx(ref_mean, abs=1e-12) and std == pytest.approx(ref_std, abs=1e-12)


@pytest.mark.parametrize("positives", [0.02, 0.5, 0.97])
def test_pair_counts_auc_matches_sklearn(positives):
    rng = np.random.default_rng(3)
    labels = rng.random(600) < positives
    scores = np.round(rng.normal(0.3 * labels, 0.2), 2)
    assert M.PairCounts.of(scores, labels).auc() == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_accuracy_at_threshold_matches_loop():
    scores, labels = tied_pairs(300, seed=4, decimals=2)
    for t in (-np.inf, -0.2, 0.1, 0.25, 0.3000001, np.inf):
        assert M.accuracy_at_threshold(scores, labels, t) == pytest.approx(loop_accuracy(scores, labels, t))
    # float32 scores against a float64 threshold between two float32 values
    s32 = np.array([0.1, 0.2, 0.3], np.float32)
    t = float(np.float32(0.2)) + 1e-12
    assert M.accuracy_at_threshold(s32, [0, 1, 1], t) == pytest.approx(loop_accuracy(s32.astype(float), [0, 1, 1], t))
    with pytest.raises(ValueError, match="threshold must be a number"):
        M.accuracy_at_threshold(scores, labels, float("nan"))
