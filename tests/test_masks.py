"""Mask augmentation: only the lower face changes, deterministic in (seed, epoch, index), the ratio holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from faceforge.data import masks
from faceforge.data.align import ARCFACE_TEMPLATE


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_upper_face_rows_sit_between_the_eyes_and_the_nose():
    rows = masks.upper_face_rows(112)
    eye_y, nose_y = ARCFACE_TEMPLATE[:2, 1].max(), ARCFACE_TEMPLATE[2, 1]
    assert eye_y < rows < nose_y
    assert masks.upper_face_rows(56) == pytest.approx(rows / 2, abs=1)


@pytest.mark.parametrize("size", [112, 56])
def test_only_the_lower_face_changes(size):
    augment = masks.MaskAugmentation(ratio=1.0, seed=3)
    x = images(48, size)
    out, masked = augment(x, torch.arange(48), epoch=0)
    assert masked.all()
    top = masks.upper_face_rows(size)
    assert torch.equal(out[:, :, :top], x[:, :, :top])  # eyes and above: untouched, bit for bit
    changed = (out != x).any(dim=1)  # (B, S, S)
    assert changed[:, top:].flatten(1).float().mean(1).min() > 0.15  # every mask covers a good part below
    # the covered rows start near the nose bridge and reach the chin region
    rows = changed.any(dim=2).float()
    assert rows[:, int(0.85 * size) :].mean() > 0.9


def test_masks_are_deterministic_in_seed_epoch_and_index():
    augment = masks.MaskAugmentation(ratio=0.5, seed=7)
    x = images(16, 56)
    idx = torch.arange(100, 116)
    a, ma = augment(x, idx, epoch=2)
    b, mb = augment(x, idx, epoch=2)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    # one image alone gets what it got inside the batch (nothing depends on the batch around it)
    alone, _ = augment(x[5:6], idx[5:6], epoch=2)
    assert torch.equal(alone[0], a[5])
    # another epoch or seed draws other masks
    c, mc = augment(x, idx, epoch=3)
    d, md = masks.MaskAugmentation(ratio=0.5, seed=8)(x, idx, epoch=2)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_ratio_and_nesting():
    n = 2000
    low = [masks.MaskAugmentation(0.35, seed=0).params_for(1, i) is not None for i in range(n)]
    high = [masks.MaskAugmentation(0.5, seed=0).params_for(1, i) is not None for i in range(n)]
    # binomial: sd = sqrt(0.35 * 0.65 / 2000) = 0.0107; 4.5 sd = 0.048
    assert abs(np.mean(low) - 0.35) < 0.048 and abs(np.mean(high) - 0.5) < 0.051
    assert all(h for l, h in zip(low, high) if l)  # masked at 0.35 => masked at 0.5
    for i in [i for i in range(50) if low[i]]:  # and masked the same way
        assert masks.MaskAugmentation(0.35, seed=0).params_for(1, i) == masks.MaskAugmentation(0.5, seed=0).params_for(1, i)
    x = images(4, 32)
    out, m = masks.MaskAugmentation(0.0, seed=0)(x, torch.arange(4), 0)
    assert out is x and not m.any()
    with pytest.raises(ValueError, match="ratio"):
        masks.MaskAugmentation(1.5, seed=0)


def test_variety_of_shapes_textures_colours_and_wires():
    drawn = [masks.sample_params(masks.mask_rng(0, 0, i)) for i in range(300)]
    assert {p.shape for p in drawn} == set(masks.SHAPES)
    assert {p.texture for p in drawn} == set(masks.TEXTURES)
    assert len({p.colour for p in drawn}) > len(masks.COLOURS)  # the palette and random colours
    assert {p.nose_wire for p in drawn} == {True, False}
    assert max(abs(p.rotation) for p in drawn) > 0.1  # pose jitter
    for p in drawn[:12]:  # every shape renders with alpha in [0, 1]
        alpha, rgb = masks.render_mask(p, 64)
        assert alpha.min() >= 0 and alpha.max() <= 1 and alpha.max() == 1 and rgb.shape == (64, 64, 3)


def test_normalised_and_uint8_composites_agree():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(56, 56, 3), dtype=np.uint8)
    alpha, rgb = masks.render_mask(masks.sample_params(masks.mask_rng(0, 0, 1)), 56)
    as_uint8 = masks.apply_uint8(image, alpha, rgb).astype(np.float64)
    normalised = (torch.from_numpy(image).permute(2, 0, 1).double() - 127.5) / 127.5
    as_tensor = masks.apply_normalised(normalised, alpha, rgb).permute(1, 2, 0).numpy() * 127.5 + 127.5
    assert np.abs(as_tensor - as_uint8).max() <= 0.5 + 1e-9  # uint8 rounds to the nearest level
    eval_masked = masks.mask_images_uint8(image[None].repeat(2, 0), seed=0, keys=[4, 4])
    assert np.array_equal(eval_masked[0], eval_masked[1]) and not np.array_equal(eval_masked[0], image)
