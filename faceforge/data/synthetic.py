"""Built-in synthetic face identities: procedurally rendered, aligned, deterministic face-like images.

Each identity is a fixed random parameter vector (:class:`Identity`): face shape, skin tone, eyes,
brows, nose, mouth, ears, hair, facial hair, moles. Each image of an identity adds nuisances drawn
from its own random stream: pose (yaw/pitch as feature shifts and foreshortening, roll/scale/shift as
a 2-D warp), expression (smile, open mouth, eye closure, brow raise, gaze), illumination (directional
shading on an ellipsoid face, gain, colour cast), occluders (glasses, hat, hand or bar, patches),
background clutter, blur and noise. ``difficulty`` scales every nuisance magnitude (0 = a clean frontal
face on a plain background).

Faces are rendered aligned: at difficulty 0 the five landmarks (eye centres, nose tip, mouth corners)
sit exactly at the ArcFace template (:func:`faceforge.data.align.template_for_size`) for every identity;
identities differ in everything drawn around them. Above difficulty 0, yaw and pitch move the landmarks
(foreshortening and depth parallax), then a known similarity (roll, scale about the centre, shift) maps
the canonical frame to the output; ``render_images(..., return_landmarks=True)`` returns where the
landmarks ended up.

The image for ``(seed, split, identity, sample, difficulty, image_size)`` is always the same byte for
byte: every identity and every image has its own ``numpy.random.SeedSequence`` keyed by those integers,
so order, batching and workers do not matter, and the splits are disjoint by construction.

Rendering is vectorised over a batch of images with numpy (no per-pixel Python loops); small features
are evaluated only inside their bounding window. Coordinates are in *template units*: pixels of the
112x112 crop, whatever the output size (output pixel ``j`` sits at ``j * 112 / size``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from faceforge.data.align import ARCFACE_TEMPLATE, TEMPLATE_SIZE
from faceforge.data.transforms import to_tensor
from faceforge.core.fileio import save_image

__all__ = [
    "SPLITS",
    "Identity",
    "identity_params",
    "render_images",
    "SyntheticFaces",
    "synthetic_pairs",
    "montage",
]

# Each split draws identities from its own seed stream, so train and test never share one.
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
# Domain tags keep the identity, image and pair streams apart for the same integers.
_TAG_IDENTITY, _TAG_IMAGE, _TAG_PAIRS = 1, 2, 3
_BATCH_PIXELS = 64 * 112 * 112  # pixels rendered together: bigger batches at small sizes (numpy call overhead)
_NOISE_BANK = 384  # side of the fixed noise texture that images crop their pixel noise from
_CX, _CY = 56.0, 56.0  # centre of the crop, template units

_SKIN_LIGHT = np.array([236.0, 200.0, 172.0])
_SKIN_DARK = np.array([92.0, 60.0, 42.0])
_HAIR = np.array(
    [[25, 20, 18], [70, 45, 30], [120, 80, 45], [200, 165, 100], [150, 70, 35], [160, 160, 160], [45, 35, 30]],
    dtype=np.float64,
)
_IRIS = np.array([[70, 45, 25], [60, 100, 150], [70, 110, 70], [110, 110, 115], [120, 90, 40]], dtype=np.float64)
# Depth (template units, towards the camera) of each landmark: yaw/pitch move near points further.
_LANDMARK_DEPTH = np.array([10.0, 10.0, 22.0, 9.0, 9.0])


# ----------------------------------------------------------------------------------------------------
# Identities
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """The fixed appearance of one synthetic person. Lengths in template units, colours RGB 0..255."""

    face_dx: float  # face-oval centre x offset
    face_cy: float  # face-oval centre y
    face_w: float  # half-width
    face_h: float  # half-height
    jaw: float  # 0 = oval, 1 = pointed chin
    skin: tuple[float, float, float]
    eye_rx: float
    eye_ry: float
    eye_tilt: float  # radians, mirrored for the right eye
    iris_r: float
    iris: tuple[float, float, float]
    brow_gap: float  # brow height above the eye centre
    brow_len: float  # half-length
    brow_thick: float
    brow_tilt: float  # slope, mirrored
    brow_arch: float
    brow_dx: float  # horizontal offset from the eye centre (outwards)
    nose_len: float
    nose_w: float
    nostril: float
    lip_up: float
    lip_low: float
    lip: tuple[float, float, float]
    ear: float  # half-height of the ears
    hair: tuple[float, float, float]
    hairline: float  # y of the hairline at the centre
    hair_curve: float
    hair_long: float  # 0/1: hair falls behind the head down to the shoulders
    hair_density: float  # 0.25 (shaved) .. 1
    fringe: float  # amplitude of a jagged fringe
    fringe_phase: float
    beard: float  # 0 = none, else the beard's opacity
    moles: tuple[float, ...]  # 4 x (x, y, radius, present)


def _sample_identity(rng: np.random.Generator) -> Identity:
    u = rng.random
    tone = u()
    skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * tone + rng.normal(0.0, 10.0, 3)
    hair = _HAIR[rng.integers(len(_HAIR))] + rng.normal(0.0, 12.0, 3)
    iris = _IRIS[rng.integers(len(_IRIS))] + rng.normal(0.0, 12.0, 3)
    lip = skin * np.array([0.85, 0.55, 0.55]) + rng.normal(0.0, 10.0, 3)
    moles = []
    for _ in range(4):
        moles += [u() * 2 - 1, u() * 1.2 - 0.2, 0.7 + 1.1 * u(), float(u() < 0.4)]
    return Identity(
        face_dx=rng.normal(0.0, 1.0),
        face_cy=56.0 + rng.normal(0.0, 2.5),
        face_w=37.0 + 9.0 * u(),
        face_h=52.0 + 9.0 * u(),
        jaw=0.6 * u(),
        skin=tuple(np.clip(skin, 20, 250).tolist()),
        eye_rx=5.5 + 3.5 * u(),
        eye_ry=2.2 + 2.4 * u(),
        eye_tilt=rng.normal(0.0, 0.12),
        iris_r=2.0 + 1.6 * u(),
        iris=tuple(np.clip(iris, 10, 240).tolist()),
        brow_gap=7.0 + 6.0 * u(),
        brow_len=7.0 + 5.0 * u(),
        brow_thick=1.3 + 3.0 * u(),
        brow_tilt=rng.normal(0.0, 0.18),
        brow_arch=4.0 * u(),
        brow_dx=rng.normal(0.0, 1.5),
        nose_len=11.0 + 10.0 * u(),
        nose_w=5.0 + 5.0 * u(),
        nostril=1.0 + 1.0 * u(),
        lip_up=1.2 + 2.8 * u(),
        lip_low=1.5 + 3.5 * u(),
        lip=tuple(np.clip(lip, 10, 250).tolist()),
        ear=6.0 + 5.0 * u(),
        hair=tuple(np.clip(hair, 5, 250).tolist()),
        hairline=8.0 + 22.0 * u(),
        hair_curve=-4.0 + 16.0 * u(),
        hair_long=float(u() < 0.4),
        hair_density=1.0 if u() < 0.85 else 0.3,
        fringe=3.5 * u() if u() < 0.35 else 0.0,
        fringe_phase=2 * np.pi * u(),
        beard=0.6 + 0.35 * u() if u() < 0.2 else 0.0,
        moles=tuple(moles),
    )


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[split]


def _check_nonneg_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


@functools.lru_cache(maxsize=65536)
def identity_params(seed: int, split: str, identity: int) -> Identity:
    """The :class:`Identity` of person ``identity`` of ``split`` under ``seed`` (deterministic, cached)."""
    code = _check_split(split)
    seq = np.random.SeedSequence([_check_nonneg_int("seed", seed), _TAG_IDENTITY, code,
                                  _check_nonneg_int("identity", identity)])
    return _sample_identity(np.random.default_rng(seq))


# ----------------------------------------------------------------------------------------------------
# Per-image nuisances (raw draws; the renderer scales them by the difficulty)
# ----------------------------------------------------------------------------------------------------

_NORMALS = ("yaw", "pitch", "roll", "scale", "dx", "dy", "brow_raise", "gaze_x", "gaze_y", "smile",
            "gain", "cast_r", "cast_g", "cast_b", "bg_r", "bg_g", "bg_b")
_UNIFORMS = ("open", "open_p", "closure", "closure_p", "light_angle", "light_strength", "blur", "blur_p",
             "noise", "glasses_p", "glasses_x", "glasses_y", "sunglasses_p", "hat_p", "hat_y", "bar_p",
             "bar_x", "bar_y", "bar_angle", "bar_w", "bar_skin", "patch1_p", "patch2_p", "clutter")
_N_BG = 4 * 4 * 3 + 2 * 8  # a 4x4 colour field and two background rectangles
_N_PATCH = 2 * 7


def _draw_image(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every random number one image needs, in a fixed order that does not depend on the difficulty."""
    draws = {name: v for name, v in zip(_NORMALS, rng.standard_normal(len(_NORMALS)))}
    draws.update(zip(_UNIFORMS, rng.random(len(_UNIFORMS))))
    draws["colours"] = rng.random(12)  # glasses, hat, bar, spare
    draws["bg"] = rng.random(_N_BG)
    draws["patches"] = rng.random(_N_PATCH)
    draws["noise_at"] = rng.random(3)  # crop offset (x, y) and sign of the noise texture
    return draws


@functools.lru_cache(maxsize=4)
def _noise_bank(side: int) -> np.ndarray:
    """A fixed standard-normal texture (3, side, side); images take random crops (cheaper than fresh noise)."""
    return np.random.default_rng(20261123).standard_normal((3, side, side), dtype=np.float32)


def _image_rng(seed: int, split_code: int, identity: int, sample: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _TAG_IMAGE, split_code, identity, sample]))


# ----------------------------------------------------------------------------------------------------
# Drawing primitives on a batch (B, h, w, 3) in template units
# ----------------------------------------------------------------------------------------------------


def _col(a: np.ndarray) -> np.ndarray:
    """(B,) -> (B, 1, 1) for broadcasting over a window."""
    return np.asarray(a, dtype=np.float32)[:, None, None]


def _smooth(signed: np.ndarray, aa: float) -> np.ndarray:
    """Coverage from a signed inside-distance (template units; > 0 inside), anti-aliased over one pixel."""
    return np.clip(signed * (1.0 / aa) + 0.5, 0.0, 1.0)


def _paint(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-blend ``colour (B, 3)`` into ``img (B, 3, h, w)`` in place with coverage ``alpha (B, h, w)``."""
    diff = np.subtract(colour[:, :, None, None].astype(np.float32), img)
    diff *= alpha[:, None]
    img += diff


def _darken(img: np.ndarray, alpha: np.ndarray, amount: float | np.ndarray) -> None:
    img *= (1.0 - alpha * amount)[:, None]


def _ellipse(x: np.ndarray, y: np.ndarray, cx, cy, rx, ry, aa: float, angle=None) -> np.ndarray:
    """Coverage of ellipses centred ``(cx, cy)`` with radii ``(rx, ry)`` ((B,1,1) each), optionally rotated."""
    dx, dy = x - cx, y - cy
    if angle is not None:
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = dx * c + dy * s, dy * c - dx * s
    q = (dx / rx) ** 2 + (dy / ry) ** 2
    return _smooth((1.0 - q) * (0.5 * np.minimum(rx, ry)), aa)


class _Canvas:
    """The batch image plus its coordinate axes; ``window`` yields views over the box features can touch."""

    def __init__(self, batch: int, size: int) -> None:
        self.size = size
        self.aa = TEMPLATE_SIZE / size  # one output pixel, in template units
        axis = (np.arange(size, dtype=np.float32) * self.aa).astype(np.float32)
        self.xs = axis[None, None, :]
        self.ys = axis[None, :, None]
        self.img = np.empty((batch, 3, size, size), dtype=np.float32)  # channels first: fast broadcasting

    def _range(self, lo: np.ndarray, hi: np.ndarray) -> slice:
        a = int(np.floor(np.min(lo) / self.aa)) - 1
        b = int(np.ceil(np.max(hi) / self.aa)) + 2
        return slice(min(max(a, 0), self.size), min(max(b, 0), self.size))

    def subset(self, idx: np.ndarray) -> "_Canvas":
        """A canvas holding a copy of images ``idx`` (write it back with ``cv.img[idx] = sub.img``)."""
        sub = object.__new__(_Canvas)
        sub.size, sub.aa, sub.xs, sub.ys, sub.img = self.size, self.aa, self.xs, self.ys, self.img[idx]
        return sub

    def box(self, x0, x1, y0, y1) -> tuple[slice, slice]:
        """Pixel (rows, cols) slices covering ``[x0, x1] x [y0, y1]`` (template units, per image) for the whole batch."""
        return self._range(y0, y1), self._range(x0, x1)

    def window(self, x0, x1, y0, y1):
        """(img view, x, y) for the box ``[x0, x1] x [y0, y1]`` (template units, per image; union over batch)."""
        sy, sx = self.box(x0, x1, y0, y1)
        return self.img[:, :, sy, sx], self.xs[:, :, sx], self.ys[:, sy, :]


# ----------------------------------------------------------------------------------------------------
# The renderer
# ----------------------------------------------------------------------------------------------------


def _stack_identities(ids: Sequence[Identity]) -> dict[str, np.ndarray]:
    return {f.name: np.array([getattr(p, f.name) for p in ids], dtype=np.float64) for f in dataclasses.fields(Identity)}


def _stack_draws(draws: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.array([d[k] for d in draws], dtype=np.float64) for k in draws[0]}


def _nuisances(r: dict[str, np.ndarray], d: float) -> dict[str, np.ndarray]:
    """Raw draws -> nuisance magnitudes at difficulty ``d`` (0 = none). Angles in radians."""
    on = lambda p, rate: (p < min(rate * d, 0.95)).astype(np.float64)  # noqa: E731  (event probability)
    return {
        "yaw": np.clip(0.30 * d * r["yaw"], -1.0, 1.0),
        "pitch": np.clip(0.18 * d * r["pitch"], -0.7, 0.7),
        "roll": np.clip(0.12 * d * r["roll"], -0.6, 0.6),
        "scale": np.exp(np.clip(0.07 * d * r["scale"], -0.4, 0.4)),
        "dx": 3.0 * d * r["dx"],
        "dy": 3.0 * d * r["dy"],
        "smile": np.clip(0.5 * d * r["smile"], -0.6, 1.5),
        "open": on(r["open_p"], 0.3) * 4.0 * d * r["open"],
        "closure": on(r["closure_p"], 0.15) * np.clip(d * r["closure"], 0.0, 0.9),
        "brow_raise": 1.5 * d * r["brow_raise"],
        "gaze_x": np.clip(0.8 * d * r["gaze_x"], -2.0, 2.0),
        "gaze_y": np.clip(0.4 * d * r["gaze_y"], -1.0, 1.0),
        "light_angle": 2 * np.pi * r["light_angle"],
        "light": np.minimum(0.8 * d * r["light_strength"], 0.95),
        "gain": np.exp(np.clip(0.25 * d * r["gain"], -0.9, 0.9)),
        "cast": np.exp(np.clip(0.08 * d * np.stack([r["cast_r"], r["cast_g"], r["cast_b"]], 1), -0.5, 0.5)),
        "bg": 128.0 + np.clip(45.0 * d * np.stack([r["bg_r"], r["bg_g"], r["bg_b"]], 1), -120, 120),
        "clutter": np.minimum(d, 1.5) * r["clutter"],
        "blur": on(r["blur_p"], 0.5) * 1.6 * d * r["blur"],  # gaussian sigma at 112 px
        "noise": 8.0 * d * r["noise"],  # std, grey levels
        "glasses": on(r["glasses_p"], 0.25),
        "hat": on(r["hat_p"], 0.15),
        "bar": on(r["bar_p"], 0.15),
        "patch1": on(r["patch1_p"], 0.2),
        "patch2": on(r["patch2_p"], 0.1),
    }


def _posed_landmarks(P: dict[str, np.ndarray], N: dict[str, np.ndarray]) -> np.ndarray:
    """Landmarks (B, 5, 2) in the canonical frame after yaw/pitch (foreshortening + depth parallax).

    Written as template + displacement so that zero yaw and pitch give the template bit for bit.
    """
    t = ARCFACE_TEMPLATE[None]
    yaw, pitch = N["yaw"][:, None], N["pitch"][:, None]
    x = t[..., 0] + (t[..., 0] - _CX) * (np.cos(yaw) - 1.0) + _LANDMARK_DEPTH * np.sin(yaw)
    y = t[..., 1] + (t[..., 1] - _CY) * (np.cos(pitch) - 1.0) + _LANDMARK_DEPTH * np.sin(pitch)
    return np.stack([x, y], -1)


def _warp_matrix(N: dict[str, np.ndarray]) -> np.ndarray:
    """Forward similarity (B, 2, 3) canonical -> output, template units: roll, scale about the centre, shift."""
    c, s, k = np.cos(N["roll"]), np.sin(N["roll"]), N["scale"]
    a = np.stack([np.stack([k * c, -k * s], -1), np.stack([k * s, k * c], -1)], -2)  # (B, 2, 2)
    centre = np.array([_CX, _CY])
    t = centre - a @ centre + np.stack([N["dx"], N["dy"]], -1)
    return np.concatenate([a, t[..., None]], -1)


def _draw_background(cv: _Canvas, N, R) -> None:
    b = len(N["bg"])
    field = (R["bg"][:, :48].reshape(b, 3, 4, 4) - 0.5) * 160.0 * N["clutter"][:, None, None, None]
    field += N["bg"][:, :, None, None]
    # A smooth colour field: the 4x4 grid upsampled bilinearly.
    smooth = torch.nn.functional.interpolate(torch.from_numpy(field.astype(np.float32)), size=(cv.size, cv.size),
                                             mode="bilinear", align_corners=True)
    cv.img[:] = smooth.numpy()
    rects = R["bg"][:, 48:].reshape(b, 2, 8)
    for i in range(b):  # two background rectangles per image (slicing only)
        for r in rects[i]:
            if r[0] > N["clutter"][i] * 0.9:
                continue
            x0, y0 = int(r[1] * cv.size), int(r[2] * cv.size)
            w, h = int((0.1 + 0.4 * r[3]) * cv.size), int((0.1 + 0.4 * r[4]) * cv.size)
            cv.img[i, :, y0:y0 + h, x0:x0 + w] = r[5:8, None, None] * 255.0


def _draw_head(cv: _Canvas, P, N, lm) -> None:
    aa = cv.aa
    skin, hair = P["skin"], P["hair"]
    fcx = _col(_CX + P["face_dx"] - 6.0 * np.sin(N["yaw"]))
    fcy = _col(P["face_cy"] - 4.0 * np.sin(N["pitch"]))
    fw, fh, jaw = _col(P["face_w"]), _col(P["face_h"]), _col(P["jaw"])
    img, x, y = cv.img, cv.xs, cv.ys
    # Long hair behind the head.
    long = P["hair_long"] * P["hair_density"]
    if long.any():
        back = _smooth(np.minimum(fw + 9.0 - np.abs(x - fcx), y - (fcy - fh * 0.6)), aa)
        _paint(img, back * _col(long), hair)
    # Ears, behind the face oval.
    ear_y = 0.5 * (lm[:, 0, 1] + lm[:, 2, 1])
    for side in (-1.0, 1.0):
        ex = _CX + P["face_dx"] + side * (P["face_w"] - 0.5) - 10.0 * np.sin(N["yaw"])
        win, wx, wy = cv.window(ex - 4.5, ex + 4.5, ear_y - P["ear"] - 1.0, ear_y + P["ear"] + 1.0)
        _paint(win, _ellipse(wx, wy, _col(ex), _col(ear_y), 3.5, _col(P["ear"]), aa), skin * 0.9)
    # Face oval narrowing towards the chin.
    below = np.clip((y - fcy) / fh, 0.0, 1.0)
    w = fw * (1.0 - jaw * below**2)
    q = ((x - fcx) / w) ** 2 + ((y - fcy) / fh) ** 2
    face = _smooth((1.0 - q) * (0.5 * w), aa)
    _paint(img, face, skin)
    # Beard: the face below the nose.
    if P["beard"].any():
        sy, sx = cv.box(np.zeros(1), np.full(1, 112.0), lm[:, 2, 1] + 3.0, np.full(1, 112.0))
        beard = face[:, sy, sx] * _smooth(y[:, sy] - _col(lm[:, 2, 1] + 4.0), aa) * _col(P["beard"])
        _paint(img[:, :, sy, sx], beard, hair)
    # Moles.
    moles = P["moles"].reshape(-1, 4, 4)
    for k in range(4):
        mx, my, mr, present = (moles[:, k, j] for j in range(4))
        if present.any():
            px = fcx[:, 0, 0] + mx * 0.7 * P["face_w"]
            py = fcy[:, 0, 0] + my * 0.7 * P["face_h"]
            sy, sx = cv.box(px - mr - 1.0, px + mr + 1.0, py - mr - 1.0, py + mr + 1.0)
            m = _ellipse(x[:, :, sx], y[:, sy], _col(px), _col(py), _col(mr), _col(mr), aa)
            _darken(img[:, :, sy, sx], m * face[:, sy, sx], _col(0.55 * present))
    # Hair over the top of the head, above a (possibly jagged) hairline.
    lowest = P["hairline"] + 1.3 * np.maximum(P["hair_curve"], 0.0) + P["fringe"] + 2.0
    sy, _ = cv.box(np.zeros(1), np.zeros(1), np.zeros(1), lowest)
    x, y = cv.xs, cv.ys[:, sy]
    line = _col(P["hairline"]) + _col(P["hair_curve"]) * ((x - fcx) / fw) ** 2 \
        + _col(P["fringe"]) * np.sin(x * 1.3 + _col(P["fringe_phase"]))
    cap = _ellipse(x, y, fcx, fcy - 2.0, fw + 3.0, fh + 4.0, aa) * _smooth(line - y, aa)
    _paint(img[:, :, sy], cap * _col(P["hair_density"]), hair)


def _draw_eyes(cv: _Canvas, P, N, lm) -> None:
    aa = cv.aa
    foreshorten = np.cos(N["yaw"])
    rx = P["eye_rx"] * foreshorten
    ry = P["eye_ry"] * (1.0 - N["closure"]) + 0.3
    for k, side in ((0, -1.0), (1, 1.0)):
        ex, ey = lm[:, k, 0], lm[:, k, 1]
        reach = np.maximum(P["brow_len"], P["eye_rx"]) + np.abs(P["brow_dx"]) + 3.0
        top = ey - P["brow_gap"] - np.abs(N["brow_raise"]) - P["brow_arch"] - P["brow_thick"] - 2.0
        img, x, y = cv.window(ex - reach, ex + reach, top, ey + P["eye_ry"] + 3.0)
        cx, cy, tilt = _col(ex), _col(ey), _col(side * P["eye_tilt"])
        lash = _ellipse(x, y, cx, cy, _col(rx + 0.9), _col(ry + 0.9), aa, tilt)
        _paint(img, lash, P["hair"] * 0.4 + 10.0)
        white = _ellipse(x, y, cx, cy, _col(rx), _col(ry), aa, tilt)
        _paint(img, white, np.full((len(ex), 3), (236.0, 234.0, 226.0)))
        ix, iy = cx + _col(N["gaze_x"]), cy + _col(N["gaze_y"])
        ir = _col(P["iris_r"])
        _paint(img, _ellipse(x, y, ix, iy, ir, ir, aa) * white, P["iris"])
        _paint(img, _ellipse(x, y, ix, iy, ir * 0.45, ir * 0.45, aa) * white, np.full((len(ex), 3), 15.0))
        # Brow: a curved band of the hair colour above the eye.
        bx = cx + _col(side * P["brow_dx"])
        by = cy - _col(P["brow_gap"] + N["brow_raise"])
        u = (x - bx) / _col(P["brow_len"])
        centre = by - _col(P["brow_arch"]) * (1.0 - u**2) + _col(side * P["brow_tilt"]) * (x - bx)
        band = _smooth(np.minimum(_col(P["brow_thick"] * 0.5) - np.abs(y - centre),
                                  (1.0 - np.abs(u)) * _col(P["brow_len"])), aa)
        _paint(img, band, P["hair"] * 0.75)


def _draw_nose(cv: _Canvas, P, N, lm) -> None:
    aa = cv.aa
    nx, ny = lm[:, 2, 0], lm[:, 2, 1]
    half = 0.5 * P["nose_w"] * np.cos(N["yaw"])
    img, x, y = cv.window(nx - half - 4.0, nx + half + 4.0, ny - P["nose_len"] - 1.0, ny + 5.0)
    cx, cy, hw = _col(nx), _col(ny), _col(half)
    # Side shadows of the nose bridge, stronger on the side turned away.
    ridge = _smooth(np.minimum(0.8 - np.abs(np.abs(x - cx) - hw * 0.8), np.minimum(y - (cy - _col(P["nose_len"])), cy - y)), aa)
    _darken(img, ridge, 0.18)
    tip = _ellipse(x, y, cx, cy, hw * 0.7 + 0.5, _col(0.4 * P["nose_w"] + 0.5), aa)
    _darken(img, tip, -0.08)
    for side in (-1.0, 1.0):
        nost = _ellipse(x, y, cx + side * hw, cy + 1.5, _col(1.6 * P["nostril"]), _col(1.0 * P["nostril"]), aa)
        _darken(img, nost, 0.55)


def _draw_mouth(cv: _Canvas, P, N, lm) -> None:
    aa = cv.aa
    (lx, ly), (rx, ry) = lm[:, 3].T, lm[:, 4].T
    lips = P["lip_up"] + P["lip_low"] + N["open"]
    smile = N["smile"] * 3.0
    img, x, y = cv.window(lx - 2.0, rx + 2.0, np.minimum(ly, ry) - lips - np.abs(smile) - 2.0,
                          np.maximum(ly, ry) + lips + np.abs(smile) + 2.0)
    cx, cy, hw = _col(0.5 * (lx + rx)), _col(0.5 * (ly + ry)), _col(0.5 * (rx - lx))
    u = (x - cx) / hw
    t = np.clip(1.0 - u**2, 0.0, 1.0)
    s = np.sqrt(t)
    mid = cy + _col((ry - ly) * 0.5) * u + _col(smile) * t  # corners stay on the landmarks
    half_open = _col(0.5 * N["open"]) * s
    top, bottom = mid - half_open - _col(P["lip_up"]) * s, mid + half_open + _col(P["lip_low"]) * s
    inside = _smooth(np.minimum(np.minimum(y - top, bottom - y), (1.0 - np.abs(u)) * hw), aa)
    _paint(img, inside, P["lip"])
    gap = _smooth(np.minimum(np.minimum(y - (mid - half_open), (mid + half_open) - y) + 0.4, (1.0 - np.abs(u)) * hw), aa)
    _darken(img, gap, 0.75)


def _glasses(cv: _Canvas, R, lm, colours) -> None:
    aa = cv.aa
    grx, gry = 9.0 + 3.0 * R["glasses_x"], 6.0 + 3.0 * R["glasses_y"]
    frame = colours[:, 0] * 0.5
    sunglasses = _col((R["sunglasses_p"] < 0.3) * 0.85)
    ey = 0.5 * (lm[:, 0, 1] + lm[:, 1, 1])
    win, wx, wy = cv.window(lm[:, 0, 0] - grx - 2, lm[:, 1, 0] + grx + 2, ey - gry - 2, ey + gry + 2)
    for k in (0, 1):
        ring = _ellipse(wx, wy, _col(lm[:, k, 0]), _col(lm[:, k, 1]), _col(grx), _col(gry), aa)
        inner = _ellipse(wx, wy, _col(lm[:, k, 0]), _col(lm[:, k, 1]), _col(grx - 1.2), _col(gry - 1.2), aa)
        _paint(win, inner * sunglasses, frame * 0.4)
        _paint(win, ring - inner, frame)
    between = np.minimum(wx - _col(lm[:, 0, 0] + grx), _col(lm[:, 1, 0] - grx) - wx) + 1.0
    _paint(win, _smooth(np.minimum(0.7 - np.abs(wy - _col(ey - 1.0)), between), aa), frame)


def _hat(cv: _Canvas, R, lm, colours) -> None:
    hy = 6.0 + 22.0 * R["hat_y"]
    b = len(hy)
    win, wx, wy = cv.window(np.zeros(b), np.full(b, 112.0), np.zeros(b), hy + 6.0)
    _paint(win, _smooth(_col(hy) + 3.0 - np.abs(wx - _CX) * 0.08 - wy, cv.aa), colours[:, 1])


def _bar(cv: _Canvas, R, lm, colours) -> None:
    """A hand-coloured or coloured band across the image (a hand, a microphone, a bar)."""
    ang = np.pi * R["bar_angle"]
    px, py = 20.0 + 72.0 * R["bar_x"], 40.0 + 60.0 * R["bar_y"]
    dist = (cv.xs - _col(px)) * _col(np.sin(ang)) - (cv.ys - _col(py)) * _col(np.cos(ang))
    bar = _smooth(_col(5.0 + 10.0 * R["bar_w"]) - np.abs(dist), cv.aa)
    tone = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * R["bar_skin"][:, None]
    _paint(cv.img, bar, np.where((R["bar_skin"] < 0.6)[:, None], tone, colours[:, 2]))


_OCCLUDERS = {"glasses": _glasses, "hat": _hat, "bar": _bar}


def _draw_occluders(cv: _Canvas, N, R, lm) -> None:
    """Each occluder is drawn only on the images that have it."""
    colours = R["colours"].reshape(-1, 4, 3) * 255.0
    for name, draw in _OCCLUDERS.items():
        idx = np.flatnonzero(N[name])
        if len(idx):
            sub = cv.subset(idx)
            draw(sub, {k: v[idx] for k, v in R.items()}, lm[idx], colours[idx])
            cv.img[idx] = sub.img
    patches = R["patches"].reshape(-1, 2, 7)
    for i in np.flatnonzero(N["patch1"] + N["patch2"]):  # square patches anywhere (slicing only)
        for k, key in enumerate(("patch1", "patch2")):
            if N[key][i]:
                p = patches[i, k]
                w = int((0.08 + 0.17 * p[0]) * cv.size)
                x0, y0 = int(p[1] * (cv.size - w)), int(p[2] * (cv.size - w))
                cv.img[i, :, y0:y0 + w, x0:x0 + w] = p[3:6, None, None] * 255.0


def _light(cv: _Canvas, P, N) -> None:
    """Directional shading on the face ellipsoid, then gain and colour cast. Identity at difficulty 0."""
    k = N["light"]
    if k.any():
        lx, ly = np.cos(N["light_angle"]) * 0.8, np.sin(N["light_angle"]) * 0.8
        lz = np.sqrt(1.0 - lx**2 - ly**2)
        nx = (cv.xs - _col(_CX + P["face_dx"])) / _col(P["face_w"] * 1.2)
        ny = (cv.ys - _col(P["face_cy"])) / _col(P["face_h"] * 1.2)
        nz = np.sqrt(np.clip(1.0 - nx**2 - ny**2, 0.0, 1.0))
        lam = np.maximum(nx * _col(lx) + ny * _col(ly) + nz * _col(lz), 0.0)
        shade = 1.0 - _col(k) + _col(k * 1.25) * lam
        cv.img *= shade[:, None]
    gain = (N["gain"][:, None] * N["cast"]).astype(np.float32)
    cv.img *= gain[:, :, None, None]


def _warp(img: np.ndarray, forward: np.ndarray, size: int) -> np.ndarray:
    """Resample ``img (B, 3, S, S)`` through the forward similarity (B, 2, 3) (template units); bilinear, edges clamped."""
    inv_a = np.linalg.inv(forward[:, :, :2])  # the linear part is the same in pixels and template units
    inv_t = -(inv_a @ forward[:, :, 2:])[..., 0] * (size / TEMPLATE_SIZE)
    # grid_sample's coordinates (align_corners=False): n = (2p + 1) / S - 1 for pixel p.
    theta = np.concatenate([inv_a, (inv_a.sum(-1) * (1.0 - 1.0 / size) + (2.0 * inv_t + 1.0) / size - 1.0)[..., None]], -1)
    grid = torch.nn.functional.affine_grid(torch.from_numpy(theta.astype(np.float32)), list(img.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(torch.from_numpy(img), grid, mode="bilinear", padding_mode="border",
                                          align_corners=False)
    return out.numpy()


def _blur(img: np.ndarray, sigma: np.ndarray) -> None:
    """Separable gaussian blur in place, per-image ``sigma (B,)`` in pixels; images with sigma < 0.3 untouched."""
    idx = np.flatnonzero(sigma >= 0.3)
    if len(idx) == 0:
        return
    taps = np.arange(-3, 4, dtype=np.float64)
    w = np.exp(-0.5 * (taps[None] / sigma[idx, None]) ** 2)
    w = (w / w.sum(1, keepdims=True)).astype(np.float32)
    sub = img[idx]
    for axis in (2, 3):
        pad = [(0, 0)] * 4  # (B, 3, H, W)
        pad[axis] = (3, 3)
        padded = np.pad(sub, pad, mode="edge")
        out = np.zeros_like(sub)
        n = sub.shape[axis]
        for j in range(7):
            out += w[:, j, None, None, None] * np.take(padded, np.arange(j, j + n), axis=axis)
        sub = out
    img[idx] = sub


def _render_batch(ids: Sequence[Identity], draws: Sequence[dict], difficulty: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    P, R = _stack_identities(ids), _stack_draws(draws)
    N = _nuisances(R, difficulty)
    lm = _posed_landmarks(P, N)
    cv = _Canvas(len(ids), size)
    _draw_background(cv, N, R)
    _draw_head(cv, P, N, lm)
    _draw_eyes(cv, P, N, lm)
    _draw_nose(cv, P, N, lm)
    _draw_mouth(cv, P, N, lm)
    _draw_occluders(cv, N, R, lm)
    _light(cv, P, N)
    forward = _warp_matrix(N)
    img = cv.img if difficulty == 0 else _warp(cv.img, forward, size)
    _blur(img, N["blur"] * size / TEMPLATE_SIZE)
    if difficulty > 0:
        side = max(_NOISE_BANK, 2 * size)
        bank = _noise_bank(side)
        at = (R["noise_at"][:, :2] * (side - size)).astype(int)
        sign = np.where(R["noise_at"][:, 2] < 0.5, -1.0, 1.0)
        for i, (ox, oy) in enumerate(at):
            img[i] += bank[:, oy:oy + size, ox:ox + size] * np.float32(sign[i] * N["noise"][i])
    landmarks = lm @ forward[:, :, :2].transpose(0, 2, 1) + forward[:, None, :, 2]
    out = np.clip(img + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)  # round to nearest; (B, H, W, 3)
    return out, landmarks * (size / TEMPLATE_SIZE)


def _check_render_args(difficulty: float, image_size: int) -> None:
    if not np.isfinite(difficulty) or difficulty < 0:
        raise ValueError(f"difficulty must be a finite float >= 0 (0 = clean frontal), got {difficulty!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16 (pixels), got {image_size!r}")


def render_images(identities: Sequence[int] | np.ndarray, samples: Sequence[int] | np.ndarray, *,
                  seed: int = 0, split: str = "train", difficulty: float = 1.0, image_size: int = 112,
                  return_landmarks: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Render image ``samples[k]`` of person ``identities[k]`` for every ``k``.

    Returns uint8 RGB ``(N, image_size, image_size, 3)``; with ``return_landmarks`` also the five
    landmarks the renderer used, float64 ``(N, 5, 2)`` ``(x, y)`` output pixels (ArcFace order).
    Each image depends only on ``(seed, split, identity, sample, difficulty, image_size)``.
    """
    _check_render_args(difficulty, image_size)
    code = _check_split(split)
    seed = _check_nonneg_int("seed", seed)
    identities, samples = np.asarray(identities).ravel(), np.asarray(samples).ravel()
    if identities.shape != samples.shape:
        raise ValueError(f"identities and samples must have the same length, got {len(identities)} and {len(samples)}")
    images = np.empty((len(identities), image_size, image_size, 3), dtype=np.uint8)
    landmarks = np.empty((len(identities), 5, 2))
    if len(identities) and (identities.min() < 0 or samples.min() < 0):
        raise ValueError(f"identities and samples must be >= 0, got min {identities.min()} and {samples.min()}")
    batch = max(8, _BATCH_PIXELS // image_size**2)
    for start in range(0, len(identities), batch):
        keys = zip(identities[start:start + batch].tolist(), samples[start:start + batch].tolist())
        ids, draws = [], []
        for ident, sample in keys:
            ids.append(identity_params(seed, split, ident))
            draws.append(_draw_image(_image_rng(seed, code, ident, sample)))
        stop = start + len(ids)
        images[start:stop], landmarks[start:stop] = _render_batch(ids, draws, float(difficulty), image_size)
    return (images, landmarks) if return_landmarks else images


# ----------------------------------------------------------------------------------------------------
# Dataset, pairs, montage
# ----------------------------------------------------------------------------------------------------


class SyntheticFaces(Dataset):
    """``num_identities x images_per_identity`` synthetic faces; ``ds[i] -> (image (3, H, W) float32, label)``.

    Item ``i`` is image ``i % images_per_identity`` of identity ``i // images_per_identity`` (label).
    Images are normalised as ``(x - 127.5) / 127.5``. ``cache=True`` renders everything once into a
    uint8 array at construction (``progress=True`` shows a tqdm bar).
    """

    def __init__(self, num_identities: int, images_per_identity: int, split: str = "train", seed: int = 0,
                 difficulty: float = 1.0, image_size: int = 112, cache: bool = False, progress: bool = False) -> None:
        if isinstance(num_identities, bool) or not isinstance(num_identities, (int, np.integer)) or num_identities < 1:
            raise ValueError(f"num_identities must be a positive int, got {num_identities!r}")
        if isinstance(images_per_identity, bool) or not isinstance(images_per_identity, (int, np.integer)) \
                or images_per_identity < 1:
            raise ValueError(f"images_per_identity must be a positive int, got {images_per_identity!r}")
        _check_split(split)
        _check_nonneg_int("seed", seed)
        _check_render_args(difficulty, image_size)
        self.num_identities, self.images_per_identity = int(num_identities), int(images_per_identity)
        self.split, self.seed, self.difficulty, self.image_size = split, int(seed), float(difficulty), int(image_size)
        self.labels = np.repeat(np.arange(self.num_identities, dtype=np.int64), self.images_per_identity)
        self.images: np.ndarray | None = None
        if cache:
            self.images = self._render_all(progress)

    @property
    def num_classes(self) -> int:
        return self.num_identities

    def __len__(self) -> int:
        return len(self.labels)

    def _index(self, i: int) -> tuple[int, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i %= len(self)
        return i // self.images_per_identity, i % self.images_per_identity

    def _render_all(self, progress: bool) -> np.ndarray:
        out = np.empty((len(self), self.image_size, self.image_size, 3), dtype=np.uint8)
        idx = np.arange(len(self))
        ident, sample = idx // self.images_per_identity, idx % self.images_per_identity
        step = 1024
        starts = range(0, len(self), step)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc=f"rendering {len(self)} synthetic faces", unit_scale=step)
        for s in starts:
            out[s:s + step] = render_images(ident[s:s + step], sample[s:s + step], seed=self.seed, split=self.split,
                                            difficulty=self.difficulty, image_size=self.image_size)
        return out

    def render(self, i: int) -> np.ndarray:
        """Item ``i`` as uint8 RGB ``(H, W, 3)``."""
        if self.images is not None:
            return self.images[self._index(i)[0] * self.images_per_identity + self._index(i)[1]]
        ident, sample = self._index(i)
        return render_images([ident], [sample], seed=self.seed, split=self.split, difficulty=self.difficulty,
                             image_size=self.image_size)[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return to_tensor(self.render(i)), int(self.labels[i])


def synthetic_pairs(num_pairs: int, num_identities: int = 1000, seed: int = 0, difficulty: float = 1.0,
                    image_size: int = 112, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """A verification set laid out like insightface's ``.bin`` files, from ``split`` identities.

    Returns images uint8 ``(2 * num_pairs, H, W, 3)`` (pair ``k`` is images ``2k`` and ``2k + 1``) and
    ``issame`` bool ``(num_pairs,)``: even pairs are the same person, odd pairs two different people
    (so any contiguous fold is balanced). Deterministic in all arguments.
    """
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, (int, np.integer)) or num_pairs < 1:
        raise ValueError(f"num_pairs must be a positive int, got {num_pairs!r}")
    if isinstance(num_identities, bool) or not isinstance(num_identities, (int, np.integer)) or num_identities < 2:
        raise ValueError(f"num_identities must be an int >= 2 (negative pairs need two people), got {num_identities!r}")
    code = _check_split(split)
    rng = np.random.default_rng(np.random.SeedSequence(
        [_check_nonneg_int("seed", seed), _TAG_PAIRS, code, int(num_pairs), int(num_identities)]))
    issame = np.arange(num_pairs) % 2 == 0
    first = rng.integers(num_identities, size=num_pairs)
    other = (first + rng.integers(1, num_identities, size=num_pairs)) % num_identities  # never == first
    second = np.where(issame, first, other)
    # Distinct sample indices for the two images of a positive pair.
    s1 = rng.integers(0, 1 << 30, size=num_pairs)
    s2 = (s1 + rng.integers(1, 1 << 30, size=num_pairs)) % (1 << 30)
    identities = np.stack([first, second], 1).ravel()
    samples = np.stack([s1, s2], 1).ravel()
    images = render_images(identities, samples, seed=seed, split=split, difficulty=difficulty, image_size=image_size)
    return images, issame


def montage(path: str, num_identities: int = 8, images_per_identity: int = 8, seed: int = 0,
            difficulty: float = 1.0, image_size: int = 112, split: str = "train", gap: int = 2) -> np.ndarray:
    """Write a PNG grid (rows = identities, columns = images of that identity) with Pillow; returns it (H, W, 3)."""
    ids = np.repeat(np.arange(num_identities), images_per_identity)
    samples = np.tile(np.arange(images_per_identity), num_identities)
    imgs = render_images(ids, samples, seed=seed, split=split, difficulty=difficulty, image_size=image_size)
    step = image_size + gap
    grid = np.full((num_identities * step - gap, images_per_identity * step - gap, 3), 255, dtype=np.uint8)
    for k, im in enumerate(imgs):
        r, c = divmod(k, images_per_identity)
        grid[r * step:r * step + image_size, c * step:c * step + image_size] = im
    save_image(path, grid)
    return grid


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m faceforge.data.synthetic --montage docs/images/synthetic_montage.png``"""
    parser = argparse.ArgumentParser(description="Render a montage of synthetic face identities.")
    parser.add_argument("--montage", default="docs/images/synthetic_montage.png", help="output PNG path")
    parser.add_argument("--identities", type=int, default=8)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--difficulty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    montage(args.montage, args.identities, args.images, seed=args.seed, difficulty=args.difficulty, image_size=args.size)
    print(f"wrote {args.montage}")


if __name__ == "__main__":
    main()
