"""A model file, checkpoint or teacher from someone else is data, never code (issue 26.1), and its sizes and
normalisation are checked before anything is built (26.6, 26.11). Every crafted file is made here: a module
that leaves a marker file when imported or called shows that nothing a file names is imported."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import _modelfiles as M  # tests/ is on sys.path
import numpy as np
import pytest
import torch

from faceforge.cli import main
from faceforge.deploy.inference import Gallery, load_model
from faceforge.deploy.modelfile import MAX_EMBEDDING_SIZE, MAX_IMAGE_SIZE, MIN_STD, ModelFileError
from faceforge.core.registry import UntrustedCodeError, trusting_code, untrusted


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """(a 'module:Net' spec importable from tmp_path, the marker file it writes when imported or called)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    name, marker = M.marker_module(tmp_path)
    return f"{name}:Net", marker


def _nothing_ran(spec: str, marker: Path) -> None:
    assert not marker.exists(), marker.read_text()
    assert spec.split(":")[0] not in sys.modules


def _one_line(capsys: pytest.CaptureFixture, command: str, *words: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"faceforge {command}: "), err
    for w in words:
        assert w in err[0], (w, err[0])
    return err[0]


# ---------------------------------------------------------------------------------------------- the registry


def test_the_registry_refuses_an_import_inside_untrusted_and_allows_it_when_trusted(planted):
    from faceforge.backbones import BACKBONES

    spec, marker = planted
    with untrusted("x/model.json: backbone"):
        with pytest.raises(UntrustedCodeError, match=r"^x/model\.json: backbone: '.*:Net' names code to import"):
            BACKBONES.get(spec)
        assert BACKBONES.get("r18") is not None  # registered names pass
    _nothing_ran(spec, marker)
    with trusting_code(), untrusted("x/model.json: backbone"):  # --trust-code around a loader
        assert callable(BACKBONES.get(spec))
    assert marker.read_text() == "imported"


def test_the_users_own_config_may_still_name_an_import(planted):
    from faceforge.backbones import BACKBONES

    spec, marker = planted
    BACKBONES.build(spec, embedding_size=M.DIM, input_size=M.SIZE)  # outside `untrusted`: the user's YAML
    assert marker.read_text() == "called"


# ---------------------------------------------------------------------------------------------- model files


@pytest.mark.parametrize("json_beside", [True, False], ids=["model.json", "safetensors header"])
def test_load_model_imports_nothing_a_model_file_names(tmp_path: Path, planted, json_beside: bool):
    spec, marker = planted
    weights = M.write_model(tmp_path / "m", backbone=spec, json_beside=json_beside)
    for path in (weights, weights.parent):
        with pytest.raises(ModelFileError, match=r"names code to import.*--trust-code"):
            load_model(path)
    _nothing_ran(spec, marker)
    r = load_model(weights, trust_code=True)
    assert marker.read_text() == "called" and r.embed(M.faces(2)).shape == (2, M.DIM)


def test_torch_hub_load_named_by_a_model_file_runs_nothing(tmp_path: Path):
    """The issue's own exploit: torch.hub:load with a local hubconf.py."""
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "hubconf.py").write_text(f"import pathlib\npathlib.Path({str(tmp_path / 'HUB_RAN')!r}).write_text('x')\n"
                                    "def m(**kw):\n    raise SystemExit\n")
    weights = M.write_model(tmp_path / "m", backbone="torch.hub:load",
                            backbone_kwargs={"repo_or_dir": str(hub), "model": "m", "source": "local"})
    with pytest.raises(ModelFileError, match="'torch.hub:load' names code to import"):
        load_model(weights)
    assert not (tmp_path / "HUB_RAN").exists()


def test_a_checkpoint_config_naming_an_import_is_refused(tmp_path: Path, planted):
    from faceforge.build import load_backbone

    spec, marker = planted
    ckpt = M.write_checkpoint(tmp_path / "run" / "last.pt", spec)
    with pytest.raises(ModelFileError, match=r"last\.pt: model\.backbone: '.*:Net' names code to import"):
        load_model(ckpt)
    with pytest.raises(UntrustedCodeError):
        load_backbone(ckpt)
    _nothing_ran(spec, marker)
    assert load_model(ckpt, trust_code=True).embed(M.faces(1)).shape == (1, M.DIM)
    assert marker.read_text() == "called"


def test_a_teacher_checkpoint_naming_an_import_is_refused(tmp_path: Path, planted):
    from faceforge.train.teacher import load_teacher

    spec, marker = planted
    ckpt = M.write_checkpoint(tmp_path / "teacher" / "last.pt", spec)
    for source in (ckpt, ckpt.parent):
        with pytest.raises(UntrustedCodeError, match="names code to import"):
            load_teacher(source)
    _nothing_ran(spec, marker)
    teacher = load_teacher(ckpt, trust_code=True)
    assert teacher(torch.zeros(2, 3, M.SIZE, M.SIZE)).shape == (2, M.DIM)


def _commands(tmp_path: Path, model: Path) -> dict[str, list[str]]:
    """Each command that loads a model, with valid other arguments."""
    images = tmp_path / "faces"
    paths = M.save_faces(images, 4, identities=2)
    index = tmp_path / "index"
    Gallery(np.eye(M.DIM, dtype=np.float32)[:2], ["a", "b"], ["a.png", "b.png"]).save(index)
    return {
        "embed": ["embed", str(model), str(images), "--out", str(tmp_path / "e.npy"), "--quiet"],
        "verify": ["verify", str(model), str(paths[0]), str(paths[1])],
        "search build": ["search", "build", str(model), str(images), str(tmp_path / "new_index"), "--quiet"],
        "search": ["search", str(model), str(index), str(paths[0]), "--force"],
        "export": ["export", str(model), str(tmp_path / "m.onnx")],
        "eval": ["eval", str(model), "--pairs", "20", "--output", str(tmp_path / "eval")],
    }


@pytest.mark.parametrize("kind", ["model.safetensors", "last.pt"])
def test_every_command_refuses_a_file_naming_an_import_and_trust_code_loads_it(tmp_path: Path, planted, kind, capsys):
    spec, marker = planted
    model = (M.write_model(tmp_path / "m", backbone=spec) if kind == "model.safetensors"
             else M.write_checkpoint(tmp_path / "m" / "last.pt", spec))
    commands = _commands(tmp_path, model)
    for name, argv in commands.items():
        assert main(argv) == 2, name
        _one_line(capsys, name.split()[0], str(model), "names code to import", "--trust-code")
        _nothing_ran(spec, marker)
        assert not (tmp_path / "e.npy").exists() and not (tmp_path / "m.onnx").exists()
    assert main(commands["verify"] + ["--trust-code"]) == 0
    assert marker.read_text() == "called" and "cosine" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- sizes, normalisation


@pytest.mark.parametrize("key, value, expected", [
    ("embedding_size", 2 ** 40, f"an int in [1, {MAX_EMBEDDING_SIZE}]"),
    ("embedding_size", 2 ** 17, f"an int in [1, {MAX_EMBEDDING_SIZE}]"),
    ("image_size", 2048, f"an int in [1, {MAX_IMAGE_SIZE}]"),
    ("std", [1e-320, 1.0, 1.0], "3 numbers >= 3.04e-05"),
    ("std", [0.0, 1.0, 1.0], "3 numbers >= 3.04e-05"),
    ("std", [-1.0, 1.0, 1.0], "3 numbers >= 3.04e-05"),
    ("std", [float("nan"), 1.0, 1.0], "3 finite numbers"),
    ("mean", [float("inf"), 1.0, 1.0], "3 finite numbers"),
    ("mean", [-1.0, 127.5, 127.5], "3 numbers in [0, 255]"),
    ("mean", [127.5, 127.5, 300.0], "3 numbers in [0, 255]"),
])
def test_hostile_sizes_and_normalisation_are_one_line_before_anything_is_built(tmp_path: Path, key, value, expected,
                                                                             capsys, monkeypatch):
    weights = M.write_model(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    meta[key] = value
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))  # NaN / Infinity: JSON parsers accept them
    built = []
    monkeypatch.setattr("faceforge.deploy.modelfile.build_backbone_from_info", lambda info: built.append(info))
    with pytest.raises(ModelFileError, match=rf"model\.json: {key}: got .*expected {expected.replace('[', '.').replace(']', '.')}"):
        load_model(weights)
    assert not built
    assert main(["verify", str(weights), "a.png", "b.png"]) == 2  # images are checked first: give real ones
    capsys.readouterr()
    faces = M.save_faces(tmp_path / "f", 2)
    assert main(["verify", str(weights), str(faces[0]), str(faces[1])]) == 2
    _one_line(capsys, "verify", "model.json", key)


def test_min_std_is_float32_resolution_of_the_0_255_scale():
    assert MIN_STD == pytest.approx(255 * 2.0 ** -23)  # float32 eps = 2^-23


def test_weights_of_other_shapes_than_the_metadata_are_refused_on_the_meta_device(tmp_path: Path, monkeypatch):
    """embedding_size within bounds but not the weights' (4096 claimed, 8 stored), and image_size 512 on
    weights for 32 px: refused from the header's shapes; the real backbone is never built."""
    weights = M.write_model(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    import faceforge.build as build

    real = []
    original = build.build_backbone
    monkeypatch.setattr(build, "build_backbone",
                        lambda cfg: real.append(torch.empty(0).device.type) or original(cfg))
    for key, value in (("embedding_size", 4096), ("image_size", 512)):
        (tmp_path / "m" / "model.json").write_text(json.dumps({**meta, key: value}))
        real.clear()
        with pytest.raises(ModelFileError, match=r"model\.safetensors: the weights do not fit the backbone the metadata describes: "
                                                 r".* is \[.*\] in the file, the backbone needs \["):
            load_model(weights)
        assert real == ["meta"]  # built once, on the meta device only
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    load_model(weights)
    assert real[-2:] == ["meta", "cpu"]


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_refused_before_building(tmp_path: Path):
    ckpt = M.write_checkpoint(tmp_path / "last.pt")
    state = torch.load(ckpt, weights_only=True)
    state["config"]["model"]["embedding_size"] = 4096
    torch.save(state, ckpt)
    with pytest.raises(ModelFileError, match=r"last\.pt: the backbone: the weights do not fit .* in the file, the backbone needs"):
        load_model(ckpt)


def test_modules_listed_in_faceforge_trusted_modules_are_trusted(tmp_path: Path, planted, monkeypatch):
    spec, marker = planted
    ckpt = M.write_checkpoint(tmp_path / "run" / "last.pt", spec)
    module = spec.split(":")[0]
    for listed in (f"{module}x", "other", module[:-1]):  # a prefix of the name is not the module
        monkeypatch.setenv("FACEFORGE_TRUSTED_MODULES", listed)
        with pytest.raises(ModelFileError, match="FACEFORGE_TRUSTED_MODULES"):
            load_model(ckpt)
    _nothing_ran(spec, marker)
    monkeypatch.setenv("FACEFORGE_TRUSTED_MODULES", f"lab.nets, {module}")
    assert load_model(ckpt).embed(M.faces(1)).shape == (1, M.DIM)
    assert marker.read_text() == "called"
