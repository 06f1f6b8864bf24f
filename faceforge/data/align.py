"""Face alignment: the ArcFace 5-point template, scaled to any crop size.

The five landmarks are, in order: left eye centre, right eye centre, nose tip, left mouth corner,
right mouth corner (left/right as seen in the image). Coordinates are pixels ``(x, y)`` of a
112x112 crop, as in insightface's ``arcface_dst``.

Alignment maps five detected points onto the template with the least-squares similarity transform
(rotation, uniform scale, translation; Umeyama 1991), as insightface's ``face_align.norm_crop`` does,
and resamples the photo through it with bilinear interpolation.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from faceforge.data.images import BadImageError, decode_image, image_size
from faceforge.core.fileio import save_image

TEMPLATE_SIZE = 112

# insightface `arcface_dst`: (x, y) in a 112x112 crop.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],  # left eye
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float64,
)
ARCFACE_TEMPLATE.setflags(write=False)


def template_for_size(size: int) -> np.ndarray:
    """The ArcFace template for a square ``size x size`` crop: ``ARCFACE_TEMPLATE * size / 112``.

    Returns a new float64 array ``(5, 2)`` of ``(x, y)`` pixel coordinates. The face fills the crop
    in the same proportion as at 112 (insightface scales the template the same way).
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"size must be a positive int (pixels), got {size!r}")
    return ARCFACE_TEMPLATE * (float(size) / TEMPLATE_SIZE)


def _check_points(points: np.ndarray, name: str) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or len(p) < 2:
        raise ValueError(f"{name} must be (N, 2) (x, y) points with N >= 2, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError(f"{name} must be finite, got {p.tolist()}")
    return p


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The similarity transform ``T`` (2, 3) minimising ``sum_i |T [src_i; 1] - dst_i|^2`` (Umeyama 1991).

    Args:
        src, dst: ``(N, 2)`` corresponding ``(x, y)`` points, N >= 2 (five landmarks and the template).
    Returns:
        float64 ``(2, 3)`` ``[[a, -b, tx], [b, a, ty]]``: a rotation by ``atan2(b, a)`` and a scale
        ``hypot(a, b)`` (never a reflection), then a translation.
    """
    src, dst = _check_points(src, "src"), _check_points(dst, "dst")
    if src.shape != dst.shape:
        raise ValueError(f"src and dst must have the same shape, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0**2).sum() / len(src)
    if var_s <= 0:
        raise ValueError(f"src points are all the same point {src[0].tolist()}: no transform is defined")
    cov = d0.T @ s0 / len(src)  # Umeyama Eq. 38
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # Umeyama Eq. 39: a rotation, not a reflection
        sign[1, 1] = -1.0
    rotation = u @ sign @ vt  # Eq. 40
    scale = np.trace(np.diag(d) @ sign) / var_s  # Eq. 42
    translation = mu_d - scale * rotation @ mu_s  # Eq. 41
    return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """Warp a photo so that its five ``landmarks`` land on the ArcFace template of a ``size`` crop.

    Args:
        image: uint8 RGB ``(H, W, 3)``.
        landmarks: ``(5, 2)`` ``(x, y)`` pixels in ``image``, in the template's order.
        size: side of the square output (112 by default; the template scales with it).
    Returns:
        uint8 RGB ``(size, size, 3)``; pixels that fall outside the photo are black.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = (image.dtype, image.shape) if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be a uint8 (H, W, 3) RGB array, got {got}")
    points = _check_points(landmarks, "landmarks")
    if points.shape != (5, 2):
        raise ValueError(f"landmarks must be (5, 2): eyes, nose tip, mouth corners; got shape {points.shape}")
    forward = estimate_similarity(points, template_for_size(size))
    inverse = np.linalg.inv(np.vstack([forward, [0.0, 0.0, 1.0]]))[:2]
    # PIL maps output pixel corners' coordinates (pixel j's centre is j + 0.5) through the affine map;
    # ours maps centre coordinates (pixel j's centre is j): X_in = A X_out + t - A (0.5, 0.5) + (0.5, 0.5).
    offset = inverse[:, 2] - 0.5 * inverse[:, :2].sum(1) + 0.5
    coeffs = (*inverse[0, :2], offset[0], *inverse[1, :2], offset[1])
    warped = Image.fromarray(image).transform((size, size), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
    return np.asarray(warped)


def read_landmarks(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """Read a landmark list: one image per line, ``image_path x1 y1 x2 y2 x3 y3 x4 y4 x5 y5``.

    Blank lines and lines starting with ``#`` are skipped; relative image paths are taken relative to
    the list's folder. A malformed line is an error naming the file and the line number.
    Returns ``[(image_path, (5, 2) float64 landmarks), ...]``.
    """
    path = Path(path)
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 11:
            raise ValueError(f"{path}:{number}: expected 'image_path' and 10 coordinates, got {len(fields)} fields")
        try:
            points = np.array([float(v) for v in fields[1:]]).reshape(5, 2)
        except ValueError:
            raise ValueError(f"{path}:{number}: landmark coordinates must be numbers, got {fields[1:]}") from None
        image = Path(fields[0])
        entries.append((str(image if image.is_absolute() else path.parent / image), points))
    return entries


def output_names(images: list[str]) -> list[Path]:
    """Where :func:`align_files` writes each image, relative to its output folder: the image's path relative
    to the deepest folder that holds every listed image, with a ``.png`` suffix, so identity folders are
    kept (``a/x.jpg`` and ``b/x.jpg`` -> ``a/x.png`` and ``b/x.png``). Two images that would land on one
    output (``x.jpg`` and ``x.png`` side by side) are a ValueError naming both."""
    absolute = [os.path.abspath(p) for p in images]
    if not absolute:
        return []
    common = os.path.commonpath([os.path.dirname(p) for p in absolute])
    names = [Path(os.path.relpath(p, common)).with_suffix(".png") for p in absolute]
    seen: dict[Path, str] = {}
    for name, image in zip(names, images):
        if name in seen:
            raise ValueError(f"{image}: would be written to {name}, as {seen[name]} is; expected image paths "
                             "that differ by more than their suffix")
        seen[name] = image
    return names


def align_files(landmark_list: str | Path, output: str | Path, size: int = TEMPLATE_SIZE) -> list[Path]:
    """Align every photo of a landmark list (:func:`read_landmarks`) into ``output`` as PNG files.

    Output paths keep the photos' folders below the deepest folder that holds them all
    (:func:`output_names`). Every photo's header is checked (it exists, is an image, is not an animation,
    is not a decompression bomb) before the first crop is written; a photo that then fails to decode is
    an error naming it, and crops already written stay. Each crop is written atomically. Returns the
    written paths.
    """
    output = Path(output)
    entries = read_landmarks(landmark_list)
    names = output_names([image for image, _ in entries])
    for image_path, _ in entries:
        _readable(image_path, landmark_list)
    written = []
    for (image_path, points), name in zip(entries, names):
        try:
            image = decode_image(image_path, image_path)
        except BadImageError as e:
            raise ValueError(f"{image_path}: cannot read image listed in {landmark_list}: "
                             f"{str(e).removeprefix(image_path + ': ')}") from None
        target = output / name
        target.parent.mkdir(parents=True, exist_ok=True)
        save_image(target, align_face(image, points, size))
        written.append(target)
    return written


def _readable(image_path: str, landmark_list: str | Path) -> None:
    try:
        image_size(image_path, image_path)
    except BadImageError as e:
        raise ValueError(f"{image_path}: cannot read image listed in {landmark_list}: "
                         f"{str(e).removeprefix(image_path + ': ')}") from None
