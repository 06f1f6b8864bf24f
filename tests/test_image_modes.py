"""Every image mode Pillow opens is read at its own range (issue 25.4), EXIF orientation is applied,
transparency is composited on white, animations and decompression bombs are refused (issue 26.5, 26.12).

Each mode's image is made in the test from one hand-made 8-bit picture and compared with that picture
(or with its composite written in float64 here): the decoders of faceforge (``folder.decode_image``,
which the Recognizer, the image folders and the eval sets use, and ``faceforge.data.images``) must give
it back. Integer results are exact (the 16-bit pictures differ from ``257 g`` by less than half a step).
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceforge.data.folder import DatasetError, decode_image

H, W = 24, 32  # not square: a rotation shows in the shape


def grey() -> np.ndarray:
    """The hand-made 8-bit reference picture: a gradient with a bright block and a dark bar."""
    g = (np.add.outer(np.arange(H) * 5, np.arange(W) * 3) % 256).astype(np.uint8)
    g[4:10, 6:14] = 250
    g[15:18, :] = 7
    return g


def rgb() -> np.ndarray:
    g = grey().astype(np.int64)
    return np.stack([g, (255 - g), (g * 7) % 256], axis=2).astype(np.uint8)


def alpha() -> np.ndarray:
    return ((np.arange(W)[None, :] * 8 + np.arange(H)[:, None] * 3) % 256).astype(np.uint8)


def on_white(colour: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The documented composite, in float64: round((c a + 255 (255 - a)) / 255)."""
    c, a = colour.astype(np.float64), a.astype(np.float64)[..., None]
    if c.ndim == 2:
        c = c[..., None]
    out = np.rint((c * a + 255.0 * (255.0 - a)) / 255.0)
    return np.broadcast_to(out, (H, W, 3)).astype(np.uint8)


def as_rgb(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[:, :, None], 3, axis=2)


def saved(tmp_path: Path, im: Image.Image, name: str, **kwargs) -> Path:
    path = tmp_path / name
    im.save(path, **kwargs)
    return path


def sixteen_bit() -> np.ndarray:
    """The same picture at 16 bits: 257 g plus an offset below half a step (128.5), so it rounds back to g."""
    offset = (np.arange(H * W).reshape(H, W) % 201) - 100
    return np.clip(grey().astype(np.int64) * 257 + offset, 0, 65535)


def test_16_bit_grey_png_is_scaled_not_white(tmp_path: Path) -> None:
    path = saved(tmp_path, Image.fromarray(sixteen_bit().astype(np.uint16)), "g16.png")
    assert Image.open(path).mode == "I;16"
    out = decode_image(path)
    assert out.dtype == np.uint8 and out.shape == (H, W, 3)
    np.testing.assert_array_equal(out, as_rgb(grey()))  # the old decoder gave 255 everywhere


def test_16_bit_big_endian_tiff(tmp_path: Path) -> None:
    im = Image.frombytes("I;16B", (W, H), sixteen_bit().astype(">u2").tobytes())
    path = saved(tmp_path, im, "g16b.tif")
    assert Image.open(path).mode == "I;16B"
    np.testing.assert_array_equal(decode_image(path), as_rgb(grey()))


def test_mode_i_from_a_16_bit_pgm(tmp_path: Path) -> None:
    path = saved(tmp_path, Image.fromarray(sixteen_bit().astype(np.uint16)), "g16.pgm")
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(decode_image(path), as_rgb(grey()))


def test_mode_i_outside_16_bits_is_refused_in_one_line(tmp_path: Path) -> None:
    path = saved(tmp_path, Image.fromarray(sixteen_bit().astype(np.int32) - 1000), "neg.tif")
    assert Image.open(path).mode == "I"
    with pytest.raises(DatasetError, match=r"neg\.tif: 32-bit integer \(mode I\) values span -1000\.\.") as e:
        decode_image(path)
    assert "\n" not in str(e.value)


def test_float_mode_in_0_1(tmp_path: Path) -> None:
    noise = ((np.arange(H * W).reshape(H, W) % 9) - 4) * 0.1 / 255  # below half a step
    f = np.clip(grey() / 255.0 + noise, 0, 1).astype(np.float32)
    path = saved(tmp_path, Image.fromarray(f), "f.tif")
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(decode_image(path), as_rgb(grey()))
    path = saved(tmp_path, Image.fromarray(f * 255), "f255.tif")
    with pytest.raises(DatasetError, match=r"f255\.tif: 32-bit float \(mode F\) values must lie in \[0, 1\]"):
        decode_image(path)


@pytest.mark.parametrize("name", ["grey.png", "bilevel.png", "rgb.png", "cmyk.tif", "ycbcr.tif"])
def test_plain_modes(tmp_path: Path, name: str) -> None:
    picture = {"grey.png": Image.fromarray(grey()), "bilevel.png": Image.fromarray(grey()).point(lambda v: 255 * (v > 127)).convert("1"),
               "rgb.png": Image.fromarray(rgb()), "cmyk.tif": Image.fromarray(rgb()).convert("CMYK"),
               "ycbcr.tif": Image.fromarray(rgb()).convert("YCbCr")}[name]
    expected = {"grey.png": as_rgb(grey()), "bilevel.png": as_rgb(np.where(grey() > 127, 255, 0).astype(np.uint8)),
                "rgb.png": rgb(), "cmyk.tif": rgb()}.get(name)
    out = decode_image(saved(tmp_path, picture, name))
    if expected is None:  # YCbCr: Pillow rounds to 8 bits going there and back, 3 levels at most here
        assert np.abs(out.astype(int) - rgb().astype(int)).max() <= 3
    else:
        np.testing.assert_array_equal(out, expected)


def test_rgba_and_la_are_composited_on_white(tmp_path: Path) -> None:
    rgba = np.concatenate([rgb(), alpha()[..., None]], axis=2)
    np.testing.assert_array_equal(decode_image(saved(tmp_path, Image.fromarray(rgba), "rgba.png")),
                                  on_white(rgb(), alpha()))
    la = Image.fromarray(np.stack([grey(), alpha()], axis=2), mode="LA")
    np.testing.assert_array_equal(decode_image(saved(tmp_path, la, "la.png")), on_white(grey(), alpha()))


def test_palette_with_transparency_and_pa(tmp_path: Path) -> None:
    from faceforge.data.images import to_rgb

    palette = np.array([[0, 0, 0], [200, 10, 30], [20, 220, 40], [90, 90, 250]], dtype=np.uint8)
    index = (grey() // 64).astype(np.uint8)
    im = Image.fromarray(index, mode="P")
    im.putpalette(palette.ravel().tolist())
    expected = palette[index]
    expected[index == 0] = 255  # index 0 is transparent: white
    path = saved(tmp_path, im, "p.png", transparency=0)
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    np.testing.assert_array_equal(decode_image(path), expected)  # the old decoder gave black

    pa = im.convert("PA")
    pa.putalpha(Image.fromarray(alpha()))
    np.testing.assert_array_equal(to_rgb(pa), on_white(palette[index], alpha()))


def test_a_pil_image_given_to_the_recognizer_is_read_the_same_way() -> None:
    from faceforge.deploy.inference import load_images

    crops, _, _ = load_images(Image.fromarray(sixteen_bit().astype(np.uint16)).crop((0, 0, H, H)), image_size=H)
    np.testing.assert_array_equal(crops[0], as_rgb(grey()[:, :H]))


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    blocks = np.kron(rgb()[::8, ::8], np.ones((8, 8, 1), np.uint8))  # flat 8x8 blocks: JPEG keeps them
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = saved(tmp_path, Image.fromarray(blocks), "turned.jpg", exif=exif, quality=95, subsampling=0)
    out = decode_image(path)
    from faceforge.data.images import image_size

    assert image_size(path, "turned.jpg") == (H, W)  # the header's size, turned as decoded
    shown = np.rot90(blocks, k=-1)  # what a viewer shows
    assert out.shape == shown.shape == (W, H, 3)  # the old decoder gave (H, W, 3), unrotated
    # JPEG error on flat blocks at quality 95 is a few levels; the unrotated or wrongly turned picture is far
    assert np.abs(out.astype(int) - shown.astype(int)).mean() < 4
    assert np.abs(out.astype(int) - np.rot90(blocks, k=1).astype(int)).mean() > 20


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "TIFF"])
def test_animations_and_multi_page_files_are_refused(tmp_path: Path, fmt: str) -> None:
    frames = [Image.fromarray(rgb()), Image.fromarray(255 - rgb())]
    path = tmp_path / f"moving.{fmt.lower()}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:])
    with pytest.raises(DatasetError, match=rf"moving\.{fmt.lower()}: {fmt} image has several frames"):
        decode_image(path)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """45 bytes: a PNG signature, a header declaring width x height RGB, and the end; no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b"")


def broken_after_idat() -> bytes:
    """A valid PNG with a corrupt iCCP chunk after IDAT (Pillow raises SyntaxError reading it)."""
    buf = io.BytesIO()
    Image.fromarray(rgb()).save(buf, format="PNG")
    good = buf.getvalue()
    end = good.index(b"IEND") - 4
    return good[:end] + png_chunk(b"iCCP", b"x") + good[end:]


@pytest.mark.parametrize("name", ["bomb.png", "broken.png"])
def test_align_detector_and_ijb_loaders_give_one_line(tmp_path: Path, capsys, name: str) -> None:
    from faceforge.cli import main
    from faceforge.data.align import ARCFACE_TEMPLATE
    from faceforge.data.detect import load_rgb
    from faceforge.data.ijb import _load_image

    data = bomb_png() if name == "bomb.png" else broken_after_idat()
    assert len(data) == 45 or name == "broken.png"
    (tmp_path / name).write_bytes(data)
    coords = " ".join(f"{v:.4f}" for v in ARCFACE_TEMPLATE.ravel())
    (tmp_path / "list.txt").write_text(f"{name} {coords}\n")
    assert main(["align", str(tmp_path / "list.txt"), str(tmp_path / "out")]) == 2  # was 1: internal error
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "internal error" not in err
    assert re.match(rf"faceforge align: .*{name}: cannot read image listed in", err)
    if name == "bomb.png":
        assert "400000000 pixels" in err
    else:
        assert "SyntaxError" in err
    assert not (tmp_path / "out" / name).exists()
    for loader in (load_rgb, _load_image):
        with pytest.raises(ValueError, match=re.escape(name)):
            loader(tmp_path / name)


def test_pixel_cap_is_checked_on_the_header() -> None:
    from faceforge.data.images import BadImageError, decode_image as decode, image_size

    assert image_size(bomb_png(3000, 2000), "b") == (3000, 2000)  # a header alone gives the size
    with pytest.raises(BadImageError, match=r"declares 3000x2000 = 6000000 pixels, more than the 1000000"):
        decode(bomb_png(3000, 2000), "b", max_pixels=1_000_000)
