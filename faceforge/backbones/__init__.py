"""Backbones: (B, 3, H, W) images normalised as (x - 127.5) / 127.5 -> (B, embedding_size) embeddings.

Embeddings come out unnormalised; the heads normalise them. Build one by name:

    >>> from faceforge.backbones import build
    >>> net = build("r50")                                   # IResNet-50, 112x112, 512-D
    >>> tiny = build("r18", input_size=56, width=0.25)       # a small CPU demo net
    >>> deep = build("iresnet", layers=(3, 25, 88, 3))       # any stage depths (BigFace r240)

Registered names: r18, r34, r50, r100, r120, r140, r200, r240, r600, r1200, iresnet (takes `layers`),
mobilefacenet (alias mbf), mbf_large, SphereFace's sfnet20 and sfnet64, and arcface_torch's Vision
Transformers vit_t, vit_s, vit_b, vit_l. Unknown names raise KeyError listing every name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from faceforge.backbones.iresnet import IRESNET_LAYERS, IResNet
from faceforge.backbones.mobilefacenet import MobileFaceNet
from faceforge.backbones.sfnet import SFNET_LAYERS, SFNet
from faceforge.backbones.vit import VIT_PRESETS, VisionTransformer, vit_preset
from faceforge.core.registry import Registry

__all__ = [
    "BACKBONES", "IResNet", "MobileFaceNet", "SFNet", "VisionTransformer", "build", "count_flops", "count_parameters",
]

BACKBONES: Registry[nn.Module] = Registry("backbone")


def _preset(
    cls: type[nn.Module], name: str, layers: tuple[int, int, int, int], generic: str
) -> Callable[..., nn.Module]:
    def factory(**kwargs: Any) -> nn.Module:
        if "layers" in kwargs:
            raise TypeError(f"backbone {name!r} fixes layers={layers}; use {generic} to choose the depths")
        return cls(layers=layers, **kwargs)

    factory.__doc__ = f"{cls.__name__} with {layers} blocks per stage."
    signature = inspect.signature(cls)  # what the preset accepts: the class's arguments but `layers`
    factory.__signature__ = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "layers"])
    return factory


for _name, _layers in IRESNET_LAYERS.items():
    BACKBONES.register(_name)(_preset(IResNet, _name, _layers, "'iresnet'"))
for _name, _layers in SFNET_LAYERS.items():
    BACKBONES.register(_name)(_preset(SFNet, _name, _layers, "SFNet(layers=...)"))
BACKBONES.register("iresnet")(IResNet)
BACKBONES.register("mobilefacenet")(MobileFaceNet)
BACKBONES.register("mbf")(MobileFaceNet)
for _name in VIT_PRESETS:
    BACKBONES.register(_name)(vit_preset(_name))


@BACKBONES.register("mbf_large")
def mbf_large(**kwargs: Any) -> MobileFaceNet:
    """insightface's `mbf_large`: blocks (2, 8, 12, 4), scale 4."""
    return MobileFaceNet(**{"blocks": (2, 8, 12, 4), "scale": 4, **kwargs})


def __getattr__(name: str) -> Any:
    # count_parameters / count_flops load lazily, so that `python -m faceforge.backbones.complexity`
    # does not find its own module already imported by this package (runpy's RuntimeWarning).
    if name in {"count_parameters", "count_flops"}:
        from faceforge.backbones import complexity

        return getattr(complexity, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build(name: str, embedding_size: int = 512, **kwargs: Any) -> nn.Module:
    """Build the backbone registered as `name` (case-insensitive), mapping images to (B, embedding_size)."""
    return BACKBONES.build(name, embedding_size=embedding_size, **kwargs)
