"""AdaFace's training augmentations: a crop kept in place on a black canvas, low resolution, photometric jitter.

AdaFace (Kim et al., CVPR 2022, Sec. 4 "Implementation details") trains with three augmentations that make
low-quality images, each applied with probability 0.2; its official code (``dataset/augmenter.py``) does, in
this order, on the uint8 image:

    crop         torchvision ``RandomResizedCrop.get_params`` with scale (0.2, 1.0), ratio (3/4, 4/3) draws a
                 box (top, left, h, w); the box's pixels stay where they are, every other pixel is black (0)
    low_res      side ratio r ~ U(0.2, 1.0): resize to int(r H) x int(r W) and back to H x W, each of the two
                 resizes with its own random interpolation (here nearest, bilinear, bicubic or area through
                 ``torch.nn.functional.interpolate``; the official code draws among OpenCV's five, Lanczos too)
    photometric  ``ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5)``: factors b, c, s ~ U(0.5, 1.5),
                 applied in a random order (a permutation of the four ColorJitter operations, hue skipped)

On an image u in [0, 1] (torchvision's tensor formulas; gray = 0.2989 R + 0.587 G + 0.114 B):

    brightness  clip(b u, 0, 1)
    contrast    clip(c u + (1 - c) mean(gray(u)), 0, 1)      (one mean over the whole image)
    saturation  clip(s u + (1 - s) gray(u), 0, 1)

The functions here take the pipeline's images, float ``(3, H, W)`` normalised as ``(x - 127.5) / 127.5``
(``faceforge.data.transforms``): black is -1. They work in float (no rounding to uint8 between operations, as
the official code's PIL round trips do).

Sampling is deterministic in ``(seed, epoch, index)`` like the masks (``faceforge.data.masks``): whether
operation k touches image ``index`` in ``epoch``, and how, is drawn from a generator seeded by those numbers and
k only (:func:`augment_rng`). So a resumed run, any world size, accumulation or DataLoader workers see the same
images; one operation's probability changes nothing of the others' draws, and the images an operation touches
at probability p are among those it touches at any p' > p (the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from faceforge.data.transforms import MEAN, STD

__all__ = [
    "OPERATIONS",
    "CROP_SCALE",
    "CROP_RATIO",
    "LOW_RES_SIDE",
    "INTERPOLATIONS",
    "JITTER",
    "BLACK",
    "WHITE",
    "GRAY_WEIGHTS",
    "AugmentParams",
    "AdaFaceAugmentation",
    "augment_rng",
    "crop_box",
    "crop_in_place",
    "low_resolution",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "grayscale",
    "photometric",
    "to_unit",
    "from_unit",
    "sample_params",
    "apply_params",
]

OPERATIONS: tuple[str, ...] = ("crop", "low_res", "photometric")  # the order they are applied in
CROP_SCALE = (0.2, 1.0)  # the box's area as a fraction of the image's (the official code's RandomResizedCrop)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # the box's width / height
LOW_RES_SIDE = (0.2, 1.0)  # the small side as a fraction of the image's
INTERPOLATIONS: tuple[str, ...] = ("nearest", "bilinear", "bicubic", "area")
JITTER = 0.5  # ColorJitter(brightness, contrast, saturation): factors ~ U(1 - 0.5, 1 + 0.5)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
_SALT = 0xADAF  # "AdaFace": apart from the masks' stream
BLACK, WHITE = (0.0 - MEAN) / STD, (255.0 - MEAN) / STD  # pixel 0 and 255, normalised (-1 and 1)


def augment_rng(seed: int, epoch: int, index: int, operation: int) -> np.random.Generator:
    """The generator of operation ``operation`` (its position in :data:`OPERATIONS`) for image ``index`` in
    ``epoch``: a function of the four numbers only."""
    key = [int(seed) & 0xFFFFFFFF, int(epoch), int(index), _SALT, int(operation)]
    return np.random.default_rng(np.random.SeedSequence(key))


# --- the operations, on (3, H, W) float images --------------------------------------------------------------


def to_unit(image: torch.Tensor) -> torch.Tensor:
    """Normalised ``(x - 127.5) / 127.5`` -> [0, 1] (pixel / 255)."""
    return (image * STD + MEAN) / 255.0


def from_unit(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> normalised ``(255 u - 127.5) / 127.5`` (the inverse of :func:`to_unit`)."""
    return (image * 255.0 - MEAN) / STD


def crop_box(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float] = CROP_SCALE,
             ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random box: torchvision's ``RandomResizedCrop.get_params`` (area ~ U(scale) of
    the image's, log aspect ~ U(log ratio), 10 tries, else the central crop with the aspect clipped to ratio)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_in_place(image: torch.Tensor, box: tuple[int, int, int, int], fill: float = BLACK) -> torch.Tensor:
    """``(C, H, W)`` -> same shape: the pixels inside ``box`` = (top, left, h, w) kept where they are, every other
    pixel ``fill`` (-1: black in the normalised range)."""
    top, left, h, w = box
    out = torch.full_like(image, fill)
    out[..., top : top + h, left : left + w] = image[..., top : top + h, left : left + w]
    return out


def _resize(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    align = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(image.unsqueeze(0), size=size, mode=mode, **align).squeeze(0)


def low_resolution(image: torch.Tensor, side_ratio: float, down: str, up: str, low: float = BLACK,
                   high: float = WHITE) -> torch.Tensor:
    """``(C, H, W)`` -> same shape: resized to ``max(1, int(side_ratio H)) x max(1, int(side_ratio W))`` with
    interpolation ``down``, then back to H x W with ``up`` (modes of :data:`INTERPOLATIONS`), clipped to
    [low, high] (bicubic overshoots; the official code's uint8 saturates)."""
    h, w = image.shape[-2:]
    small = (max(1, int(side_ratio * h)), max(1, int(side_ratio * w)))
    return _resize(_resize(image, small, down), (h, w), up).clamp_(low, high)


def grayscale(image: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` RGB -> ``(1, H, W)``: 0.2989 R + 0.587 G + 0.114 B (torchvision's weights)."""
    r, g, b = image.unbind(-3)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def _blend(image: torch.Tensor, other: torch.Tensor | float, factor: float) -> torch.Tensor:
    return (factor * image + (1.0 - factor) * other).clamp(0.0, 1.0)


def adjust_brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """[0, 1] image -> ``clip(factor u, 0, 1)``."""
    return _blend(image, 0.0, factor)


def adjust_contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    """[0, 1] image -> ``clip(factor u + (1 - factor) m, 0, 1)``, m the mean of its grayscale."""
    return _blend(image, grayscale(image).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """[0, 1] RGB image -> ``clip(factor u + (1 - factor) gray(u), 0, 1)``."""
    return _blend(image, grayscale(image), factor)


_JITTERS = (adjust_brightness, adjust_contrast, adjust_saturation)  # ColorJitter's fn_idx 0, 1, 2 (3 = hue: off)


def photometric(image: torch.Tensor, order: tuple[int, ...], factors: tuple[float, float, float]) -> torch.Tensor:
    """[0, 1] image jittered by ``factors`` = (brightness, contrast, saturation), in ``order`` (a permutation of
    ColorJitter's 0..3; 3, hue, is skipped)."""
    for k in order:
        if k < len(_JITTERS):
            image = _JITTERS[k](image, factors[k])
    return image


# --- drawing and applying them per image -------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentParams:
    """What happens to one image; None where an operation does not apply.

    crop: (top, left, h, w). low_res: (side ratio, down interpolation, up interpolation). photometric: (order
    (4,) permutation of 0..3, (brightness, contrast, saturation) factors)."""

    crop: tuple[int, int, int, int] | None = None
    low_res: tuple[float, str, str] | None = None
    photometric: tuple[tuple[int, ...], tuple[float, float, float]] | None = None

    def applied(self) -> tuple[bool, bool, bool]:
        """Which of :data:`OPERATIONS` apply."""
        return self.crop is not None, self.low_res is not None, self.photometric is not None


def sample_params(probabilities: Mapping[str, float], seed: int, epoch: int, index: int, height: int,
                  width: int) -> AugmentParams:
    """The augmentation of image ``index`` (``height x width``) in ``epoch``: operation k applies when the first
    uniform of :func:`augment_rng` (seed, epoch, index, k) is below its probability, and its parameters come
    from the same generator."""
    drawn: dict[str, object] = {}
    for k, name in enumerate(OPERATIONS):
        p = float(probabilities.get(name, 0.0))
        if p <= 0.0:
            continue
        rng = augment_rng(seed, epoch, index, k)
        if not rng.random() < p:
            continue
        if name == "crop":
            drawn[name] = crop_box(rng, height, width)
        elif name == "low_res":
            ratio = float(rng.uniform(*LOW_RES_SIDE))
            down, up = (INTERPOLATIONS[int(i)] for i in rng.integers(len(INTERPOLATIONS), size=2))
            drawn[name] = (ratio, down, up)
        else:
            order = tuple(int(i) for i in rng.permutation(4))
            factors = tuple(float(f) for f in rng.uniform(1.0 - JITTER, 1.0 + JITTER, size=3))
            drawn[name] = (order, factors)
    return AugmentParams(**drawn)  # type: ignore[arg-type]


def apply_params(image: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """A normalised ``(3, H, W)`` image with ``params`` applied (crop, then low resolution, then photometric)."""
    if params.crop is not None:
        image = crop_in_place(image, params.crop, fill=BLACK)
    if params.low_res is not None:
        image = low_resolution(image, *params.low_res, low=BLACK, high=WHITE)
    if params.photometric is not None:
        image = from_unit(photometric(to_unit(image), *params.photometric))
    return image


class AdaFaceAugmentation:
    """AdaFace's augmentations of training images, each with its own probability, deterministic in
    ``(seed, epoch, index)`` (module docstring).

    ``images, applied = augment(images (B, 3, H, W) normalised, indices (B,) dataset indices, epoch)``;
    ``applied`` (B, 3) bool says which of :data:`OPERATIONS` touched each image. All probabilities 0 returns the
    images untouched.

    Args:
        crop, low_res, photometric: the probability of each operation, in [0, 1] (AdaFace: 0.2 each).
        seed: the run's seed.
    """

    def __init__(self, crop: float = 0.0, low_res: float = 0.0, photometric: float = 0.0, seed: int = 0) -> None:
        self.probabilities = {"crop": float(crop), "low_res": float(low_res), "photometric": float(photometric)}
        for name, p in self.probabilities.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"data.augment.{name} = {p!r}: expected a probability in [0, 1]")
        self.seed = int(seed)

    @property
    def active(self) -> bool:
        """True when any operation has a probability > 0."""
        return any(p > 0 for p in self.probabilities.values())

    def params_for(self, epoch: int, index: int, height: int, width: int) -> AugmentParams:
        """What happens to image ``index`` in ``epoch`` (:func:`sample_params`)."""
        return sample_params(self.probabilities, self.seed, epoch, index, height, width)

    def __call__(self, images: torch.Tensor, indices: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        applied = torch.zeros(len(indices), len(OPERATIONS), dtype=torch.bool)
        if not self.active:
            return images, applied
        out = images.clone()
        height, width = images.shape[-2:]
        for k, index in enumerate(indices.tolist()):
            params = self.params_for(epoch, int(index), height, width)
            if any(params.applied()):
                out[k] = apply_params(images[k], params)
                applied[k] = torch.tensor(params.applied())
        return out, applied
