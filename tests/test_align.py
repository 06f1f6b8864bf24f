"""faceforge.data.align: the Umeyama similarity (checked against its closed form) and the warp."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from faceforge.data.align import ARCFACE_TEMPLATE, align_face, estimate_similarity, template_for_size


def similarity(angle: float, scale: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def apply(t: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ t[:, :2].T + t[:, 2]


@pytest.mark.parametrize("angle,scale,tx,ty", [(0.0, 1.0, 0.0, 0.0), (0.3, 2.5, 40.0, -7.0), (-2.9, 0.4, 3.0, 90.0)])
def test_recovers_an_exact_similarity(angle, scale, tx, ty):
    t = similarity(angle, scale, tx, ty)
    src = ARCFACE_TEMPLATE.copy()
    np.testing.assert_allclose(estimate_similarity(src, apply(t, src)), t, atol=1e-9)


def test_least_squares_beats_any_nearby_similarity():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(5, 2)) * 30
    dst = apply(similarity(0.4, 1.3, 5, 6), src) + rng.normal(size=(5, 2))
    best = estimate_similarity(src, dst)
    residual = ((apply(best, src) - dst) ** 2).sum()
    a, b = best[0, 0], best[1, 0]
    for da, db, dx, dy in rng.normal(scale=1e-3, size=(200, 4)):
        other = np.array([[a + da, -(b + db), best[0, 2] + dx], [b + db, a + da, best[1, 2] + dy]])
        assert ((apply(other, src) - dst) ** 2).sum() >= residual - 1e-9


def test_mirrored_points_give_a_rotation_not_a_reflection():
    src = ARCFACE_TEMPLATE.copy()
    dst = src * np.array([-1.0, 1.0])  # a mirror image: the best similarity cannot reflect
    t = estimate_similarity(src, dst)
    assert np.linalg.det(t[:, :2]) > 0


def test_align_warps_through_the_similarity_with_pixel_centres():
    """A ramp image I(x, y) = x: bilinear sampling is exact, so each output pixel must hold the input x
    coordinate that the inverse similarity sends its centre to."""
    size = 112
    forward = similarity(0.2, 0.5, -10.0, 5.0)  # photo -> crop
    inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
    landmarks = apply(inverse, template_for_size(size))  # where the template points sit in the photo
    photo = np.repeat(np.tile(np.arange(240, dtype=np.uint8), (240, 1))[:, :, None], 3, axis=2)
    crop = align_face(photo, landmarks, size)
    ys, xs = np.mgrid[0:size, 0:size]
    x_in = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    inside = (x_in > 1) & (x_in < 238)
    y_in = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    inside &= (y_in > 1) & (y_in < 238)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(crop[..., 0][inside], x_in[inside], atol=1.0)


def test_aligned_template_image_is_unchanged():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    out = align_face(image, ARCFACE_TEMPLATE).astype(int)  # the identity map, up to float rounding of 1e-15
    assert np.abs(out - image).max() <= 1


def test_bad_inputs_are_clear_errors():
    image = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(ValueError, match=r"landmarks must be \(5, 2\)"):
        align_face(image, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="uint8"):
        align_face(image.astype(np.float32), ARCFACE_TEMPLATE)
    with pytest.raises(ValueError, match="same point"):
        estimate_similarity(np.ones((5, 2)), ARCFACE_TEMPLATE)
    with pytest.raises(ValueError, match="finite"):
        estimate_similarity(np.full((5, 2), np.nan), ARCFACE_TEMPLATE)


def test_align_command_on_a_landmark_list(tmp_path, capsys):
    from PIL import Image

    from faceforge.cli import main

    rng = np.random.default_rng(2)
    photo = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "a.png")
    coords = " ".join(f"{v:.4f}" for v in ARCFACE_TEMPLATE.ravel())
    (tmp_path / "list.txt").write_text(f"# photo landmarks\na.png {coords}\n")
    assert main(["align", str(tmp_path / "list.txt"), str(tmp_path / "out")]) == 0
    crop = np.asarray(Image.open(tmp_path / "out" / "a.png")).astype(int)
    assert np.abs(crop - photo).max() <= 1

    (tmp_path / "bad.txt").write_text(f"a.png {coords}\na.png 1 2 3\n")
    assert main(["align", str(tmp_path / "bad.txt"), str(tmp_path / "out2")]) == 2  # one line, exit 2
    assert re.match(r"faceforge align: .*bad\.txt:2: expected", capsys.readouterr().err)
    (tmp_path / "missing.txt").write_text(f"nope.png {coords}\n")
    assert main(["align", str(tmp_path / "missing.txt"), str(tmp_path / "out3")]) == 2
    assert re.match(r"faceforge align: .*nope\.png: cannot read image", capsys.readouterr().err)
