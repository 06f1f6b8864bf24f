"""RecordIO (.rec/.idx) reader and writer, checked against the format spelled out with struct."""

from __future__ import annotations

import io
import os
import struct

import numpy as np
import pytest
from PIL import Image

from faceforge.data import recordio
from faceforge.data.recordio import RecordIODataset, RecordIOError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def image(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def chunk(cflag: int, data: bytes) -> bytes:
    """One dmlc chunk written by hand: magic, cflag<<29 | length, data, zero pad to 4 bytes."""
    pad = (-len(data)) % 4
    return struct.pack("<II", MAGIC, (cflag << 29) | len(data)) + data + b"\0" * pad


def payload(label, data: bytes, id_: int = 0) -> bytes:
    """mxnet IRHeader + optional float32 label array + image bytes."""
    if isinstance(label, (list, tuple)):
        return struct.pack("<IfQQ", len(label), 0.0, id_, 0) + struct.pack(f"<{len(label)}f", *label) + data
    return struct.pack("<IfQQ", 0, float(label), id_, 0) + data


def write_raw(tmp_path, name: str, records: list[bytes], keys=None) -> str:
    """Write already-framed records and an .idx by hand; return the prefix."""
    prefix = str(tmp_path / name)
    keys = list(range(len(records))) if keys is None else keys
    offset = 0
    lines = []
    with open(prefix + ".rec", "wb") as f:
        for k, rec in zip(keys, records):
            lines.append(f"{k}\t{offset}\n")
            f.write(rec)
            offset += len(rec)
    with open(prefix + ".idx", "w") as f:
        f.writelines(lines)
    return prefix


# ------------------------------------------------------------------------------------------


def test_hand_built_records_are_read(tmp_path):
    imgs = [image(i) for i in range(3)]
    recs = [chunk(0, payload(lbl, png_bytes(im), id_=k)) for k, (lbl, im) in enumerate(zip([2, 0, 1], imgs))]
    prefix = write_raw(tmp_path, "plain", recs, keys=[0, 1, 2])
    ds = RecordIODataset(prefix)
    assert len(ds) == 3 and ds.meta is None and ds.keys == [0, 1, 2]
    for i in range(3):
        img, lbl = ds[i]
        assert img.dtype == np.uint8 and img.shape == (8, 8, 3)
        np.testing.assert_array_equal(img, imgs[i])
        assert lbl == [2, 0, 1][i]
    header, data = ds.read_key(1)
    assert header.flag == 0 and header.label == 0.0 and header.id == 1 and header.id2 == 0
    assert data == png_bytes(imgs[1])
    assert ds.num_classes == 3
    assert ds.identity_index() == {0: [1], 1: [2], 2: [0]}
    assert [k for k, _, _ in ds.scan()] == [0, 1, 2]


def test_magic_in_payload_is_split_and_rejoined(tmp_path):
    # Payload: IRHeader (24 bytes) then data with the magic at payload offsets 28 and 36 (aligned),
    # at 0-based offset 42 (unaligned: must NOT split), and 3 trailing bytes (needs padding).
    body = b"ABCD" + MAGIC_BYTES + b"EFGH" + MAGIC_BYTES + b"IJ" + MAGIC_BYTES + b"xyz"
    pl = struct.pack("<IfQQ", 0, 1.0, 7, 0) + body
    assert pl.find(MAGIC_BYTES) == 28 and pl.rfind(MAGIC_BYTES) == 42
    framed = recordio.frame_record(pl)
    expected = chunk(1, pl[:28]) + chunk(2, pl[32:36]) + chunk(3, pl[40:])
    assert framed == expected
    # raw walk of the chunk headers
    flags, pos = [], 0
    while pos < len(framed):
        magic, lrec = struct.unpack_from("<II", framed, pos)
        assert magic == MAGIC
        flags.append((lrec >> 29, lrec & ((1 << 29) - 1)))
        pos += 8 + ((lrec & ((1 << 29) - 1)) + 3) // 4 * 4
    assert flags == [(1, 28), (2, 4), (3, 9)]
    assert len(framed) % 4 == 0 and framed.endswith(b"xyz\0\0\0")

    # magic at offset 0 of a payload and as its last 4 bytes: empty first / last parts
    edge = MAGIC_BYTES + b"1234" + MAGIC_BYTES
    assert recordio.frame_record(edge) == chunk(1, b"") + chunk(2, b"1234") + chunk(3, b"")
    assert recordio.frame_record(b"abc") == chunk(0, b"abc")

    # read back: hand-framed file and the writer's file give the same bytes
    prefix = write_raw(tmp_path, "split", [framed, chunk(0, payload(0, b"tail"))])
    ds = RecordIODataset(prefix)
    header, data = ds.read_key(0)
    assert header.label == 1.0 and header.id == 7 and data == body
    assert ds.read_key(1)[1] == b"tail"
    assert [d for _, _, d in ds.scan()] == [body, b"tail"]

    # the writer splits encoded image bytes the same way
    img = png_bytes(image(0))
    evil = img + b"\0" * ((-(len(img) + 24)) % 4) + MAGIC_BYTES + b"end"  # trailing junk after IEND
    out = str(tmp_path / "w")
    recordio.write(out, [(evil, 0)])
    raw = open(out + ".rec", "rb").read()
    off = int(open(out + ".idx").read().splitlines()[1].split("\t")[1])
    assert struct.unpack_from("<II", raw, off)[1] >> 29 == 1
    ds = RecordIODataset(out)
    assert ds.read_key(1)[1] == evil
    np.testing.assert_array_equal(ds[0][0], image(0))


def test_round_trip_20_images_4_identities(tmp_path):
    samples = [(image(i), i // 5) for i in range(20)]
    samples[3] = (png_bytes(image(3)), 0)  # encoded bytes are stored as they are
    prefix = str(tmp_path / "train")
    assert recordio.write(prefix, samples) == 20
    assert sorted(os.listdir(tmp_path)) == ["train.idx", "train.rec"]

    # the layout, read plainly: idx lines, meta record, identity records
    idx = [tuple(map(int, line.split("\t"))) for line in open(prefix + ".idx").read().splitlines()]
    assert [k for k, _ in idx] == list(range(25))
    raw = open(prefix + ".rec", "rb").read()
    offsets = dict(idx)
    assert offsets[0] == 0 and all(offsets[k] < offsets[k + 1] for k in range(24))

    def rec_at(k):
        magic, lrec = struct.unpack_from("<II", raw, offsets[k])
        assert magic == MAGIC and lrec >> 29 == 0
        return raw[offsets[k] + 8: offsets[k] + 8 + (lrec & ((1 << 29) - 1))]

    assert rec_at(0) == struct.pack("<IfQQ2f", 2, 0.0, 0, 0, 21.0, 25.0)
    for c in range(4):
        assert rec_at(21 + c) == struct.pack("<IfQQ2f", 2, 0.0, 0, 0, 1 + 5 * c, 6 + 5 * c)
    flag, label, id_, id2 = struct.unpack_from("<IfQQ", rec_at(7))
    assert (flag, label, id_, id2) == (0, 1.0, 7, 0)
    assert rec_at(4)[24:] == png_bytes(image(3))

    ds = RecordIODataset(prefix)
    assert len(ds) == 20 and ds.num_classes == 4 and ds.meta == (21, 25)
    assert ds.keys == list(range(1, 21))
    for i in range(20):
        img, lbl = ds[i]
        np.testing.assert_array_equal(img, image(i))
        assert lbl == i // 5
    assert ds.identity_index() == {c: list(range(5 * c, 5 * c + 5)) for c in range(4)}
    assert ds.identity_ranges()[2] == (11, 16)
    scanned = list(ds.scan())
    assert [k for k, _, _ in scanned] == list(range(25))
    assert scanned[0][1].flag == 2 and list(scanned[0][1].label) == [21.0, 25.0]

    # transform is applied to the decoded array
    ds_t = RecordIODataset(prefix, transform=lambda a: a.shape)
    assert ds_t[0] == ((8, 8, 3), 0)


def test_label_arrays(tmp_path):
    prefix = str(tmp_path / "arr")
    samples = [(image(i), [float(i // 2), 0.25 * i, -1.0]) for i in range(4)]
    recordio.write(prefix, samples, image_format="jpeg", quality=90)
    ds = RecordIODataset(prefix)
    header, data = ds.read_key(3)
    assert header.flag == 3 and header.label.dtype == np.float32
    np.testing.assert_array_equal(header.label, np.float32([1.0, 0.5, -1.0]))
    assert data[:2] == b"\xff\xd8"  # JPEG
    assert [ds[i][1] for i in range(4)] == [0, 0, 1, 1] and ds.num_classes == 2
    # hand-built: a flag-3 label array record with no meta record
    recs = [chunk(0, payload([1.0, 9.0, 9.0], png_bytes(image(5)))), chunk(0, payload([0.0, 3.0, 3.0], png_bytes(image(6))))]
    ds = RecordIODataset(write_raw(tmp_path, "arr_raw", recs, keys=[5, 6]))  # no key 0: no meta
    assert ds.keys == [5, 6] and ds[0][1] == 1 and ds[1][1] == 0
    np.testing.assert_array_equal(ds[1][0], image(6))


def test_dataset_without_meta_record(tmp_path):
    # im2rec style: key 0 is an ordinary image (flag 0), every key in the .idx is an image
    recs = [chunk(0, payload(k % 3, png_bytes(image(k)), id_=k)) for k in range(6)]
    ds = RecordIODataset(write_raw(tmp_path, "im2rec", recs))
    assert ds.meta is None and len(ds) == 6 and ds.num_classes == 3
    assert ds.identity_index() == {0: [0, 3], 1: [1, 4], 2: [2, 5]}
    np.testing.assert_array_equal(ds[0][0], image(0))
    with pytest.raises(RecordIOError, match="no meta record"):
        ds.identity_ranges()


# ------------------------------------------------------------------------------------------
# bad input


def _good(tmp_path, name="bad", n=3):
    prefix = str(tmp_path / name)
    recordio.write(prefix, [(image(i), i) for i in range(n)])
    return prefix


def test_truncated_rec(tmp_path):
    recs = [chunk(0, payload(k, png_bytes(image(k)))) for k in range(3)]
    prefix = write_raw(tmp_path, "bad", recs, keys=[1, 2, 3])
    last_off = len(recs[0]) + len(recs[1])
    with open(prefix + ".rec", "r+b") as f:
        f.truncate(last_off + 20)  # the last record loses most of its payload
    ds = RecordIODataset(prefix)
    np.testing.assert_array_equal(ds[1][0], image(1))
    with pytest.raises(RecordIOError) as e:
        ds[2]
    msg = str(e.value)
    assert "bad.rec" in msg and "truncated" in msg and f"byte offset {last_off}" in msg and "key 3" in msg
    with pytest.raises(RecordIOError, match=r"truncated record \(record #2"):
        list(ds.scan())


def test_rec_truncated_inside_chunk_header(tmp_path):
    recs = [chunk(0, payload(0, png_bytes(image(0))))]
    prefix = write_raw(tmp_path, "hdr", recs)
    with open(prefix + ".rec", "ab") as f:
        f.write(MAGIC_BYTES[:3])
    ds = RecordIODataset(prefix)
    with pytest.raises(RecordIOError, match=r"hdr\.rec.*truncated.*byte offset %d" % len(recs[0])):
        list(ds.scan())


def test_wrong_magic(tmp_path):
    prefix = _good(tmp_path)
    off = int(open(prefix + ".idx").read().splitlines()[2].split("\t")[1])  # key 2
    with open(prefix + ".rec", "r+b") as f:
        f.seek(off)
        f.write(b"\xde\xad\xbe\xef")
    ds = RecordIODataset(prefix)
    with pytest.raises(RecordIOError) as e:
        ds[1]
    msg = str(e.value)
    assert "bad.rec" in msg and "magic 0xefbeadde" in msg and f"byte offset {off}" in msg and "key 2" in msg


def test_idx_offset_past_end(tmp_path):
    prefix = _good(tmp_path)
    size = os.path.getsize(prefix + ".rec")
    with open(prefix + ".idx", "a") as f:
        f.write(f"99\t{size + 16}\n")
    with pytest.raises(RecordIOError) as e:
        RecordIODataset(prefix)
    msg = str(e.value)
    assert "bad.idx:8" in msg and "key 99" in msg and str(size + 16) in msg and "past the end" in msg and "bad.rec" in msg


def test_idx_offset_not_at_a_record(tmp_path):
    prefix = _good(tmp_path)
    lines = open(prefix + ".idx").read().splitlines()
    lines[1] = "1\t4"  # points into the middle of record 0
    open(prefix + ".idx", "w").write("\n".join(lines) + "\n")
    ds = RecordIODataset(prefix)
    with pytest.raises(RecordIOError, match=r"bad\.rec.*magic.*byte offset 4.*key 1"):
        ds[0]


@pytest.mark.parametrize("line", ["1 40", "x\t40", "1\t40\t3", "1\tabc", "1\t-8", "0\t0"])
def test_malformed_idx_line(tmp_path, line):
    prefix = _good(tmp_path)
    lines = open(prefix + ".idx").read().splitlines()
    lines.insert(2, line)
    open(prefix + ".idx", "w").write("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError, match=r"bad\.idx:3: (malformed line|negative byte offset|duplicate key)"):
        RecordIODataset(prefix)


def test_undecodable_image(tmp_path):
    recs = [chunk(0, payload(0, png_bytes(image(0)))), chunk(0, payload(1, b"not an image at all"))]
    prefix = write_raw(tmp_path, "junk", recs, keys=[10, 11])
    ds = RecordIODataset(prefix)
    ds[0]
    with pytest.raises(RecordIOError) as e:
        ds[1]
    msg = str(e.value)
    assert "junk.rec" in msg and "key 11" in msg and f"byte offset {len(recs[0])}" in msg and "cannot decode image" in msg


@pytest.mark.parametrize(("bad_label", "says"), [
    (-1.0, ": negative label -1"),
    (4.0, ": label 4 is out of range: the meta record (key 0) declares 2 classes"),
    (2.5, ": label 2.5 is not an integer class index"),
], ids=["negative", "beyond-declared", "fractional"])
def test_label_out_of_range(tmp_path, bad_label, says):
    # meta declares images 1..2 and 2 identities (keys 3, 4): num_classes = 2
    recs = [
        chunk(0, payload([3.0, 5.0], b"")),
        chunk(0, payload(0, png_bytes(image(1)))),
        chunk(0, payload(bad_label, png_bytes(image(2)))),
        chunk(0, payload([1.0, 2.0], b"")),
        chunk(0, payload([2.0, 3.0], b"")),
    ]
    ds = RecordIODataset(write_raw(tmp_path, "lbl", recs))
    assert ds.num_classes == 2 and len(ds) == 2
    assert ds[0][1] == 0
    with pytest.raises(RecordIOError) as e:
        ds[1]
    msg = str(e.value)
    assert "lbl.rec" in msg and "key 2" in msg and f"byte offset {len(recs[0]) + len(recs[1])}" in msg
    assert msg.endswith(says), msg  # each case its own reason


def test_label_array_shorter_than_flag(tmp_path):
    bad = struct.pack("<IfQQ", 5, 0.0, 0, 0) + b"\0" * 8
    ds = RecordIODataset(write_raw(tmp_path, "short", [chunk(0, bad)], keys=[3]))
    with pytest.raises(RecordIOError, match=r"short\.rec: key 3 .*flag 5"):
        ds[0]


def test_writer_rejects_bad_samples_and_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "out")
    with pytest.raises(ValueError, match="sample 2: class 0 appears again"):
        recordio.write(prefix, [(image(0), 0), (image(1), 1), (image(2), 0)])
    with pytest.raises(ValueError, match="sample 1: negative class label"):
        recordio.write(prefix, [(image(0), 0), (image(1), -1)])
    with pytest.raises(ValueError, match="sample 0: .*uint8"):
        recordio.write(prefix, [(np.zeros((4, 4, 3), np.float32), 0)])
    assert os.listdir(tmp_path) == []
    # an existing set is left untouched by a failed write
    recordio.write(prefix, [(image(0), 0)])
    before = open(prefix + ".rec", "rb").read()

    def gen():
        yield image(1), 0
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError):
        recordio.write(prefix, gen())
    assert open(prefix + ".rec", "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["out.idx", "out.rec"]


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.rec"):
        RecordIODataset(tmp_path / "nothere")


# ------------------------------------------------------------------------------------------


def test_dataloader_two_workers(tmp_path):
    import torch
    from torch.utils.data import DataLoader

    prefix = str(tmp_path / "dl")
    recordio.write(prefix, [(image(i), i // 3) for i in range(12)])
    ds = RecordIODataset(prefix)
    ds[0]  # open a handle in the parent: workers must open their own
    loader = DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(y)
    images = torch.cat(images).numpy()
    labels = torch.cat(labels).tolist()
    assert labels == [i // 3 for i in range(12)]
    for i in range(12):
        np.testing.assert_array_equal(images[i], image(i))


def test_write_creates_the_destination_folder(tmp_path):
    import numpy as np

    from faceforge.data.recordio import RecordIODataset, write

    image = np.full((8, 8, 3), 7, dtype=np.uint8)
    write(tmp_path / "new" / "sub" / "train", [(image, 0), (image, 1)])
    ds = RecordIODataset(tmp_path / "new" / "sub" / "train")
    assert len(ds) == 2 and ds.num_classes == 2
