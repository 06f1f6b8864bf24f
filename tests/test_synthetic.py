"""The built-in synthetic identities: determinism, splits, alignment, arguments, dataset, pairs, hardness."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from faceforge.data import synthetic
from faceforge.data.align import template_for_size
from faceforge.data.synthetic import SyntheticFaces, identity_params, montage, render_images, synthetic_pairs
from faceforge.data.transforms import to_tensor
from faceforge.eval.verify import evaluate_scores, pair_scores, verify_pairs

SIZE = 32  # small images keep the file fast; the renderer is the same code at every size


def _keys(n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n) % 7, np.arange(n) * 3 + 1  # repeated identities, distinct samples


# ------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------


def test_same_bytes_twice():
    ids, samples = _keys()
    a = render_images(ids, samples, seed=5, image_size=SIZE)
    identity_params.cache_clear()
    b = render_images(ids, samples, seed=5, image_size=SIZE)
    assert a.tobytes() == b.tobytes()


def test_independent_of_order_and_batching(monkeypatch):
    ids, samples = _keys()
    together = render_images(ids, samples, image_size=SIZE)
    one_by_one = np.stack([render_images([i], [s], image_size=SIZE)[0] for i, s in zip(ids, samples)])
    perm = np.random.default_rng(0).permutation(len(ids))
    shuffled = np.empty_like(together)
    shuffled[perm] = render_images(ids[perm], samples[perm], image_size=SIZE)
    monkeypatch.setattr(synthetic, "_BATCH_PIXELS", 3 * SIZE * SIZE)  # internal batches of 8
    small_batches = render_images(ids, samples, image_size=SIZE)
    for other in (one_by_one, shuffled, small_batches):
        assert together.tobytes() == other.tobytes()


def test_seed_sample_and_identity_change_the_image():
    base = render_images([0], [0], seed=0, image_size=SIZE)[0]
    for kwargs in ({"seed": 1}, {"ids": 1}, {"samples": 1}):
        ids, samples = [kwargs.get("ids", 0)], [kwargs.get("samples", 0)]
        other = render_images(ids, samples, seed=kwargs.get("seed", 0), image_size=SIZE)[0]
        assert not np.array_equal(base, other), kwargs


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------


def test_splits_are_disjoint():
    train = {identity_params(0, "train", k) for k in range(200)}
    test = {identity_params(0, "test", k) for k in range(200)}
    val = {identity_params(0, "val", k) for k in range(200)}
    assert len(train) == len(test) == len(val) == 200
    assert not train & test and not train & val and not test & val
    for k in range(10):  # the same index in two splits is two different people
        assert identity_params(0, "train", k) != identity_params(0, "test", k)
    a = render_images([3], [0], split="train", image_size=SIZE)
    b = render_images([3], [0], split="test", image_size=SIZE)
    assert not np.array_equal(a, b)


def test_identity_params_cached_and_seeded():
    assert identity_params(0, "train", 4) is identity_params(0, "train", 4)
    assert identity_params(0, "train", 4) != identity_params(1, "train", 4)


# ------------------------------------------------------------------------------------------------
# Alignment
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 56, 112])
def test_difficulty_zero_landmarks_exactly_at_template(size):
    images, lm = render_images(np.arange(12), np.arange(12), difficulty=0.0, image_size=size, return_landmarks=True)
    assert lm.shape == (12, 5, 2) and lm.dtype == np.float64
    assert np.array_equal(lm, np.broadcast_to(template_for_size(size), lm.shape))


def test_difficulty_zero_is_one_image_per_identity():
    a = render_images([2, 2, 2], [0, 1, 99], difficulty=0.0, image_size=SIZE)
    assert a[0].tobytes() == a[1].tobytes() == a[2].tobytes()


def _fit_similarity(src: np.ndarray, dst: np.ndarray) -> tuple[float, float, float]:
    """Least-squares similarity src -> dst (5, 2): (scale, rotation in radians, rms residual)."""
    s, d = src - src.mean(0), dst - dst.mean(0)
    zs, zd = s[:, 0] + 1j * s[:, 1], d[:, 0] + 1j * d[:, 1]
    a = np.vdot(zs, zd) / np.vdot(zs, zs)
    rms = float(np.sqrt(np.mean(np.abs(zd - a * zs) ** 2)))
    return float(abs(a)), float(np.angle(a)), rms


def test_landmarks_under_jitter_stay_near_template():
    n = 64
    _, lm112 = render_images(np.arange(n), np.arange(n), difficulty=1.0, image_size=112, return_landmarks=True)
    _, lm56 = render_images(np.arange(n), np.arange(n), difficulty=1.0, image_size=56, return_landmarks=True)
    np.testing.assert_allclose(lm56, lm112 * 0.5, atol=1e-9)  # the same draws at every size
    template = template_for_size(112)
    err = np.linalg.norm(lm112 - template, axis=-1)
    assert 1.0 < np.median(err) < 10.0  # jittered, but around the template
    assert err.max() < 40.0
    for points in lm112:  # the known similarity: scale/roll within the renderer's clips
        scale, angle, _ = _fit_similarity(template, points)
        assert math.exp(-0.45) < scale < math.exp(0.45) and abs(angle) < 0.65
    # With little jitter the landmarks are a near-similarity of the template (only yaw/pitch parallax).
    _, lm = render_images(np.arange(n), np.arange(n), difficulty=0.2, image_size=112, return_landmarks=True)
    rms = [_fit_similarity(template, p)[2] for p in lm]
    assert np.median(rms) < 1.0


# ------------------------------------------------------------------------------------------------
# Shapes, dtypes, arguments
# ------------------------------------------------------------------------------------------------


def test_shapes_and_dtypes():
    images, lm = render_images([0, 1, 2], [0, 0, 0], image_size=24, return_landmarks=True)
    assert images.shape == (3, 24, 24, 3) and images.dtype == np.uint8
    assert lm.shape == (3, 5, 2) and lm.dtype == np.float64
    assert render_images([], [], image_size=SIZE).shape == (0, SIZE, SIZE, 3)
    assert images.std() > 10  # not a blank canvas


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"difficulty": -0.1}, "difficulty"),
        ({"difficulty": float("nan")}, "difficulty"),
        ({"difficulty": float("inf")}, "difficulty"),
        ({"image_size": 8}, "image_size"),
        ({"image_size": 32.0}, "image_size"),
        ({"image_size": True}, "image_size"),
        ({"split": "dev"}, "split"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_render_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        render_images([0], [0], **kwargs)


def test_render_bad_keys():
    with pytest.raises(ValueError, match="identities"):
        render_images([-1], [0], image_size=SIZE)
    with pytest.raises(ValueError, match="samples"):
        render_images([0], [-2], image_size=SIZE)
    with pytest.raises(ValueError, match="same length"):
        render_images([0, 1], [0], image_size=SIZE)
    with pytest.raises(ValueError, match="identity"):
        identity_params(0, "train", -1)


@pytest.mark.parametrize(
    "args, kwargs, name",
    [
        ((0, 2), {}, "num_identities"),
        ((2, 0), {}, "images_per_identity"),
        ((2.0, 2), {}, "num_identities"),
        ((2, 2), {"split": "holdout"}, "split"),
        ((2, 2), {"difficulty": -1.0}, "difficulty"),
        ((2, 2), {"image_size": 4}, "image_size"),
        ((2, 2), {"seed": -3}, "seed"),
    ],
)
def test_dataset_bad_arguments(args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        SyntheticFaces(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_pairs": 0}, "num_pairs"),
        ({"num_pairs": 4, "num_identities": 1}, "num_identities"),
        ({"num_pairs": 4, "split": "x"}, "split"),
        ({"num_pairs": 4, "seed": -1}, "seed"),
        ({"num_pairs": 4, "difficulty": -2.0}, "difficulty"),
    ],
)
def test_pairs_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        synthetic_pairs(image_size=SIZE, **kwargs)


# ------------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------------


def test_dataset_items():
    ds = SyntheticFaces(3, 4, split="train", seed=2, image_size=SIZE)
    assert len(ds) == 12 and ds.num_classes == 3
    for i in range(len(ds)):
        x, label = ds[i]
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
        assert label == i // 4
        assert -1.0 <= x.min() and x.max() <= 1.0
        raw = render_images([i // 4], [i % 4], seed=2, split="train", image_size=SIZE)[0]
        assert torch.equal(x, to_tensor(raw))
        np.testing.assert_array_equal((x * 127.5 + 127.5).round().permute(1, 2, 0).numpy().astype(np.uint8), raw)
    assert torch.equal(ds[-1][0], ds[11][0])
    with pytest.raises(IndexError):
        ds[12]


def test_dataset_cache_equals_no_cache():
    lazy = SyntheticFaces(4, 3, split="val", seed=1, difficulty=0.7, image_size=SIZE)
    cached = SyntheticFaces(4, 3, split="val", seed=1, difficulty=0.7, image_size=SIZE, cache=True)
    assert cached.images is not None and cached.images.shape == (12, SIZE, SIZE, 3)
    for i in range(len(lazy)):
        assert np.array_equal(lazy.render(i), cached.render(i))
        (a, la), (b, lb) = lazy[i], cached[i]
        assert torch.equal(a, b) and la == lb


# ------------------------------------------------------------------------------------------------
# Pairs and montage
# ------------------------------------------------------------------------------------------------


def test_pairs_balanced_and_deterministic():
    images, issame = synthetic_pairs(40, num_identities=50, seed=3, image_size=SIZE)
    assert images.shape == (80, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert issame.shape == (40,) and issame.dtype == bool
    assert issame.sum() == 20
    assert all(fold.sum() == 2 for fold in issame.reshape(10, 4))  # every contiguous fold is balanced
    again, issame2 = synthetic_pairs(40, num_identities=50, seed=3, image_size=SIZE)
    assert images.tobytes() == again.tobytes() and np.array_equal(issame, issame2)
    other, _ = synthetic_pairs(40, num_identities=50, seed=4, image_size=SIZE)
    assert not np.array_equal(images, other)
    for k in range(40):  # two different images in every pair, positives included
        assert not np.array_equal(images[2 * k], images[2 * k + 1])


def test_pairs_same_person_at_difficulty_zero():
    # Without nuisances an identity has one image: positives are identical, negatives are not.
    images, issame = synthetic_pairs(20, num_identities=30, difficulty=0.0, image_size=SIZE)
    same = np.array([np.array_equal(images[2 * k], images[2 * k + 1]) for k in range(20)])
    assert np.array_equal(same, issame)


def test_montage(tmp_path):
    from PIL import Image

    path = tmp_path / "m.png"
    synthetic.main(["--montage", str(path), "--identities", "2", "--images", "3", "--size", "20"])
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 22 - 2, 3 * 22 - 2, 3)
    assert np.array_equal(grid, montage(str(tmp_path / "n.png"), 2, 3, image_size=20))


# ------------------------------------------------------------------------------------------------
# Hardness: the default difficulty is not solved by an untrained network or by raw pixels
# ------------------------------------------------------------------------------------------------


def test_default_difficulty_is_hard_for_untrained_features():
    from faceforge.backbones import build

    images, issame = synthetic_pairs(400, num_identities=1000, seed=0, difficulty=1.0, image_size=56)
    pixels = (images.reshape(len(images), -1).astype(np.float64) - 127.5) / 127.5
    raw = evaluate_scores(pair_scores(pixels), issame)
    assert raw.accuracy < 0.75
    torch.manual_seed(0)
    model = build("r18", embedding_size=128, input_size=56, width=0.5)
    untrained = verify_pairs(model, images, issame, batch_size=200)
    assert untrained.accuracy < 0.75
    # ... while at difficulty 0 the same pixels separate identities perfectly (the knob, not noise).
    clean, same0 = synthetic_pairs(100, num_identities=1000, seed=0, difficulty=0.0, image_size=56)
    clean_px = clean.reshape(len(clean), -1).astype(np.float64)
    assert evaluate_scores(pair_scores(clean_px - 127.5), same0).accuracy > 0.95
