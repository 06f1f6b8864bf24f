"""Embeddings are checked before they leave: a NaN or infinite embedding is an error that names the model
and the image, never a score, a verdict or a file (a wrong embedding that looks right is the one failure a
user deploying on a threshold cannot see)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class NonFiniteEmbeddingError(ValueError):
    """A model produced a NaN or infinite embedding; the message names the model and the first image."""


def require_finite(embeddings: torch.Tensor | np.ndarray, model: str, names: Sequence[str]) -> None:
    """Raise `NonFiniteEmbeddingError` if any row of ``embeddings`` (N, D) holds NaN or inf.

    ``model`` names the model (its path); ``names[i]`` names the image of row ``i`` (a path, or a set and index).
    """
    rows = torch.as_tensor(embeddings).reshape(len(names), -1) if len(names) else torch.zeros(0, 1)
    bad = (~torch.isfinite(rows).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        more = f" (and {len(bad) - 1} more images)" if len(bad) > 1 else ""
        raise NonFiniteEmbeddingError(
            f"{model}: the model gave a non-finite (NaN or inf) embedding for {names[bad[0]]}{more}; "
            "expected finite embeddings (check the weights for NaN/inf)"
        )
