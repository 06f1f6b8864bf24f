"""AdaFace's training augmentations (``data.augment``, faceforge/data/augment.py): each operation's maths on small
hand-made images against float64 formulas written here, the probabilities within a binomial bound, determinism in
(seed, epoch, index) across ranks, accumulation and resume, the teacher cache skipping augmented views, the config
checks, and ``faceforge train`` with the option on."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from _runs import BASE, make_config, resumed_equals_straight
from faceforge.core.config import ConfigError
from faceforge.data.augment import (
    BLACK,
    CROP_RATIO,
    CROP_SCALE,
    INTERPOLATIONS,
    LOW_RES_SIDE,
    OPERATIONS,
    WHITE,
    AdaFaceAugmentation,
    AugmentParams,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    apply_params,
    crop_box,
    crop_in_place,
    low_resolution,
    photometric,
    sample_params,
)
from faceforge.data.samplers import AUGMENTED, Batch, EpochSampler, SamplerContext
from faceforge.train.config import config_from_dict, to_dict
from test_distillation import student_parts, teacher_run  # noqa: F401  (teacher_run is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

PAPER = {"crop": 0.2, "low_res": 0.2, "photometric": 0.2}


def gray64(u: np.ndarray) -> np.ndarray:
    """(3, H, W) float64 -> (H, W): torchvision's luma weights."""
    return 0.2989 * u[0] + 0.587 * u[1] + 0.114 * u[2]


def random_unit(seed: int, shape: tuple[int, ...] = (3, 5, 7)) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random(shape))  # float64 in [0, 1)


# ------------------------------------------------------------------------------------------ crop


def test_crop_keeps_the_box_in_place_and_blackens_the_rest():
    image = torch.arange(3 * 6 * 8, dtype=torch.float32).reshape(3, 6, 8) / 144.0 - 0.5  # every pixel distinct
    out = crop_in_place(image, (1, 2, 3, 4))
    rows, cols = torch.meshgrid(torch.arange(6), torch.arange(8), indexing="ij")
    inside = (rows >= 1) & (rows < 4) & (cols >= 2) & (cols < 6)
    assert torch.equal(out[:, inside], image[:, inside])  # the same pixels at the same places
    assert (out[:, ~inside] == BLACK).all() and BLACK == -1.0  # pixel 0 normalised as (0 - 127.5) / 127.5
    assert int(inside.sum()) == 12


def test_crop_boxes_follow_random_resized_crop():
    """Area fraction in scale (up to the rounding of w and h), aspect in ratio (idem), the box inside the image;
    and the central fallback when no try fits (a 1-pixel-high image: h = sqrt(area / aspect) >= 3.9 never fits)."""
    rng = np.random.default_rng(0)
    H, W = 40, 30
    areas, aspects = [], []
    for _ in range(2000):
        top, left, h, w = crop_box(rng, H, W)
        assert 0 <= top and top + h <= H and 0 <= left and left + w <= W and h > 0 and w > 0
        areas.append(h * w / (H * W))
        aspects.append(w / h)
    # w, h = round(sqrt(A a)), round(sqrt(A / a)) with A >= 0.2 * 1200 = 240: each within 0.5 of a value >= 13.4,
    # so the area and the aspect are within a factor (1 +- 0.5 / 13.4)^2 = 1 +- 0.076 of the drawn ones
    assert CROP_SCALE[0] / 1.08 <= min(areas) and max(areas) <= CROP_SCALE[1]
    assert CROP_RATIO[0] / 1.08 <= min(aspects) and max(aspects) <= CROP_RATIO[1] * 1.08
    assert min(areas) < 0.25 and max(areas) > 0.9  # the whole range is drawn
    assert crop_box(np.random.default_rng(1), 1, 100) == (0, 49, 1, 1)  # fallback: aspect clipped to 4/3, centred
    assert crop_box(np.random.default_rng(1), 1, 1) == (0, 0, 1, 1)


# ------------------------------------------------------------------------------------------ low resolution


@pytest.mark.parametrize("down", INTERPOLATIONS)
@pytest.mark.parametrize("up", INTERPOLATIONS)
def test_low_resolution_of_a_constant_image_is_constant(down, up):
    """Every interpolation's weights sum to 1; in float32 each output is a sum of at most 4 x 4 products per pass
    (bicubic) plus the area mean of up to 5 x 5 pixels, each rounding relative 2^-24: two passes of two axes stay
    within 50 roundings of |c| <= 1, 3e-6; 1e-5 leaves margin."""
    for c in (-1.0, -0.3, 0.7, 1.0):
        image = torch.full((3, 23, 23), c)
        for ratio in (0.2, 0.37, 0.5, 0.99):
            out = low_resolution(image, ratio, down, up)
            assert out.shape == image.shape
            torch.testing.assert_close(out, image, rtol=0, atol=1e-5)


def test_low_resolution_sizes_and_nearest_maths():
    """ratio 0.5 of 4 pixels: 2 x 2 with nearest (source index floor(2 i)), back up (floor(i / 2)): each pixel is
    the one at (2 floor(i / 2), 2 floor(j / 2)). ratio 0.2 of 5: int(1.0) = 1 pixel, the top-left one."""
    image = torch.arange(3 * 4 * 4, dtype=torch.float64).reshape(3, 4, 4) / 48
    out = low_resolution(image, 0.5, "nearest", "nearest")
    index = torch.tensor([0, 0, 2, 2])
    assert torch.equal(out, image[:, index][:, :, index])
    five = torch.rand(3, 5, 5, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(low_resolution(five, 0.2, "nearest", "bilinear"), five[:, :1, :1].expand(3, 5, 5),
                               rtol=0, atol=1e-15)
    # area down by 2 then nearest up: the 2 x 2 means, each repeated
    means = image.reshape(3, 2, 2, 2, 2).mean(dim=(2, 4))
    torch.testing.assert_close(low_resolution(image, 0.5, "area", "nearest"),
                               means.repeat_interleave(2, 1).repeat_interleave(2, 2), rtol=0, atol=1e-15)


def test_low_resolution_stays_in_the_pixel_range():
    step = torch.full((3, 16, 16), BLACK)
    step[:, :, 8:] = WHITE  # bicubic overshoots at the edge; the official uint8 saturates, so do we
    for down in INTERPOLATIONS:
        out = low_resolution(step, 0.5, down, "bicubic")
        assert out.min() >= BLACK and out.max() <= WHITE


# ------------------------------------------------------------------------------------------ photometric


@pytest.mark.parametrize("factor", [0.5, 0.83, 1.0, 1.37, 1.5])
def test_brightness_contrast_saturation_are_torchvision_formulas(factor):
    u = random_unit(int(factor * 100))
    x = u.numpy()
    torch.testing.assert_close(adjust_brightness(u, factor).numpy(), np.clip(factor * x, 0, 1), rtol=0, atol=1e-15)
    mean = gray64(x).mean()  # one scalar over the whole image
    torch.testing.assert_close(adjust_contrast(u, factor).numpy(), np.clip(factor * x + (1 - factor) * mean, 0, 1),
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(adjust_saturation(u, factor).numpy(),
                               np.clip(factor * x + (1 - factor) * gray64(x)[None], 0, 1), rtol=0, atol=1e-15)


def test_photometric_applies_the_drawn_order_and_skips_hue():
    u = random_unit(3)
    b, c, s = 1.3, 0.6, 1.45
    x = u.numpy()
    expected = np.clip(s * x + (1 - s) * gray64(x)[None], 0, 1)  # order (2, 0, 3, 1): saturation,
    expected = np.clip(b * expected, 0, 1)  # brightness, (hue: off), contrast
    expected = np.clip(c * expected + (1 - c) * gray64(expected).mean(), 0, 1)
    torch.testing.assert_close(photometric(u, (2, 0, 3, 1), (b, c, s)).numpy(), expected, rtol=0, atol=1e-15)


def test_params_on_normalised_images_match_the_pixel_formulas():
    """apply_params works on (x - 127.5) / 127.5 images: the jitter in pixel units / 255, back again. float32:
    some 10 operations on values <= 2, each rounding relative 2^-24 (1.2e-7): 1e-5 leaves an order of margin."""
    pixels = np.random.default_rng(7).integers(0, 256, (3, 9, 9)).astype(np.float64)
    image = torch.from_numpy((pixels - 127.5) / 127.5).float()
    params = AugmentParams(crop=(2, 1, 5, 6), photometric=((1, 0, 2, 3), (0.7, 1.4, 0.55)))
    u = pixels / 255
    box = np.zeros_like(u)
    box[:, 2:7, 1:7] = u[:, 2:7, 1:7]  # the crop, black around it
    u = np.clip(1.4 * box + (1 - 1.4) * gray64(box).mean(), 0, 1)  # contrast,
    u = np.clip(0.7 * u, 0, 1)  # brightness,
    u = np.clip(0.55 * u + (1 - 0.55) * gray64(u)[None], 0, 1)  # saturation
    torch.testing.assert_close(apply_params(image, params).double().numpy(), (255 * u - 127.5) / 127.5,
                               rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ sampling


def test_each_operation_applies_with_its_probability():
    """Over N = 4000 images the applied fraction f of an operation of probability p is binomial: sd =
    sqrt(p (1 - p) / N) = 0.0063 at p = 0.2, so |f - p| < 5 sd = 0.032 (two-sided 5.7e-7 by chance); two
    operations are independent: both at 0.04, sd 0.0031, bound 0.016. p = 0 never, p = 1 always."""
    n = 4000
    applied = np.array([sample_params(PAPER, 0, 0, i, 112, 112).applied() for i in range(n)])
    for k in range(3):
        assert abs(applied[:, k].mean() - 0.2) < 5 * math.sqrt(0.2 * 0.8 / n), OPERATIONS[k]
    both = (applied[:, 0] & applied[:, 1]).mean()
    assert abs(both - 0.04) < 5 * math.sqrt(0.04 * 0.96 / n)
    never_always = np.array([sample_params({"crop": 0.0, "low_res": 1.0}, 0, 0, i, 8, 8).applied() for i in range(200)])
    assert not never_always[:, 0].any() and never_always[:, 1].all() and not never_always[:, 2].any()


def test_draws_are_a_function_of_seed_epoch_index_and_nest_across_probabilities():
    def params(probabilities, seed=0, epoch=0, index=5):
        return sample_params(probabilities, seed, epoch, index, 32, 32)

    one = [params(PAPER, index=i) for i in range(200)]
    assert one == [params(PAPER, index=i) for i in range(200)]
    assert one != [params(PAPER, epoch=1, index=i) for i in range(200)]
    assert one != [params(PAPER, seed=1, index=i) for i in range(200)]
    more = [params({**PAPER, "crop": 0.6}, index=i) for i in range(200)]
    for a, b in zip(one, more):
        assert a.low_res == b.low_res and a.photometric == b.photometric  # one probability moves no other draw
        assert a.crop is None or a.crop == b.crop  # cropped at 0.2: cropped the same way at 0.6
    assert sum(b.crop is not None for b in more) > sum(a.crop is not None for a in one)
    for p in one:  # parameters in their declared ranges
        if p.low_res:
            assert LOW_RES_SIDE[0] <= p.low_res[0] <= LOW_RES_SIDE[1] and set(p.low_res[1:]) <= set(INTERPOLATIONS)
        if p.photometric:
            assert sorted(p.photometric[0]) == [0, 1, 2, 3] and all(0.5 <= f <= 1.5 for f in p.photometric[1])


def test_probabilities_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"data.augment.low_res = 1.5: expected a probability in \[0, 1\]"):
        AdaFaceAugmentation(low_res=1.5)


class Indexed(torch.utils.data.Dataset):
    """``ds[i] -> (random normalised image (3, 12, 12) of seed i, i % 4)``."""

    num_classes = 4

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, 12, 12, generator=g) * 2 - 1, i % 4


def sampler(batch_size: int = 8, world_size: int = 1, rank: int = 0, grad_accum: int = 1, augment=PAPER,
            flip: bool = True) -> EpochSampler:
    micro = 32 // (batch_size * world_size * grad_accum) * grad_accum
    return EpochSampler(SamplerContext(dataset=Indexed(), batch_size=batch_size, world_size=world_size, rank=rank,
                                       seed=3, grad_accum=grad_accum, micro_per_epoch=micro, flip=flip,
                                       augment=dict(augment)))


def test_the_sampler_augments_the_same_images_on_any_world_size_accumulation_and_resume():
    def flat(s, epoch=1, start=0):
        return [(b.sample_ids, b.images, b.altered()) for b in s.batches(epoch, start)]

    one = flat(sampler())
    plain = flat(sampler(augment={}))
    assert all(torch.equal(a[0], p[0]) for a, p in zip(one, plain))  # the same data order and flips
    changed = torch.cat([(a[1] != p[1]).flatten(1).any(1) for a, p in zip(one, plain)])
    assert torch.equal(changed, torch.cat([a[2] for a in one]))  # extras["augmented"]: exactly the changed ones
    assert 0 < int(changed.sum()) < 32  # 1 - 0.8^3 = 49 % expected
    ranks = [flat(sampler(batch_size=4, world_size=2, rank=r)) for r in range(2)]
    accum = flat(sampler(batch_size=4, grad_accum=2))
    for step, (ids, images, augmented) in enumerate(one):
        for r in range(2):  # rank r holds every second image of the global micro-batch
            assert torch.equal(ranks[r][step][0], ids[r::2]) and torch.equal(ranks[r][step][1], images[r::2])
        for a in range(2):
            assert torch.equal(accum[2 * step + a][1], images[4 * a : 4 * a + 4])
    # a resumed epoch (from micro-batch 2; no flips, whose generator is in the sampler's state) sees the same images
    straight = flat(sampler(flip=False))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(flat(sampler(flip=False), start=2), straight[2:]))
    assert "augmented" not in next(sampler(augment={}).batches(0, 0)).extras  # off: the batch is as before


def test_altered_views_are_neither_read_from_nor_written_to_the_teacher_cache(teacher_run, tmp_path):  # noqa: F811
    from faceforge.train.distillation import Distillation

    backbone, head = student_parts()
    objective = Distillation(backbone, head, teacher=str(teacher_run), cache=str(tmp_path / "cache"))
    objective.bind(SamplerContext(dataset=[(torch.zeros(3, 32, 32), 0)] * 10, batch_size=4, world_size=1, rank=0,
                                  seed=0, grad_accum=1, micro_per_epoch=2))
    calls = []
    real_forward = objective.teacher.forward
    objective.teacher.forward = lambda x: calls.append(len(x)) or real_forward(x)
    batch = Batch(images=torch.rand(4, 3, 32, 32) * 2 - 1, labels=torch.arange(4), sample_ids=torch.arange(1, 5),
                  flipped=torch.zeros(4, dtype=torch.bool),
                  extras={"masked": torch.tensor([True, False, False, False]),
                          AUGMENTED: torch.tensor([False, False, True, False])})
    assert batch.altered().tolist() == [True, False, True, False]
    objective.teacher_embeddings(batch)
    objective.teacher_embeddings(batch)
    assert calls == [2, 2, 2]  # the 2 altered images live each time; the 2 others once, then from the cache


# ------------------------------------------------------------------------------------------ config and training


def test_config_defaults_off_and_ranges(tmp_path):
    cfg = make_config(tmp_path / "run")
    assert (cfg.data.augment.crop, cfg.data.augment.low_res, cfg.data.augment.photometric) == (0.0, 0.0, 0.0)
    data = to_dict(cfg)
    data["data"]["augment"] = {"crop": 0.2, "photometric": 1.2}
    with pytest.raises(ConfigError, match=r"data.augment.photometric = 1.2: expected a probability in \[0, 1\]"):
        config_from_dict(data, "<test>")
    data["data"]["augment"] = {"blur": 0.2}
    with pytest.raises(ConfigError, match=r"unknown key data.augment.blur"):
        config_from_dict(data, "<test>")


def test_resume_with_augmentations_is_bit_identical(tmp_path):
    resumed_equals_straight(tmp_path, data={"augment": {"crop": 0.5, "low_res": 0.5, "photometric": 0.5}})


def test_faceforge_train_runs_with_the_option_on(tmp_path):
    from faceforge.cli import main

    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["train"].update(steps=2, checkpoint_every=0)
    results = {}
    for name, augment in (("off", None), ("on", PAPER)):
        data["output"] = str(tmp_path / name)
        data["data"]["augment"] = augment or {}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
        assert main(["train", str(tmp_path / f"{name}.yaml")]) == 0
        results[name] = [line.split("loss ")[1].split()[0] for line in (tmp_path / name / "train.log").read_text()
                         .splitlines() if " loss " in line]
    assert len(results["on"]) == 2 and results["on"] != results["off"]  # the augmentations changed the images
    saved = yaml.safe_load((tmp_path / "on" / "config.yaml").read_text())
    assert saved["data"]["augment"] == PAPER


def test_the_harness_declares_adaface_against_arcface_with_the_same_augmentations(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy"))
    import experiments as ex
    import harness

    for size in ("default", "many"):
        runs = harness.plan(size, ["adaface_quality"], ["synthetic"], 1, tmp_path)
        assert [r.cfg.head.name for r in runs] == ["arcface", "adaface"]
        assert all(to_dict(r.cfg)["data"]["augment"] == PAPER for r in runs)
        d = [to_dict(r.cfg) for r in runs]
        for x in d:
            x.pop("head"), x.pop("output")
        assert d[0] == d[1]  # the equal budget: everything but the head
    assert ex.EXPERIMENTS["adaface_quality"].variants_for("full") == ()
