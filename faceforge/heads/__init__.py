"""Classification heads: (embeddings (B, D), labels (B,)) -> scalar loss; each head owns its class weights.

`build(name, num_classes=..., embedding_size=..., **kwargs)` makes any registered head by name:
"margin_softmax", "arcface", "cosface", "sphereface", "normface", "softmax", "sphereface2", "adaface", "magface",
"elasticface_arc", "elasticface_cos", "elasticface_arc_plus", "elasticface_cos_plus", "subcenter_arcface",
"curricularface", and "broadface",
which builds its inner head by name too:
`build("broadface", num_classes=C, embedding_size=D, queue_size=Q, head="arcface", head_kwargs={...})`.
`ShardedHead("arcface", C, D, **kwargs)` (parallel.py) shards any head with class rows (``base.ClassRows``: the
margin heads, ``MarginHead`` subclasses written anywhere, and sphereface2) by class over torch.distributed.

A margin head is its class rows plus the public margin hook of ``MarginHead`` (softmax.py): ``target_logit(cos_y,
context)`` and, where needed, ``observe``, ``loss_term``, ``nontarget_logits``, ``class_rows``. A new head module must
be imported here to register (its ``@HEADS.register`` runs on import); a head with its own sharded form registers it in
``base.SHARDED_HEADS`` (parallel_broadface.py, parallel_attfc.py, imported below for that).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from faceforge.heads.base import HEADS, MarginContext, margin_context
from faceforge.heads.broadface import BroadFace
from faceforge.heads.margin import apply_margin, target_logit
from faceforge.heads.parallel import ShardedHead
from faceforge.heads.regularizers import inter_class_loss, intra_class_angle
from faceforge.heads.softmax import (
    ArcFace,
    CosFace,
    MarginHead,
    MarginSoftmax,
    NormFace,
    Softmax,
    SphereFace,
    chunked_margin_cross_entropy,
)
from faceforge.heads.sphereface2 import SphereFace2, balanced_bias
from faceforge.heads.attfc import AttFC
from faceforge.heads.adaface import AdaFace
from faceforge.heads.magface import MagFace
from faceforge.heads.curricularface import CurricularFace
from faceforge.heads.elasticface import (
    ElasticFace,
    ElasticFaceArc,
    ElasticFaceArcPlus,
    ElasticFaceCos,
    ElasticFaceCosPlus,
)
from faceforge.heads.subcenter import SubCenterArcFace
from faceforge.heads import parallel_attfc, parallel_broadface  # noqa: F401  (register their sharded forms)


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build the head registered as `name` (case-insensitive) with keyword arguments, e.g.
    `build("arcface", num_classes=10, embedding_size=512)`. An unknown name lists the known ones."""
    return HEADS.build(name, **kwargs)


__all__ = [
    "HEADS",
    "AdaFace",
    "AttFC",
    "ArcFace",
    "BroadFace",
    "CosFace",
    "CurricularFace",
    "ElasticFace",
    "ElasticFaceArc",
    "ElasticFaceArcPlus",
    "ElasticFaceCos",
    "ElasticFaceCosPlus",
    "MarginContext",
    "MarginHead",
    "MagFace",
    "MarginSoftmax",
    "NormFace",
    "ShardedHead",
    "Softmax",
    "SphereFace",
    "SubCenterArcFace",
    "SphereFace2",
    "apply_margin",
    "balanced_bias",
    "build",
    "chunked_margin_cross_entropy",
    "inter_class_loss",
    "margin_context",
    "intra_class_angle",
    "target_logit",
]
