"""data.label_noise: a fraction of every class's training labels shuffled within the training set."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from faceforge.train.config import ConfigError, config_from_dict
from faceforge.train.data import LabelNoise, build_dataset, build_verification_sets, shuffled_labels


def test_shuffled_labels_fraction_and_permutation() -> None:
    labels = np.repeat(np.arange(20), 10)
    rng = np.random.default_rng(5)
    labels = labels[rng.permutation(len(labels))]  # classes interleaved, not in blocks
    for fraction in (0.2, 0.4, 0.6):
        noisy, chosen = shuffled_labels(labels, fraction, seed=0)
        # round(fraction * 10) items of every class are chosen
        assert Counter(labels[chosen].tolist()) == {c: round(fraction * 10) for c in range(20)}
        unchosen = np.setdiff1d(np.arange(len(labels)), chosen)
        assert np.array_equal(noisy[unchosen], labels[unchosen])  # the others are untouched
        assert sorted(noisy[chosen].tolist()) == sorted(labels[chosen].tolist())  # a permutation of them
        changed = (noisy != labels).mean()
        # a label moved within the chosen subset stays in its class with probability about 1/20
        assert fraction * 0.85 <= changed <= fraction
    again, _ = shuffled_labels(labels, 0.4, seed=0)
    other, _ = shuffled_labels(labels, 0.4, seed=1)
    assert np.array_equal(again, shuffled_labels(labels, 0.4, seed=0)[0]) and not np.array_equal(again, other)
    none, chosen = shuffled_labels(labels, 0.0, seed=0)
    assert np.array_equal(none, labels) and len(chosen) == 0
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        shuffled_labels(labels, 1.5, seed=0)


def _cfg(tmp_path: Path, noise: float) -> object:
    return config_from_dict({
        "output": str(tmp_path), "model": {"backbone": "r18"}, "head": {"name": "arcface"},
        "data": {"num_identities": 10, "images_per_identity": 5, "image_size": 16, "eval_pairs": 20,
                 "eval_identities": 4, "label_noise": noise},
    }, "<test>")


def test_label_noise_wraps_the_training_set_only(tmp_path: Path) -> None:
    clean, noisy = build_dataset(_cfg(tmp_path, 0.0)), build_dataset(_cfg(tmp_path, 0.4))
    assert isinstance(noisy, LabelNoise) and not isinstance(clean, LabelNoise)
    assert noisy.num_classes == clean.num_classes and len(noisy) == len(clean)
    assert np.array_equal(noisy.clean_labels, clean.labels)
    assert len(noisy.noisy_indices) == 10 * 2  # round(0.4 * 5) per class
    for i in (0, 7, 33):
        (x_noisy, y_noisy), (x_clean, _) = noisy[i], clean[i]
        assert np.array_equal(x_noisy.numpy(), x_clean.numpy()) and y_noisy == noisy.labels[i]
    (a_img, a_same), = build_verification_sets(_cfg(tmp_path, 0.0)).values()
    (b_img, b_same), = build_verification_sets(_cfg(tmp_path, 0.4)).values()
    assert np.array_equal(a_img, b_img) and np.array_equal(a_same, b_same)  # held-out pairs never touched
    with pytest.raises(ConfigError, match=r"data.label_noise = 1.5: expected a float in \[0, 1\]"):
        _cfg(tmp_path, 1.5)
