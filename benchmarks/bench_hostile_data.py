"""Hostile data inputs (issues 25 and 26): what each costs, in a fresh process per input.

Makes every input in a temporary folder (nothing shipped), then runs each case as its own process under
``ulimit -v`` (so that code which would allocate without bound fails fast instead of swapping) and
reports the exit code, wall time, peak resident memory (``/usr/bin/time``) and the last line of stderr.

    PYTHONPATH=<tree> python benchmarks/bench_hostile_data.py [--limit-gb 6]

Run it once with the tree to measure (``PYTHONPATH=.``) and once with an older tree for "before".
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class _Call:
    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def make_inputs(d: Path) -> list[tuple[str, str]]:
    """``[(what, shell command)]`` of every case, its input written under ``d``."""
    from faceforge.data import recordio

    py = f"{sys.executable} -c"
    cases = []
    # align: a 45-byte PNG declaring 20000 x 20000, and a PNG with a corrupt chunk after IDAT
    bomb = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)) + _chunk(b"IEND", b"")
    (d / "bomb.png").write_bytes(bomb)
    good = _png(np.zeros((16, 16, 3), np.uint8))
    end = good.index(b"IEND") - 4
    (d / "broken.png").write_bytes(good[:end] + _chunk(b"iCCP", b"x") + good[end:])
    coords = " ".join(["40 50 70 50 56 70 42 90 70 90"])
    for name in ("bomb", "broken"):
        (d / f"{name}.txt").write_text(f"{name}.png {coords}\n")
        cases.append((f"`align` of a {'45-byte PNG declaring 20000x20000' if name == 'bomb' else 'PNG with a corrupt iCCP chunk after IDAT'}",
                      f"{py} 'from faceforge.cli import main; raise SystemExit(main([\"align\", \"{d}/{name}.txt\", \"{d}/out_{name}\"]))'"))
    # .bin: bytes(2**40)
    (d / "huge.bin").write_bytes(pickle.dumps(([_Call(bytes, 2**40), b"x"], [True]), protocol=2))
    cases.append(("`inspect` of a .bin calling `bytes(2**40)`", f"{py} 'from faceforge.cli import main; raise SystemExit(main([\"inspect\", \"{d}/huge.bin\"]))'"))
    # .bin: one 8000x8000 PNG in 4 slots through the pickle memo
    big = _png(np.zeros((8000, 8000, 3), np.uint8))
    (d / "memo.bin").write_bytes(pickle.dumps(([big] * 4, [True, False])))
    cases.append((f"`load_bin` (train, eval) of a {os.path.getsize(d / 'memo.bin') // 1024} KB .bin: one 8000x8000 PNG in 4 slots (memo)",
                   f"{py} 'from faceforge.data.pairs import load_bin; load_bin(\"{d}/memo.bin\")'"))
    # .bin: shared nest 60 deep in issame[0]; 100k-deep nest; first element no list
    nest: list = [True]
    for _ in range(60):
        nest = [nest, nest]
    (d / "nest.bin").write_bytes(pickle.dumps(([b"a", b"b"], [nest])))
    cases.append((f"`inspect` of a {os.path.getsize(d / 'nest.bin')}-byte .bin whose issame[0] is a shared nest 60 deep",
                   f"{py} 'from faceforge.cli import main; raise SystemExit(main([\"inspect\", \"{d}/nest.bin\"]))'"))
    depth = 100_000
    (d / "deep.bin").write_bytes(b"\x80\x02]" + b"]" * depth + b"a" * (depth - 1) + b"\x86.")
    cases.append(("`inspect` of a .bin nesting lists 100,000 deep", f"{py} 'from faceforge.cli import main; raise SystemExit(main([\"inspect\", \"{d}/deep.bin\"]))'"))
    (d / "odd.bin").write_bytes(pickle.dumps((5, [True])))
    cases.append(("`inspect` of a .bin whose first element is an int", f"{py} 'from faceforge.cli import main; raise SystemExit(main([\"inspect\", \"{d}/odd.bin\"]))'"))

    # RecordIO: overlapping identity records; a meta record claiming (2**31, 2**31)
    def meta(a, b):
        return recordio.pack(recordio.IRHeader(2, [a, b], 0, 0), b"")

    def image(label):
        return recordio.pack(recordio.IRHeader(0, float(label), 0, 0), good)

    for name, records in (("overlap", [meta(3, 5), image(0), image(1), meta(1, 3), meta(1, 3)]),
                          ("claim", [meta(2.0**31, 2.0**31), image(0)])):
        offsets, rec = [], bytearray()
        for payload in records:
            offsets.append(len(rec))
            rec += recordio.frame_record(payload)
        (d / f"{name}.rec").write_bytes(bytes(rec))
        (d / f"{name}.idx").write_text("".join(f"{k}\t{o}\n" for k, o in enumerate(offsets)))
    cases.append(("`inspect --decode` of a .rec of 2 images whose 2 identity records overlap",
                  f"{py} 'from faceforge.cli import main; raise SystemExit(main([\"inspect\", \"{d}/overlap\", \"--decode\"]))'"))
    cases.append(("`inspect` of a .rec whose meta record claims (2^31, 2^31)",
                  f"{py} 'from faceforge.cli import main; raise SystemExit(main([\"inspect\", \"{d}/claim\"]))'"))

    # IJB: 1:N CSVs and meta names
    (d / "quote.csv").write_text('TEMPLATE_ID,SUBJECT_ID,FILENAME\n1,2,"a.jpg\n3,4,b.jpg\n')
    (d / "field.csv").write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n1,2," + "x" * 131_073 + "\n")
    (d / "id.csv").write_text("TEMPLATE_ID,SUBJECT_ID\n99999999999999999999,2\n")
    for name, what in (("quote", "an unterminated quote"), ("field", "a 128 KiB field"), ("id", "TEMPLATE_ID 99999999999999999999")):
        cases.append((f"IJB 1:N CSV with {what} (`read_1n_gallery`, read by eval --ijb)",
                      f"{py} 'from faceforge.eval.ijb import read_1n_gallery; print(len(read_1n_gallery(\"{d}/{name}.csv\")))'"))
    release = d / "IJBC"
    (release / "meta").mkdir(parents=True)
    (release / "meta" / "ijbc_face_tid_mid.txt").write_text("a.jpg 1 1\n../../etc/hostname 2 2\n")
    (release / "meta" / "ijbc_name_5pts_score.txt").write_text(
        "".join(f"{n} {' '.join(['1'] * 10)} 0.9\n" for n in ("a.jpg", "../../etc/hostname")))
    (release / "meta" / "ijbc_template_pair_label.txt").write_text("1 2 0\n")
    cases.append(("IJB meta naming `../../etc/hostname` (`IJBMeta.load`)",
                  f"{py} 'from faceforge.data.ijb import IJBMeta; print(IJBMeta.load(\"{release}\").image_names)'"))
    return cases


def run(command: str, limit_kb: int, timeout: int) -> tuple[int, float, float, str]:
    """(exit code, seconds, peak RSS MB, last stderr line) of ``command`` in a fresh process."""
    script = f"ulimit -v {limit_kb}; exec /usr/bin/time -f '@@ %e %M' {command}"
    try:
        p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, float(timeout), float("nan"), f"killed after {timeout} s"
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    stats = [line for line in lines if line.startswith("@@ ")]
    seconds, kb = (float(v) for v in stats[-1].split()[1:3]) if stats else (float("nan"), float("nan"))
    rest = [line for line in lines if not line.startswith("@@ ") and "Command exited" not in line]
    last = rest[-1] if rest else (p.stdout.strip().splitlines() or [""])[-1]
    return p.returncode, seconds, kb / 1024, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-gb", type=float, default=6.0, help="ulimit -v of each case (default 6)")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per case (default 120)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for what, command in make_inputs(Path(tmp)):
            code, seconds, mb, last = run(command, int(args.limit_gb * 2**20), args.timeout)
            last = last.replace(tmp, "D")
            print(f"| {what} | exit {code}, {seconds:.2f} s, {mb:.0f} MB | {last[:160]} |", flush=True)


if __name__ == "__main__":
    main()
