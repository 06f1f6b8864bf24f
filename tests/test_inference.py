"""From a trained model to a face search: model.safetensors + model.json, ONNX export with parity,
`faceforge embed / verify / search / export`, load_model / Recognizer, the faiss gallery, foreign ONNX."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import _eval_data as E  # tests/ is on sys.path
import numpy as np
import pytest
import torch
from torch import nn

import faceforge
from faceforge.cli import main
from faceforge.cli.demo import run_demo
from faceforge.deploy.export import (
    REAL_FACE_IDENTITIES,
    ExportError,
    check_parity,
    export_backbone,
    export_onnx,
    real_faces,
)
from faceforge.deploy.inference import Gallery, ImageError, Recognizer, TorchBackend, load_model, make_index
from faceforge.deploy.modelfile import MODEL_JSON, MODEL_WEIGHTS, ModelFileError, ModelInfo

pytest.importorskip("onnxruntime", reason="the export / search extras (onnx, onnxruntime, faiss-cpu) are in `dev`")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained run (IResNet, 32 px): its folder."""
    root = tmp_path_factory.mktemp("inference") / "run"
    torch.set_num_threads(1)
    run_demo(tiny=True, overrides=[f"output={root}", "train.progress=false"])
    return root


@pytest.fixture(scope="module")
def gallery_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return E.identity_folder(tmp_path_factory.mktemp("gallery"), identities=6, per_identity=3, size=32)


# ---------------------------------------------------------------------------------------------- model files


def test_each_run_writes_safetensors_and_model_json_that_round_trip(run: Path):
    assert (run / MODEL_WEIGHTS).is_file() and (run / MODEL_JSON).is_file()
    meta = json.loads((run / MODEL_JSON).read_text())
    state = torch.load(run / "last.pt", weights_only=True)
    assert meta["backbone"] == state["config"]["model"]["backbone"]
    assert meta["embedding_size"] == state["config"]["model"]["embedding_size"]
    assert meta["image_size"] == state["config"]["data"]["image_size"] and meta["step"] == state["step"]
    assert meta["mean"] == meta["std"] == [127.5] * 3 and meta["flip_test"] is True
    assert meta["threshold"] == pytest.approx(state["metrics"]["threshold"]) and "best-threshold" in meta["threshold_source"]
    assert meta["threshold_far"] == pytest.approx(state["metrics"]["threshold_far"])
    # safetensors holds exactly the backbone's state_dict
    from safetensors.torch import load_file

    tensors = load_file(run / MODEL_WEIGHTS)
    assert set(tensors) == set(state["backbone"])
    for k, v in state["backbone"].items():
        assert torch.equal(tensors[k], v), k
    crops = real_faces(meta["image_size"])
    a = load_model(run).embed(crops)  # the run folder -> model.safetensors
    b = load_model(run / "last.pt").embed(crops)
    c = load_model(run / MODEL_WEIGHTS).embed(crops)
    assert a.shape == (12, meta["embedding_size"]) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-6)


def test_embeddings_are_eval_embeddings(run: Path):
    """The Recognizer's embeddings are `faceforge eval`'s: normalize(f(x) + f(flip(x)))."""
    from faceforge.eval.verify import embed

    r = load_model(run)
    crops = real_faces(r.image_size)
    np.testing.assert_allclose(r.embed(crops), embed(r.backend.module, crops), atol=1e-6)


def test_safetensors_header_alone_is_enough(run: Path, tmp_path: Path):
    alone = tmp_path / "m.safetensors"
    alone.write_bytes((run / MODEL_WEIGHTS).read_bytes())
    crops = real_faces(32)
    np.testing.assert_array_equal(load_model(alone).embed(crops), load_model(run).embed(crops))


def test_foreign_safetensors_without_metadata_is_a_one_line_error(tmp_path: Path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(ModelFileError, match=r"x\.safetensors: no faceforge metadata"):
        load_model(tmp_path / "x.safetensors")


class Hostile:
    def __reduce__(self):
        return (os.system, ("touch HACKED",))


def test_a_hostile_pickle_never_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "last.pt"
    torch.save({"config": {}, "backbone": Hostile()}, bad, _use_new_zipfile_serialization=True)
    with pytest.raises(ModelFileError, match="last.pt"):
        load_model(bad)
    assert main(["embed", str(bad), str(tmp_path), "--out", str(tmp_path / "f.npy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("faceforge embed: ")
    assert not (tmp_path / "HACKED").exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Hostile()))
    with pytest.raises(ModelFileError):
        load_model(raw)
    assert not (tmp_path / "HACKED").exists()


def test_model_json_errors_name_the_key(tmp_path: Path):
    with pytest.raises(ModelFileError, match=r"src: embedding_size: missing"):
        ModelInfo.from_dict({"backbone": "r18"}, "src")
    with pytest.raises(ModelFileError, match=r"src: colour: unknown key"):
        ModelInfo.from_dict({"backbone": "r18", "embedding_size": 8, "colour": 1}, "src")
    with pytest.raises(ModelFileError, match=r"src: std: got \(1.0, 0.0, 1.0\), expected 3 numbers >= 3.04e-05"):
        ModelInfo.from_dict({"backbone": "r18", "embedding_size": 8, "std": [1, 0, 1]}, "src")


def test_import_faceforge_stays_light():
    code = "import sys, faceforge; assert 'torch' not in sys.modules and 'faceforge.deploy.inference' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(Path(faceforge.__file__).parents[1])})
    from faceforge.deploy import inference

    assert faceforge.load_model is inference.load_model and faceforge.Recognizer is Recognizer


# ---------------------------------------------------------------------------------------------- ONNX


def small_backbone(name: str, size: int, **extra) -> tuple[nn.Module, ModelInfo]:
    from faceforge.backbones import build
    from test_fuse import randomise_batchnorms

    kwargs = {"embedding_size": 16, "input_size": size, **extra}
    if name == "iresnet":
        kwargs["layers"] = (1, 1, 1, 1)
    if name.startswith(("r", "iresnet", "sfnet", "vit")):
        kwargs["width"] = 0.125
    torch.manual_seed(0)
    model = randomise_batchnorms(build(name, **kwargs)).eval()
    return model, ModelInfo(backbone=name, embedding_size=16, image_size=size, backbone_kwargs=extra)


ONE_OF_EACH = [("iresnet", {}), ("mbf", {}), ("sfnet20", {}), ("sfnet20", {"batch_norm": True})]


@pytest.mark.parametrize(("name", "extra"), ONE_OF_EACH, ids=["iresnet", "mbf", "sfnet20", "sfnet20-bn"])
def test_onnx_parity_for_each_kind_of_backbone(name, extra, tmp_path: Path, one_thread):
    model, info = small_backbone(name, 32, **extra)
    report = export_backbone(model, info, tmp_path / "m.onnx")
    # the export's own parity check runs in float64: measured 1 - cos <= 3e-13 for these four (rounding through
    # ~50 layers of 2^-53 each); 1e-11 keeps a 30x margin and sees a 0.5 % embedding error (1 - cos ~ 1e-5)
    assert report.parity_min_cosine >= 1 - 1e-11 and report.parity_images == 12
    r = load_model(tmp_path / "m.onnx")
    assert r.info == info
    torch_r = Recognizer(TorchBackend(model), info)
    crops = real_faces(32)
    cos = np.einsum("nd,nd->n", r.embed(crops).astype(np.float64), torch_r.embed(crops).astype(np.float64))
    # float32 embeddings, each normalised to 1 within D x 2^-24 = 16 x 6e-8 ~ 1e-6 (worst case): 1 - cos <= 2e-6
    # (measured <= 6.6e-8)
    assert cos.min() >= 1 - 2e-6
    e = r.embed(np.concatenate([crops, crops[:3]]))  # dynamic batch: 15 images in one batch
    assert e.shape == (15, 16)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(__import__("faceforge.backbones", fromlist=["BACKBONES"]).BACKBONES.names())))
def test_onnx_parity_for_every_registered_backbone(name, tmp_path: Path, one_thread):
    model, info = small_backbone(name, 16)
    report = export_backbone(model, info, tmp_path / "m.onnx")
    assert report.parity_min_cosine >= 1 - 1e-4


def test_export_refuses_when_parity_fails(run: Path, tmp_path: Path):
    def corrupt(model: nn.Module) -> nn.Module:
        with torch.no_grad():
            model.conv1.weight[0].mul_(-3.0)  # one corrupted filter of the stem
        return model

    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match=r"bad\.onnx: parity check failed: onnxruntime vs PyTorch cosine"):
        export_onnx(run, out, transform=corrupt)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_check_parity_catches_a_corrupted_onnx_weight(run: Path, tmp_path: Path):
    import onnx
    from onnx import numpy_helper

    report = export_onnx(run, tmp_path / "m.onnx")
    model = onnx.load(tmp_path / "m.onnx")
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))  # the FC
    w = numpy_helper.to_array(init).copy()
    w[: w.shape[0] // 2] *= -1
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, tmp_path / "bad.onnx")
    r = load_model(run)
    x = r.preprocess(real_faces(r.image_size))
    good = check_parity(lambda b: r.backend(b), tmp_path / "m.onnx", x)
    assert good == pytest.approx(report.parity_min_cosine, abs=1e-7)
    with pytest.raises(ExportError):
        check_parity(lambda b: r.backend(b), tmp_path / "bad.onnx", x)


INT8_MEASURED_MIN = 0.99933  # min cosine int8 / float32 of test_export_cli_with_int8, measured (torch 2.13, onnxruntime CPU)


def test_export_cli_with_int8(run: Path, tmp_path: Path, gallery_folder: Path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(run), str(out), "--quantize", "dynamic", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "opset 17" in text and "parity:" in text and "int8 best-threshold accuracy" in text
    assert "12 real faces" in text and "66 (4 same-identity)" in text
    import onnx

    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(meta["faceforge"])["backbone"] == json.loads((run / MODEL_JSON).read_text())["backbone"]
    assert meta["faceforge_opset"] == "17" and int(meta["faceforge_bn_folded"]) > 0
    int8 = load_model(tmp_path / "m.int8.onnx")
    crops = real_faces(32)
    agree = np.einsum("nd,nd->n", int8.embed(crops), load_model(out).embed(crops))
    assert agree.shape == (12,)
    # dynamic int8 (weights to 8 bits, activations quantised per batch) of this run's model on these 12 faces:
    # measured min cosine INT8_MEASURED_MIN; the bound allows twice its distance from 1
    assert agree.min() >= 1 - 2 * (1 - INT8_MEASURED_MIN), agree.min()
    assert main(["export", str(run), str(tmp_path / "s.onnx"), "--quantize", "static", "--calibration",
                 str(gallery_folder), "--eval-folder", str(gallery_folder)]) == 0
    assert "18 images of" in capsys.readouterr().out and (tmp_path / "s.int8.onnx").is_file()


# ---------------------------------------------------------------------------------------------- commands


def test_embed_verify_search_end_to_end(run: Path, gallery_folder: Path, tmp_path: Path, capsys):
    r = load_model(run)
    feats = tmp_path / "f.npy"
    assert main(["embed", str(run), str(gallery_folder), "--out", str(feats), "--quiet", "--batch-size", "5"]) == 0
    files = (tmp_path / "f.txt").read_text().splitlines()
    assert len(files) == 18 and files == sorted(files)
    emb = np.load(feats)
    np.testing.assert_allclose(emb, r.embed(files), atol=1e-6)

    capsys.readouterr()
    a, b = files[0], files[1]
    assert main(["verify", str(run), a, b]) == 0
    out = capsys.readouterr().out
    cos = float(np.dot(emb[0].astype(np.float64), emb[1]))
    assert f"cosine {cos:.4f}" in out and f"threshold {r.info.threshold:.4f}" in out
    assert ("same person" if cos >= r.info.threshold else "different people") in out
    assert main(["verify", str(run), a, b, "--threshold", "0.99"]) == 0
    assert "at threshold 0.9900" in capsys.readouterr().out
    assert main(["verify", str(run), a, b, "--threshold", "2"]) == 2  # a cosine is in [-1, 1]
    assert "--threshold: got 2.0, expected a cosine in [-1, 1]" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"threshold: got 2, expected a cosine in \[-1, 1\]"):
        r.verify(a, b, threshold=2)

    index = tmp_path / "index"
    assert main(["search", "build", str(run), str(gallery_folder), str(index), "--quiet"]) == 0
    capsys.readouterr()
    probe = files[4]
    assert main(["search", str(run), str(index), probe, "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == probe and len(lines) == 4
    brute = emb.astype(np.float64) @ emb[4].astype(np.float64)
    best = np.argsort(-brute, kind="stable")[:3]
    assert [ln.split()[-1] for ln in lines[1:]] == [files[k] for k in best]
    assert lines[1].split()[1] == Path(probe).parent.name  # itself
    assert main(["search", "build", str(run), str(gallery_folder), str(index), "--quiet", "--append"]) == 2
    assert "18 of these images are already in the index" in capsys.readouterr().err  # tests/test_gallery.py
    assert len(Gallery.load(index)) == 18


def test_flat_index_agrees_with_brute_force_numpy_and_other_kinds_run(tmp_path: Path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:40] + 0.05 * rng.normal(size=(40, 32)).astype(np.float32)
    ids = [f"id{k % 50}" for k in range(500)]
    g = Gallery(x, ids, [f"f{k}" for k in range(500)])
    scores, rows = g.search_raw(q, 5)
    brute = q.astype(np.float64) @ x.astype(np.float64).T
    np.testing.assert_array_equal(rows, np.argsort(-brute, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, rows, 1), atol=1e-5)
    g.save(tmp_path / "g")
    again = Gallery.load(tmp_path / "g")
    assert again.search(q[:2], 3) == g.search(q[:2], 3)
    (tmp_path / "g" / "index.faiss").unlink()  # rebuilt from embeddings.npy
    assert Gallery.load(tmp_path / "g").search(q[:2], 3) == g.search(q[:2], 3)
    for kind in ("ivf", "hnsw"):
        approx = make_index(x, kind)
        _, arows = approx.search(q, 1)
        assert (arows[:, 0] == rows[:, 0]).mean() >= 0.9, kind  # recall@1 against exact, at near-duplicates
    g.add(x[:3], ["new"] * 3, ["n0", "n1", "n2"])
    assert len(g) == 503 and g.search(x[:1], 2)[0][0].score == pytest.approx(1.0, abs=1e-5)


def test_bad_images_are_named_and_skipped_only_on_request(run: Path, gallery_folder: Path, tmp_path: Path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = sorted(gallery_folder.rglob("*.png"))[:2]
    for p in good:
        (folder / p.name.replace("img", f"{p.parent.name}_")).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    from PIL import Image

    Image.new("RGB", (40, 30)).save(folder / "big.png")
    out = tmp_path / "f.npy"
    assert main(["embed", str(run), str(folder), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("faceforge embed: ") and "big.png: image is 40x30, expected a 32x32" in err[0]
    assert main(["embed", str(run), str(folder), "--out", str(out), "--quiet", "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 image(s)" in captured.err and "broken.png: cannot decode image" in captured.err
    assert "skipped:    2" in captured.out and np.load(out).shape[0] == 2
    assert main(["embed", str(run), str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "missing: not found" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "nope"), str(good[0]), str(good[1])]) == 2
    assert capsys.readouterr().err.startswith("faceforge verify: ")


def test_python_api_takes_paths_pil_arrays_and_detects_with_any_detector(run: Path, gallery_folder: Path):
    from PIL import Image

    from faceforge.data.align import ARCFACE_TEMPLATE, align_face

    r = faceforge.load_model(run)
    paths = sorted(gallery_folder.rglob("*.png"))[:2]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    e = r.embed(paths)
    np.testing.assert_array_equal(r.embed([Image.open(p) for p in paths]), e)
    np.testing.assert_array_equal(r.embed(np.stack(arrays)), e)
    v = r.verify(paths[0], paths[1])
    assert v.cosine == pytest.approx(float(e[0].astype(np.float64) @ e[1]), abs=1e-6)
    # detection: a stub detector that reports the template scaled into a larger photo
    photo = np.zeros((100, 120, 3), np.uint8)
    photo[20:84, 30:94] = np.asarray(Image.fromarray(arrays[0]).resize((64, 64), Image.BILINEAR))
    landmarks = ARCFACE_TEMPLATE * (64 / 112) + [30, 20]
    r.detector = lambda image: [(np.array([30, 20, 94, 84.0]), landmarks, 0.9)]
    got = r.embed([photo], detect=True)
    np.testing.assert_array_equal(got, r.embed(align_face(photo, landmarks, 32)[None]))
    r.detector = lambda image: []
    with pytest.raises(ImageError, match="image 0: no face detected"):
        r.embed([photo], detect=True)


# ---------------------------------------------------------------------------------------------- foreign ONNX


class ForeignNet(nn.Module):
    """Another toolkit's model: BGR input, normalised as (x - 100) / 50, 8-D output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 7 * 7, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def test_a_foreign_onnx_model_loads_given_its_normalisation(tmp_path: Path, capsys):
    torch.manual_seed(0)
    net = ForeignNet().eval()
    path = tmp_path / "foreign.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False, input_names=["data"],
                      output_names=["fea"], dynamic_axes={"data": {0: "n"}, "fea": {0: "n"}})
    with pytest.raises(ModelFileError, match=r"foreign\.onnx: no faceforge metadata .*mean, std: missing"):
        load_model(path)
    r = load_model(path, mean=(100, 100, 100), std=(50, 50, 50), channel_order="BGR")
    assert (r.info.image_size, r.info.embedding_size, r.info.flip_test) == (16, 8, False)
    crops = np.random.default_rng(0).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    # by hand: RGB -> BGR, (x - 100) / 50, NCHW, the network, L2-normalised
    x = torch.from_numpy((crops[..., ::-1].astype(np.float32) - 100) / 50).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = nn.functional.normalize(net(x), dim=1).numpy()
    np.testing.assert_allclose(r.embed(crops), expected, atol=1e-5)
    from PIL import Image

    for k in range(2):
        Image.fromarray(crops[k]).save(tmp_path / f"{k}.png")
    assert main(["verify", str(path), str(tmp_path / "0.png"), str(tmp_path / "1.png"), "--mean", "100",
                 "--std", "50", "--channel-order", "BGR", "--threshold", "0.5"]) == 0
    assert f"cosine {float(expected[0].astype(np.float64) @ expected[1]):.4f}" in capsys.readouterr().out
    assert main(["verify", str(path), str(tmp_path / "0.png"), str(tmp_path / "1.png")]) == 2
    assert "mean, std: missing" in capsys.readouterr().err


def test_eval_scores_a_foreign_onnx_beside_its_json_as_it_scores_ours(tmp_path: Path):
    from faceforge.data.pairs import write_bin
    from faceforge.eval.evaluate import evaluate_checkpoints

    torch.manual_seed(1)
    path = tmp_path / "foreign.onnx"
    torch.onnx.export(ForeignNet().eval(), (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False,
                      input_names=["data"], output_names=["fea"], dynamic_axes={"data": {0: "n"}, "fea": {0: "n"}})
    (tmp_path / "foreign.json").write_text(json.dumps({"mean": [100] * 3, "std": [50] * 3, "channel_order": "BGR"}))
    r = load_model(path)  # normalisation from foreign.json
    assert (r.info.mean, r.info.channel_order) == ((100.0,) * 3, "BGR")
    images = np.random.default_rng(3).integers(0, 256, size=(24, 16, 16, 3), dtype=np.uint8)
    issame = np.array([True, False] * 6)  # 12 pairs: the 10-fold accuracy needs >= 10
    write_bin(tmp_path / "p.bin", images, issame)
    results = evaluate_checkpoints([path], output=tmp_path / "out", bins=[str(tmp_path / "p.bin")])
    ((label, _), scores), = results.items()
    assert label == "foreign.onnx"
    r.info.flip_test = True  # faceforge eval's protocol: normalize(f(x) + f(flip(x)))
    e = r.embed_crops(images).astype(np.float64)
    np.testing.assert_allclose(scores.pairs[0], np.einsum("nd,nd->n", e[0::2], e[1::2]), atol=1e-5)
    with pytest.raises(ValueError, match=r"foreign\.onnx: a model file carries no held-out sets"):
        evaluate_checkpoints([path], output=tmp_path / "out2")


def test_real_face_labels_match_the_asset():
    faces = real_faces()
    assert faces.shape == (12, 112, 112, 3) and len(REAL_FACE_IDENTITIES) == 12
    assert faces.std(axis=(1, 2, 3)).min() > 10  # every tile holds a face, not the white gutter
