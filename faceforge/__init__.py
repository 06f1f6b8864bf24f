"""faceforge: train and evaluate face-recognition models (ArcFace, SphereFace2, BroadFace, AttFC, BigFace).

``faceforge.load_model(path)`` returns a :class:`faceforge.deploy.inference.Recognizer`; it is imported on
first use, so ``import faceforge`` stays light.
"""

from typing import Any

__version__ = "0.1.0"


_LAZY = ("load_model", "Recognizer")  # from faceforge.deploy.inference, imported on first use
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from faceforge.deploy import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'faceforge' has no attribute {name!r}")


def __dir__() -> list[str]:
    """``dir(faceforge)`` lists the lazy names too (``load_model``, ``Recognizer``)."""
    return sorted(set(globals()) | set(_LAZY))
