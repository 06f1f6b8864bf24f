"""Sub-center ArcFace (Deng, Guo, Liu, Gong and Zafeiriou, ECCV 2020): K sub-centres a class, for noisy web faces.

    cos(theta_{i,j}) = max_k cos(theta_{i,j,k}),  k = 1..K            Sec. 3, the sub-class-wise max pooling
    t_i = s cos(theta_{i,y_i} + m),  the other logits s cos(theta_{i,j})      ArcFace's margin on the pooled target
    L_i = -log(exp(t_i) / (exp(t_i) + sum_{j != y_i} exp(s cos(theta_{i,j}))))   Sec. 3, ArcFace's loss

The class weights are ``weight`` (C, K, D): the K sub-centres of class j are ``weight[j]``, so everything that
indexes class rows along dim 0 (seeding by (seed, row), class sharding, Partial FC's row selection, row-sharded
checkpoints) keeps a class's sub-centres together. The head only declares ``subcentres = K``; the chunked kernel
(``heads.softmax._ChunkedMarginCE``) pools per chunk and sends each gradient to the maximising sub-centre.

Defaults are the paper's: K = 3 (Sec. 3 and its ablation on the number of sub-centres), s = 64, m = 0.5 (ArcFace's).
After training, the cleaning step (the paper's Sec. 3: keep each class's dominant sub-centre, drop the samples more
than 75 degrees from it) is ``faceforge clean`` (``faceforge/clean.py``); ``dominant_subcentres`` and
``angles_to_subcentres`` below are its two pure steps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faceforge.heads.base import (
    ANGULAR_MARGIN_RANGE,
    HEADS,
    SCALE_RANGE,
    KwargRange,
    check_inputs,
    compute_dtype,
)
from faceforge.heads.margin import apply_margin
from faceforge.heads.softmax import ArcFace

SUBCENTRE_RANGE = KwargRange(1.0, 256.0)  # K: the paper uses 3 (and studies up to 10); the kernel's uint8 argmax


def subcentre_cosines(x: Tensor, weight: Tensor) -> Tensor:
    """(B, C, K) cos(theta_{b,j,k}) of embeddings x (B, D) (any norm) against sub-centres weight (C, K, D)."""
    return torch.einsum("bd,jkd->bjk", F.normalize(x, dim=1), F.normalize(weight, dim=2))


def dominant_subcentres(nearest: Tensor, labels: Tensor, num_classes: int, subcentres: int) -> Tensor:
    """(C,) each class's dominant sub-centre: the one most of its samples are nearest to (ties: the lowest index).

    nearest: (N,) the sub-centre of its own class each sample is nearest to; labels (N,) its class."""
    counts = torch.zeros(num_classes * subcentres, dtype=torch.long)
    counts.index_add_(0, labels.long() * subcentres + nearest.long(), torch.ones_like(labels, dtype=torch.long))
    return counts.view(num_classes, subcentres).argmax(1)


def angles_to_subcentres(x: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """(N, K) the angle in degrees between each embedding x (N, D) and each sub-centre of its own class (weight
    (C, K, D), labels (N,)): arccos of the cosine clamped to [-1, 1]."""
    cos = (F.normalize(x, dim=1).unsqueeze(1) * F.normalize(weight[labels], dim=2)).sum(2)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


@HEADS.register("subcenter_arcface")
class SubCenterArcFace(ArcFace):
    """Sub-center ArcFace (module docstring): K = 3 sub-centres a class, s = 64, m = 0.5 rad.

    Args:
        num_classes: C. embedding_size: D. k: sub-centres a class (K). s, m: ArcFace's scale and angular margin.
        **kwargs: as ``ArcFace`` (``margin_grad``, ``chunk_size``, ``buffers``; the Eq. 5 / 6 regularisers are
            ArcFace's, not this paper's: refused).
    Call: ``loss = head(embeddings (B, D), labels (B,))``. Attributes: ``weight`` (C, K, D), initialised N(0, 0.01^2)
    (rows normalised on the fly); ``subcentres`` = K.
    """

    KWARG_RANGES = {"s": SCALE_RANGE, "m": ANGULAR_MARGIN_RANGE, "k": SUBCENTRE_RANGE}

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.5, k: int = 3,
                 **kwargs: Any) -> None:
        if isinstance(k, bool) or int(k) != k or not SUBCENTRE_RANGE.holds(k):
            raise ValueError(f"k={k!r}; expected an integer in [1, 256] (sub-centres a class)")
        for name in ("intra_loss_weight", "inter_loss_weight"):
            if kwargs.get(name, 0.0):
                raise ValueError(f"{name}={kwargs[name]!r}: ArcFace's regularisers are not defined over sub-centres; "
                                 "expected 0")
        super().__init__(num_classes, embedding_size, s=s, m=m, **kwargs)
        self.subcentres = int(k)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.subcentres, self.embedding_size))
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.subcentres}"

    def logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The full (B, C) logits plainly (small C): s times ArcFace's margin on max_k cos(theta_{b,j,k})."""
        labels = check_inputs(embeddings, labels, self.num_classes, self.embedding_size)
        dtype = compute_dtype(embeddings, self.weight)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos = subcentre_cosines(embeddings.to(dtype), self.weight.to(dtype)).amax(2)
            return self.s * apply_margin(cos, labels, self.m1, self.m2, self.m3, self.margin_grad)


__all__ = ["SubCenterArcFace", "angles_to_subcentres", "dominant_subcentres", "subcentre_cosines"]
