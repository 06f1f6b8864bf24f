"""faceforge pack / inspect / pack-pairs (faceforge.data.pack through faceforge.cli.main)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from faceforge.cli import main
from faceforge.data.pairs import load_bin
from faceforge.data.recordio import RecordIODataset
from faceforge.data.synthetic import render_images

NAMES = ["bob", "alice", "carol"]  # sorted -> alice 0, bob 1, carol 2
PER_ID = 4
SIZE = 32


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    ids = np.repeat(np.arange(len(NAMES)), PER_ID)
    samples = np.tile(np.arange(PER_ID), len(NAMES))
    return render_images(ids, samples, image_size=SIZE).reshape(len(NAMES), PER_ID, SIZE, SIZE, 3)


@pytest.fixture
def folder(tmp_path, pixels):
    root = tmp_path / "faces"
    for i, name in enumerate(NAMES):
        (root / name).mkdir(parents=True)
        for j in range(PER_ID):
            Image.fromarray(pixels[i, j]).save(root / name / f"{j:02d}.png")
    return root


def expected(pixels) -> list[tuple[np.ndarray, int]]:
    out = []
    for label, name in enumerate(sorted(NAMES)):
        i = NAMES.index(name)
        out += [(pixels[i, j], label) for j in range(PER_ID)]
    return out


def read_all(prefix) -> list[tuple[np.ndarray, int]]:
    ds = RecordIODataset(prefix)
    try:
        return [ds[i] for i in range(len(ds))]
    finally:
        ds.close()


def test_pack_folder_round_trip(folder, tmp_path, pixels, capsys):
    dest = tmp_path / "out" / "train"
    dest.parent.mkdir()
    assert main(["pack", str(folder), str(dest), "--workers", "2"]) == 0
    assert "12 images of 3 identities" in capsys.readouterr().out
    got = read_all(dest)
    want = expected(pixels)
    assert len(got) == len(want)
    for (gi, gl), (wi, wl) in zip(got, want):
        assert gl == wl
        np.testing.assert_array_equal(gi, wi)
    ds = RecordIODataset(dest)
    assert ds.num_classes == 3 and ds.identity_ranges() == {0: (1, 5), 1: (5, 9), 2: (9, 13)}
    ds.close()
    # PNG bytes are stored unchanged
    _, data = RecordIODataset(dest).read_key(1)
    assert data == (folder / "alice" / "00.png").read_bytes()
    labels = json.loads((tmp_path / "out" / "train.labels.json").read_text())
    assert labels == {"alice": 0, "bob": 1, "carol": 2}


def test_pack_list(folder, tmp_path, pixels):
    # labels interleaved in the list: packing makes each identity contiguous, keeping list order
    lines = []
    for j in range(PER_ID):
        for label, name in enumerate(sorted(NAMES)):
            lines.append(f"faces/{name}/{j:02d}.png {label}")
    lst = tmp_path / "train.lst"
    lst.write_text("# comment\n" + "\n".join(lines) + "\n")
    assert main(["pack", str(lst), str(tmp_path / "lst"), "--workers", "1"]) == 0
    got = read_all(tmp_path / "lst")
    for (gi, gl), (wi, wl) in zip(got, expected(pixels)):
        assert gl == wl
        np.testing.assert_array_equal(gi, wi)


def test_non_png_is_reencoded(tmp_path, pixels):
    root = tmp_path / "bmp" / "x"
    root.mkdir(parents=True)
    Image.fromarray(pixels[0, 0]).save(root / "a.bmp")
    assert main(["pack", str(tmp_path / "bmp"), str(tmp_path / "b")]) == 0
    (img, label), = read_all(tmp_path / "b")
    assert label == 0
    np.testing.assert_array_equal(img, pixels[0, 0])


def test_empty_identity_folder(folder, tmp_path, capsys):
    (folder / "dave").mkdir()
    assert main(["pack", str(folder), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "dave" in err and "no images" in err
    assert not (tmp_path / "x.rec").exists()


def test_unreadable_image(folder, tmp_path, capsys):
    bad = folder / "bob" / "02.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert main(["pack", str(folder), str(tmp_path / "x")]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "x.rec").exists() and not (tmp_path / "x.idx").exists()

    assert main(["pack", str(folder), str(tmp_path / "x"), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "11 images" in out and "skipped 1 unreadable" in out
    report = (tmp_path / "x.bad.txt").read_text()
    assert str(bad) in report
    assert len(RecordIODataset(tmp_path / "x")) == 11


def test_inspect(folder, tmp_path, capsys):
    dest = tmp_path / "train"
    assert main(["pack", str(folder), str(dest)]) == 0
    capsys.readouterr()
    for path in (str(dest), str(dest) + ".rec", str(folder)):
        assert main(["inspect", path, "--decode"]) == 0
        out = capsys.readouterr().out
        assert "images:     12" in out and "identities: 3" in out
        assert "min 4, median 4, max 4" in out and "4-7" in out
        assert f"{SIZE}x{SIZE} (12)" in out and "unreadable: 0" in out

    # corrupt the pixels of key 6: keep the PNG signature, break the data inside the .rec payload
    ds = RecordIODataset(dest)
    offset = ds._index[6]
    ds.close()
    raw = bytearray((tmp_path / "train.rec").read_bytes())
    start = offset + 8 + 24 + 40  # chunk header, IRHeader, past the PNG signature and IHDR
    for k in range(start, start + 200):
        raw[k] ^= 0x5A
    (tmp_path / "train.rec").write_bytes(bytes(raw))
    assert main(["inspect", str(dest), "--decode"]) == 1
    out = capsys.readouterr().out
    assert "unreadable: 1" in out and "key 6" in out


def test_pack_pairs_round_trip(folder, tmp_path, pixels, capsys):
    lst = tmp_path / "pairs.txt"
    lst.write_text("alice/00.png alice/01.png 1\nbob/00.png carol/03.png 0\n")
    dest = tmp_path / "val.bin"
    assert main(["pack-pairs", str(lst), str(dest), "--root", str(folder)]) == 0
    images, issame = load_bin(dest)
    assert issame.tolist() == [True, False]
    a, b, c = NAMES.index("alice"), NAMES.index("bob"), NAMES.index("carol")
    for got, want in zip(images, [pixels[a, 0], pixels[a, 1], pixels[b, 0], pixels[c, 3]]):
        np.testing.assert_array_equal(got, want)
    capsys.readouterr()
    assert main(["inspect", str(dest), "--decode"]) == 0
    assert "pairs:      2 (1 same, 1 different)" in capsys.readouterr().out

    # a different size is an error unless --size is given
    Image.fromarray(pixels[c, 0]).resize((40, 40)).save(folder / "carol" / "big.png")
    lst.write_text("alice/00.png carol/big.png 0\n")
    assert main(["pack-pairs", str(lst), str(dest), "--root", str(folder)]) == 2
    assert "big.png" in capsys.readouterr().err
    assert main(["pack-pairs", str(lst), str(dest), "--root", str(folder), "--size", "24"]) == 0
    images, _ = load_bin(dest)
    assert images.shape == (2, 24, 24, 3)

    lst.write_text("alice/00.png nobody/x.png 1\n")
    assert main(["pack-pairs", str(lst), str(dest), "--root", str(folder)]) == 2
    assert "nobody/x.png" in capsys.readouterr().err
