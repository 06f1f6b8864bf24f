"""Rendered glyphs as a real open-set verification benchmark: a character is an identity, a font file is one
image of it.

No one here drew these images: they are the glyphs of installed font files (on Debian the CJK packages that
``benchmarks/accuracy/install_fonts.sh`` installs under ``/usr/share/fonts``), so a method that helps on them
helps on data it was not designed around. The pipeline:

1. **Fonts** (:func:`find_font_files`, :func:`select_fonts`): every ``.ttf/.otf/.ttc/.otc`` under a folder
   (symlinks resolved, each file once; face 0 of a collection). A font is dropped, with the reason
   recorded in :attr:`FontSelection.dropped`, when it cannot be read or rendered, maps fewer than
   ``min_coverage`` x the best font's characters of the charset (fontTools cmap), renders blank for more
   than ``max_blank`` of the probe characters (fonts that map characters to empty glyphs), draws nearly
   the same glyph for every character (placeholder fonts such as LastResort), or is a
   **near-duplicate** of a font already kept (mean absolute difference of the probe renders, in [0, 1],
   below ``near_duplicate``: ``ipagp`` = ``ipag``, ``wqy-microhei`` ~ ``DroidSansFallback``). Fonts are
   preferred in order of coverage, then path.
2. **Families** (:attr:`FontSelection.families`): two kept fonts are one family when the normalised
   family name of one (name table ID 16, else ID 1, style words such as Bold/Light removed) is a prefix of
   the other's, or the same holds for their file-name stems up to the first ``-``/``_`` (``kouzan-mouhitsu``
   and ``kouzan-mouhitsu-gyosho``), or their probe renders differ by less than ``same_family`` (LXGW
   WenKai is derived from Klee One). The grouping errs on the side of merging: a family always stays on
   one side of a font split.
3. **Characters**: only characters that every kept font maps are drawn. :class:`GlyphBenchmark` shuffles
   them by seed and takes ``num_train`` training and ``num_test`` test characters, disjoint; a character
   whose glyph is blank in some font, or renders exactly like an already chosen one in every font, is
   skipped.
4. **Images**: uint8 ``(S, S, 3)``, black ink on white, the glyph's ink box centred and scaled (aspect
   kept) to fill the square less a ``S/32`` border; ``variants > 1`` adds jittered copies (rotation up to
   8 degrees, scale 0.8 to 1, shift up to ``S/16``) per (character, font), drawn from their own seeds.
   Everything is rendered once into memory (about 0.3 ms a glyph) and is a function of the arguments only.

Verification pairs (:meth:`GlyphBenchmark.pairs`) come from the test characters: a positive pair is one
character in two different fonts, a negative pair two different characters. With ``held_out_families = 0``
the test pairs use the training fonts (new characters, known fonts); with ``k > 0``, ``k`` font families
drawn by seed are kept out of training and the test pairs use only their fonts (new characters *and* new
fonts).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from faceforge.data.transforms import to_tensor
from faceforge.core.fileio import save_image

__all__ = [
    "CHARSETS",
    "DEFAULT_FONT_DIR",
    "INSTALL_HINT",
    "FontFile",
    "FontSelection",
    "GlyphBenchmark",
    "GlyphDataset",
    "family_key",
    "find_font_files",
    "glyph_benchmark",
    "read_font",
    "render_glyph",
    "sample_pairs",
    "select_fonts",
]

logger = logging.getLogger("faceforge.data.glyphs")

# name -> inclusive code-point ranges
CHARSETS: dict[str, tuple[tuple[int, int], ...]] = {
    "cjk": ((0x4E00, 0x9FFF),),  # CJK Unified Ideographs
    # Basic Latin letters, Latin-1 and Latin Extended-A/B, Greek capitals and small letters, basic Cyrillic:
    # the charset of the tests (DejaVu fonts ship with matplotlib). Look-alikes across scripts (Latin A,
    # Greek Alpha, Cyrillic A) render alike; identical ones are skipped, near-identical ones are not.
    "latin_greek_cyrillic": (
        (0x0041, 0x005A), (0x0061, 0x007A), (0x00C0, 0x024F), (0x0391, 0x03A9), (0x03B1, 0x03C9), (0x0410, 0x044F),
    ),
}
DEFAULT_FONT_DIR = "/usr/share/fonts"
FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
INSTALL_HINT = (
    "install the benchmark's fonts with `bash benchmarks/accuracy/install_fonts.sh` "
    "(apt-get install fonts-noto-cjk fonts-arphic-ukai fonts-lxgw-wenkai ...: the list is in that script)"
)

# Font selection defaults (measured on the Debian CJK fonts; docs/data.md has the distance table).
MIN_COVERAGE = 0.25  # a font must map >= this fraction of the best font's characters of the charset
MAX_BLANK = 0.05  # ... and render ink for all but this fraction of the probe characters
MIN_VARIETY = 0.05  # ... and draw different characters differently (mean |a - b| of consecutive probe renders)
NEAR_DUPLICATE = 0.06  # mean |a - b| of the probe renders (ink in [0, 1]) below which a font is dropped
SAME_FAMILY = 0.08  # ... below which two kept fonts count as one family
PROBE_CHARS = 64
PROBE_SIZE = 32

# Seed-stream tags, so the split, the variants and the pairs draw independent numbers from one seed.
_TAG_SPLIT, _TAG_VARIANT, _TAG_PAIRS = 11, 12, 13
_STYLE_WORDS = (
    "regular", "book", "normal", "roman", "medium", "bold", "semibold", "demibold", "extrabold", "ultrabold",
    "black", "heavy", "light", "extralight", "ultralight", "semilight", "thin", "italic", "oblique",
    "condensed", "semicondensed", "expanded",
)
_STYLE_SUFFIX = re.compile(f"(?:{'|'.join(sorted(_STYLE_WORDS, key=len, reverse=True))})$")


class FontsNotFoundError(FileNotFoundError):
    """No usable font files where the glyph benchmark looked (the message says where and how to install)."""


# ----------------------------------------------------------------------------------------------------
# Font files
# ----------------------------------------------------------------------------------------------------


def find_font_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Font files (``.ttf .otf .ttc .otc``) under a folder (recursive), or the given files; each real file once.

    Symlinks are resolved (Debian links ``fonts-japanese-gothic.ttf`` to ``ipaexg.ttf``); the result is
    sorted. Raises :class:`FontsNotFoundError` naming the folder and the install command when there are none.
    """
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    found: set[Path] = set()
    for src in sources:
        path = Path(src)
        if path.is_dir():
            found.update(p.resolve() for p in path.rglob("*") if p.suffix.lower() in FONT_SUFFIXES and p.is_file())
        elif path.is_file():
            found.add(path.resolve())
        else:
            raise FontsNotFoundError(f"{path}: no such font file or folder; {INSTALL_HINT}")
    if not found:
        where = ", ".join(str(s) for s in sources)
        raise FontsNotFoundError(f"{where}: no font files ({'/'.join(FONT_SUFFIXES)}) found; {INSTALL_HINT}")
    return sorted(found)


def family_key(name: str) -> str:
    """A family name or file stem normalised for grouping: lower-case letters and digits, style words
    stripped from the end (``"LXGW WenKai Light"`` -> ``"lxgwwenkai"``, ``"KleeOne-SemiBold"`` -> ``"kleeone"``)."""
    key = re.sub(r"[^0-9a-z]", "", name.lower())
    while True:
        stripped = _STYLE_SUFFIX.sub("", key)
        if stripped == key or not stripped:
            return key
        key = stripped


@dataclass(frozen=True)
class FontFile:
    """One font file (face 0 of a collection): its family name and the charset code points its cmap maps."""

    path: str
    family_name: str
    characters: frozenset[int] = field(repr=False)

    @property
    def stem_family(self) -> str:
        """The file-name stem up to the first ``-`` or ``_``, normalised (``"kouzan-mouhitsu-gyosho"`` -> ``"kouzan"``)."""
        return family_key(re.split(r"[-_]", Path(self.path).stem)[0])


def _charset(name: str) -> tuple[tuple[int, int], ...]:
    if name not in CHARSETS:
        raise ValueError(f"charset {name!r}: expected one of {sorted(CHARSETS)}")
    return CHARSETS[name]


def read_font(path: str | os.PathLike, charset: str = "cjk") -> FontFile:
    """Read a font's cmap and name table with fontTools (lazily: no outlines are parsed).

    Raises ValueError naming the file when fontTools cannot read it.
    """
    from fontTools.ttLib import TTFont, TTLibError

    ranges = _charset(charset)
    try:
        with TTFont(str(path), fontNumber=0, lazy=True) as font:
            cmap = font.getBestCmap() or {}
            names = font["name"] if "name" in font else None
            family = (names.getDebugName(16) or names.getDebugName(1)) if names is not None else None
    except (TTLibError, OSError, KeyError, AssertionError, struct.error) as e:  # what fontTools raises on bad files
        raise ValueError(f"{path}: not a readable font file ({type(e).__name__}: {e})") from None
    chars = frozenset(c for c in cmap if any(lo <= c <= hi for lo, hi in ranges))
    return FontFile(str(path), family or Path(path).stem, chars)


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _face(path: str, pixel_size: int):
    """A PIL FreeType face (face 0) at ``pixel_size``; OSError when FreeType cannot size or read it."""
    from PIL import ImageFont

    return ImageFont.truetype(path, pixel_size, index=0)


def _border(image_size: int) -> int:
    return max(1, image_size // 32)


def _ink_crop(path: str, char: int, image_size: int):
    """The glyph's ink (L image, 0 = background) cropped to its box, drawn at twice the output size; None if blank."""
    from PIL import Image, ImageDraw

    pixel_size = max(32, 2 * image_size)
    face = _face(path, pixel_size)
    side = 3 * pixel_size  # room for glyphs that overhang the em box (brush fonts)
    canvas = Image.new("L", (side, side), 0)
    ImageDraw.Draw(canvas).text((side / 2, side / 2), chr(char), font=face, fill=255, anchor="mm")
    box = canvas.getbbox()
    return None if box is None else canvas.crop(box)


def _fit(ink, image_size: int, scale: float = 1.0, angle: float = 0.0, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Rotate (degrees), scale the ink box to fill ``image_size`` less the border (times ``scale``), centre, shift."""
    from PIL import Image

    if angle:
        ink = ink.rotate(angle, resample=Image.BILINEAR, expand=True, fillcolor=0)
    w, h = ink.size
    inner = (image_size - 2 * _border(image_size)) * scale
    factor = inner / max(w, h)
    ink = ink.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BILINEAR)
    out = Image.new("L", (image_size, image_size), 0)
    x = (image_size - ink.size[0]) // 2 + round(shift[0])
    y = (image_size - ink.size[1]) // 2 + round(shift[1])
    out.paste(ink, (x, y))
    return 255 - np.asarray(out)  # black ink on white


def render_glyph(path: str | os.PathLike, char: int, image_size: int = 32) -> np.ndarray | None:
    """Character ``char`` (a code point) in font ``path``: uint8 grey ``(S, S)``, black on white, its ink box
    centred and scaled to fill the square (less a ``S/32`` border). None when the glyph has no ink."""
    ink = _ink_crop(str(path), int(char), int(image_size))
    return None if ink is None else _fit(ink, int(image_size))


def _variant(ink, char: int, image_size: int, seed: int, font_index: int, k: int) -> np.ndarray:
    """Jittered copy ``k >= 1`` of a glyph from its ``_ink_crop``: rotation up to 8 degrees, scale 0.8..1,
    shift up to S/16 px."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_VARIANT, char, font_index, k]))
    angle, scale = rng.uniform(-8.0, 8.0), rng.uniform(0.8, 1.0)
    dx, dy = rng.uniform(-image_size / 16, image_size / 16, size=2)
    return _fit(ink, image_size, scale=scale, angle=angle, shift=(dx, dy))


# ----------------------------------------------------------------------------------------------------
# Font selection
# ----------------------------------------------------------------------------------------------------


@dataclass
class FontSelection:
    """The fonts a benchmark uses. ``families[i]`` is the family number of ``fonts[i]`` (0, 1, ...);
    ``characters`` are the code points every kept font maps (sorted); ``dropped`` maps a file to why it
    was left out; ``distances`` is the probe-render distance matrix of the kept fonts ``(F, F)``."""

    fonts: list[FontFile]
    families: list[int]
    characters: list[int]
    dropped: dict[str, str]
    charset: str
    distances: np.ndarray = field(repr=False)

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.fonts]

    def family_members(self) -> list[list[int]]:
        """Font indices of each family, families in order of their first font."""
        members: dict[int, list[int]] = {}
        for i, fam in enumerate(self.families):
            members.setdefault(fam, []).append(i)
        return list(members.values())

    def report(self) -> str:
        """Human-readable: the kept fonts by family, the dropped ones with reasons, the character count."""
        lines = [
            f"{len(self.fonts)} fonts in {len(set(self.families))} families map {len(self.characters)} "
            f"characters of charset {self.charset!r} in common"
        ]
        for members in self.family_members():
            lines.append("  family: " + ", ".join(Path(self.fonts[i].path).name for i in members))
        for path, reason in sorted(self.dropped.items()):
            lines.append(f"  dropped {path}: {reason}")
        return "\n".join(lines)


def _probe(chars: Sequence[int], count: int) -> list[int]:
    """``count`` characters spread evenly over the sorted common characters (independent of any seed)."""
    chars = sorted(chars)
    if len(chars) <= count:
        return chars
    return [chars[i] for i in np.linspace(0, len(chars) - 1, count).round().astype(int)]


def _probe_renders(path: str, probe: Sequence[int]) -> tuple[np.ndarray, int]:
    """Ink in [0, 1] of the probe characters ``(P, s, s)`` (blank = zeros) and how many were blank."""
    out = np.zeros((len(probe), PROBE_SIZE, PROBE_SIZE), dtype=np.float32)
    blank = 0
    for i, c in enumerate(probe):
        img = render_glyph(path, c, PROBE_SIZE)
        if img is None:
            blank += 1
        else:
            out[i] = (255 - img.astype(np.float32)) / 255
    return out, blank


def _union_find_groups(n: int, linked: np.ndarray) -> list[int]:
    """Connected components of the boolean adjacency ``(n, n)``, numbered by first member."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(linked, 1))):
        parent[root(int(j))] = root(int(i))
    numbers: dict[int, int] = {}
    return [numbers.setdefault(root(i), len(numbers)) for i in range(n)]


def _prefix_related(keys: Sequence[str]) -> np.ndarray:
    return np.array([[bool(a and b) and (a.startswith(b) or b.startswith(a)) for b in keys] for a in keys])


def select_fonts(
    paths: Sequence[str | os.PathLike],
    charset: str = "cjk",
    min_coverage: float = MIN_COVERAGE,
    max_blank: float = MAX_BLANK,
    near_duplicate: float = NEAR_DUPLICATE,
    same_family: float = SAME_FAMILY,
) -> FontSelection:
    """Choose the fonts of a benchmark from candidate files (see the module docstring for the rules).

    Args:
        paths: font files (e.g. from :func:`find_font_files`).
        charset: a key of :data:`CHARSETS`.
        min_coverage: drop fonts mapping fewer than this fraction of the best font's charset characters.
        max_blank: drop fonts whose glyph is blank for more than this fraction of the probe characters.
        near_duplicate: drop a font whose probe renders differ from a kept font's by less than this
            (mean absolute ink difference in [0, 1], 64 characters at 32 px).
        same_family: kept fonts closer than this are one family (besides same-name families).

    Raises:
        FontsNotFoundError: fewer than two fonts survive (the message lists why each was dropped).
    """
    _charset(charset)
    dropped: dict[str, str] = {}
    fonts: list[FontFile] = []
    for path in paths:
        try:
            fonts.append(read_font(path, charset))
        except ValueError as e:
            dropped[str(path)] = str(e).split(": ", 1)[-1]
    best = max((len(f.characters) for f in fonts), default=0)
    need = max(1, math.ceil(min_coverage * best))
    for f in [f for f in fonts if len(f.characters) < need]:
        dropped[f.path] = (
            f"maps {len(f.characters)} characters of charset {charset!r}; need >= {need} "
            f"({min_coverage:g} x the best font's {best})"
        )
    fonts = [f for f in fonts if len(f.characters) >= need]
    # preferred first: more characters, then path
    fonts.sort(key=lambda f: (-len(f.characters), f.path))
    common = frozenset.intersection(*(f.characters for f in fonts)) if fonts else frozenset()
    probe = _probe(common, PROBE_CHARS)
    renders: list[np.ndarray] = []
    usable: list[FontFile] = []
    for f in fonts:
        try:
            ink, blank = _probe_renders(f.path, probe)
        except OSError as e:  # FreeType cannot open or size it (fixed-size bitmap fonts)
            dropped[f.path] = f"FreeType cannot render it ({e})"
            continue
        if probe and blank > max_blank * len(probe):
            dropped[f.path] = f"blank glyphs for {blank} of {len(probe)} probe characters its cmap maps"
            continue
        variety = float(np.abs(ink[1:] - ink[:-1]).mean()) if len(probe) > 1 else 1.0
        if variety < MIN_VARIETY:
            dropped[f.path] = f"draws nearly one glyph for every character (variety {variety:.4f} < {MIN_VARIETY:g}; a placeholder font)"
            continue
        usable.append(f)
        renders.append(ink)
    kept: list[int] = []
    for i, f in enumerate(usable):
        distances = [float(np.abs(renders[i] - renders[j]).mean()) for j in kept]
        twin = int(np.argmin(distances)) if distances else -1
        if twin >= 0 and distances[twin] < near_duplicate:
            dropped[f.path] = (
                f"near-duplicate of {usable[kept[twin]].path} (mean abs difference {distances[twin]:.4f} "
                f"< {near_duplicate:g})"
            )
        else:
            kept.append(i)
    if len(kept) < 2:
        reasons = "; ".join(f"{p}: {r}" for p, r in sorted(dropped.items())) or "none dropped"
        raise FontsNotFoundError(
            f"the glyph benchmark needs >= 2 usable fonts for charset {charset!r}, found {len(kept)} among "
            f"{len(paths)} files ({reasons}); {INSTALL_HINT}"
        )
    order = sorted(kept, key=lambda i: usable[i].path)
    chosen = [usable[i] for i in order]
    ink = np.stack([renders[i] for i in order])
    dist = np.abs(ink[:, None] - ink[None, :]).mean(axis=(2, 3, 4)) if len(probe) else np.zeros((len(order),) * 2)
    linked = (
        _prefix_related([family_key(f.family_name) for f in chosen])
        | _prefix_related([f.stem_family for f in chosen])
        | (dist < same_family)
    )
    characters = sorted(frozenset.intersection(*(f.characters for f in chosen)))
    return FontSelection(chosen, _union_find_groups(len(chosen), linked), characters, dropped, charset, dist)


# ----------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------


def _grey_to_rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images[..., None], 3, axis=-1)


class GlyphDataset(Dataset):
    """Training images: ``ds[i] -> ((3, S, S) float32 normalised (x - 127.5) / 127.5, label)``.

    ``images`` uint8 ``(N, S, S)`` grey, ``labels`` int64 ``(N,)``; ``num_classes`` characters.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, names: Sequence[str]) -> None:
        self.images, self.labels, self._num_classes, self._names = images, labels, int(num_classes), names

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, index: int) -> str:
        return self._names[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return to_tensor(_grey_to_rgb(self.images[index])), int(self.labels[index])


def sample_pairs(labels: np.ndarray | Sequence[int], num_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Verification pairs drawn from a labelled gallery: ``(first (N,), second (N,), issame (N,))`` indices.

    Even pairs are positive (two different items of one label, the label drawn in proportion to its items
    among labels with two or more), odd pairs negative (two items of different labels, uniform), so any
    contiguous fold is balanced, as in :func:`faceforge.data.synthetic.synthetic_pairs`. Deterministic in
    ``(labels, num_pairs, seed)``; pairs may repeat.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {y.shape}")
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, (int, np.integer)) or num_pairs < 1:
        raise ValueError(f"num_pairs must be a positive int, got {num_pairs!r}")
    order = np.argsort(y, kind="stable")
    values, starts, counts = np.unique(y[order], return_index=True, return_counts=True)
    if len(values) < 2 or counts.max() < 2:
        raise ValueError(f"need >= 2 labels and a label with >= 2 items for pairs; got {len(values)} labels, "
                         f"at most {counts.max() if len(counts) else 0} items per label")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _TAG_PAIRS, int(num_pairs), len(y)]))
    issame = np.arange(num_pairs) % 2 == 0
    n_pos, n_neg = int(issame.sum()), int((~issame).sum())
    # positives: an item of a label with >= 2 items, then another item of the same label
    pool = order[np.repeat(counts >= 2, counts)]
    group = np.repeat(np.arange(len(values)), counts)[np.repeat(counts >= 2, counts)]
    pick = rng.integers(len(pool), size=n_pos)
    a_pos = pool[pick]
    rank = pick - np.searchsorted(group, group[pick])  # position of the item inside its label's block
    size = counts[group[pick]]
    other = (rank + rng.integers(1, size)) % size  # never the same item
    b_pos = order[starts[group[pick]] + other]
    # negatives: two items of different labels (redraw the second until the labels differ)
    a_neg = rng.integers(len(y), size=n_neg)
    b_neg = rng.integers(len(y), size=n_neg)
    clash = y[a_neg] == y[b_neg]
    while clash.any():
        b_neg[clash] = rng.integers(len(y), size=int(clash.sum()))
        clash = y[a_neg] == y[b_neg]
    first, second = np.empty(num_pairs, dtype=np.int64), np.empty(num_pairs, dtype=np.int64)
    first[issame], second[issame] = a_pos, b_pos
    first[~issame], second[~issame] = a_neg, b_neg
    return first, second, issame


class GlyphBenchmark:
    """The characters, fonts and rendered images of one glyph benchmark (see the module docstring).

    Args:
        selection: the fonts (:func:`select_fonts`).
        num_train / num_test: training / test characters (disjoint).
        held_out_families: font families kept out of training for the test pairs (0 = test pairs use the
            training fonts).
        seed: draws the character split, the held-out families, the variants and (by default) the pairs.
        image_size: side ``S`` in pixels.
        variants: images per (training character, font): 1 = the clean render, more adds jittered copies.

    Attributes:
        train_chars, test_chars: code points. train_fonts, test_fonts: font indices into ``selection.fonts``.
        train_images: uint8 ``(num_train, len(train_fonts) * variants, S, S)``; test_images: uint8
        ``(num_test, len(test_fonts), S, S)`` (clean renders). skipped: ``{"blank": n, "duplicate": n}``.
    """

    def __init__(
        self, selection: FontSelection, num_train: int, num_test: int, held_out_families: int = 0, seed: int = 0,
        image_size: int = 32, variants: int = 1,
    ) -> None:
        for name, value, low in (("num_train", num_train, 1), ("num_test", num_test, 2), ("image_size", image_size, 8),
                                 ("variants", variants, 1), ("held_out_families", held_out_families, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.selection, self.seed, self.image_size, self.variants = selection, int(seed), int(image_size), int(variants)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _TAG_SPLIT]))
        self.train_fonts, self.test_fonts = self._split_fonts(held_out_families, rng)
        chars, renders, self.skipped = self._choose_characters(num_train + num_test, rng)
        self.train_chars, self.test_chars = chars[:num_train], chars[num_train:]
        self.test_images = renders[num_train:][:, self.test_fonts]
        self.train_images = self._training_images(renders[:num_train])

    def _split_fonts(self, held_out: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        members = self.selection.family_members()
        every = list(range(len(self.selection.fonts)))
        if held_out == 0:
            return every, every
        if held_out >= len(members):
            raise ValueError(f"held_out_families = {held_out}: the fonts form only {len(members)} families; "
                             f"need at least one family left for training")
        test = sorted(i for fam in rng.permutation(len(members))[:held_out] for i in members[fam])
        if len(test) < 2:
            raise ValueError(f"held_out_families = {held_out} holds out {len(test)} font; positive test pairs need "
                             f">= 2 fonts; hold out more families")
        return [i for i in every if i not in test], test

    def _choose_characters(self, count: int, rng: np.random.Generator) -> tuple[list[int], np.ndarray, dict[str, int]]:
        """The first ``count`` usable characters in a seeded order, with their clean renders in every font."""
        paths = self.selection.paths
        candidates = rng.permutation(np.asarray(self.selection.characters, dtype=np.int64))
        chosen, stacks, seen = [], [], set()
        skipped = {"blank": 0, "duplicate": 0}
        for c in candidates:
            if len(chosen) == count:
                break
            glyphs = [render_glyph(p, int(c), self.image_size) for p in paths]
            if any(g is None for g in glyphs):
                skipped["blank"] += 1
                continue
            stack = np.stack(glyphs)
            digest = hashlib.blake2b(stack.tobytes(), digest_size=16).digest()
            if digest in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(digest)
            chosen.append(int(c))
            stacks.append(stack)
        if len(chosen) < count:
            raise ValueError(
                f"the {len(paths)} fonts share only {len(chosen)} usable characters of charset "
                f"{self.selection.charset!r} ({skipped['blank']} blank, {skipped['duplicate']} duplicate skipped); "
                f"asked for {count} (train + test): ask for fewer or use fewer fonts"
            )
        return chosen, np.stack(stacks), skipped

    def _training_images(self, clean: np.ndarray) -> np.ndarray:
        """``(num_train, F * V, S, S)``: per font the clean render, then its ``variants - 1`` jittered copies."""
        fonts = self.train_fonts
        out = np.empty((len(clean), len(fonts) * self.variants, self.image_size, self.image_size), dtype=np.uint8)
        out[:, 0::self.variants] = clean[:, fonts]
        if self.variants == 1:
            return out
        for c, char in enumerate(self.train_chars):
            for j, f in enumerate(fonts):
                ink = _ink_crop(self.selection.paths[f], char, self.image_size)  # once for all its variants
                for k in range(1, self.variants):  # the clean render has ink, so `ink` is not None
                    out[c, j * self.variants + k] = _variant(ink, char, self.image_size, self.seed, f, k)
        return out

    @property
    def images_per_character(self) -> int:
        return self.train_images.shape[1]

    def train_set(self) -> GlyphDataset:
        """The training images, character-major: item ``i`` is character ``i // images_per_character``."""
        n, per = self.train_images.shape[:2]
        names = [
            f"glyph U+{self.train_chars[i // per]:04X} in {self.selection.paths[self.train_fonts[(i % per) // self.variants]]}"
            + (f" (variant {(i % per) % self.variants})" if self.variants > 1 else "")
            for i in range(n * per)
        ]
        return GlyphDataset(
            self.train_images.reshape(n * per, self.image_size, self.image_size),
            np.repeat(np.arange(n, dtype=np.int64), per), n, names,
        )

    def test_gallery(self) -> tuple[np.ndarray, np.ndarray]:
        """Every test character in every test font: images uint8 ``(N, S, S, 3)``, labels int64 ``(N,)``."""
        n, per = self.test_images.shape[:2]
        images = self.test_images.reshape(n * per, self.image_size, self.image_size)
        return _grey_to_rgb(images), np.repeat(np.arange(n, dtype=np.int64), per)

    def pairs(self, num_pairs: int, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Verification pairs of test characters, laid out like insightface ``.bin`` sets.

        Returns images uint8 ``(2N, S, S, 3)`` (pair ``k`` = images ``2k``, ``2k + 1``) and ``issame`` bool
        ``(N,)``: even pairs one character in two different fonts, odd pairs two characters.
        """
        images, labels = self.test_gallery()
        first, second, issame = sample_pairs(labels, num_pairs, self.seed if seed is None else seed)
        return images[np.stack([first, second], 1).ravel()], issame


@functools.lru_cache(maxsize=4)
def _cached_selection(source: str, charset: str, min_coverage: float = MIN_COVERAGE) -> FontSelection:
    selection = select_fonts(find_font_files(source), charset, min_coverage)
    logger.info("glyph fonts under %s: %s", source, selection.report())
    return selection


@functools.lru_cache(maxsize=2)
def glyph_benchmark(
    source: str = DEFAULT_FONT_DIR, charset: str = "cjk", num_train: int = 1000, num_test: int = 200,
    held_out_families: int = 0, seed: int = 0, image_size: int = 32, variants: int = 1,
    min_coverage: float = MIN_COVERAGE,
) -> GlyphBenchmark:
    """:class:`GlyphBenchmark` over the fonts under ``source`` (a folder or one file), memoised per process
    (the last two configurations), so that a training set and its verification pairs, or several runs in one
    process, render once. Font files changed on disk during the process are not noticed."""
    return GlyphBenchmark(_cached_selection(str(source), charset, min_coverage), num_train, num_test,
                          held_out_families, seed, image_size, variants)


# ----------------------------------------------------------------------------------------------------
# Command line: the font report and a montage
# ----------------------------------------------------------------------------------------------------


def montage(bench: GlyphBenchmark, path: str, characters: int = 8, gap: int = 2) -> np.ndarray:
    """Write a PNG grid: rows = training characters, columns = their training images. Returns it (H, W)."""
    imgs = bench.train_images[:characters]
    rows, cols, s = imgs.shape[0], imgs.shape[1], bench.image_size
    grid = np.full((rows * (s + gap) - gap, cols * (s + gap) - gap), 255, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            grid[r * (s + gap):r * (s + gap) + s, c * (s + gap):c * (s + gap) + s] = imgs[r, c]
    save_image(path, grid)
    return grid


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m faceforge.data.glyphs [--fonts DIR] [--montage PNG]``: print the font report."""
    parser = argparse.ArgumentParser(description="Report the glyph benchmark's fonts; optionally write a montage.")
    parser.add_argument("--fonts", default=DEFAULT_FONT_DIR, help="font folder or file")
    parser.add_argument("--charset", default="cjk", choices=sorted(CHARSETS))
    parser.add_argument("--montage", help="write a PNG of 8 training characters x their fonts")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--variants", type=int, default=1)
    args = parser.parse_args(argv)
    selection = _cached_selection(args.fonts, args.charset)
    print(selection.report())
    if args.montage:
        bench = GlyphBenchmark(selection, 8, 2, image_size=args.size, variants=args.variants)
        montage(bench, args.montage)
        print(f"wrote {args.montage}")


if __name__ == "__main__":
    main()
