"""identify / retrieval / mean_average_precision against plain loops on small random data."""

from __future__ import annotations

import numpy as np
import pytest

from faceforge.eval import metrics as M
from faceforge.eval.identify import StreamingFarThreshold, identify_with_distractors
from faceforge.eval.retrieval import class_disjoint_split, retrieval_map, retrieval_recall


def _norm(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _data(seed, p=12, ids=5, g_per=2, m=200, d=8):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, d))
    p_lab = rng.integers(0, ids, p)
    g_lab = np.repeat(np.arange(ids), g_per)
    probe = centres[p_lab] + 0.9 * rng.normal(size=(p, d))
    gallery = centres[g_lab] + 0.9 * rng.normal(size=(len(g_lab), d))
    dis = rng.normal(size=(m, d))
    return probe, p_lab, gallery, g_lab, dis


def _loop_identify(probe, p_lab, gallery, g_lab, dis, ks, fars):
    pn, gn, dn = _norm(probe), _norm(gallery), _norm(dis)
    ranks, pos, neg = [], [], []
    for i in range(len(pn)):
        mates = [float(pn[i] @ gn[j]) for j in range(len(gn)) if g_lab[j] == p_lab[i]]
        others = [float(pn[i] @ gn[j]) for j in range(len(gn)) if g_lab[j] != p_lab[i]]
        others += [float(pn[i] @ dn[j]) for j in range(len(dn))]
        best = max(mates)
        ranks.append(1 + sum(o >= best for o in others))
        pos += mates
        neg += others
    rank_rates = {k: float(np.mean(np.array(ranks) <= k)) for k in ks}
    scores = np.array(pos + neg)
    labels = np.array([1] * len(pos) + [0] * len(neg))
    tars = {f: M.tar_at_far(scores, labels, f) for f in fars}
    return rank_rates, tars, np.array(ranks)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identify_matches_loop(seed):
    probe, p_lab, gallery, g_lab, dis = _data(seed)
    ks, fars = (1, 2, 5, 50), (1e-3, 1e-2, 0.05, 0.3, 1.0)
    want_rank, want_tar, want_ranks = _loop_identify(probe, p_lab, gallery, g_lab, dis, ks, fars)
    got = identify_with_distractors(probe, p_lab, gallery, g_lab, dis, ks=ks, fars=fars, chunk_size=37)
    np.testing.assert_array_equal(got.ranks, want_ranks)
    assert got.rank_k == pytest.approx(want_rank, abs=1e-12)
    assert got.tar_at_far == pytest.approx(want_tar, abs=1e-12)
    assert got.num_distractors == len(dis)


def test_identify_num_distractors_and_blocks():
    probe, p_lab, gallery, g_lab, dis = _data(3, m=300)
    fars = (1e-3, 0.02)
    for n in (10, 100, 250):
        want_rank, want_tar, _ = _loop_identify(probe, p_lab, gallery, g_lab, dis[:n], (1, 3), fars)
        a = identify_with_distractors(probe, p_lab, gallery, g_lab, dis, ks=(1, 3), fars=fars, num_distractors=n)
        blocks = (dis[i : i + 64] for i in range(0, len(dis), 64))
        b = identify_with_distractors(
            probe, p_lab, gallery, g_lab, blocks, ks=(1, 3), fars=fars, num_distractors=n, chunk_size=16
        )
        for r in (a, b):
            assert r.num_distractors == n
            assert r.rank_k == pytest.approx(want_rank, abs=1e-12)
            assert r.tar_at_far == pytest.approx(want_tar, abs=1e-12)


def test_identify_matches_rank_k_on_concatenated_gallery():
    probe, p_lab, gallery, g_lab, dis = _data(4)
    feats = _norm(np.concatenate([gallery, dis]))
    labels = np.concatenate([g_lab, np.full(len(dis), -1)])
    want = M.rank_k(_norm(probe) @ feats.T, p_lab, labels, k=[1, 4, 20])
    got = identify_with_distractors(probe, p_lab, gallery, g_lab, dis, ks=(1, 4, 20))
    np.testing.assert_allclose([got.rank_k[k] for k in (1, 4, 20)], want, atol=1e-12)


def test_identify_needs_mates():
    probe, p_lab, gallery, g_lab, dis = _data(5)
    with pytest.raises(ValueError):
        identify_with_distractors(probe, p_lab + 100, gallery, g_lab, dis)


@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_far_threshold_equals_exact_tar_at_far(seed):
    rng = np.random.default_rng(seed)
    n_pos, n_neg = 300, 5000
    # rounded scores: many ties, the hard case for the threshold
    pos = np.round(rng.normal(1.0, 1.0, n_pos), 1)
    neg = np.round(rng.normal(0.0, 1.0, n_neg), 1)
    scores = np.concatenate([pos, neg])
    labels = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    for far in (1e-4, 2e-4, 1e-3, 0.01, 0.1, 0.5, 1.0):
        allowed = int(np.floor(far * n_neg * (1 + 1e-9)))
        if allowed >= n_neg:
            bar = -np.inf
        else:
            top = StreamingFarThreshold(allowed + 1)
            for i in range(0, n_neg, 333):  # blocks of negatives, in stream order
                top.update(neg[i : i + 333])
            bar = top.kth_largest()
            assert bar == np.sort(neg)[::-1][allowed]
        assert np.mean(pos > bar) == M.tar_at_far(scores, labels, far)


# ---------------------------------------------------------------- retrieval


def _loop_recall(x, y, k):
    xn = _norm(x)
    hits = []
    for i in range(len(x)):
        others = [(float(xn[i] @ xn[j]), y[j] == y[i]) for j in range(len(x)) if j != i]
        others.sort(key=lambda t: (-t[0], t[1]))
        hits.append(any(r for _, r in others[:k]))
    return float(np.mean(hits))


def _loop_ap(x, y):
    xn = _norm(x)
    aps = []
    for i in range(len(x)):
        others = [(float(xn[i] @ xn[j]), y[j] == y[i]) for j in range(len(x)) if j != i]
        others.sort(key=lambda t: (-t[0], t[1]))
        n_rel = sum(r for _, r in others)
        if n_rel == 0:
            continue
        hit, ap = 0, 0.0
        for pos, (_, r) in enumerate(others, start=1):
            if r:
                hit += 1
                ap += hit / pos
        aps.append(ap / n_rel)
    return float(np.mean(aps))


@pytest.mark.parametrize("seed", [0, 1])
def test_mean_average_precision_matches_loop(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 8, 60)
    y[0] = 99  # a singleton class: left out of the mean
    x = rng.normal(size=(8, 6))[y % 8] + rng.normal(size=(60, 6))
    want = _loop_ap(x, y)
    assert M.mean_average_precision(x, y, chunk_size=7) == pytest.approx(want, abs=1e-12)
    assert retrieval_map(x, y) == pytest.approx(want, abs=1e-12)


def test_mean_average_precision_perfect_and_ties():
    x = np.array([[1.0, 0], [1, 0], [0, 1], [0, 1]])
    assert M.mean_average_precision(x, [0, 0, 1, 1]) == 1.0
    # identical embeddings across classes: the tie counts against the query
    x = np.ones((4, 2))
    assert M.mean_average_precision(x, [0, 0, 1, 1]) == pytest.approx(_loop_ap(x, np.array([0, 0, 1, 1])))
    assert M.mean_average_precision(x, [0, 0, 1, 1]) == pytest.approx(1 / 3)


def test_class_disjoint_split_and_recall():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 20, 200)
    x = rng.normal(size=(20, 5))[y] + 1.5 * rng.normal(size=(200, 5))
    tr, te = class_disjoint_split(y, test_fraction=0.5, seed=3)
    assert len(tr) + len(te) == len(y) and not set(y[tr]) & set(y[te])
    assert np.array_equal(np.sort(np.r_[tr, te]), np.arange(len(y)))
    tr2, te2 = class_disjoint_split(y, test_fraction=0.5, seed=3)
    assert np.array_equal(te, te2)
    xt, yt = x[te], y[te]
    got = retrieval_recall(xt, yt, ks=(1, 10, 100, 1000))
    assert set(got) == {1, 10, 100, 1000}
    for k in (1, 10):
        assert got[k] == pytest.approx(_loop_recall(xt, yt, k), abs=1e-12)
    assert got[1000] == pytest.approx(_loop_recall(xt, yt, len(yt) - 1), abs=1e-12)
