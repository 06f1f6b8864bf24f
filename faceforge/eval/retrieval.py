"""Retrieval evaluation on a class-disjoint split (SOP / In-shop style): Recall@K and mAP.

Thin wrappers over :func:`faceforge.eval.metrics.recall_at_k` and
:func:`faceforge.eval.metrics.mean_average_precision`, both chunked over queries.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from faceforge.eval.metrics import mean_average_precision, recall_at_k

__all__ = ["class_disjoint_split", "retrieval_map", "retrieval_recall"]


def class_disjoint_split(
    labels: np.ndarray | Sequence, test_fraction: float = 0.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split items so that no class appears on both sides.

    A random ``round(test_fraction * C)`` of the ``C`` classes (at least 1, at most ``C - 1``) goes to
    the test side. Returns ``(train_idx, test_idx)``, sorted int64 index arrays.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError(f"need at least 2 classes to split, got {len(classes)}")
    n_test = int(min(max(round(test_fraction * len(classes)), 1), len(classes) - 1))
    test_classes = np.random.default_rng(seed).permutation(classes)[:n_test]
    test = np.isin(y, test_classes)
    return np.flatnonzero(~test), np.flatnonzero(test)


def retrieval_recall(
    embeddings: np.ndarray,
    labels: np.ndarray | Sequence,
    ks: Sequence[int] = (1, 10, 100, 1000),
    chunk_size: int = 1024,
) -> dict[int, float]:
    """Recall@K for each requested ``k``; a ``k`` above ``N - 1`` is clipped to ``N - 1``.

    Returns ``{k: recall}`` keyed by the requested ``k``.
    """
    n = len(np.asarray(labels))
    if n < 2:
        raise ValueError(f"need at least 2 items, got {n}")
    req = [int(k) for k in ks]
    if not req or min(req) < 1:
        raise ValueError(f"ks must be a non-empty sequence of integers >= 1, got {ks!r}")
    clipped = [min(k, n - 1) for k in req]
    rates = recall_at_k(embeddings, labels, clipped, chunk_size=chunk_size)
    return {k: float(r) for k, r in zip(req, rates)}


def retrieval_map(embeddings: np.ndarray, labels: np.ndarray | Sequence, chunk_size: int = 256) -> float:
    """mAP over all queries (each item against all others), see ``metrics.mean_average_precision``."""
    return mean_average_precision(embeddings, labels, chunk_size=chunk_size)
