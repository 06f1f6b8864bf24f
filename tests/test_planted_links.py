"""No faceforge command writes through a planted symlink: a run folder, index folder or output folder may ship
links at the names faceforge writes (``results.md -> ~/.bashrc``, ``.index.faiss.tmp -> victim``); every write
goes through faceforge.core.fileio (a fresh mkstemp temporary renamed with os.replace), so the link itself is
replaced and its target never touched. One test per command: eval, search build, export, pack, align; and the
in-place writers (shard files, the teacher cache, an appended log)."""

from __future__ import annotations

import json
from pathlib import Path

import _eval_data as E  # tests/ is on sys.path
import _tiny_run as T
import numpy as np
import pytest
import torch

from faceforge.cli import main

PRECIOUS = "precious: must never be overwritten\n"


def _plant(link: Path, victim: Path) -> Path:
    """A symlink ``link -> victim``, the victim holding PRECIOUS."""
    victim.parent.mkdir(parents=True, exist_ok=True)
    victim.write_text(PRECIOUS)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)
    return link


def _untouched(victims: list[Path]) -> None:
    for v in victims:
        assert v.read_text() == PRECIOUS, f"{v} was written through a link"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("links")
    ckpt = T.tiny_run(root / "run")
    bin_path, _ = T.pairs_bin(root / "pairs.bin", pairs=24, seed=1)
    people = E.identity_folder(root / "people", identities=3, per_identity=2)
    return {"root": root, "ckpt": ckpt, "bin": bin_path, "people": people}


def test_eval_replaces_links_at_its_reports(run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run_eval"
    names = ["results.md", "results.json", "roc.png", "hist_pairs.png"]
    victims = [tmp_path / "home" / f"victim_{n}" for n in names]
    for name, victim in zip(names, victims):
        _plant(out / name, victim)
    assert main(["eval", str(run["ckpt"]), "--bin", str(run["bin"]), "--output", str(out)]) == 0
    _untouched(victims)
    for name in names:
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "results.json").read_text())["results"][0]["set"] == "pairs"


def test_search_build_replaces_links_in_the_index_folder(run: dict[str, Path], tmp_path: Path) -> None:
    """Before: faiss wrote through idx/.index.faiss.tmp -> victim, and index.faiss then became that link."""
    idx = tmp_path / "idx"
    tmp_victim, index_victim = _plant(idx / ".index.faiss.tmp", tmp_path / "v1").resolve(), tmp_path / "v2"
    _plant(idx / "index.faiss", index_victim)
    _plant(idx / "gallery.json", tmp_path / "v3")
    assert main(["search", "build", str(run["ckpt"].parent / "model.safetensors"), str(run["people"]), str(idx)]) == 0
    _untouched([tmp_victim, index_victim, tmp_path / "v3"])
    assert not (idx / "index.faiss").is_symlink() and (idx / "index.faiss").stat().st_size > 0
    assert json.loads((idx / "gallery.json").read_text())["dim"] == 16


def test_export_replaces_links_at_the_onnx_files(run: dict[str, Path], tmp_path: Path) -> None:
    """Before: the predictable .model.onnx.tmp was written through, and the int8 file was written in place."""
    out = tmp_path / "export" / "model.onnx"
    victims = [tmp_path / "v_tmp", tmp_path / "v_onnx", tmp_path / "v_int8"]
    _plant(out.with_name(".model.onnx.tmp"), victims[0])
    _plant(out, victims[1])
    _plant(out.with_name("model.int8.onnx"), victims[2])
    assert main(["export", str(run["ckpt"].parent), str(out), "--quantize", "dynamic"]) == 0
    _untouched(victims)
    import onnx

    for p in (out, out.with_name("model.int8.onnx")):
        assert not p.is_symlink()
        onnx.checker.check_model(onnx.load(str(p)))


def test_pack_replaces_a_link_at_the_label_map(run: dict[str, Path], tmp_path: Path) -> None:
    dest = tmp_path / "packed" / "train"
    victim = tmp_path / "v"
    _plant(Path(f"{dest}.labels.json"), victim)
    assert main(["pack", str(run["people"]), str(dest)]) == 0
    _untouched([victim])
    assert json.loads(Path(f"{dest}.labels.json").read_text()) == {"id_00": 0, "id_01": 1, "id_02": 2}


def test_align_replaces_a_link_at_an_output_crop(tmp_path: Path) -> None:
    from PIL import Image

    from faceforge.data.align import ARCFACE_TEMPLATE

    photo = tmp_path / "photos" / "x.png"
    photo.parent.mkdir()
    Image.fromarray(np.full((112, 112, 3), 128, dtype=np.uint8)).save(photo)
    points = " ".join(f"{v:.2f}" for v in np.asarray(ARCFACE_TEMPLATE, dtype=np.float64).reshape(10))
    (tmp_path / "marks.txt").write_text(f"{photo} {points}\n")
    out = tmp_path / "aligned"
    assert main(["align", str(tmp_path / "marks.txt"), str(out)]) == 0
    (crop,) = [p for p in out.rglob("*.png")]  # wherever align writes x's crop, a link is planted there
    crop.unlink()
    victim = tmp_path / "v"
    _plant(crop, victim)
    assert main(["align", str(tmp_path / "marks.txt"), str(out)]) == 0
    _untouched([victim])
    assert not crop.is_symlink() and Image.open(crop).size == (112, 112)


def test_shard_files_replace_a_planted_link(tmp_path: Path) -> None:
    from faceforge.heads.base import RowShard
    from faceforge.core import shards

    file = shards.shard_file(3, "head.weight")
    victim = tmp_path / "v"
    _plant(tmp_path / file, victim)
    rows = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    shards.create(tmp_path, file, [3, 4], torch.float32)
    shards.write_rows(tmp_path, file, RowShard(0, 3, 3), rows)
    _untouched([victim])
    entry = {shards.PLACEHOLDER_KEY: file, "shape": [3, 4], "dtype": "float32"}
    assert torch.equal(shards.read_rows(tmp_path, entry), rows)


def test_in_place_writers_refuse_a_link(tmp_path: Path) -> None:
    from faceforge.core.fileio import append_text, atomic_path
    from faceforge.train.teacher_cache import TeacherCache

    victim = tmp_path / "v"
    _plant(tmp_path / "bad_records.txt", victim)
    with pytest.raises(OSError, match="symbolic link"):
        append_text(tmp_path / "bad_records.txt", "x\n")
    # a cache whose files are links (to files of the right shape, even) is refused, never mapped for writing
    cache = TeacherCache(tmp_path / "cache", {"k": 1}, rows=4, dim=2)
    emb = cache.base.with_suffix(".npy")
    np.save(tmp_path / "elsewhere.npy", np.zeros((4, 2), dtype=np.float32))
    emb.unlink()
    emb.symlink_to(tmp_path / "elsewhere.npy")
    with pytest.raises(OSError, match="symbolic link"):
        TeacherCache(tmp_path / "cache", {"k": 1}, rows=4, dim=2)
    # a writer that takes a file name gets a fresh file, never the planted name
    _plant(tmp_path / "out.bin", tmp_path / "v2")
    with atomic_path(tmp_path / "out.bin") as tmp:
        assert tmp.is_file() and not tmp.is_symlink() and tmp.stat().st_size == 0
        tmp.write_bytes(b"new")
    _untouched([victim, tmp_path / "v2"])
    assert (tmp_path / "out.bin").read_bytes() == b"new" and not (tmp_path / "out.bin").is_symlink()


def test_eval_refuses_a_linked_report_folder_in_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A shipped run folder with eval -> elsewhere would make the default reports land there."""
    ckpt = T.tiny_run(tmp_path / "run", model_files=False)
    bin_path, _ = T.pairs_bin(tmp_path / "pairs.bin", pairs=24, seed=1)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run" / "eval").symlink_to(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--bin", str(bin_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "symbolic link inside the run folder" in err
    assert list((tmp_path / "elsewhere").iterdir()) == []
