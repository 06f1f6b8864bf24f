"""1:1 verification of image pairs: embed (with flip test-time augmentation), score, measure.

The pair layout is insightface's ``.bin``: images ``2k`` and ``2k + 1`` form pair ``k``, and
``issame[k]`` says whether they show the same identity. Embeddings are ``f(x) + f(flip(x))``,
L2-normalised, and pairs are scored by cosine similarity (ArcFace / insightface ``verification.py``;
OpenSphere's "old" feature fusion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from faceforge.eval import metrics

PIXEL_MEAN = 127.5
PIXEL_STD = 127.5


# --------------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------------


def _to_input(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A batch as a float tensor ``(B, 3, H, W)``: uint8 ``(B, H, W, 3)`` is normalised and made CHW."""
    x = torch.as_tensor(batch)
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, H, W, 3) RGB, got shape {tuple(x.shape)}")
        return (x.permute(0, 3, 1, 2).float() - PIXEL_MEAN) / PIXEL_STD
    if x.is_floating_point():
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"float images must be normalised (N, 3, H, W), got shape {tuple(x.shape)}")
        return x
    raise TypeError(f"images must be uint8 (N, H, W, 3) or float (N, 3, H, W), got dtype {x.dtype}")


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)
    if param is None or not param.is_floating_point():
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype


def embed(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 256,
    flip: bool = True,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Embed images with a backbone: ``normalize(f(x) + f(flip(x)))``.

    Args:
        model: maps ``(B, 3, H, W)`` to ``(B, D)``. Run in eval mode under ``torch.no_grad()``; every
            submodule's train/eval mode is restored afterwards.
        images: uint8 RGB ``(N, H, W, 3)`` (numpy or tensor), normalised here as ``(x - 127.5) / 127.5``
            one batch at a time; or a float ``(N, 3, H, W)`` already normalised.
        batch_size: images per forward pass (default 256).
        flip: add the embedding of the horizontally flipped image (default True).
        device: where the model runs; default the device of its first parameter (CPU if none).
        progress: show a tqdm progress bar.

    Returns:
        float32 ``(N, D)``, every row L2-normalised.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(images)
    if n == 0:
        raise ValueError("images is empty; expected (N, H, W, 3) uint8 or (N, 3, H, W) float with N >= 1")
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, total=math.ceil(n / batch_size), desc="embed", unit="batch")
    return embed_batches(model, (images[start : start + batch_size] for start in starts), flip, device, normalize=True)


def embed_batches(
    model: nn.Module,
    batches: Iterable[np.ndarray | torch.Tensor],
    flip: bool = True,
    device: torch.device | str | None = None,
    normalize: bool = True,
) -> np.ndarray:
    """``f(x) + f(flip(x))`` (or ``f(x)``) of every batch, concatenated: float32 ``(N, D)``.

    Each batch is uint8 ``(B, H, W, 3)`` or normalised float ``(B, 3, H, W)`` (as for :func:`embed`).
    The model runs in eval mode under ``torch.no_grad()`` on ``device`` (default: its own); every
    submodule's train/eval mode is restored afterwards, also on error. ``normalize``: L2-normalise each
    row (verification); False keeps the norm (IJB image features, normalised per template later).
    """
    model_device, dtype = _model_device_dtype(model)
    device = torch.device(device) if device is not None else model_device
    modes = {module: module.training for module in model.modules()}
    model.eval()
    outputs = []
    try:
        with torch.no_grad():
            for batch in batches:
                x = _to_input(batch).to(device=device, dtype=dtype)
                out = model(x)
                if flip:
                    out = out + model(torch.flip(x, dims=[3]))  # flip the width axis
                if out.ndim != 2 or len(out) != len(x):
                    raise ValueError(f"model must return (B, D) embeddings, got shape {tuple(out.shape)}")
                out = out.float()
                outputs.append((nn.functional.normalize(out, dim=1) if normalize else out).cpu())
    finally:
        for module, training in modes.items():
            module.train(training)
    return torch.cat(outputs).numpy()


def embedding_norms(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """``|f(x)|`` of every image: the L2 norm of the model's raw output (no flip, not normalised), float64 ``(N,)``;
    MagFace's magnitude, the quality score of a norm-aware head. Images as for :func:`embed`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    raw = embed_batches(model, (images[s : s + batch_size] for s in range(0, len(images), batch_size)), flip=False,
                        device=device, normalize=False)
    return np.linalg.norm(raw.astype(np.float64), axis=1)


def pair_scores(embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
    """Cosine similarity of rows ``2k`` and ``2k + 1``: ``(2N, D) -> (N,)`` float64."""
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2 or len(e) % 2:
        raise ValueError(f"embeddings must be (2N, D) with pairs in rows 2k, 2k+1, got shape {e.shape}")
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return np.einsum("nd,nd->n", e[0::2], e[1::2])


# --------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------


@dataclass
class VerificationResult:
    """Verification metrics of one pair set; rates in [0, 1].

    accuracy / accuracy_std: insightface's 10-fold cross-validated accuracy (mean, np.std).
    best_threshold_accuracy / threshold: one threshold tuned on all pairs (OpenSphere); accept when
    ``score >= threshold``. tar_at_far: ``{far: tar}``, exact (ties together). eer, auc: of the ROC.
    fixed_threshold / fixed_threshold_accuracy: the accuracy at a threshold given in advance (e.g. the
    one SphereFace2 learns); None when none was given. threshold_far: the false accept rate at
    ``threshold`` (negatives with ``score >= threshold`` / negatives), stored in ``model.json``.
    scores / labels: ``(N,)`` cosine scores and same-identity labels; counts: their
    :class:`~faceforge.eval.metrics.PairCounts` (the one sort), from which :meth:`roc_curve` reads the
    ROC for plots.
    """

    accuracy: float
    accuracy_std: float
    best_threshold_accuracy: float
    threshold: float
    tar_at_far: dict[float, float]
    eer: float
    auc: float
    scores: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    counts: metrics.PairCounts | None = field(default=None, repr=False)
    fixed_threshold: float | None = None
    fixed_threshold_accuracy: float | None = None
    threshold_far: float | None = None

    @property
    def negative_pairs(self) -> int:
        """How many pairs show two identities: TAR@FAR is resolved only for FAR >= 1 / negative_pairs."""
        return int(np.count_nonzero(~np.asarray(self.labels, dtype=bool)))

    def as_dict(self) -> dict[str, float]:
        """Flat scalars for logging: ``tar_at_far`` becomes ``tar@far=1e-03`` keys, and ``negative_pairs`` (a
        float count) says which of them the pairs resolve (:func:`faceforge.eval.report.metrics_table`); no
        arrays, no Nones."""
        scalars = {f.name: getattr(self, f.name) for f in fields(self)
                   if f.name not in ("scores", "labels", "counts", "tar_at_far")}
        out = {k: v for k, v in scalars.items() if v is not None}
        out.update({f"tar@far={far:.0e}": tar for far, tar in self.tar_at_far.items()})
        out["negative_pairs"] = float(self.negative_pairs)
        return out

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(fpr, tpr)``, each ``(M + 1,)``: the exact ROC of :func:`faceforge.eval.metrics.roc`."""
        return (self.counts or metrics.PairCounts.of(self.scores, self.labels)).rates()


def evaluate_scores(
    scores: np.ndarray | Sequence[float],
    labels: np.ndarray | Sequence[bool],
    fars: Sequence[float] = (1e-3, 1e-4),
    folds: int = 10,
    fixed_threshold: float | None = None,
) -> VerificationResult:
    """Every verification metric of pair scores ``(N,)`` and labels ``(N,)`` (1 = same identity).

    One :class:`~faceforge.eval.metrics.PairCounts` (one sort of the scores) serves every metric; the
    folds of the 10-fold accuracy each sort their own tenth. float32 scores are kept float32 (exact,
    faster to sort). ``fixed_threshold``: also report the accuracy at this threshold.
    """
    counts = metrics.PairCounts.of(scores, labels)
    accuracies = counts.verification_accuracy(folds)
    n_correct, threshold = counts.best_threshold()
    tars = np.atleast_1d(counts.tar_at_far(list(fars)))
    return VerificationResult(
        accuracy=float(accuracies.mean()),
        accuracy_std=float(accuracies.std()),
        best_threshold_accuracy=n_correct / len(counts.scores),
        threshold=threshold,
        tar_at_far={float(far): float(tar) for far, tar in zip(fars, tars)},
        eer=counts.eer(),
        auc=counts.auc(),
        scores=counts.scores,
        labels=counts.labels,
        counts=counts,
        fixed_threshold=None if fixed_threshold is None else float(fixed_threshold),
        fixed_threshold_accuracy=None if fixed_threshold is None else counts.accuracy_at(float(fixed_threshold)),
        threshold_far=float(np.count_nonzero(counts.scores[~counts.labels] >= threshold) / max(counts.n_neg, 1)),
    )


def verify_pairs(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    issame: np.ndarray | Sequence[bool],
    batch_size: int = 256,
    flip: bool = True,
    fars: Sequence[float] = (1e-3, 1e-4),
    device: torch.device | str | None = None,
    progress: bool = False,
) -> VerificationResult:
    """Embed ``2N`` images (pair ``k`` = images ``2k``, ``2k + 1``), score by cosine, measure.

    Args:
        model, images, batch_size, flip, device, progress: as for :func:`embed`.
        issame: ``(N,)`` bool, 1 = the pair shows one identity.
        fars: false accept rates for ``tar_at_far`` (default 1e-3 and 1e-4).
    """
    issame = np.asarray(issame)
    if len(images) != 2 * len(issame):
        raise ValueError(f"need 2 images per pair: {len(issame)} pairs but {len(images)} images")
    embeddings = embed(model, images, batch_size=batch_size, flip=flip, device=device, progress=progress)
    return evaluate_scores(pair_scores(embeddings), issame, fars=fars)


__all__ = ["VerificationResult", "embed", "embed_batches", "embedding_norms", "evaluate_scores", "pair_scores", "verify_pairs"]
