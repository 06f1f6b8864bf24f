"""Hostile and malformed data files are one line, exit 2, bounded memory (issues 25 and 26).

Every crafted input is made here: ``.bin`` pickles written opcode by opcode or from a ``__reduce__``,
RecordIO files framed by hand, IJB meta and 1:N files as text. Items: align keeps identity folders
(25.9); ``bytes(2**40)`` in a ``.bin`` (25); image amplification through the pickle memo (26.9);
bounded messages and deep nests (26.10); ``inspect`` of a ``.bin`` whose first element is no list
(26.15); RecordIO identity records against labels (26.7), a meta record claiming 2**31 keys (26.8) and
every record header checked before step 1 (25); IJB CSVs, ids and image names (26.13).
"""

from __future__ import annotations

import io
import pickle
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from faceforge.cli import main
from faceforge.data import pairs, recordio
from faceforge.data.pairs import PairSetError, load_bin, write_bin
from faceforge.data.synthetic import render_images


def one_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run ``faceforge ARGV``: exit 2 and one line ``faceforge <cmd>: ...`` (no internal error); return it."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "internal error" not in err, (code, err)
    assert lines[0].startswith(f"faceforge {argv[0]}: ")
    return lines[0]


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# 25.9: align keeps the identity folders


def test_align_keeps_identity_folders(tmp_path: Path, capsys) -> None:
    from faceforge.data.align import ARCFACE_TEMPLATE

    faces = render_images([0, 1], [0, 0], image_size=112)
    coords = " ".join(f"{v:.4f}" for v in ARCFACE_TEMPLATE.ravel())
    for person, face in zip("ab", faces):
        (tmp_path / "photos" / person).mkdir(parents=True)
        Image.fromarray(face).save(tmp_path / "photos" / person / "x.png")
    (tmp_path / "photos" / "list.txt").write_text(f"a/x.png {coords}\nb/x.png {coords}\n")
    assert main(["align", str(tmp_path / "photos" / "list.txt"), str(tmp_path / "out")]) == 0
    for person, face in zip("ab", faces):  # two crops, each of its own photo (was: one x.png, b over a)
        crop = np.asarray(Image.open(tmp_path / "out" / person / "x.png")).astype(int)
        assert np.abs(crop - face.astype(int)).max() <= 1
    assert not (tmp_path / "out" / "x.png").exists()

    Image.fromarray(faces[0]).save(tmp_path / "photos" / "a" / "x.jpg")
    (tmp_path / "photos" / "clash.txt").write_text(f"a/x.png {coords}\na/x.jpg {coords}\n")
    line = one_line(capsys, ["align", str(tmp_path / "photos" / "clash.txt"), str(tmp_path / "out2")])
    assert re.search(r"a/x\.jpg: would be written to x\.png, as .*a/x\.png is", line)
    assert not (tmp_path / "out2").exists()  # refused before any crop is written


# ----------------------------------------------------------------------------------------------
# .bin pair sets


class _Call:
    """Pickles as ``fn(*args)``: how a hostile file asks the unpickler to call something."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_bytes_of_an_int_is_refused_in_train_eval_and_inspect(tmp_path: Path, capsys) -> None:
    path = tmp_path / "huge.bin"
    path.write_bytes(pickle.dumps(([_Call(bytes, 2**40), b"x"], [True]), protocol=2))
    start = time.perf_counter()
    with pytest.raises(PairSetError, match=r"huge\.bin: builtins\.bytes is admitted only to copy bytes, got \(int: "):
        load_bin(path)  # was: MemoryError (an attempt to allocate 1 TiB)
    assert time.perf_counter() - start < 5  # refused before anything is allocated, whatever the load
    assert "builtins.bytes" in one_line(capsys, ["inspect", str(path)])


def test_bytes_made_by_the_pickle_are_bounded_by_the_file(tmp_path: Path) -> None:
    # One 1,000-character string stored once and re-encoded by 2,000 memo references: 2 MB of bytes objects
    # from a 30 KB file (a bigger string and more references reach any size).
    memo = _memo_amplified_pickle("\xff" * 1000, 2000)
    assert len(memo) < 40_000
    (tmp_path / "memo.bin").write_bytes(memo)
    with pytest.raises(PairSetError, match=r"memo\.bin: _codecs\.encode would make 1000 bytes, more than the file holds"):
        load_bin(tmp_path / "memo.bin")
    legit = _memo_amplified_pickle("\xff" * 1000, 1)  # one encode of a string it holds: admitted
    assert pickle.loads(legit)[0] == [b"\xff" * 1000]
    (tmp_path / "one.bin").write_bytes(legit)
    with pytest.raises(PairSetError, match=r"one\.bin: 1 images for 0 issame entries"):
        load_bin(tmp_path / "one.bin")  # unpickled; the structure is what is wrong


def _memo_amplified_pickle(text: str, copies: int) -> bytes:
    """``([encode(text, 'latin1')] * copies distinct bytes objects, [])`` with ``text`` stored once (memo 0)."""
    out = bytearray(b"\x80\x02")
    out += b"c_codecs\nencode\nq\x000"  # GLOBAL, memo 0, POP
    data = text.encode("utf-8")
    out += b"X" + len(data).to_bytes(4, "little") + data + b"q\x010"  # BINUNICODE, memo 1, POP
    out += b"]("  # EMPTY_LIST, MARK
    for _ in range(copies):
        out += b"h\x00h\x01X\x06\x00\x00\x00latin1\x86R"  # encode(text, 'latin1'): a new 1 KB bytes object
    out += b"e"  # APPENDS
    out += b"]\x86."  # issame = [], TUPLE2, STOP
    return bytes(out)


def test_one_image_referenced_by_every_slot_is_refused_before_decoding(tmp_path: Path, monkeypatch) -> None:
    image = png(np.zeros((16, 16, 3), np.uint8))
    path = tmp_path / "memo.bin"
    path.write_bytes(pickle.dumps(([image] * 8, [True] * 4)))  # the pickler stores it once: 8 memo references
    decoded = []
    monkeypatch.setattr(pairs, "decode_image", lambda *a, **k: decoded.append(a) or np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(PairSetError, match=r"memo\.bin: image 1 is the same pickled object as image 0"):
        load_bin(path)
    assert decoded == []  # nothing decoded


def test_image_sizes_are_read_from_headers_before_decoding(tmp_path: Path, monkeypatch, capsys) -> None:
    big = png(np.zeros((2000, 2000, 3), np.uint8))  # 4 MP of zeros: 12 KB of PNG
    path = tmp_path / "big.bin"
    path.write_bytes(pickle.dumps(([bytes(bytearray(big)) for _ in range(4)], [True, False])))
    decoded = []
    monkeypatch.setattr(pairs, "decode_image", lambda *a, **k: decoded.append(a))
    with pytest.raises(PairSetError, match=r"big\.bin: image 0: image declares 2000x2000 = 4000000 pixels, more "
                                           r"than the 1048576 allowed here; refused before decoding"):
        load_bin(path)
    small = render_images([0, 0], [0, 1], image_size=16)
    write_bin(tmp_path / "small.bin", small, [True])
    with pytest.raises(PairSetError, match=r"small\.bin: verification images are 16x16 but the model's image size "
                                           r"is 56 \(image 0, refused before decoding\)"):
        load_bin(tmp_path / "small.bin", expect_size=56, expect_name="the model's image size")
    assert decoded == []
    monkeypatch.undo()
    images, issame = load_bin(tmp_path / "small.bin", expect_size=16)
    np.testing.assert_array_equal(images, small)


def shared_nest(depth: int) -> list:
    nest: list = [True]
    for _ in range(depth):
        nest = [nest, nest]  # shared: a small pickle, an exponential repr
    return nest


def test_messages_quoting_file_data_are_bounded(tmp_path: Path, capsys) -> None:
    path = tmp_path / "nest.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], [shared_nest(60)])))
    assert path.stat().st_size < 1000
    with pytest.raises(PairSetError, match=r"nest\.bin: issame\[0\] must be a bool or 0/1, got list: \[\[\[") as e:
        load_bin(path)  # was: a repr of 2**60 leaves
    assert len(str(e.value)) < 300
    assert len(one_line(capsys, ["inspect", str(path)])) < 320


def deep_nest_pickle(depth: int) -> bytes:
    """``([], [[[...]]])`` nested ``depth`` lists deep, written opcode by opcode (pickle.dumps would recurse)."""
    return b"\x80\x02]" + b"]" * depth + b"a" * (depth - 1) + b"\x86."


def test_a_deep_nest_is_a_bad_file_not_a_recursion_error(tmp_path: Path, capsys) -> None:
    path = tmp_path / "deep.bin"
    path.write_bytes(deep_nest_pickle(100_000))
    with pytest.raises(PairSetError, match=r"deep\.bin: "):
        load_bin(path)  # was: RecursionError, an internal error
    one_line(capsys, ["inspect", str(path)])


def test_inspect_of_a_bin_whose_first_element_is_no_list(tmp_path: Path, capsys) -> None:
    path = tmp_path / "odd.bin"
    path.write_bytes(pickle.dumps((5, [True])))
    line = one_line(capsys, ["inspect", str(path)])  # was: internal error: TypeError
    assert re.search(r"odd\.bin: bins \(the first element\) must be a list of encoded images, got int: 5", line)


def test_an_unsafe_pickle_is_a_user_error(tmp_path: Path, capsys) -> None:
    import os

    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Call(os.system, "true")], [True])))
    assert re.search(r"refused to load global (posix|os)\.system", one_line(capsys, ["inspect", str(path)]))


# ----------------------------------------------------------------------------------------------
# RecordIO


def write_records(prefix: Path, records: list[bytes]) -> None:
    """``prefix.rec``/``.idx`` with ``records[k]`` (payloads) at key ``k``, framed as dmlc does."""
    offsets, rec = [], bytearray()
    for payload in records:
        offsets.append(len(rec))
        rec += recordio.frame_record(payload)
    Path(f"{prefix}.rec").write_bytes(bytes(rec))
    Path(f"{prefix}.idx").write_text("".join(f"{k}\t{o}\n" for k, o in enumerate(offsets)))


def meta(a: float, b: float) -> bytes:
    return recordio.pack(recordio.IRHeader(2, [a, b], 0, 0), b"")


def image_record(label: int, seed: int) -> bytes:
    face = render_images([seed], [0], image_size=16)[0]
    return recordio.pack(recordio.IRHeader(0, float(label), 0, 0), png(face))


def test_overlapping_identity_records_are_refused(tmp_path: Path, capsys) -> None:
    prefix = tmp_path / "overlap"
    # 2 images (keys 1, 2), identity records (keys 3, 4) both claiming keys 1..2
    write_records(prefix, [meta(3, 5), image_record(0, 0), image_record(1, 1), meta(1, 3), meta(1, 3)])
    line = one_line(capsys, ["inspect", str(prefix), "--decode"])  # was: 2 identities x 2 images, exit 0
    assert re.search(r"overlap\.rec: key 4 .*\(identity record of class 1\): range \(1, 3\) overlaps the range "
                     r"\(1, 3\) of class 0 \(key 3\)", line)


def test_image_labels_are_checked_against_identity_records(tmp_path: Path, capsys) -> None:
    prefix = tmp_path / "swapped"
    write_records(prefix, [meta(3, 5), image_record(1, 0), image_record(0, 1), meta(1, 2), meta(2, 3)])
    line = one_line(capsys, ["inspect", str(prefix), "--decode"])
    assert re.search(r"swapped\.rec: key 1 .*: label 1 but the identity record of class 0 \(key 3\) holds keys 1\.\.1",
                     line)


def test_a_meta_record_claiming_2_31_keys_is_compared_with_the_idx_first(tmp_path: Path, capsys) -> None:
    prefix = tmp_path / "claim"
    write_records(prefix, [meta(2.0**31, 2.0**31), image_record(0, 0)])
    start = time.perf_counter()
    line = one_line(capsys, ["inspect", str(prefix)])  # was: a list of 2**31 keys (about 190 GB)
    assert time.perf_counter() - start < 5
    assert re.search(r"claim\.rec: meta record .*label \(2147483648, 2147483648\) declares keys 1\.\.2147483647 "
                     r"\(2147483647 records\) but .*claim\.idx has 2 entries", line)


def test_every_record_header_is_checked_before_step_1(tmp_path: Path) -> None:
    from faceforge.train.config import config_from_dict
    from faceforge.train.data import BadRecordError, build_dataset

    labels = np.repeat(np.arange(4), 4)
    faces = render_images(labels, np.tile(np.arange(4), 4), image_size=16)
    prefix = tmp_path / "train"
    recordio.write(prefix, zip(list(faces), labels.tolist()))
    index = recordio.read_idx(f"{prefix}.idx")
    rec = bytearray(Path(f"{prefix}.rec").read_bytes())
    rec[index[13]: index[13] + 4] = b"\0\0\0\0"  # key 13: a bad magic, met only at the 13th read before
    Path(f"{prefix}.rec").write_bytes(bytes(rec))

    def config(skip_bad: bool) -> Any:
        return config_from_dict({
            "seed": 0, "output": str(tmp_path / "run"),
            "model": {"backbone": "r18", "embedding_size": 16},
            "head": {"name": "arcface"},
            "data": {"name": "recordio", "path": str(prefix), "image_size": 16, "batch_size": 4, "eval_pairs": 0,
                     "skip_bad": skip_bad},
            "train": {"steps": 1},
        }, "<test>")

    with pytest.raises(BadRecordError, match=rf"data\.path: .*train\.rec: bad magic 0x00000000 at byte offset "
                                             rf"{index[13]} \(key 13\)"):
        build_dataset(config(False))  # was: built, the record found at its first read
    assert len(build_dataset(config(True))) == 16  # data.skip_bad: left to the reader, which skips it


def test_a_training_record_far_larger_than_the_crop_is_refused_from_its_header(tmp_path: Path, monkeypatch) -> None:
    from faceforge.data import images
    from faceforge.train.config import config_from_dict
    from faceforge.train.data import BadRecordError, build_dataset

    faces = list(render_images([0, 0, 1, 1], [0, 1, 0, 1], image_size=16))
    faces[2] = np.zeros((400, 400, 3), np.uint8)  # 160,000 pixels: no 16x16 crop
    recordio.write(tmp_path / "train", zip(faces, [0, 0, 1, 1]))
    cfg = config_from_dict({"seed": 0, "output": str(tmp_path / "run"), "model": {"backbone": "r18", "embedding_size": 16},
                            "head": {"name": "arcface"}, "train": {"steps": 1},
                            "data": {"name": "recordio", "path": str(tmp_path / "train"), "image_size": 16,
                                     "batch_size": 2, "eval_pairs": 0}}, "<test>")
    dataset = build_dataset(cfg)
    loads = []
    real_to_rgb = images.to_rgb
    monkeypatch.setattr(images, "to_rgb", lambda im, *a, **k: loads.append(im.size) or real_to_rgb(im, *a, **k))
    with pytest.raises(BadRecordError, match=r"train\.rec: key 3 .*image declares 400x400 = 160000 pixels, more than "
                                             r"the 1024 allowed here; refused before decoding"):
        dataset[2]  # was: decoded whole, then refused for its size
    assert loads == []


# ----------------------------------------------------------------------------------------------
# IJB


@pytest.mark.parametrize(("text", "match"), [
    ('TEMPLATE_ID,SUBJECT_ID,FILENAME\n1,2,"a.jpg\n3,4,b.jpg\n', r"g\.csv:\d: not a readable CSV line: unexpected end"),
    ("TEMPLATE_ID,SUBJECT_ID,FILENAME\n1,2," + "x" * 131_073 + "\n", r"g\.csv:2: not a readable CSV line: field larger"),
    ("TEMPLATE_ID,SUBJECT_ID\n99999999999999999999,2\n", r"g\.csv:2: TEMPLATE_ID 99999999999999999999 is out of range"),
])
def test_ijb_1n_csv_errors_are_one_line_when_read(tmp_path: Path, text: str, match: str) -> None:
    from faceforge.eval.ijb import read_1n_gallery

    (tmp_path / "g.csv").write_text(text)
    with pytest.raises(ValueError, match=match) as e:  # was: _csv.Error, or an OverflowError after embedding
        read_1n_gallery(tmp_path / "g.csv")
    assert len(str(e.value)) < 400


@pytest.mark.parametrize("name", ["/etc/hostname", "../../secret.jpg", "ok/../../x.jpg"])
def test_ijb_image_names_stay_in_the_release(tmp_path: Path, name: str) -> None:
    from faceforge.data.ijb import IJBMeta

    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "ijbc_face_tid_mid.txt").write_text(f"a.jpg 1 1\n{name} 2 2\n")
    (tmp_path / "meta" / "ijbc_name_5pts_score.txt").write_text(
        "".join(f"{n} {' '.join(['1'] * 10)} 0.9\n" for n in ("a.jpg", name)))
    (tmp_path / "meta" / "ijbc_template_pair_label.txt").write_text("1 2 0\n")
    with pytest.raises(ValueError, match=rf"ijbc_face_tid_mid\.txt:2: image name '{re.escape(name)}' leaves the "
                                         "release folder"):
        IJBMeta.load(tmp_path, "IJBC")


def test_ijb_template_ids_are_range_checked_when_read(tmp_path: Path) -> None:
    from faceforge.data.ijb import IJBMeta

    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "ijbc_face_tid_mid.txt").write_text("a.jpg 99999999999999999999 1\n")
    (tmp_path / "meta" / "ijbc_name_5pts_score.txt").write_text(f"a.jpg {' '.join(['1'] * 10)} 0.9\n")
    (tmp_path / "meta" / "ijbc_template_pair_label.txt").write_text("1 99999999999999999999 0\n")
    with pytest.raises(ValueError, match=r"ijbc_face_tid_mid\.txt:1: template_id 99999999999999999999 is out of range"):
        IJBMeta.load(tmp_path, "IJBC")  # was: OverflowError, an internal error
