"""One image decoder: encoded bytes, an image file or a PIL image -> uint8 RGB ``(H, W, 3)``.

Every reader of faceforge (image folders, ``.bin`` pair sets, RecordIO, ``pack``, ``align``, the
detector, IJB, ``Recognizer``) decodes through :func:`decode_image` (or :func:`to_rgb` for an image
already open), so every one of them reads an image the same way:

* **the header first**: :func:`open_image` reads only the header, then refuses, before any pixel is
  decoded, an image of more than ``max_pixels`` pixels (default :data:`MAX_PIXELS`, Pillow's own
  warning threshold, 89,478,485 pixels = 256 MiB as RGB; a decompression bomb is one line) and an
  animation or multi-page file (an animated GIF/PNG/WebP, a multi-page TIFF), which has no one
  picture to read. A JPEG that Pillow opens as MPO (a camera's primary image + previews) is read as its
  primary image, as every viewer shows it. :func:`image_size` gives ``(width, height)`` from the header
  alone, so a caller can compare it with the size it expects before decoding anything.
* **EXIF orientation** is applied (``ImageOps.exif_transpose``), so a photo comes out the way a
  viewer shows it.
* **every mode** is read at its own range, never clipped:

  - ``1``, ``L``, ``P``, ``RGB``, ``RGBX``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's
    ``convert("RGB")`` (CMYK by Pillow's formula, no ICC profile);
  - ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit grey): ``round(v * 255 / 65535)``;
  - ``I`` (32-bit int): taken as 16-bit grey (Pillow's mode for 16-bit PGM/TIFF data),
    ``round(v * 255 / 65535)``; a value outside ``0..65535`` is refused (its range is unknown);
  - ``F`` (32-bit float): range ``[0, 1]``, ``round(v * 255)``; a value outside it (or NaN) is refused;
  - ``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``, and ``P``/``L``/``RGB`` with a ``transparency`` colour:
    composited on :data:`BACKGROUND` (white, what a viewer shows on a page),
    ``round((c a + 255 (255 - a)) / 255)`` per channel ``c`` and alpha ``a``.

  Any other mode is refused with one line naming it.

A bad image raises ``error`` (default :class:`BadImageError`, a ``ValueError``) with a one-line message
that starts with ``where``; Pillow's many exception types (``OSError``, ``SyntaxError``,
``struct.error``, ``DecompressionBombError``, ...) all become that.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = ["BACKGROUND", "MAX_PIXELS", "BadImageError", "decode_image", "image_size", "open_image", "to_rgb"]

MAX_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS: 1 GiB / 4 / 3, i.e. 256 MiB of RGB pixels
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white

_PLAIN = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_SIXTEEN = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")
_FIRST_FRAME_FORMATS = ("MPO",)  # a camera JPEG with previews: frame 0 is the picture
_OPEN_LOCK = threading.Lock()  # warnings.catch_warnings is process-wide: one header read at a time


class BadImageError(ValueError):
    """An image that cannot be read: bad bytes, too many pixels, several frames or an unsupported mode."""


def _brief(text: Any, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cannot(where: str, source: Any, e: BaseException) -> str:
    size = f" ({len(source)} bytes)" if isinstance(source, (bytes, bytearray, memoryview)) else ""
    return f"{where}: cannot decode image{size}: {type(e).__name__}: {_brief(e)}"


def open_image(source: bytes | bytearray | memoryview | str | os.PathLike, where: str,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open ``source`` (encoded bytes or a file path) reading only its header, and check it.

    Returns the open (lazy) PIL image; use it as a context manager. Raises :class:`BadImageError`
    naming ``where`` for a missing or unreadable file, bytes that are no image, more than
    ``max_pixels`` pixels, a zero-sized image, or several frames (animation, multi-page file).
    """
    fp: Any = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own cap below
            im = Image.open(fp)
    except FileNotFoundError:
        raise BadImageError(f"{where}: image file not found") from None
    except Image.DecompressionBombError as e:
        raise BadImageError(f"{where}: refused before decoding: {_brief(e)} (at most {max_pixels} pixels)") from None
    except Exception as e:  # Pillow raises many types for bad data (OSError, SyntaxError, struct.error, ...)
        raise BadImageError(_cannot(where, source, e)) from None
    try:
        _check_header(im, where, max_pixels)
    except BaseException:
        im.close()
        raise
    return im


def _check_header(im: Image.Image, where: str, max_pixels: int) -> None:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise BadImageError(f"{where}: image is {w}x{h}; expected at least one pixel")
    if w * h > max_pixels:
        raise BadImageError(f"{where}: image declares {w}x{h} = {w * h} pixels, more than the {max_pixels} "
                            "allowed here; refused before decoding (a decompression bomb, or not a face crop)")
    try:
        several = bool(getattr(im, "is_animated", False))
    except Exception as e:
        raise BadImageError(f"{where}: cannot read its frames: {type(e).__name__}: {_brief(e)}") from None
    if several and im.format not in _FIRST_FRAME_FORMATS:
        raise BadImageError(f"{where}: {im.format} image has several frames (an animation or a multi-page file); "
                            "expected one still image")


def image_size(source: bytes | bytearray | memoryview | str | os.PathLike, where: str,
               max_pixels: int = MAX_PIXELS, error: type[Exception] = BadImageError) -> tuple[int, int]:
    """``(width, height)`` from the header alone (nothing decoded), with :func:`open_image`'s checks: the
    size :func:`decode_image` gives, swapped for an EXIF orientation of 5 to 8 that the header carries (a
    JPEG's; a PNG's eXIf chunk after the pixels is not read here)."""
    try:
        with open_image(source, where, max_pixels) as im:
            w, h = im.size
            try:
                turned = im.getexif().get(0x0112) in (5, 6, 7, 8)
            except Exception:  # a corrupt EXIF block: decode_image names it
                turned = False
            return (h, w) if turned else (w, h)
    except BadImageError as e:
        raise error(str(e)) from None


def decode_image(source: bytes | bytearray | memoryview | str | os.PathLike, where: str,
                 max_pixels: int = MAX_PIXELS, error: type[Exception] = BadImageError) -> np.ndarray:
    """Decode encoded bytes or an image file -> uint8 RGB ``(H, W, 3)`` (see the module docstring).

    ``where`` names the image in messages; ``error`` is the exception type raised (its message is one
    line starting with ``where``).
    """
    try:
        with open_image(source, where, max_pixels) as im:
            try:
                im.load()
            except Exception as e:
                raise BadImageError(_cannot(where, source, e)) from None
            return to_rgb(im, where)
    except BadImageError as e:
        raise error(str(e)) from None


def to_rgb(im: Image.Image, where: str = "image", error: type[Exception] = BadImageError) -> np.ndarray:
    """A PIL image -> uint8 RGB ``(H, W, 3)``: EXIF orientation applied, every mode at its own range."""
    try:
        try:
            im = ImageOps.exif_transpose(im)
            return np.ascontiguousarray(_rgb_of_mode(im, where))
        except BadImageError:
            raise
        except Exception as e:  # corrupt EXIF, truncated data met late, ...
            raise BadImageError(_cannot(where, None, e)) from None
    except BadImageError as e:
        raise error(str(e)) from None


def _grey(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[:, :, None], 3, axis=2)


def _rgb_of_mode(im: Image.Image, where: str) -> np.ndarray:
    mode = im.mode
    if mode in _ALPHA or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint32)
        alpha = rgba[:, :, 3:]
        bg = np.asarray(BACKGROUND, dtype=np.uint32)
        return ((rgba[:, :, :3] * alpha + bg * (255 - alpha) + 127) // 255).astype(np.uint8)
    if mode in _PLAIN:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if mode in _SIXTEEN or mode == "I":
        a = np.asarray(im)
        if mode == "I" and a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise BadImageError(f"{where}: 32-bit integer (mode I) values span {int(a.min())}..{int(a.max())}; "
                                "expected 16-bit grey values in 0..65535 (convert the image to 8 or 16 bits)")
        return _grey(((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8))
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
            raise BadImageError(f"{where}: 32-bit float (mode F) values must lie in [0, 1], got "
                                f"{np.nanmin(a):.6g}..{np.nanmax(a):.6g}" + ("" if np.isfinite(a).all() else " and NaN/inf"))
        return _grey(np.rint(a * 255).astype(np.uint8))
    raise BadImageError(f"{where}: image mode {mode!r} is not supported; expected one of "
                        f"{', '.join(_PLAIN + _SIXTEEN + ('I', 'F') + _ALPHA)}")
