"""The harness's held-out evaluation: a gallery of test identities, embedded once, scored over many pairs.

The trainer's own verification (``data.eval_pairs``) embeds two images per pair; to measure TAR at
FAR = 1e-4 that needs tens of thousands of negative pairs, i.e. about 100k images per evaluation. Here
every gallery image is embedded once (``f(x) + f(flip(x))``, as the trainer does) and the pairs only index
into the embeddings, so 100k pairs cost a dot product each:

- synthetic: ``data.eval_identities`` test-split identities (never trained) x ``per_identity`` images;
- glyphs: the test characters (never trained) in every test font (``GlyphBenchmark.test_gallery``).

Pairs come from :func:`faceforge.data.glyphs.sample_pairs` (half positive, half negative, with replacement),
seeded by the run's seed, so every head of a seed is scored on the same pairs. Recall@K (K = 1, 10, 20,
30) is leave-one-out retrieval over the whole gallery: a class-disjoint retrieval split as in BroadFace's
Table 5 (SOP, In-Shop), since no test identity was trained.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from torch import nn

from faceforge.data.glyphs import sample_pairs
from faceforge.eval.metrics import recall_at_k
from faceforge.eval.verify import embed, evaluate_scores
from faceforge.train.config import Config

FARS = (1e-3, 1e-4)
RECALL_KS = (1, 10, 20, 30)  # BroadFace Table 5 (In-Shop's columns; SOP's 1 / 10 as well)


def _synthetic_gallery(cfg: Config, per_identity: int) -> tuple[np.ndarray, np.ndarray]:
    from faceforge.data.synthetic import render_images

    d = cfg.data
    labels = np.repeat(np.arange(d.kwargs['eval_identities']), per_identity)
    samples = np.tile(np.arange(per_identity), d.kwargs['eval_identities'])
    images = render_images(labels, samples, seed=cfg.seed, split="test", difficulty=d.kwargs['difficulty'], image_size=d.image_size)
    return images, labels


def _glyph_gallery(cfg: Config, per_identity: int) -> tuple[np.ndarray, np.ndarray]:
    from faceforge.train.data import glyph_benchmark_of

    return glyph_benchmark_of(cfg).test_gallery()  # every test font: per_identity does not apply


# data.name -> gallery builder (cfg, images per identity) -> (images uint8 (N, S, S, 3), labels (N,))
GALLERIES: dict[str, Callable[[Config, int], tuple[np.ndarray, np.ndarray]]] = {
    "synthetic": _synthetic_gallery,
    "glyphs": _glyph_gallery,
}


def _synthetic_unlabelled(cfg: Config, count: int) -> np.ndarray:
    """``count`` images of identities neither trained (another split) nor in the gallery (test-split
    identities from 1,000,000 on): 5 images each."""
    from faceforge.data.synthetic import render_images

    d = cfg.data
    index = np.arange(count)
    return render_images(1_000_000 + index // 5, index % 5, seed=cfg.seed, split="test", difficulty=d.kwargs['difficulty'],
                         image_size=d.image_size)


def _glyph_unlabelled(cfg: Config, count: int) -> np.ndarray:
    """``count`` images of characters neither trained nor tested (drawn by seed from the fonts' shared
    characters), each in every training font."""
    from faceforge.data.glyphs import render_glyph
    from faceforge.train.data import glyph_benchmark_of

    bench = glyph_benchmark_of(cfg)
    used = {*bench.train_chars, *bench.test_chars}
    spare = [c for c in bench.selection.characters if c not in used]
    rng = np.random.default_rng([cfg.seed, 7])
    fonts = [bench.selection.fonts[i].path for i in bench.train_fonts]
    images: list[np.ndarray] = []
    for char in rng.permutation(spare):
        for path in fonts:
            grey = render_glyph(path, int(char), cfg.data.image_size)
            if grey is not None and len(images) < count:
                images.append(np.repeat(grey[..., None], 3, axis=-1))
        if len(images) == count:
            return np.stack(images)
    raise ValueError(f"glyphs: only {len(images)} unlabelled images from {len(spare)} spare characters; asked for {count}")


# data.name -> unlabelled images (cfg, count) -> uint8 (count, S, S, 3): semi-supervised KD's extra data
UNLABELLED: dict[str, Callable[[Config, int], np.ndarray]] = {
    "synthetic": _synthetic_unlabelled,
    "glyphs": _glyph_unlabelled,
}


def write_unlabelled(cfg: Config, count: int, folder: Path) -> Path:
    """Write ``count`` unlabelled images of ``cfg``'s dataset as PNG files into ``folder`` (once: a finished
    folder is kept; it appears whole, by a rename)."""
    from PIL import Image

    if folder.is_dir():
        return folder
    images = UNLABELLED[cfg.data.name](cfg, count)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(partial / f"{i:06d}.png")
    partial.rename(folder)
    return folder


def held_out_gallery(cfg: Config, per_identity: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The test identities of ``cfg``'s dataset: images uint8 ``(N, S, S, 3)`` and labels int64 ``(N,)``."""
    if cfg.data.name not in GALLERIES:
        raise ValueError(f"data.name = {cfg.data.name!r}: the accuracy harness has galleries for {sorted(GALLERIES)}")
    return GALLERIES[cfg.data.name](cfg, per_identity)


def evaluate_gallery(
    backbone: nn.Module, images: np.ndarray, labels: np.ndarray, num_pairs: int, seed: int, batch_size: int = 256,
    threshold: float | None = None,
) -> dict[str, float]:
    """Verification over ``num_pairs`` sampled pairs plus leave-one-out Recall@K of the gallery.

    threshold: a ready verification threshold on the cosine (SphereFace2's learned one), or None.
    Returns the keys of ``VerificationResult.as_dict()`` (accuracy = 10-fold, ``tar@far=1e-03``, eer, ...;
    with a threshold also ``fixed_threshold`` and ``fixed_threshold_accuracy``), ``recall@K`` for K in
    ``RECALL_KS`` below the gallery size, ``pairs`` and ``gallery`` (sizes).
    """
    embeddings = embed(backbone, images, batch_size=batch_size, flip=True)
    first, second, issame = sample_pairs(labels, num_pairs, seed)
    wide = embeddings.astype(np.float64)  # once per gallery item, not once per pair side
    scores = np.einsum("nd,nd->n", wide[first], wide[second])
    metrics = evaluate_scores(scores, issame, fars=FARS, fixed_threshold=threshold).as_dict()
    ks = [k for k in RECALL_KS if k < len(labels)]  # a K needs K other gallery items
    metrics.update({f"recall@{k}": float(r) for k, r in zip(ks, recall_at_k(embeddings, labels, ks))})
    metrics["pairs"], metrics["gallery"] = float(num_pairs), float(len(labels))
    return metrics


# datasets whose images are aligned faces, on which faceforge.data.masks can draw a mask
MASKABLE = ("synthetic",)


def evaluate_masked(
    backbone: nn.Module, images: np.ndarray, labels: np.ndarray, num_pairs: int, seed: int, batch_size: int = 256,
) -> dict[str, float]:
    """Verification over the same pairs as :func:`evaluate_gallery` with the first image of every pair masked
    (``faceforge.data.masks.mask_images_uint8``: the mask of gallery image n depends on (seed, n) only) and
    the second not: the MFR protocol of ``faceforge eval --masked``. Returns ``VerificationResult.as_dict()``."""
    from faceforge.data.masks import mask_images_uint8

    changed = mask_images_uint8(images, seed, np.arange(len(images)))
    return _one_side_changed(backbone, images, changed, labels, num_pairs, seed, batch_size, first_changed=True)


def evaluate_degraded(
    backbone: nn.Module, images: np.ndarray, labels: np.ndarray, num_pairs: int, seed: int, batch_size: int = 256,
) -> dict[str, float]:
    """Verification over the same pairs as :func:`evaluate_gallery` with the second image of every pair degraded
    (``faceforge.data.degrade.degrade_images``: low resolution and blur at fixed levels) and the first not: the
    mixed-quality protocol of ``faceforge eval --degraded``. Returns ``VerificationResult.as_dict()``."""
    from faceforge.data.degrade import degrade_images

    return _one_side_changed(backbone, images, degrade_images(images), labels, num_pairs, seed, batch_size,
                             first_changed=False)


def _one_side_changed(backbone: nn.Module, images: np.ndarray, changed: np.ndarray, labels: np.ndarray,
                      num_pairs: int, seed: int, batch_size: int, first_changed: bool) -> dict[str, float]:
    """The pairs of :func:`evaluate_gallery`, one side embedded from ``changed`` (the gallery's images changed one
    to one), the other from ``images``."""
    plain = embed(backbone, images, batch_size=batch_size, flip=True).astype(np.float64)
    other = embed(backbone, changed, batch_size=batch_size, flip=True).astype(np.float64)
    first, second, issame = sample_pairs(labels, num_pairs, seed)
    a, b = (other, plain) if first_changed else (plain, other)
    scores = np.einsum("nd,nd->n", a[first], b[second])
    return evaluate_scores(scores, issame, fars=FARS).as_dict()
