"""Error versus reject (faceforge.eval.quality): the maths against plain float64 loops on hand-made scores, random
rejection's expectation by enumeration, and `faceforge eval --quality` end to end (tables, JSON, plot, errors)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from faceforge.eval.metrics import PairCounts
from faceforge.eval.quality import (
    CURVE_FRACTIONS,
    REJECT_FRACTIONS,
    error_versus_reject,
    fnmr_after_rejection,
    pair_quality,
)


def plain_threshold(scores: np.ndarray, labels: np.ndarray, fmr: float) -> float:
    """The lowest score t (of all scores, or just above the top one) with #{negatives >= t} <= floor(fmr n_neg)."""
    neg = scores[~labels]
    allowed = math.floor(fmr * len(neg) * (1 + 1e-9))
    candidates = sorted(set(scores.tolist()))
    ok = [t for t in candidates if np.sum(neg >= t) <= allowed]
    return min(ok) if ok else float(np.nextafter(max(candidates), np.inf))


def plain_fnmr(scores: np.ndarray, labels: np.ndarray, quality: np.ndarray, t: float, r: float) -> float:
    """Genuine pairs sorted by quality (all distinct), the first floor(r n) dropped, FNMR of the rest."""
    order = sorted(np.flatnonzero(labels).tolist(), key=lambda i: quality[i])
    kept = order[int(math.floor(r * len(order) + 1e-9)):]
    return sum(scores[i] < t for i in kept) / len(kept)


def random_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = np.where(labels, rng.normal(0.5, 0.2, n), rng.normal(0.0, 0.2, n))
    quality = rng.random(n) + np.where(labels, scores, 0.0)  # better quality, higher genuine scores: rejection helps
    return scores, labels, quality


def test_pair_quality_is_the_lower_of_the_two_images() -> None:
    q = np.array([3.0, 1.0, 2.0, 5.0, -1.0, 0.5])
    assert pair_quality(q).tolist() == [1.0, 2.0, -1.0]
    with pytest.raises(ValueError, match="one quality per image"):
        pair_quality(q[:5])
    with pytest.raises(ValueError, match="value 1 is nan"):
        pair_quality(np.array([1.0, np.nan]))


def test_threshold_is_fixed_on_all_pairs_as_tar_at_far_reads_it() -> None:
    for seed in range(4):
        scores, labels, _ = random_pairs(3000, seed)
        scores = np.round(scores, 2)  # ties among the scores
        counts = PairCounts.of(scores, labels)
        for fmr in (1e-3, 1e-2, 0.1):
            t = counts.threshold_at_far(fmr)
            assert t == plain_threshold(scores, labels, fmr)
            assert 1 - np.mean(scores[labels] < t) == pytest.approx(counts.tar_at_far(fmr), abs=1e-15)


def test_hand_made_curve() -> None:
    """10 genuine pairs, 3 of them below the threshold; the 3 lowest qualities are exactly those 3."""
    neg = np.linspace(-0.5, 0.3, 1000)  # 1000 negatives: FMR 1e-3 allows one false match, the top one
    gen_scores = np.array([0.1, 0.2, 0.25, 0.9, 0.8, 0.7, 0.6, 0.5, 0.95, 0.85])
    gen_quality = np.array([1.0, 2.0, 3.0, 10, 9, 8, 7, 6, 5, 4])
    scores = np.concatenate([gen_scores, neg])
    labels = np.r_[np.ones(10, bool), np.zeros(1000, bool)]
    quality = np.concatenate([gen_quality, np.full(1000, 100.0)])
    (c,) = error_versus_reject(scores, labels, quality, fmrs=(1e-3,))
    # one false match allowed: the threshold is the highest negative, 0.3 (accepted: score >= threshold), so
    # 0.1, 0.2, 0.25 are the false non-matches
    assert c.threshold == neg[-1] == 0.3 and c.resolved
    assert c.fnmr == {0.0: 3 / 10, 0.1: 2 / 9, 0.2: 1 / 8, 0.3: 0 / 7}
    assert c.random_fnmr == 0.3 and c.random_area == pytest.approx(0.3 * 0.3, abs=1e-15)
    grid = np.array(CURVE_FRACTIONS)
    expect = np.array([plain_fnmr(scores, labels, quality, c.threshold, r) for r in grid])
    assert np.array_equal(c.curve, expect)
    area = sum((grid[i + 1] - grid[i]) * (expect[i + 1] + expect[i]) / 2 for i in range(len(grid) - 1))
    assert c.area == pytest.approx(area, abs=1e-15)
    assert c.area < c.random_area


def test_fnmr_after_rejection_matches_a_plain_loop() -> None:
    for seed in range(5):
        scores, labels, quality = random_pairs(2000, seed)
        t = float(np.quantile(scores[labels], 0.2))
        fractions = np.arange(0, 0.96, 0.01)
        got = fnmr_after_rejection(scores, labels, quality, t, fractions)
        expect = [plain_fnmr(scores, labels, quality, t, r) for r in fractions]
        np.testing.assert_allclose(got, expect, rtol=0, atol=1e-15)


def test_random_rejection_is_the_fnmr_at_zero_and_ties_are_rejected_on_average() -> None:
    """Every k-subset of n genuine pairs rejected, averaged, keeps the FNMR at 0 %; a tied quality group at the cut
    is rejected as that average over its orders; a constant quality is random rejection."""
    scores = np.array([0.1, 0.9, 0.2, 0.8, 0.7, 0.3, 0.95, 0.6])
    labels = np.ones(8, bool)
    t = 0.5  # false non-matches: 0.1, 0.2, 0.3 -> FNMR(0) = 3 / 8
    for k in range(0, 8):
        kept = [np.mean(np.delete(scores, list(c)) < t) for c in itertools.combinations(range(8), k)]
        assert np.mean(kept) == pytest.approx(3 / 8, abs=1e-15)
    constant = fnmr_after_rejection(scores, labels, np.zeros(8), t, np.arange(8) / 8)
    np.testing.assert_allclose(constant, 3 / 8, rtol=0, atol=1e-15)
    # quality: pair 0 lowest, then a tie of pairs 1, 2, 3 (one false non-match among them), then the rest
    quality = np.array([0.0, 1.0, 1.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    fractions = np.array([0, 1, 2, 3, 4]) / 8
    got = fnmr_after_rejection(scores, labels, quality, t, fractions)
    expect = []
    for k in range(5):  # reject pair 0, then k - 1 of the tied three in every order, averaged
        if k <= 1:
            expect.append(np.mean(np.delete(scores, list(range(k))) < t))
            continue
        rows = [np.mean(np.delete(scores, [0, *perm[: k - 1]]) < t) for perm in itertools.permutations([1, 2, 3])]
        expect.append(np.mean(rows))
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-15)


def test_random_rejection_against_fixed_seed_draws() -> None:
    scores, labels, quality = random_pairs(4000, 7)
    (c,) = error_versus_reject(scores, labels, quality, fmrs=(1e-2,))
    genuine = np.flatnonzero(labels)
    rng = np.random.default_rng(0)
    k = int(0.3 * len(genuine))
    draws = [np.mean(scores[rng.permutation(genuine)[k:]] < c.threshold) for _ in range(400)]
    # the spread of one draw is at most sqrt(p (1 - p) / kept) (sampling without replacement shrinks it); the mean
    # of 400 draws is within 5 standard errors of the expectation
    p = c.random_fnmr
    assert abs(np.mean(draws) - p) < 5 * math.sqrt(p * (1 - p) / (len(genuine) - k)) / math.sqrt(400)
    assert c.fnmr[0.3] < c.fnmr[0.0] == p  # a quality that tracks the scores helps


def test_unresolved_fmr_and_bad_inputs() -> None:
    scores, labels, quality = random_pairs(300, 1)  # about 210 negatives: 1e-3 is not resolved, 1e-2 is
    low, high = error_versus_reject(scores, labels, quality)
    assert (low.fmr, low.resolved, high.resolved) == (1e-3, False, True)
    assert set(low.fnmr) == set(REJECT_FRACTIONS)
    with pytest.raises(ValueError, match="values for 300 pairs"):
        error_versus_reject(scores, labels, quality[:-1])
    with pytest.raises(ValueError, match="quality: value 3 is inf"):
        error_versus_reject(scores, labels, np.where(np.arange(300) == 3, np.inf, quality))
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        fnmr_after_rejection(scores, labels, quality, 0.3, [1.0])


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import _tiny_run as T  # tests/ is on sys.path

    root = tmp_path_factory.mktemp("quality_cli")
    ckpt = T.tiny_run(root / "run")
    bin_path, _ = T.pairs_bin(root / "pairs.bin", pairs=240)  # 120 negative pairs: FMR 1e-2 is resolved
    return {"ckpt": ckpt, "bin": bin_path}


def test_eval_quality_prints_writes_and_plots_the_error_versus_reject(tiny: dict[str, Path], tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from faceforge.build import load_backbone
    from faceforge.cli import main
    from faceforge.core.checkpoint import load_checkpoint
    from faceforge.data.pairs import load_bin

    out = tmp_path / "q"
    assert main(["eval", str(tiny["ckpt"]), "--bin", str(tiny["bin"]), "--quality", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Error versus reject" in text and "FNMR, 30 % rejected" in text
    assert "the norm of a model trained with head 'arcface' is not a calibrated quality score" in text
    assert (out / "error_vs_reject.png").stat().st_size > 0 and (out / "roc.png").is_file()
    data = json.loads((out / "results.json").read_text())
    assert "error_vs_reject.png" in data["plots"]
    (rec,) = data["results"]
    reject = rec["error_versus_reject"]
    assert reject["quality"] == "embedding norm" and [c["fmr"] for c in reject["by_fmr"]] == [1e-3, 1e-2]
    assert [c["resolved"] for c in reject["by_fmr"]] == [False, True]  # "—" and a footnote for 1e-3
    assert "— FMR=1e-03 on last.pt on pairs: needs at least 1,000 negative pairs" in text
    # the norms, from the checkpoint's backbone in float64 (no flip, not normalised); the pair scores from the
    # features the run cached; the curve from the float64 loop above. float32 norms differ from these by ~1e-6
    # relative: enough to reorder two pairs only if their qualities agree to 1e-6, which 240 random pairs do not
    images, issame = load_bin(tiny["bin"])
    backbone, _ = load_backbone(load_checkpoint(tiny["ckpt"]), source="test")
    backbone = backbone.double().eval()
    with torch.no_grad():
        x = (torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).double() - 127.5) / 127.5
        norms = torch.linalg.vector_norm(backbone(x), dim=1).numpy()
    emb = np.load(rec["embeddings"]).astype(np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)  # as pair_scores: the threshold is one of these cosines
    scores = np.einsum("nd,nd->n", emb[0::2], emb[1::2])
    labels = np.asarray(issame, bool)
    q = np.minimum(norms[0::2], norms[1::2])
    for c in reject["by_fmr"]:
        t = c["threshold"]
        for r, v in c["fnmr"].items():
            assert v == pytest.approx(plain_fnmr(scores, labels, q, t, float(r)), abs=1e-12), (c["fmr"], r)
        assert c["random_fnmr"] == pytest.approx(plain_fnmr(scores, labels, q, t, 0.0), abs=1e-12)

    # a score file: one per image (the min per pair is taken) or one per pair
    per_image = np.arange(2 * len(issame), dtype=np.float64)[::-1].copy()
    np.save(tmp_path / "q.npy", per_image)
    out2 = tmp_path / "q2"
    assert main(["eval", str(tiny["ckpt"]), "--bin", str(tiny["bin"]), "--quality", str(tmp_path / "q.npy"),
                 "--output", str(out2)]) == 0
    capsys.readouterr()
    (rec2,) = json.loads((out2 / "results.json").read_text())["results"]
    c = rec2["error_versus_reject"]["by_fmr"][1]
    assert rec2["error_versus_reject"]["quality"] == "q.npy"
    assert c["fnmr"]["0.20"] == pytest.approx(
        plain_fnmr(scores, labels, np.minimum(per_image[0::2], per_image[1::2]), c["threshold"], 0.2), abs=1e-12)


@pytest.mark.parametrize("make, message", [
    (lambda p: np.save(p, np.zeros(7)), "7 values for pairs (240 pairs, 480 images); expected 480 (one per image) "
                                        "or 240 (one per pair)"),
    (lambda p: np.save(p, np.zeros((480, 2))), "expected 1-D real numbers"),
    (lambda p: np.save(p, np.r_[np.zeros(479), np.nan]), "value 479 is nan; expected finite quality scores"),
    (lambda p: p.write_text("not numpy"), "cannot read it as a .npy array"),
])
def test_eval_quality_errors_are_one_line(tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          make, message: str) -> None:
    from faceforge.cli import main

    path = tmp_path / "q.npy"
    make(path)
    assert main(["eval", str(tiny["ckpt"]), "--bin", str(tiny["bin"]), "--quality", str(path),
                 "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("faceforge eval: --quality") and message in err and "\n" not in err
    assert not (tmp_path / "out" / "results.json").exists()  # refused before any work


def test_eval_quality_file_needs_one_pair_set(tiny: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from faceforge.cli import main

    np.save(tmp_path / "q.npy", np.zeros(480))
    assert main(["eval", str(tiny["ckpt"]), "--bin", str(tiny["bin"]), "--degraded", "--quality",
                 str(tmp_path / "q.npy"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "a score file scores the images of one pair set, there are 2" in err and "\n" not in err
    assert main(["eval", str(tiny["ckpt"]), "--bin", str(tiny["bin"]), "--quality", "scores.txt",
                 "--output", str(tmp_path / "out")]) == 2
    assert "expected 'norm' (the model's embedding norm) or a .npy" in capsys.readouterr().err
