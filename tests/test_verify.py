"""faceforge.eval.verify and faceforge.eval.report: embedding, pair scoring, reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from faceforge.eval import markdown_table, plot_roc, score_histogram
from faceforge.eval.metrics import roc
from faceforge.eval.verify import VerificationResult, embed, evaluate_scores, pair_scores, verify_pairs

H = W = 4
D = 5


class LinearEmbedder(nn.Module):
    """A fixed linear map of the flattened CHW image; records the mode it ran in."""

    def __init__(self, weight: np.ndarray) -> None:
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        self.dropout = nn.Dropout(0.5)  # must be inactive during embed
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return self.dropout(self.fc(x.flatten(1)))


@pytest.fixture
def weight() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(D, 3 * H * W))


@pytest.fixture
def uint8_images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(7, H, W, 3), dtype=np.uint8)


def by_hand(weight: np.ndarray, images: np.ndarray, flip: bool) -> np.ndarray:
    """normalize(W vec(x) + W vec(flip x)) in float64, x = (img - 127.5) / 127.5 as CHW."""
    x = (images.astype(np.float64) - 127.5) / 127.5
    x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    out = x.reshape(len(x), -1) @ weight.T
    if flip:
        out = out + x[:, :, :, ::-1].reshape(len(x), -1) @ weight.T
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.mark.parametrize("flip", [True, False])
def test_embed_matches_hand_computation(weight, uint8_images, flip):
    model = LinearEmbedder(weight)
    got = embed(model, uint8_images, batch_size=3, flip=flip)
    assert got.shape == (7, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, by_hand(weight, uint8_images, flip), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_flip_changes_the_embedding(weight, uint8_images):
    model = LinearEmbedder(weight)
    with_flip = embed(model, uint8_images, flip=True)
    without = embed(model, uint8_images, flip=False)
    assert np.abs(with_flip - without).max() > 1e-2


def test_uint8_and_float_inputs_agree(weight, uint8_images):
    model = LinearEmbedder(weight)
    floats = torch.from_numpy((uint8_images.astype(np.float32) - 127.5) / 127.5).permute(0, 3, 1, 2)
    a = embed(model, uint8_images, batch_size=2)
    b = embed(model, floats.contiguous(), batch_size=256)
    c = embed(model, torch.from_numpy(uint8_images), batch_size=5)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-6)


@pytest.mark.parametrize("initially_training", [True, False])
def test_embed_runs_in_eval_and_restores_modes(weight, uint8_images, initially_training):
    model = LinearEmbedder(weight)
    model.train(initially_training)
    model.dropout.train(True)  # a mixed state must come back exactly
    embed(model, uint8_images, batch_size=4)
    assert model.seen_training and not any(model.seen_training)
    assert model.training is initially_training
    assert model.dropout.training is True
    assert model.fc.training is initially_training


def test_embed_restores_modes_on_error(weight):
    model = LinearEmbedder(weight).train()
    with pytest.raises(RuntimeError):
        embed(model, torch.zeros(2, 3, H + 1, W))  # wrong size for the linear map
    assert model.training


def test_embed_rejects_bad_images(weight):
    model = LinearEmbedder(weight)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        embed(model, np.zeros((2, 3, H, W), dtype=np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        embed(model, torch.zeros(2, 3, H, W, dtype=torch.int32))


def test_pair_scores_by_hand():
    e = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [0.0, -3.0]])
    np.testing.assert_allclose(pair_scores(e), [1 / np.sqrt(2), -1.0])
    with pytest.raises(ValueError, match="2N"):
        pair_scores(np.zeros((3, 2)))


def identity_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Identity())


def test_verify_pairs_known_answer():
    # 20 pairs of (3, 1, 40) images: same pairs are identical images (cos 1), different pairs orthogonal
    # (cos 0); images are left-right symmetric so the flip adds nothing.
    rng = np.random.default_rng(2)
    n_pairs = 20
    issame = np.arange(n_pairs) % 2 == 0
    images = np.zeros((2 * n_pairs, 3, 1, 2 * n_pairs), dtype=np.float32)
    for k in range(n_pairs):
        a, b = 2 * k, (2 * k if issame[k] else 2 * k + 1)
        value = rng.uniform(0.5, 1.0)
        images[2 * k, :, 0, [a, -1 - a]] = value
        images[2 * k + 1, :, 0, [b, -1 - b]] = 2 * value
    result = verify_pairs(identity_model(), torch.from_numpy(images), issame, batch_size=8)
    np.testing.assert_allclose(result.scores, np.where(issame, 1.0, 0.0), atol=1e-6)
    assert result.accuracy == 1.0 and result.accuracy_std == 0.0
    assert result.best_threshold_accuracy == 1.0 and 0.0 < result.threshold < 1.0
    assert result.eer == 0.0 and result.auc == 1.0
    assert result.tar_at_far == {1e-3: 1.0, 1e-4: 1.0}


def test_evaluate_scores_and_as_dict():
    scores = np.array([0.9, 0.2, 0.8, 0.4, 0.3, 0.1, 0.7, 0.6, 0.35, 0.05])
    labels = np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 0], dtype=bool)
    result = evaluate_scores(scores, labels, fars=(0.2,), folds=5)
    assert isinstance(result, VerificationResult)
    # sorted: .9+ .8+ .7+ .6- .4- .35+ .3+ .2- .1- .05-: one threshold gets 8/10 (accept >= .65)
    assert result.best_threshold_accuracy == pytest.approx(0.8)
    assert result.threshold == pytest.approx(0.65)  # accept >= .25 also gets 8/10; the higher wins
    # FAR 0.2 allows 1 of 5 negatives: accept >= 0.6 -> 3/5 positives
    assert result.tar_at_far == {0.2: pytest.approx(0.6)}
    fpr, tpr, _ = roc(scores, labels)
    assert result.auc == pytest.approx(np.trapezoid(tpr, fpr))
    d = result.as_dict()
    assert set(d) == {"accuracy", "accuracy_std", "best_threshold_accuracy", "threshold", "threshold_far", "eer", "auc",
                      "tar@far=2e-01", "negative_pairs"}
    assert d["negative_pairs"] == 5.0  # which TAR@FAR the pairs resolve (report.metrics_table)
    # FAR at the best threshold: accept >= .65 lets no negative through (the highest is .6)
    assert d["threshold_far"] == np.mean(scores[~labels] >= result.threshold) == 0.0
    assert evaluate_scores(scores, labels, fars=(0.2,), folds=5).threshold_far == 0.0
    assert all(isinstance(v, float) for v in d.values())


def test_evaluate_scores_fixed_threshold_and_roc_curve():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(8)
    labels = rng.random(200) < 0.4
    scores = np.round(rng.normal(0.4 * labels, 0.3), 2)
    r = evaluate_scores(scores, labels, fixed_threshold=0.2)
    assert r.fixed_threshold == 0.2
    assert r.fixed_threshold_accuracy == pytest.approx(np.mean((scores >= 0.2) == labels))
    assert r.as_dict()["fixed_threshold_accuracy"] == r.fixed_threshold_accuracy
    assert "fixed_threshold" not in evaluate_scores(scores, labels).as_dict()  # None is left out
    fpr, tpr = r.roc_curve()
    ref_fpr, ref_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-15)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-15)


def test_verify_pairs_rejects_count_mismatch():
    with pytest.raises(ValueError, match="2 images per pair"):
        verify_pairs(identity_model(), torch.zeros(5, 3, 1, 1), [True, False])


# ---------------------------------------------------------------- report


def test_plot_roc_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.5
    curves = {}
    for name, shift in (("model A", 1.0), ("model B", 2.0)):
        fpr, tpr, _ = roc(rng.normal(size=500) + shift * labels, labels)
        curves[name] = (fpr, tpr)
    path = plot_roc(curves, tmp_path / "sub" / "roc.png", title="test")
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_roc_thins_long_curves_on_their_upper_envelope():
    from faceforge.eval.report import _thin

    rng = np.random.default_rng(1)
    labels = rng.random(200_000) < 0.01
    fpr, tpr, _ = roc(rng.normal(size=len(labels)) + 3 * labels, labels)
    f, t = _thin(fpr, tpr, 500)
    assert len(f) <= 502 and (f[0], t[0], f[-1], t[-1]) == (0.0, 0.0, 1.0, 1.0)
    drawn = f > 0  # the log axis draws FPR > 0 only
    keep = np.searchsorted(fpr, f[drawn], side="right") - 1  # every drawn point is a point of the curve...
    np.testing.assert_array_equal(fpr[keep], f[drawn])
    # ... the highest one at its FPR: the drawn staircase never drops below the curve at kept FPRs
    np.testing.assert_array_equal(t[drawn], tpr[keep])
    assert len(np.unique(f[drawn])) == drawn.sum() > 300  # log-spaced levels (fewer where the curve has few)
    short = _thin(fpr[:100], tpr[:100], 500)
    assert short[0] is fpr[:100] or np.array_equal(short[0], fpr[:100])


def test_score_histogram_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.5
    path = score_histogram(rng.normal(size=300) + labels, labels, tmp_path / "hist.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_table():
    rows = [{"model": "r50", "lfw": 0.99833, "thr": 0.23456, "n": 6000}, {"model": "r100", "lfw": 0.9985}]
    table = markdown_table(rows, ["model", "lfw", "thr", "n"], percent=["lfw"])
    assert table.splitlines() == [
        "| model |   lfw |    thr |    n |",
        "| ----- | ----: | -----: | ---: |",
        "| r50   | 99.83 | 0.2346 | 6000 |",
        "| r100  | 99.85 |        |      |",
    ]
    with pytest.raises(ValueError, match="not in the table"):
        markdown_table(rows, ["model"], percent=["lfw"])
