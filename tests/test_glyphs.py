"""faceforge.data.glyphs: font selection, families, character split, rendering, pairs, and `data.name: glyphs`.

Runs without the CJK fonts: the DejaVu and STIX fonts that matplotlib bundles, over Latin, Greek and
Cyrillic letters (charset ``latin_greek_cyrillic``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from fontTools.ttLib import TTFont

from faceforge.data import glyphs
from faceforge.data.glyphs import FontsNotFoundError, GlyphBenchmark, family_key, sample_pairs, select_fonts
from faceforge.train.config import ConfigError, config_from_dict
from faceforge.train.data import build_dataset, build_verification_sets

pytestmark = pytest.mark.usefixtures("one_thread")

MPL_FONTS = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
CHARSET = "latin_greek_cyrillic"
# three families of two weights each
FONTS = [MPL_FONTS / name for name in (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
)]


@pytest.fixture(scope="module")
def selection() -> glyphs.FontSelection:
    return select_fonts(FONTS, CHARSET)


@pytest.fixture(scope="module")
def font_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fonts folder: the six fonts, plus DejaVuSans.ttf copied under another name (a near-duplicate)."""
    folder = tmp_path_factory.mktemp("fonts")
    for path in FONTS:
        shutil.copy(path, folder / path.name)
    shutil.copy(MPL_FONTS / "DejaVuSans.ttf", folder / "zz-copy-of-DejaVuSans.ttf")
    return folder


def _name(path: str) -> str:
    return Path(path).name


# ----------------------------------------------------------------------------------------------------
# Fonts


def test_characters_are_the_cmap_intersection_and_thin_fonts_are_dropped() -> None:
    thin = MPL_FONTS / "cmr10.ttf"  # TeX font: a few ASCII letters only
    sel = select_fonts([*FONTS, thin], CHARSET)
    ranges = glyphs.CHARSETS[CHARSET]
    expected = None
    for path in FONTS:  # the intersection, computed plainly
        cmap = TTFont(str(path)).getBestCmap()
        chars = {c for c in cmap if any(lo <= c <= hi for lo, hi in ranges)}
        expected = chars if expected is None else expected & chars
    assert sel.characters == sorted(expected)
    assert len(sel.characters) > 300
    assert [_name(p) for p in sel.paths] == sorted(p.name for p in FONTS)
    assert "maps 57 characters" in sel.dropped[str(thin.resolve())]


def test_family_grouping(selection: glyphs.FontSelection) -> None:
    families = {_name(f.path): fam for f, fam in zip(selection.fonts, selection.families)}
    assert families["DejaVuSans.ttf"] == families["DejaVuSans-Bold.ttf"]
    assert families["DejaVuSerif.ttf"] == families["DejaVuSerif-Bold.ttf"]
    assert families["STIXGeneral.ttf"] == families["STIXGeneralBol.ttf"]
    assert len(set(families.values())) == 3
    assert family_key("LXGW WenKai Light") == family_key("LXGWWenKai-Bold") == "lxgwwenkai"
    assert family_key("Klee One SemiBold") == "kleeone"
    assert glyphs.FontFile("/x/kouzan-mouhitsu-gyosho.ttf", "K", frozenset()).stem_family == "kouzan"


def test_near_duplicate_copy_is_dropped(font_dir: Path) -> None:
    sel = select_fonts(glyphs.find_font_files(font_dir), CHARSET)
    names = [_name(p) for p in sel.paths]
    assert "DejaVuSans.ttf" in names and "zz-copy-of-DejaVuSans.ttf" not in names
    reason = sel.dropped[str((font_dir / "zz-copy-of-DejaVuSans.ttf").resolve())]
    assert reason.startswith(f"near-duplicate of {(font_dir / 'DejaVuSans.ttf').resolve()}")
    assert "0.0000" in reason
    assert "dropped" in sel.report() and "3 families" in sel.report()


def test_symlinks_count_once(tmp_path: Path) -> None:
    (tmp_path / "a.ttf").symlink_to(FONTS[0])
    (tmp_path / "b.ttf").symlink_to(FONTS[0])
    assert glyphs.find_font_files(tmp_path) == [FONTS[0].resolve()]


def test_no_fonts_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FontsNotFoundError, match=rf"{tmp_path}: no font files.*install_fonts\.sh"):
        glyphs.find_font_files(tmp_path)
    with pytest.raises(FontsNotFoundError, match=r"no such font file or folder.*apt-get install"):
        glyphs.find_font_files(tmp_path / "missing")
    with pytest.raises(FontsNotFoundError, match=r"needs >= 2 usable fonts.*found 1"):
        select_fonts(FONTS[:1], CHARSET)


# ----------------------------------------------------------------------------------------------------
# Rendering


def test_render_is_centred_and_fills_the_box() -> None:
    size = 32
    for char in (ord("A"), ord("i"), ord("-"), 0x0416):  # tall, thin, wide and flat, Cyrillic Zhe
        img = glyphs.render_glyph(FONTS[0], char, size)
        assert img.dtype == np.uint8 and img.shape == (size, size)
        ink = np.argwhere(img < 128)
        (y0, x0), (y1, x1) = ink.min(0), ink.max(0)
        assert max(y1 - y0, x1 - x0) + 1 >= size - 2 * glyphs._border(size) - 1  # the long side fills the box
        assert abs((y0 + y1) / 2 - (size - 1) / 2) <= 1.0 and abs((x0 + x1) / 2 - (size - 1) / 2) <= 1.0
        assert img[0].min() == 255 and img[:, 0].min() == 255  # the border stays white
    assert glyphs.render_glyph(FONTS[0], ord(" "), size) is None  # no ink


# ----------------------------------------------------------------------------------------------------
# The benchmark


def test_split_is_disjoint_deterministic_and_seeded(selection: glyphs.FontSelection) -> None:
    a = GlyphBenchmark(selection, 60, 20, seed=0, image_size=24)
    b = GlyphBenchmark(selection, 60, 20, seed=0, image_size=24)
    c = GlyphBenchmark(selection, 60, 20, seed=1, image_size=24)
    assert len(a.train_chars) == 60 and len(a.test_chars) == 20
    assert not set(a.train_chars) & set(a.test_chars)
    assert set(a.train_chars) | set(a.test_chars) <= set(selection.characters)
    assert a.train_chars == b.train_chars and a.test_chars == b.test_chars
    assert np.array_equal(a.train_images, b.train_images) and np.array_equal(a.test_images, b.test_images)
    assert a.train_chars != c.train_chars
    assert a.train_images.shape == (60, len(FONTS), 24, 24) and a.train_images.dtype == np.uint8
    # every image is the plain render of its character in its font
    i, f = 7, 3
    assert np.array_equal(a.train_images[i, f], glyphs.render_glyph(selection.paths[f], a.train_chars[i], 24))
    with pytest.raises(ValueError, match=r"share only \d+ usable characters.*asked for 100000"):
        GlyphBenchmark(selection, 99_000, 1000, image_size=16)


def test_held_out_families_stay_out_of_training(selection: glyphs.FontSelection) -> None:
    for seed in range(3):
        bench = GlyphBenchmark(selection, 20, 10, held_out_families=1, seed=seed, image_size=16)
        train_fams = {selection.families[i] for i in bench.train_fonts}
        test_fams = {selection.families[i] for i in bench.test_fonts}
        assert len(test_fams) == 1 and not train_fams & test_fams
        assert len(bench.train_fonts) + len(bench.test_fonts) == len(FONTS)
        assert bench.test_images.shape[1] == 2 and bench.train_images.shape[1] == 4
    with pytest.raises(ValueError, match="only 3 families"):
        GlyphBenchmark(selection, 20, 10, held_out_families=3, image_size=16)


def test_variants_are_jittered_copies(selection: glyphs.FontSelection) -> None:
    bench = GlyphBenchmark(selection, 5, 3, seed=0, image_size=24, variants=3)
    clean = GlyphBenchmark(selection, 5, 3, seed=0, image_size=24)
    assert bench.train_images.shape == (5, 3 * len(FONTS), 24, 24)
    assert np.array_equal(bench.train_images[:, 0::3], clean.train_images)
    assert not np.array_equal(bench.train_images[:, 1::3], clean.train_images)
    assert (bench.train_images[:, 1::3] < 128).any(axis=(2, 3)).all()  # every variant has ink
    assert np.array_equal(bench.test_images, clean.test_images)  # test images stay clean


def test_pairs_labels_and_layout(selection: glyphs.FontSelection) -> None:
    bench = GlyphBenchmark(selection, 10, 12, seed=0, image_size=16)
    images, labels = bench.test_gallery()
    assert images.shape == (12 * len(FONTS), 16, 16, 3) and np.array_equal(labels, np.repeat(np.arange(12), 6))
    first, second, issame = sample_pairs(labels, 500, seed=3)
    assert np.array_equal(issame, np.arange(500) % 2 == 0)
    assert np.array_equal(labels[first] == labels[second], issame)
    assert (first != second).all()  # a positive pair is two different fonts
    again = sample_pairs(labels, 500, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip((first, second, issame), again))
    pair_images, pair_same = bench.pairs(50)
    f, s, same = sample_pairs(labels, 50, seed=0)
    assert np.array_equal(pair_images[0::2], images[f]) and np.array_equal(pair_images[1::2], images[s])
    assert np.array_equal(pair_same, same)
    with pytest.raises(ValueError, match="num_pairs must be a positive int"):
        sample_pairs(labels, 0)
    with pytest.raises(ValueError, match=">= 2 labels"):
        sample_pairs(np.zeros(5, dtype=int), 4)


# ----------------------------------------------------------------------------------------------------
# data.name: glyphs through the trainer


def _glyph_config(font_dir: Path, output: Path, **data: object) -> dict:
    return {
        "seed": 0,
        "output": str(output),
        "model": {"backbone": "iresnet", "embedding_size": 16, "kwargs": {"layers": [1, 1, 1, 1], "width": 0.125}},
        "head": {"name": "arcface", "kwargs": {"s": 16.0}},
        "data": {
            "name": "glyphs", "path": str(font_dir), "glyph_charset": CHARSET, "num_identities": 12,
            "eval_identities": 8, "eval_pairs": 40, "image_size": 16, "batch_size": 16, "flip": False, **data,
        },
        "optim": {"lr": 0.05},
        "train": {"steps": 3, "log_every": 1, "progress": False},
    }


def test_glyphs_dataset_through_the_trainer(font_dir: Path, tmp_path: Path) -> None:
    from faceforge.train import train

    cfg = config_from_dict(_glyph_config(font_dir, tmp_path / "run"), "<test>")
    dataset = build_dataset(cfg)
    assert dataset.num_classes == 12 and len(dataset) == 12 * len(FONTS)  # the copy was dropped
    x, label = dataset[len(FONTS) + 1]
    assert tuple(x.shape) == (3, 16, 16) and label == 1 and -1.0 <= float(x.min()) < float(x.max()) <= 1.0
    assert "glyph U+" in dataset.describe(0)
    (images, issame), = build_verification_sets(cfg).values()
    assert images.shape == (80, 16, 16, 3) and issame.sum() == 20
    result = train(cfg)
    assert result.step == 3 and 0.0 <= result.metrics["accuracy"] <= 1.0 and "tar@far=1e-03" in result.metrics
    bad = _glyph_config(font_dir, tmp_path / "bad", glyph_charset="klingon")
    with pytest.raises(ConfigError, match="data.glyph_charset = 'klingon': expected one of"):
        build_dataset(config_from_dict(bad, "<test>"))
