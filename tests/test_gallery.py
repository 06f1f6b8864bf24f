"""A gallery knows its model (issue 25.5) and a gallery folder is checked as a file from someone else (26.14,
25: a corrupt index.faiss): every crafted folder is one line naming the file, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import _modelfiles as M  # tests/ is on sys.path
import numpy as np
import pytest

from faceforge.cli import main
from faceforge.deploy.inference import Gallery, Recognizer, load_model


def _err(capsys: pytest.CaptureFixture, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"faceforge {command}: "), err
    return err[0]


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    """Two models of the same architecture (other weights), an identity folder, an index of it by model a."""
    a = M.write_model(tmp_path / "a", seed=0)
    b = M.write_model(tmp_path / "b", seed=1)
    M.save_faces(tmp_path / "gallery", 6, identities=3)
    index = tmp_path / "index"
    assert main(["search", "build", str(a), str(tmp_path / "gallery"), str(index), "--quiet"]) == 0
    return {"a": a, "b": b, "gallery": tmp_path / "gallery", "index": index, "probe": tmp_path / "gallery" / "id0" / "000.png"}


def test_the_gallery_records_the_models_fingerprint_and_another_model_is_refused(setup, capsys):
    meta = json.loads((setup["index"] / "gallery.json").read_text())
    ra, rb = load_model(setup["a"]), load_model(setup["b"])
    assert meta["fingerprint"] == ra.fingerprint() != rb.fingerprint() and meta["model"] == str(setup["a"])
    capsys.readouterr()
    assert main(["search", str(setup["b"]), str(setup["index"]), str(setup["probe"])]) == 2
    line = _err(capsys, "search")
    assert str(setup["a"]) in line and str(setup["b"]) in line and "--force" in line
    assert main(["search", str(setup["b"]), str(setup["index"]), str(setup["probe"]), "--force"]) == 0
    assert main(["search", str(setup["a"]), str(setup["index"]), str(setup["probe"])]) == 0
    with pytest.raises(ValueError, match="not comparable"):
        rb.search(setup["index"], [setup["probe"]])


def test_the_fingerprint_is_the_weights_and_the_feeding_not_the_file_format(tmp_path: Path):
    """last.pt and model.safetensors of the same weights agree; another normalisation or flip test does not."""
    ckpt = M.write_checkpoint(tmp_path / "run" / "last.pt", seed=0)
    weights = M.write_model(tmp_path / "run2", seed=0)
    base = load_model(weights).fingerprint()
    assert load_model(ckpt).fingerprint() == base
    assert load_model(weights, std=(64.0,) * 3).fingerprint() != base
    assert load_model(weights, flip_test=False).fingerprint() != base
    assert Recognizer(lambda x: x, load_model(weights).info).fingerprint() == ""  # a backend that cannot say


def test_a_gallery_without_a_fingerprint_is_searched_only_with_force(setup, capsys):
    meta = json.loads((setup["index"] / "gallery.json").read_text())
    del meta["fingerprint"]  # as an older faceforge wrote it
    (setup["index"] / "gallery.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["search", str(setup["a"]), str(setup["index"]), str(setup["probe"])]) == 2
    assert "no fingerprint recorded" in _err(capsys, "search")
    assert main(["search", str(setup["a"]), str(setup["index"]), str(setup["probe"]), "--force"]) == 0


def test_append_checks_model_dimension_and_duplicates_before_embedding(setup, tmp_path: Path, capsys, monkeypatch):
    embedded: list[int] = []
    original = Recognizer.embed_files

    def counting(self, images, *args, **kwargs):
        embedded.append(len(list(images)))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(Recognizer, "embed_files", counting)
    other_dim = M.write_model(tmp_path / "wide", module=M.build_backbone(M.BACKBONE, embedding_size=16, input_size=M.SIZE),
                              embedding_size=16)
    capsys.readouterr()
    for model, words in ((setup["b"], "not comparable"), (other_dim, "16-D")):
        assert main(["search", "build", str(model), str(setup["gallery"]), str(setup["index"]), "--append", "--quiet"]) == 2
        assert words in _err(capsys, "search")
    assert main(["search", "build", str(setup["a"]), str(setup["gallery"]), str(setup["index"]), "--append", "--quiet"]) == 2
    assert "6 of these images are already in the index" in _err(capsys, "search")
    assert embedded == []  # nothing was embedded by a refused --append
    assert len(Gallery.load(setup["index"])) == 6
    M.save_faces(setup["gallery"] / "id9", 2, seed=5)
    assert main(["search", "build", str(setup["a"]), str(setup["gallery"]), str(setup["index"]), "--append",
                 "--skip-existing", "--quiet"]) == 0
    assert embedded == [2]  # only the new images
    g = Gallery.load(setup["index"])
    assert len(g) == 8 and g.identities[-2:] == ["id9", "id9"]
    np.testing.assert_array_equal(g.embeddings[-2:], load_model(setup["a"]).embed(sorted((setup["gallery"] / "id9").iterdir())))


def test_append_refusing_duplicates_names_the_first(setup, capsys):
    capsys.readouterr()
    assert main(["search", "build", str(setup["a"]), str(setup["gallery"]), str(setup["index"]), "--append", "--quiet"]) == 2
    line = _err(capsys, "search")
    assert "--append: 6 of these images are already in the index (first: " in line and "--skip-existing" in line


# ---------------------------------------------------------------------------------------------- hostile folders


def _rewrite(index: Path, **changes) -> None:
    meta = json.loads((index / "gallery.json").read_text())
    meta.update(changes)
    (index / "gallery.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("change, words", [
    ("top-level list", "gallery.json: top level: got list, expected a JSON object"),
    ({"identities": "ab"}, "gallery.json: identities: got 'ab', expected a list of strings"),
    ({"files": [1, 2, 3, 4, 5, 6]}, "gallery.json: files: got list, expected a list of strings"),
    ({"identities": ["x"]}, "gallery.json: identities: got '1 entries', expected 6"),
    ({"kind": "lsh"}, "gallery.json: kind: got 'lsh', expected one of flat, ivf, hnsw"),
    ({"dim": 9}, "gallery.json: dim: got 9, expected 8"),
    ({"options": {"nlist": 2 ** 40}, "kind": "ivf"}, "options.nlist: got 1099511627776, expected an int in [1, 6]"),
    ({"options": {"nprobe": "x"}}, "options.nprobe: got 'x', expected an int in"),
    ({"options": {"bogus": 1}}, "options.bogus: unknown"),
    ({"options": []}, "options: expected a JSON object"),
])
def test_a_bad_gallery_json_is_one_line(setup, capsys, change, words):
    if change == "top-level list":
        (setup["index"] / "gallery.json").write_text("[1, 2]")
    else:
        _rewrite(setup["index"], **change)
    (setup["index"] / "index.faiss").unlink()  # the options would go to faiss: nothing may reach it unchecked
    capsys.readouterr()
    assert main(["search", str(setup["a"]), str(setup["index"]), str(setup["probe"])]) == 2
    line = _err(capsys, "search")
    assert words in line and str(setup["index"]) in line


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other kind", "other dimension", "empty"])
def test_a_bad_index_faiss_names_the_file_and_search_build(setup, capsys, damage):
    import faiss

    path = setup["index"] / "index.faiss"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "garbage":
        path.write_bytes(b"IxFI" + bytes(range(256)) * 4)
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a valid index that is not the one gallery.json describes
        x = np.eye(8 if damage == "other kind" else 4, dtype=np.float32)[:6]
        index = faiss.IndexHNSWFlat(x.shape[1], 8, faiss.METRIC_INNER_PRODUCT) if damage == "other kind" else faiss.IndexFlatIP(4)
        index.add(x)
        faiss.write_index(index, str(path))
    capsys.readouterr()
    assert main(["search", str(setup["a"]), str(setup["index"]), str(setup["probe"])]) == 2
    line = _err(capsys, "search")
    assert f"{path}: " in line and "`faceforge search build` remakes it" in line
    path.unlink()  # the embeddings are the source of truth: without index.faiss the index is rebuilt
    assert main(["search", str(setup["a"]), str(setup["index"]), str(setup["probe"])]) == 0


def test_nan_embeddings_in_a_gallery_are_refused(setup, capsys):
    from faceforge.core.fileio import save_npy

    e = np.load(setup["index"] / "embeddings.npy")
    e[3, 0] = np.nan
    save_npy(setup["index"] / "embeddings.npy", e)
    capsys.readouterr()
    assert main(["search", str(setup["a"]), str(setup["index"]), str(setup["probe"])]) == 2
    assert "embeddings.npy: float32 array of shape (6, 8); expected finite" in _err(capsys, "search")


def test_saving_a_gallery_never_writes_through_a_planted_link(tmp_path: Path):
    """A shipped index folder with its files (and the old temporary name) linked to a victim file (issue 26.3)."""
    victim = tmp_path / "victim"
    victim.write_text("keep")
    index = tmp_path / "index"
    index.mkdir()
    for name in ("index.faiss", ".index.faiss.tmp", "gallery.json", "embeddings.npy"):
        (index / name).symlink_to(victim)
    Gallery(np.eye(4, dtype=np.float32), list("abcd"), list("abcd")).save(index)
    assert victim.read_text() == "keep"
    for name in ("index.faiss", "gallery.json", "embeddings.npy"):
        assert not (index / name).is_symlink()
    assert len(Gallery.load(index)) == 4


def test_append_refuses_another_index_kind_instead_of_ignoring_it(setup, capsys):
    M.save_faces(setup["gallery"] / "id9", 1, seed=5)
    capsys.readouterr()
    assert main(["search", "build", str(setup["a"]), str(setup["gallery"]), str(setup["index"]), "--append",
                 "--skip-existing", "--kind", "hnsw", "--quiet"]) == 2
    assert "--kind hnsw: " in _err(capsys, "search") and len(Gallery.load(setup["index"])) == 6
