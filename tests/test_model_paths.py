"""Every model path that load_model accepts -- a run folder, last.pt, model.safetensors, an .onnx file -- works as
the first argument of embed, verify, search build, search and export (issue 25.6); a failed
`export --quantize static` leaves no file behind (25.8)."""

from __future__ import annotations

import shutil
from pathlib import Path

import _modelfiles as M  # tests/ is on sys.path
import numpy as np
import pytest

from faceforge.cli import main
from faceforge.deploy.export import export_onnx
from faceforge.deploy.inference import Gallery, load_model

pytest.importorskip("onnxruntime", reason="the export / search extras (onnx, onnxruntime, faiss-cpu) are in `dev`")

KINDS = ("run folder", "last.pt", "model.safetensors", ".onnx")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One model in the four forms: a run folder holding last.pt and model.safetensors (same weights), and its
    ONNX export."""
    root = tmp_path_factory.mktemp("paths")
    run = root / "run"
    M.write_checkpoint(run / "last.pt", seed=3)
    M.write_model(run, seed=3)
    export_onnx(run, root / "m.onnx")
    return {"run folder": run, "last.pt": run / "last.pt", "model.safetensors": run / "model.safetensors",
            ".onnx": root / "m.onnx"}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faces")
    M.save_faces(root, 6, identities=3)
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_each_model_path_works_for_every_command(models, images, tmp_path: Path, kind: str, capsys):
    model = str(models[kind])
    files = sorted(str(p) for p in images.rglob("*.png"))
    reference = load_model(models["model.safetensors"]).embed(files)

    assert main(["embed", model, str(images), "--out", str(tmp_path / "e.npy"), "--quiet"]) == 0
    e = np.load(tmp_path / "e.npy")
    if kind == ".onnx":  # BN folded, another runtime: float32 rounding, measured 1 - cos ~ 1e-7 on this model
        assert (1 - _cos(e, reference)).max() < 1e-5
    else:  # the same weights and the same computation
        np.testing.assert_array_equal(e, reference)
    assert (tmp_path / "e.txt").read_text().splitlines() == files

    assert main(["verify", model, files[0], files[1]]) == 0
    assert f"cosine {float(e[0].astype(np.float64) @ e[1]):.4f}" in capsys.readouterr().out

    index = tmp_path / "index"
    assert main(["search", "build", model, str(images), str(index), "--quiet"]) == 0
    assert main(["search", model, str(index), files[2], "--top", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].split()[1] == Path(files[2]).parent.name and out[-1].split()[-1] == files[2]
    assert len(Gallery.load(index)) == 6

    assert main(["export", model, str(tmp_path / "x.onnx")]) == 0
    exported = load_model(tmp_path / "x.onnx").embed(files)
    assert (1 - _cos(exported, reference)).max() < 1e-5


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row cosines in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.einsum("nd,nd->n", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_one_model_in_every_form_searches_one_gallery(models, images, tmp_path: Path, capsys):
    """The fingerprint is the weights: a gallery built from the run folder is searched with last.pt and
    model.safetensors (the ONNX file is other weights -- BN folded -- and is refused unless --force)."""
    index = tmp_path / "index"
    assert main(["search", "build", str(models["run folder"]), str(images), str(index), "--quiet"]) == 0
    probe = sorted(str(p) for p in images.rglob("*.png"))[0]
    for kind in ("last.pt", "model.safetensors"):
        assert main(["search", str(models[kind]), str(index), probe]) == 0, kind
    capsys.readouterr()
    assert main(["search", str(models[".onnx"]), str(index), probe]) == 2
    assert "not comparable" in capsys.readouterr().err


def test_exporting_a_faceforge_onnx_copies_it_and_refuses_a_foreign_one(models, tmp_path: Path, capsys):
    assert main(["export", str(models[".onnx"]), str(tmp_path / "copy.onnx")]) == 0
    assert "copied unchanged" in capsys.readouterr().out
    assert (tmp_path / "copy.onnx").read_bytes() == models[".onnx"].read_bytes()
    import onnx

    foreign = onnx.load(models[".onnx"])
    del foreign.metadata_props[:]
    onnx.save(foreign, tmp_path / "foreign.onnx")
    assert main(["export", str(tmp_path / "foreign.onnx"), str(tmp_path / "f2.onnx")]) == 2
    assert "no faceforge metadata" in capsys.readouterr().err and not (tmp_path / "f2.onnx").exists()


@pytest.mark.parametrize("calibration", ["empty", "wrong size", "quantiser fails"])
def test_a_failed_static_quantisation_leaves_no_file(models, tmp_path: Path, capsys, monkeypatch, calibration: str):
    folder = tmp_path / "calib"
    folder.mkdir()
    if calibration == "wrong size":
        from PIL import Image

        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "a.png")
    elif calibration == "quantiser fails":
        M.save_faces(folder, 2)

        def broken(*args, **kwargs):
            raise ValueError("quantiser failed")

        monkeypatch.setattr("onnxruntime.quantization.quantize_static", broken)
    out = tmp_path / "out" / "m.onnx"
    assert main(["export", str(models["run folder"]), str(out), "--quantize", "static", "--calibration", str(folder)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not out.exists() and not out.with_name("m.int8.onnx").exists()
    # an older export at that path is kept as it was
    out.parent.mkdir(exist_ok=True)
    shutil.copy(models[".onnx"], out)
    assert main(["export", str(models["run folder"]), str(out), "--quantize", "static", "--calibration", str(folder)]) == 2
    assert out.read_bytes() == models[".onnx"].read_bytes() and not out.with_name("m.int8.onnx").exists()
    assert [p.name for p in out.parent.iterdir()] == ["m.onnx"]  # no temporary left either


# ---------------------------------------------------------------------------------------------- issue 25: small ones


def test_onnxruntime_logs_errors_only(models):
    r = load_model(models[".onnx"])
    assert r.backend.session.get_session_options().log_severity_level == 3  # 3 = error


def test_dir_faceforge_lists_load_model():
    import faceforge

    assert {"load_model", "Recognizer"} <= set(dir(faceforge))


def test_embed_streams_images_in_batches_and_counts_progress_in_images(models, images, monkeypatch):
    """Decoding and embedding interleave batch by batch (memory holds one batch of images, not N), and the
    progress bar advances by images."""
    import faceforge.deploy.inference as inference

    events: list[str] = []
    crop, embed_batch = inference._crop, inference.Recognizer._embed_batch
    monkeypatch.setattr(inference, "_crop", lambda *a: events.append("decode") or crop(*a))
    monkeypatch.setattr(inference.Recognizer, "_embed_batch",
                        lambda self, crops, names: events.append(f"embed {len(crops)}") or embed_batch(self, crops, names))
    counted: list[int] = []

    class Bar:
        def update(self, n: int) -> None:
            counted.append(n)

        def close(self) -> None:
            pass

    monkeypatch.setattr(inference, "_progress", lambda total, show: Bar())
    files = sorted(str(p) for p in images.rglob("*.png"))[:5]
    load_model(models["model.safetensors"]).embed_files(files, batch_size=2, progress=True)
    assert events == ["decode", "decode", "embed 2", "decode", "decode", "embed 2", "decode", "embed 1"]
    assert counted == [2, 2, 1]


def test_export_never_writes_through_a_planted_link(models, tmp_path: Path):
    """Links planted at the outputs and at the old temporary name (issue 26.3): the victim is untouched."""
    victim = tmp_path / "victim"
    victim.write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("m.onnx", ".m.onnx.tmp", "m.int8.onnx"):
        (out / name).symlink_to(victim)
    assert main(["export", str(models["run folder"]), str(out / "m.onnx"), "--quantize", "dynamic"]) == 0
    assert victim.read_text() == "keep"
    assert not (out / "m.onnx").is_symlink() and not (out / "m.int8.onnx").is_symlink()
    assert load_model(out / "m.int8.onnx").embed(M.faces(1)).shape == (1, M.DIM)
