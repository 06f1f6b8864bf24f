"""The test-time switches of evaluation: the flip (``eval.flip``, ``faceforge eval --no-flip``) and the degraded
pair sets (``faceforge.data.degrade``, ``eval.degraded``, ``faceforge eval --degraded``, the accuracy harness)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import _tiny_run as T  # tests/ is on sys.path
from faceforge.cli import main
from faceforge.data.degrade import (
    BLUR_SIGMA_AT_112,
    LOW_RESOLUTION_FACTOR,
    degrade_images,
    gaussian_blur,
    gaussian_kernel,
    low_resolution,
)
from faceforge.eval.sets import PairSet, degraded_pair_set


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("switches")
    ckpt = T.tiny_run(root / "run")
    bin_path, issame = T.pairs_bin(root / "pairs.bin", pairs=24)
    return {"ckpt": ckpt, "bin": bin_path, "root": root}


def float64_embeddings(ckpt: Path, images: np.ndarray, flip: bool) -> np.ndarray:
    """normalize(f(x)) or normalize(f(x) + f(flip x)) with the checkpoint's backbone run in float64."""
    from faceforge.build import load_backbone
    from faceforge.core.checkpoint import load_checkpoint

    backbone, _ = load_backbone(load_checkpoint(ckpt), source="test")
    backbone = backbone.double().eval()
    with torch.no_grad():
        x = (torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).double() - 127.5) / 127.5
        e = backbone(x) + (backbone(torch.flip(x, dims=[3])) if flip else 0)
    e = e.numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


# float32 forward passes agree with float64 to ~1e-6 per unit-vector component (a few 2^-24 per layer of a small
# net); 1e-4 still tells f(x) from f(x) + f(flip x) (they differ by ~1e-1 on random weights)
TOL = 1e-4


# ------------------------------------------------------------------------------------------------------ flip


def test_pair_set_embeds_with_and_without_the_flip(tiny: dict[str, Path]) -> None:
    from faceforge.build import load_backbone
    from faceforge.core.checkpoint import load_checkpoint
    from faceforge.data.pairs import load_bin

    images, issame = load_bin(tiny["bin"])
    backbone, _ = load_backbone(load_checkpoint(tiny["ckpt"]), source="test")
    on = PairSet("p", images, issame).embed(backbone, T.SIZE)[""]
    off = PairSet("p", images, issame, flip=False).embed(backbone, T.SIZE)[""]
    np.testing.assert_allclose(on, float64_embeddings(tiny["ckpt"], images, True), atol=TOL, rtol=0)
    np.testing.assert_allclose(off, float64_embeddings(tiny["ckpt"], images, False), atol=TOL, rtol=0)
    assert np.abs(on - off).max() > 100 * TOL


def test_eval_no_flip_reaches_the_embeddings_and_the_report(tiny: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from faceforge.data.pairs import load_bin

    images, _ = load_bin(tiny["bin"])
    for flag, flip in (([], True), (["--no-flip"], False)):
        out = tmp_path / f"flip-{flip}"
        assert main(["eval", str(tiny["ckpt"]), "--bin", str(tiny["bin"]), "--output", str(out), *flag]) == 0
        text = capsys.readouterr().out
        assert (f"Test-time flip: {'on' if flip else 'off'}") in text
        assert (f"Test-time flip: {'on' if flip else 'off'}") in (out / "results.md").read_text().splitlines()[0]
        data = json.loads((out / "results.json").read_text())
        (rec,) = data["results"]
        assert data["flip"] is flip and rec["flip"] is flip
        assert rec["embeddings"].endswith(".npy") and ("noflip" in Path(rec["embeddings"]).name) is not flip
        np.testing.assert_allclose(np.load(rec["embeddings"]), float64_embeddings(tiny["ckpt"], images, flip),
                                   atol=TOL, rtol=0)
    # the checkpoint's config flips (eval.flip default): evaluating without says so
    assert "its config has eval.flip = true" in text and "this evaluation does not flip" in text


def test_eval_flip_config_key_reaches_the_training_sets_and_model_json(tmp_path: Path) -> None:
    from faceforge.deploy.modelfile import model_info_from_config
    from faceforge.train.config import config_from_dict
    from faceforge.train.preflight import open_evaluators

    base = {**T.CONFIG, "output": str(tmp_path / "run")}
    default = config_from_dict(base)
    off = config_from_dict({**base, "eval": {"flip": False}})
    assert default.eval.flip is True and all(s.flip for s in open_evaluators(default))
    sets = open_evaluators(off)
    assert sets and not any(s.flip for s in sets)
    assert model_info_from_config(default).flip_test is True and model_info_from_config(off).flip_test is False
    with pytest.raises(ValueError, match="eval.flip = 'no': expected bool"):
        config_from_dict({**base, "eval": {"flip": "no"}})


# ------------------------------------------------------------------------------------------------ degradation


def plain_low_resolution(image: np.ndarray, factor: float) -> np.ndarray:
    """float64: f x f block means (area averaging, the side divisible by f), then bilinear back with half-pixel
    centres (source coordinate (i + 0.5) / f - 0.5, clamped at the edges), rounded half to even."""
    s = image.shape[0]
    f = round(1 / factor)
    small = image.astype(np.float64).reshape(s // f, f, s // f, f, 3).mean(axis=(1, 3))
    n = s // f

    def weights(i: int) -> tuple[int, int, float]:
        c = max((i + 0.5) / f - 0.5, 0.0)
        lo = min(int(math.floor(c)), n - 1)
        return lo, min(lo + 1, n - 1), c - lo

    out = np.empty((s, s, 3))
    for i in range(s):
        y0, y1, wy = weights(i)
        for j in range(s):
            x0, x1, wx = weights(j)
            top = small[y0, x0] * (1 - wx) + small[y0, x1] * wx
            bottom = small[y1, x0] * (1 - wx) + small[y1, x1] * wx
            out[i, j] = top * (1 - wy) + bottom * wy
    return out


def plain_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """float64 2-D convolution with the outer product of the 1-D Gaussian, edges mirrored without repeating."""
    r = math.ceil(3 * sigma)
    x = np.arange(-r, r + 1)
    k = np.exp(-x**2 / (2 * sigma**2))
    k /= k.sum()
    s = image.shape[0]
    padded = np.pad(image.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
    out = np.zeros((s, s, 3))
    for a in range(2 * r + 1):
        for b in range(2 * r + 1):
            out += k[a] * k[b] * padded[a : a + s, b : b + s]
    return out


def test_low_resolution_and_blur_match_float64_formulas() -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    low = low_resolution(images)
    blurred = gaussian_blur(images, 1.5)
    for n in range(3):
        # float32 arithmetic on 0..255 values is within ~1e-4 of float64, so rounding can differ by one level only
        # where the float64 value lies within 1e-4 of a half-integer; at most 1 everywhere
        assert np.abs(low[n].astype(int) - np.round(plain_low_resolution(images[n], LOW_RESOLUTION_FACTOR))).max() <= 1
        assert np.abs(blurred[n].astype(int) - np.round(plain_blur(images[n], 1.5))).max() <= 1
    assert np.mean(low.astype(int) == np.round([plain_low_resolution(i, 0.25) for i in images])) > 0.99
    k = gaussian_kernel(1.5)
    assert len(k) == 2 * 5 + 1 and k.sum() == pytest.approx(1.0, abs=1e-15) and k[5] == k.max()
    # a constant image stays constant; the degradation is a function of the pixels only (no random state)
    flat = np.full((2, 32, 32, 3), 77, np.uint8)
    assert np.array_equal(degrade_images(flat), flat)
    assert np.array_equal(degrade_images(images), degrade_images(images.copy()))
    sigma = BLUR_SIGMA_AT_112 * 32 / 112
    assert np.array_equal(degrade_images(images), gaussian_blur(low_resolution(images), sigma))
    with pytest.raises(ValueError, match="uint8 RGB"):
        degrade_images(images.astype(np.float32))
    with pytest.raises(ValueError, match="factor"):
        low_resolution(images, 0.0)


def test_degraded_pair_set_changes_only_the_second_image() -> None:
    images = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    s = PairSet("lfw", images, [True, False, True, False], flip=False)
    d = degraded_pair_set(s)
    assert d.name == "lfw (degraded)" and d.flip is False and np.array_equal(d.issame, s.issame)
    assert np.array_equal(d.images[0::2], images[0::2])
    assert np.array_equal(d.images[1::2], degrade_images(images[1::2]))
    assert degraded_pair_set(PairSet("", images, [True] * 4)).name == "degraded"
    assert d.key() != s.key()


def test_eval_degraded_reports_clean_and_degraded_side_by_side(tiny: dict[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from faceforge.eval.verify import evaluate_scores, pair_scores

    out = tmp_path / "deg"
    assert main(["eval", str(tiny["ckpt"]), "--bin", str(tiny["bin"]), "--degraded", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Degraded verification" in text and "10-fold accuracy, degraded" in text
    records = {r["set"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert set(records) == {"pairs", "pairs (degraded)"}
    plain, degraded = np.load(records["pairs"]["embeddings"]), np.load(records["pairs (degraded)"]["embeddings"])
    assert np.array_equal(plain[0::2], degraded[0::2]) and not np.allclose(plain[1::2], degraded[1::2])
    issame = np.asarray(T.pairs_bin(tmp_path / "again.bin", pairs=24)[1])
    expect = evaluate_scores(pair_scores(degraded), issame, fars=(1e-4, 1e-3, 1e-2, 1e-1))
    assert records["pairs (degraded)"]["accuracy"] == pytest.approx(expect.accuracy, abs=1e-12)
    # no pair set to degrade: one line, exit 2
    folder = tmp_path / "ids"
    import _eval_data as E

    E.identity_folder(folder, identities=3, per_identity=2, size=T.SIZE)
    assert main(["eval", str(tiny["ckpt"]), "--retrieval", str(folder), "--degraded", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("faceforge eval: --degraded changes one image of every 1:1 pair") and "\n" not in err


def test_eval_degraded_config_key_adds_the_degraded_sets_to_training(tmp_path: Path) -> None:
    from faceforge.train.config import ConfigError, config_from_dict
    from faceforge.train.preflight import open_evaluators

    base = {**T.CONFIG, "output": str(tmp_path / "run")}
    names = [s.name for s in open_evaluators(config_from_dict({**base, "eval": {"degraded": True}}))]
    assert names == ["", "degraded"]
    none = {**base, "data": {**base["data"], "eval_pairs": 0}, "eval": {"degraded": True}}
    with pytest.raises(ConfigError, match="eval.degraded = true: data.name 'synthetic' has no held-out pairs"):
        open_evaluators(config_from_dict(none))


def test_accuracy_harness_scores_degraded_pairs(tiny: dict[str, Path]) -> None:
    """gallery.evaluate_degraded: the same pairs as evaluate_gallery, the second side degraded."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy"))
    import gallery

    from faceforge.build import load_backbone
    from faceforge.core.checkpoint import load_checkpoint
    from faceforge.data.glyphs import sample_pairs
    from faceforge.eval.verify import embed, evaluate_scores

    backbone, _ = load_backbone(load_checkpoint(tiny["ckpt"]), source="test")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, T.SIZE, T.SIZE, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 4)
    got = gallery.evaluate_degraded(backbone, images, labels, 200, seed=3)
    clean = embed(backbone, images).astype(np.float64)
    low = embed(backbone, degrade_images(images)).astype(np.float64)
    first, second, issame = sample_pairs(labels, 200, 3)
    expect = evaluate_scores(np.einsum("nd,nd->n", clean[first], low[second]), issame, fars=gallery.FARS).as_dict()
    assert got == pytest.approx(expect, abs=1e-12)
    # its metrics (harness.execute: "degraded/<metric>") add columns to the report's tables
    import experiments as ex
    import tables

    metrics = {"accuracy": 0.9, "degraded/accuracy": 0.7, "degraded/tar@far=1e-03": 0.2}
    row = {"variant": ex.Variant("ArcFace", (), "s"), "records": {0: {"metrics": metrics, "train_seconds": 1.0}}}
    text = tables.table([row], ("accuracy",))
    assert "10-fold acc. (degraded)" in text and "TAR@FAR=1e-3 (degraded)" in text and "70.00" in text
