"""Tests for faceforge.data.pairs: .bin pair sets (py2/py3 pickles, restricted unpickling) and pair lists."""

from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from faceforge.data.pairs import (
    PairSetError,
    UnsafePickleError,
    load_bin,
    load_pair_list,
    write_bin,
)


def _images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


# --- hand-written pickle opcodes, as Python 2's cPickle emits them at protocol 2 -----------------


def _py2_str(data: bytes) -> bytes:
    """A py2 ``str`` (SHORT_BINSTRING / BINSTRING): what the original insightface .bin files hold."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<i", len(data)) + data


def _py2_list(items: list[bytes]) -> bytes:
    return b"](" + b"".join(items) + b"e"


def _py2_uint8_array(data: bytes) -> bytes:
    """A 1-D uint8 numpy array as numpy 1.x under Python 2 pickles it (protocol 2)."""
    dtype = (
        b"cnumpy\ndtype\n" + b"(" + _py2_str(b"u1") + b"\x89\x88tR"  # dtype('u1', False, True)
        + b"(K\x03" + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    )
    return (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        + b"(cnumpy\nndarray\nK\x00\x85" + _py2_str(b"b") + b"tR"
        + b"(K\x01" + b"J" + struct.pack("<i", len(data)) + b"\x85" + dtype + b"\x89" + _py2_str(data) + b"tb"
    )


def _py2_bin(entries: list[bytes], issame: list[bool]) -> bytes:
    bools = [b"\x88" if v else b"\x89" for v in issame]
    return b"\x80\x02" + _py2_list(entries) + _py2_list(bools) + b"\x86."


def test_py2_pickle_of_str(tmp_path):
    imgs = _images(4)
    p = tmp_path / "py2.bin"
    p.write_bytes(_py2_bin([_py2_str(_png(im)) for im in imgs], [True, False]))
    out, issame = load_bin(p)
    assert out.dtype == np.uint8 and out.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(out, imgs)
    assert issame.dtype == bool and issame.tolist() == [True, False]


def test_py2_pickle_of_numpy_arrays(tmp_path):
    imgs = _images(2, seed=1)
    p = tmp_path / "py2np.bin"
    p.write_bytes(_py2_bin([_py2_uint8_array(_png(im)) for im in imgs], [True]))
    out, issame = load_bin(p)
    np.testing.assert_array_equal(out, imgs)
    assert issame.tolist() == [True]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_py3_pickles(tmp_path, protocol):
    imgs = _images(4, seed=2)
    p = tmp_path / f"p{protocol}.bin"
    # bytes, bytearray, 1-D uint8 arrays of encoded bytes (arcface_paddle's variant), and an empty issame mix
    bins = [_png(imgs[0]), bytearray(_png(imgs[1])), np.frombuffer(_png(imgs[2]), np.uint8), _png(imgs[3])]
    with open(p, "wb") as f:
        pickle.dump((bins, [False, 1]), f, protocol=protocol)
    out, issame = load_bin(p)
    np.testing.assert_array_equal(out, imgs)
    assert issame.tolist() == [False, True]


def test_round_trip_png_and_jpeg(tmp_path):
    imgs = _images(6, seed=3)
    p = tmp_path / "rt.bin"
    write_bin(p, imgs, [True, False, True])
    out, issame = load_bin(p)
    np.testing.assert_array_equal(out, imgs)
    assert issame.tolist() == [True, False, True]
    # insightface loads it with a plain pickle.load: a tuple of (list of bytes, list of bools)
    with open(p, "rb") as f:
        bins, labels = pickle.load(f)
    assert isinstance(bins, list) and all(isinstance(b, bytes) for b in bins)
    assert labels == [True, False, True] and all(type(v) is bool for v in labels)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]

    smooth = np.tile(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], (16, 1, 3))
    write_bin(p, [smooth, smooth], [True], format="jpeg")
    out, _ = load_bin(p)
    assert out.shape == (2, 16, 16, 3)
    assert np.abs(out.astype(int) - smooth).max() < 20


def test_resize_and_size_mismatch(tmp_path):
    a, b = _images(1, size=16)[0], _images(1, size=20)[0]
    p = tmp_path / "mixed.bin"
    write_bin(p, [a, b], [True])
    with pytest.raises(PairSetError, match=r"mixed\.bin.*image 1 is 20x20"):
        load_bin(p)
    out, _ = load_bin(p, image_size=12)
    assert out.shape == (2, 12, 12, 3)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.bin"
    with open(p, "wb") as f:
        pickle.dump(([_Evil(marker), b"x"], [True]), f, protocol=2)
    with pytest.raises(UnsafePickleError, match=r"evil\.bin.*(posix|os|nt)\.system"):
        load_bin(p)
    assert not marker.exists()

    p2 = tmp_path / "eval.bin"
    with open(p2, "wb") as f:
        f.write(b"\x80\x04cbuiltins\neval\n(X\x0f\x00\x00\x00__import__('os')tR.")
    with pytest.raises(pickle.UnpicklingError, match=r"eval\.bin.*builtins\.eval"):
        load_bin(p2)


def test_object_arrays_refused(tmp_path):
    p = tmp_path / "obj.bin"
    with open(p, "wb") as f:
        pickle.dump(([np.array([b"a", b"b"], dtype=object), b"x"], [True]), f, protocol=4)
    with pytest.raises(UnsafePickleError, match="object"):
        load_bin(p)
    structured = np.zeros(2, dtype=[("a", "O"), ("b", "u1")])
    with open(p, "wb") as f:
        pickle.dump(([structured, b"x"], [True]), f, protocol=2)
    with pytest.raises(UnsafePickleError, match="object"):
        load_bin(p)


def test_count_mismatch(tmp_path):
    imgs = _images(3)
    p = tmp_path / "count.bin"
    with open(p, "wb") as f:
        pickle.dump(([_png(im) for im in imgs], [True, False]), f, protocol=4)
    with pytest.raises(PairSetError, match=r"count\.bin: 3 images for 2 issame"):
        load_bin(p)
    with pytest.raises(ValueError, match="3 images for 2"):
        write_bin(tmp_path / "w.bin", imgs, [True, False])


def test_bad_issame_and_undecodable(tmp_path):
    imgs = _images(2)
    p = tmp_path / "bad.bin"
    with open(p, "wb") as f:
        pickle.dump(([_png(imgs[0]), _png(imgs[1])], ["yes"]), f, protocol=4)
    with pytest.raises(PairSetError, match=r"bad\.bin: issame\[0\]"):
        load_bin(p)
    with open(p, "wb") as f:
        pickle.dump(([_png(imgs[0]), _png(imgs[1]), _png(imgs[0]), b"not an image"], [True, False]), f, protocol=4)
    with pytest.raises(PairSetError, match=r"bad\.bin: image 3: cannot decode image"):
        load_bin(p)


def test_pair_list(tmp_path):
    p = tmp_path / "pairs.txt"
    p.write_text("# header\n\na/1.jpg b/2.jpg 1\n  c.jpg\td.jpg 0  # trailing note\n")
    p1, p2, same = load_pair_list(p)
    assert p1 == ["a/1.jpg", "c.jpg"] and p2 == ["b/2.jpg", "d.jpg"]
    assert same.dtype == bool and same.tolist() == [True, False]
    p1, _, _ = load_pair_list(p, root="/data")
    assert p1[0] == os.path.join("/data", "a/1.jpg")

    p.write_text("a b 1\n\na b\n")
    with pytest.raises(PairSetError, match=r"pairs\.txt:3:"):
        load_pair_list(p)
    p.write_text("a b 1\na b 2\n")
    with pytest.raises(PairSetError, match=r"pairs\.txt:2: label"):
        load_pair_list(p)
