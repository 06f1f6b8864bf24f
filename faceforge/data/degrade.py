"""Fixed image degradations for mixed-quality evaluation (``faceforge eval --degraded``, ``eval.degraded``).

The second image of every held-out / ``.bin`` pair is degraded (:func:`degrade_images`): first low resolution,
then Gaussian blur, at fixed levels (no random state: every checkpoint and every run meets the same images):

- low resolution (:func:`low_resolution`): the image is shrunk to ``round(S * LOW_RESOLUTION_FACTOR)`` pixels a side
  by area averaging (a box filter, no aliasing) and brought back to ``S`` by bilinear interpolation (half-pixel
  centres, ``align_corners=False``). At 112 px that is a 28 px face, the size of TinyFace / surveillance faces
  (AdaFace's low-quality sets);
- Gaussian blur (:func:`gaussian_blur`): ``sigma = BLUR_SIGMA_AT_112 * S / 112`` pixels, the kernel cut at
  ``ceil(3 sigma)`` pixels each side and normalised to sum 1, edges mirrored (``reflect``), applied along rows
  then columns.

Images are uint8 RGB ``(N, S, S, 3)``; the results are rounded back to uint8. Pure functions of the pixels,
numpy/torch only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["BLUR_SIGMA_AT_112", "LOW_RESOLUTION_FACTOR", "degrade_images", "gaussian_blur", "gaussian_kernel",
           "low_resolution"]

# the side of the low-resolution image, a fraction of the image's side: 112 px -> 28 px (a TinyFace-sized face)
LOW_RESOLUTION_FACTOR = 0.25
# the blur's standard deviation in pixels of a 112 px image, scaled with the image's side (a mild defocus)
BLUR_SIGMA_AT_112 = 1.5
_CHUNK = 256  # images per torch call: bounded memory on large sets


def _check(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images shaped (N, H, W, 3); got {images.dtype} {images.shape}")
    return images


def _per_chunk(images: np.ndarray, fn) -> np.ndarray:
    """``fn`` (float32 NCHW -> float32 NCHW) on chunks of ``images`` (uint8 NHWC), rounded back to uint8."""
    out = np.empty_like(images)
    for s in range(0, len(images), _CHUNK):
        x = torch.from_numpy(np.ascontiguousarray(images[s : s + _CHUNK])).permute(0, 3, 1, 2).float()
        y = fn(x).round().clamp(0, 255).to(torch.uint8)
        out[s : s + _CHUNK] = y.permute(0, 2, 3, 1).numpy()
    return out


def low_resolution(images: np.ndarray, factor: float = LOW_RESOLUTION_FACTOR) -> np.ndarray:
    """uint8 ``(N, H, W, 3)``: shrunk to ``max(1, round(H * factor)) x max(1, round(W * factor))`` by area averaging,
    then bilinear (``align_corners=False``) back to ``H x W``. ``factor`` in (0, 1]."""
    images = _check(images)
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"factor={factor!r}; expected a fraction of the side in (0, 1]")
    h, w = images.shape[1:3]
    small = (max(1, round(h * factor)), max(1, round(w * factor)))

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(F.adaptive_avg_pool2d(x, small), size=(h, w), mode="bilinear", align_corners=False)

    return _per_chunk(images, fn)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """float64 ``(2r + 1,)``, ``r = ceil(3 sigma)``: ``exp(-x^2 / (2 sigma^2))`` for ``x = -r .. r``, summing to 1."""
    if not sigma > 0:
        raise ValueError(f"sigma={sigma!r}; expected a standard deviation > 0 pixels")
    r = math.ceil(3 * sigma)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` blurred by a Gaussian of ``sigma`` pixels (:func:`gaussian_kernel`), separably, with
    mirrored edges (``reflect``: the edge pixel is not repeated); the kernel must be narrower than the image."""
    images = _check(images)
    k = torch.from_numpy(gaussian_kernel(sigma)).float()
    r = (len(k) - 1) // 2
    if r >= min(images.shape[1:3]):
        raise ValueError(f"sigma={sigma!r}: the kernel ({2 * r + 1} px) is wider than the image {images.shape[1:3]}")

    def fn(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)

    return _per_chunk(images, fn)


def degrade_images(images: np.ndarray) -> np.ndarray:
    """The fixed degradation of ``--degraded`` (module notes): :func:`low_resolution` at
    :data:`LOW_RESOLUTION_FACTOR`, then :func:`gaussian_blur` at ``BLUR_SIGMA_AT_112 * S / 112`` (S = the height)."""
    images = _check(images)
    return gaussian_blur(low_resolution(images), BLUR_SIGMA_AT_112 * images.shape[1] / 112)
