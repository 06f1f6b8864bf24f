"""Synthetic face masks drawn on aligned faces (BigFace's mask augmentation, no detector needed).

BigFace trains on WebFace42M with masks added to a sampled fraction of the images (ratio 0.35: "by the
sampling ratio we could roughly steer our interest between MFR and SFR"). Its two tools (MaskTheFace,
insightface's MaskRenderer) need 68-point landmarks or a 3D face fit; on crops aligned to the ArcFace
5-point template the face is already where the template says, so the masks here are drawn from the
template's points (``faceforge.data.align.ARCFACE_TEMPLATE``, scaled to the crop), or from the crop's own
5 points when known (the alignment's residual).

A mask is a shape in a face frame (origin at the nose tip, unit = the eye distance, axes along and across
the eye line), jittered in pose (rotation, scale, shift, a yaw-like sideways shift of the top edge), filled
with a colour and a texture, optionally with a nose-wire line along its top edge:

    shapes    surgical (pleated rectangle), cloth (rounded), n95 (dome), kn95 (folded, pointed)
    textures  solid, pleats, stripes, check, dots, fabric noise
    colours   white, surgical blues, black, grey, green, pink, navy, beige, and random

Only the lower face changes: every pixel above :func:`upper_face_rows` (the eye line plus a quarter of
the eye-to-nose distance, at the template's scale) is left as it was, whatever the jitter.

Sampling is deterministic in ``(seed, epoch, index)``: whether image ``index`` is masked in ``epoch`` and
how is drawn from a generator seeded by those three numbers only, so a resumed run draws the same masks
and DataLoader workers or world size change nothing. The masked subset is nested across ratios: an image
masked at ratio 0.35 is masked (the same way) at 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from faceforge.data.align import ARCFACE_TEMPLATE, TEMPLATE_SIZE, template_for_size
from faceforge.core.fileio import save_image

__all__ = [
    "SHAPES",
    "TEXTURES",
    "COLOURS",
    "MaskParams",
    "MaskAugmentation",
    "sample_params",
    "render_mask",
    "mask_rng",
    "upper_face_rows",
    "apply_uint8",
    "apply_normalised",
    "mask_images_uint8",
    "montage",
]

SHAPES: tuple[str, ...] = ("surgical", "cloth", "n95", "kn95")
TEXTURES: tuple[str, ...] = ("solid", "pleats", "stripes", "check", "dots", "noise")
COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (236, 238, 240),
    "light_blue": (168, 205, 228),
    "surgical_blue": (104, 158, 206),
    "black": (34, 34, 38),
    "grey": (128, 130, 134),
    "green": (118, 170, 142),
    "pink": (232, 172, 188),
    "navy": (40, 52, 92),
    "beige": (214, 198, 168),
}
_SUPERSAMPLE = 4  # polygons are drawn at 4x and box-filtered down: anti-aliased edges
_EVAL_SALT = 0x6D61736B  # "mask": the eval stream, apart from every training epoch


def upper_face_rows(size: int) -> int:
    """Rows ``[0, upper_face_rows(size))`` of a ``size`` crop are never touched by a mask.

    The eye line of the template plus a quarter of the eye-to-nose distance (58 rows at 112).
    """
    eye_y = float(ARCFACE_TEMPLATE[:2, 1].max())
    nose_y = float(ARCFACE_TEMPLATE[2, 1])
    return int(math.ceil((eye_y + 0.25 * (nose_y - eye_y)) * size / TEMPLATE_SIZE))


@dataclass(frozen=True)
class MaskParams:
    """One mask: shape, colour (RGB 0-255), texture, nose wire, and the pose jitter of the face frame.

    rotation in radians, scale a factor on the eye distance, shift in eye-distance units (x, y), top in
    eye-distance units below the eye line toward the nose tip (0.45-0.7 of the eye-nose distance),
    yaw a sideways shift of the top edge (eye-distance units).
    """

    shape: str
    colour: tuple[int, int, int]
    texture: str
    nose_wire: bool
    rotation: float
    scale: float
    shift: tuple[float, float]
    top: float
    yaw: float
    texture_period: float
    texture_seed: int


def mask_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of image ``index`` in ``epoch``: a function of the three numbers only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index), 0x3A5C]))


def sample_params(rng: np.random.Generator) -> MaskParams:
    """Draw one mask's shape, look and pose jitter."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    if rng.random() < 0.15:
        colour = tuple(int(c) for c in rng.integers(20, 245, size=3))
    else:
        colour = list(COLOURS.values())[rng.integers(len(COLOURS))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    if shape == "surgical" and rng.random() < 0.6:
        texture = "pleats"
    return MaskParams(
        shape=shape,
        colour=colour,  # type: ignore[arg-type]
        texture=texture,
        nose_wire=shape != "cloth" and rng.random() < 0.6,
        rotation=float(rng.uniform(-0.14, 0.14)),  # about +-8 degrees of roll
        scale=float(rng.uniform(0.93, 1.08)),
        shift=(float(rng.uniform(-0.05, 0.05)), float(rng.uniform(-0.05, 0.05))),
        top=float(rng.uniform(0.45, 0.7)),
        yaw=float(rng.uniform(-0.12, 0.12)),
        texture_period=float(rng.uniform(0.1, 0.2)),
        texture_seed=int(rng.integers(2**31)),
    )


# --- geometry: shapes as polygons in the face frame ------------------------------------------------
# Face frame: a across (eye-distance units, + toward the image's right), b down from the nose tip.
# The template's eyes sit at b ~ -0.57, the mouth corners at b ~ +0.58, the chin at b ~ +1.15.


def _outline(p: MaskParams, eye_b: float) -> tuple[np.ndarray, np.ndarray]:
    """The mask polygon (K, 2) in (a, b) face units and its top edge (M, 2) for the nose wire."""
    top = eye_b * (1.0 - p.top)  # between the eye line (b = eye_b) and the nose tip (b = 0)
    a = np.linspace(-1.0, 1.0, 17)
    if p.shape == "surgical":
        top_edge = np.stack([a * 1.05 + p.yaw * (1 - a**2), top + 0.06 * a**2], 1)
        bottom = np.stack([a[::-1] * 0.98, 0.95 + 0.22 * (1 - a[::-1] ** 2)], 1)
        sides = [[1.08, 0.45], [1.02, 0.8]]
        poly = np.concatenate([top_edge, sides, bottom, [[-1.02, 0.8], [-1.08, 0.45]]])
    elif p.shape == "cloth":
        top_edge = np.stack([a * 1.0 + p.yaw * (1 - a**2), top + 0.18 * a**2 - 0.04 * (1 - np.abs(a))], 1)
        t = np.linspace(0.0, math.pi, 25)
        bottom = np.stack([np.cos(t) * 1.0, 0.55 + np.sin(t) * 0.62], 1)
        poly = np.concatenate([top_edge, [[1.0, 0.3]], bottom, [[-1.0, 0.3]]])
    elif p.shape == "n95":
        t = np.linspace(-math.pi, 0.0, 21)
        top_edge = np.stack([np.cos(t) * 0.95 + p.yaw * np.sin(-t), top + 0.25 * (1 + np.sin(t))], 1)
        t2 = np.linspace(0.0, math.pi, 25)
        bottom = np.stack([np.cos(t2) * 0.95, 0.4 + np.sin(t2) * 0.75], 1)
        poly = np.concatenate([top_edge, [[0.95, 0.35]], bottom, [[-0.95, 0.35]]])
    elif p.shape == "kn95":
        top_edge = np.stack([a * 1.02 + p.yaw * (1 - np.abs(a)), top + 0.22 * np.abs(a)], 1)
        poly = np.concatenate([top_edge, [[1.02, 0.55], [0.55, 0.95], [0.0, 1.2], [-0.55, 0.95], [-1.02, 0.55]]])
    else:
        raise ValueError(f"unknown mask shape {p.shape!r}; expected one of {SHAPES}")
    return poly, top_edge


def _face_frame(landmarks: np.ndarray, p: MaskParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(origin (2,), across (2,), down (2,), eye line b): the face frame in pixels (axes one jittered eye
    distance long), with the pose jitter applied, and where the eye line sits in it."""
    eyes = (landmarks[0] + landmarks[1]) / 2
    across = landmarks[1] - landmarks[0]
    eye_distance = float(np.linalg.norm(across))
    across = across / eye_distance
    down = np.array([-across[1], across[0]])  # 90 degrees clockwise in image coordinates (y down)
    c, s = math.cos(p.rotation), math.sin(p.rotation)
    across, down = c * across + s * down, -s * across + c * down
    unit = eye_distance * p.scale
    origin = landmarks[2] + unit * (p.shift[0] * across + p.shift[1] * down)
    return origin, across * unit, down * unit, float(np.dot(eyes - landmarks[2], down) / unit)


def _texture(p: MaskParams, size: int, origin: np.ndarray, across: np.ndarray, down: np.ndarray) -> np.ndarray:
    """(size, size, 3) float32 RGB 0-255: the colour modulated by the texture, in face coordinates."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    rel = np.stack([xs - origin[0], ys - origin[1]], -1)
    inv = np.linalg.inv(np.stack([across, down], 1))
    ab = rel @ inv.T  # (size, size, 2) face coordinates
    a, b = ab[..., 0], ab[..., 1]
    period = p.texture_period
    shade = np.ones((size, size))
    if p.texture == "pleats":
        shade = 1.0 - 0.16 * (np.abs(((b / (2 * period)) % 1.0) - 0.5) < 0.08)
    elif p.texture == "stripes":
        shade = 1.0 - 0.3 * (((a + b) / period) % 2.0 < 1.0)
    elif p.texture == "check":
        shade = 1.0 - 0.18 * ((a / period) % 2.0 < 1.0) - 0.18 * ((b / period) % 2.0 < 1.0)
    elif p.texture == "dots":
        ca, cb = (a / period) % 2.0 - 1.0, (b / period) % 2.0 - 1.0
        shade = 1.0 - 0.35 * (ca**2 + cb**2 < 0.3)
    elif p.texture == "noise":
        shade = 1.0 + 0.12 * np.random.default_rng(p.texture_seed).standard_normal((size, size))
    shade = shade * (1.0 - 0.12 * np.clip(b, 0.0, 1.2))  # light from above: the lower mask is darker
    colour = np.asarray(p.colour, dtype=np.float64)
    if colour.mean() < 60:  # shading a black mask toward lighter keeps the texture visible
        out = colour + (1.0 - shade[..., None]) * 90.0
    else:
        out = colour * shade[..., None]
    return np.clip(out, 0, 255).astype(np.float32)


def _rasterise(polygons: Sequence[np.ndarray], lines: Sequence[tuple[np.ndarray, float]], size: int) -> np.ndarray:
    """Anti-aliased coverage (size, size) float32 in [0, 1] of filled polygons and lines (pixel coordinates)."""
    big = size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        draw.polygon([tuple(map(float, q * _SUPERSAMPLE)) for q in poly], fill=255)
    for line, width in lines:
        draw.line([tuple(map(float, q * _SUPERSAMPLE)) for q in line], fill=255, width=max(1, round(width * _SUPERSAMPLE)))
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render_mask(p: MaskParams, size: int, landmarks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(alpha (size, size) float32 in [0, 1], rgb (size, size, 3) float32 0-255)`` of one mask.

    landmarks: the crop's 5 points (5, 2) in pixels; default the ArcFace template scaled to ``size``.
    Rows above :func:`upper_face_rows` get alpha 0.
    """
    points = template_for_size(size) if landmarks is None else np.asarray(landmarks, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"landmarks must be 5 (x, y) points, shaped (5, 2); got {points.shape}")
    origin, across, down, eye_b = _face_frame(points, p)

    def to_pixels(ab: np.ndarray) -> np.ndarray:
        return origin + ab[:, :1] * across + ab[:, 1:] * down

    poly, top_edge = _outline(p, eye_b)
    alpha = _rasterise([to_pixels(poly)], [], size)
    rgb = _texture(p, size, origin, across, down)
    if p.nose_wire:
        wire_ab = top_edge[2:-2] + np.array([0.0, 0.05])  # just inside the top edge, short of the sides
        wire = _rasterise([], [(to_pixels(wire_ab), max(1.0, size / 80))], size) * alpha
        metal = np.array([205.0, 208.0, 212.0], dtype=np.float32) if np.mean(p.colour) < 150 else np.array([150.0, 152.0, 158.0], dtype=np.float32)
        rgb = rgb * (1 - wire[..., None]) + metal * wire[..., None]
    alpha[: upper_face_rows(size)] = 0.0
    return alpha, rgb.astype(np.float32)


def apply_uint8(image: np.ndarray, alpha: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Composite a mask over an (S, S, 3) uint8 image; returns a new uint8 image."""
    out = image.astype(np.float32) * (1 - alpha[..., None]) + rgb * alpha[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def apply_normalised(image: torch.Tensor, alpha: np.ndarray, rgb: np.ndarray) -> torch.Tensor:
    """Composite a mask over a (3, S, S) image normalised as (x - 127.5) / 127.5; returns a new tensor."""
    a = torch.from_numpy(alpha).to(image.dtype)
    colour = (torch.from_numpy(rgb).permute(2, 0, 1).to(image.dtype) - 127.5) / 127.5
    return torch.where(a > 0, image * (1 - a) + colour * a, image)


class MaskAugmentation:
    """Mask a fraction ``ratio`` of training images, deterministically in ``(seed, epoch, index)``.

    ``images, masked = augment(images (B, 3, S, S) normalised, indices (B,) dataset indices, epoch)``;
    ``masked`` (B,) bool says which were masked. ratio 0 returns the images untouched.
    """

    def __init__(self, ratio: float, seed: int) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"mask ratio must be in [0, 1]; got {ratio!r}")
        self.ratio = float(ratio)
        self.seed = int(seed)

    def params_for(self, epoch: int, index: int) -> MaskParams | None:
        """The mask of image ``index`` in ``epoch``, or None when it stays unmasked."""
        rng = mask_rng(self.seed, epoch, index)
        if not rng.random() < self.ratio:
            return None
        return sample_params(rng)

    def __call__(self, images: torch.Tensor, indices: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        masked = torch.zeros(len(indices), dtype=torch.bool)
        if self.ratio == 0.0:
            return images, masked
        out = images.clone()
        size = images.shape[-1]
        for k, index in enumerate(indices.tolist()):
            p = self.params_for(epoch, int(index))
            if p is not None:
                alpha, rgb = render_mask(p, size)
                out[k] = apply_normalised(images[k], alpha, rgb)
                masked[k] = True
        return out, masked


def mask_images_uint8(images: np.ndarray, seed: int, keys: Sequence[int]) -> np.ndarray:
    """Mask every (N, S, S, 3) uint8 image; image ``n`` gets the mask of ``(seed, keys[n])`` (evaluation)."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected square RGB images shaped (N, S, S, 3); got {images.shape}")
    out = np.empty_like(images)
    for n, image in enumerate(images):
        p = sample_params(mask_rng(seed, _EVAL_SALT, int(keys[n])))
        out[n] = apply_uint8(image, *render_mask(p, images.shape[1]))
    return out


def montage(path: str, images: np.ndarray, seed: int = 0, gap: int = 2) -> np.ndarray:
    """A PNG grid: each unmasked image above 3 masked versions of it; returns the grid (H, W, 3)."""
    n, size = len(images), images.shape[1]
    rows = [images] + [mask_images_uint8(images, seed + r, np.arange(n) + 1000 * r) for r in range(3)]
    step = size + gap
    grid = np.full((len(rows) * step - gap, n * step - gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid[r * step : r * step + size, c * step : c * step + size] = im
    save_image(path, grid)
    return grid


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m faceforge.data.masks --montage docs/images/masked_montage.png``: synthetic faces, masked."""
    import argparse

    from faceforge.data.synthetic import render_images

    parser = argparse.ArgumentParser(description="Render a montage of masked synthetic faces.")
    parser.add_argument("--montage", default="docs/images/masked_montage.png", help="output PNG path")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    faces = render_images(np.arange(args.images), np.zeros(args.images, dtype=int), seed=args.seed, split="train",
                          difficulty=0.5, image_size=TEMPLATE_SIZE)
    montage(args.montage, faces, seed=args.seed)
    print(f"wrote {args.montage}")


if __name__ == "__main__":
    main()
