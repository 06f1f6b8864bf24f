"""Classification heads: (embeddings (B, D), labels (B,)) -> scalar loss; each head owns its class weights.

`build(name, num_classes=..., embedding_size=..., **kwargs)` makes any registered head by name:
"margin_softmax", "arcface", "cosface", "sphereface", "normface", "softmax".
"""

from __future__ import annotations

from typing import Any

from torch import nn

from faceforge.heads.margin import apply_margin, target_logit
from faceforge.heads.regularizers import inter_class_loss, intra_class_angle
from faceforge.heads.softmax import (
    HEADS,
    ArcFace,
    CosFace,
    MarginSoftmax,
    NormFace,
    Softmax,
    SphereFace,
    chunked_margin_cross_entropy,
)


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build the head registered as `name` (case-insensitive) with keyword arguments, e.g.
    `build("arcface", num_classes=10, embedding_size=512)`. An unknown name lists the known ones."""
    return HEADS.build(name, **kwargs)


__all__ = [
    "HEADS",
    "ArcFace",
    "CosFace",
    "MarginSoftmax",
    "NormFace",
    "Softmax",
    "SphereFace",
    "apply_margin",
    "build",
    "chunked_margin_cross_entropy",
    "inter_class_loss",
    "intra_class_angle",
    "target_logit",
]
