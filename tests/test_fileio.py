"""faceforge.core.fileio: the one atomic writer (checkpoints, RecordIO, pair sets, label maps, feature caches)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from faceforge.core.fileio import atomic_files, atomic_open, stale_temporaries


def test_files_replace_together_on_a_clean_exit(tmp_path: Path) -> None:
    a, b = tmp_path / "x.rec", tmp_path / "sub" / "x.idx"
    with atomic_files((a, "wb"), (b, "w")) as (fa, fb):
        fa.write(b"\x00\x01")
        fb.write("0\t0\n")
        assert not a.exists() and not b.exists()  # nothing visible before the block ends
    assert a.read_bytes() == b"\x00\x01" and b.read_bytes() == b"0\t0\n"
    umask = os.umask(0)
    os.umask(umask)
    assert a.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600
    assert stale_temporaries(a) == [] and stale_temporaries(b) == []


def test_an_exception_keeps_the_old_files_and_no_temporaries(tmp_path: Path) -> None:
    a, b = tmp_path / "x.rec", tmp_path / "x.idx"
    a.write_bytes(b"old rec")
    b.write_text("old idx")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_files((a, "wb"), (b, "w")) as (fa, fb):
            fa.write(b"new")
            raise RuntimeError("midway")
    assert a.read_bytes() == b"old rec" and b.read_text() == "old idx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.idx", "x.rec"]


def test_atomic_open_and_bad_mode(tmp_path: Path) -> None:
    with atomic_open(tmp_path / "t.txt", "w") as f:
        f.write("ü\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "ü\n"
    with pytest.raises(ValueError, match="mode='a'"):
        with atomic_open(tmp_path / "t.txt", "a"):
            pass
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "ü\n"
