"""A checkpoint or run folder from someone else is data: eval trusts no feature cache it did not write, reads no
set its config names outside the run folder, a row-shard placeholder cannot name a file outside the checkpoint's
folder, and a NaN embedding is an error naming the model and the image (exit 2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import _tiny_run as T  # tests/ is on sys.path
import numpy as np
import pytest
import torch
import yaml

import faceforge.eval.evaluate as evaluate
from faceforge.cli import main
from faceforge.data.pairs import load_bin
from faceforge.eval.metrics import verification_accuracy
from faceforge.core import shards
from faceforge.core.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def untrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_trust")
    ckpt = T.tiny_run(root / "run", model_files=False)
    bin_path, _ = T.pairs_bin(root / "pairs.bin", pairs=40, seed=3)
    return {"root": root, "ckpt": ckpt, "bin": bin_path}


def _plain_accuracy(ckpt: Path, bin_path: Path) -> float:
    """The model's own 10-fold accuracy, embedded here with plain torch: normalize(f(x) + f(flip(x))), float64 cosines."""
    from faceforge.build import load_backbone

    model, _ = load_backbone(load_checkpoint(ckpt), source=str(ckpt))
    images, issame = load_bin(bin_path)
    x = (torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    with torch.no_grad():
        e = (model.eval()(x) + model(torch.flip(x, dims=[3]))).double().numpy()
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    return float(verification_accuracy(np.sum(e[0::2] * e[1::2], axis=1), np.asarray(issame))[0])


def test_a_crafted_feature_cache_beside_a_checkpoint_is_ignored(untrained: dict[str, Path],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Before: eval read emb_<hash of last.pt>_<set>_<data hash>.npy from the run folder, and a crafted cache made
    the untrained model report 100.00 %."""
    ckpt, bin_path = untrained["ckpt"], untrained["bin"]
    out = ckpt.parent / "eval" / "shipped"
    _, issame = load_bin(bin_path)
    # every part of the name is computable by whoever ships the folder
    s = evaluate.EVALUATIONS["bins"](evaluate.EvalRequest(bins=[str(bin_path)]))[0]
    name = f"emb_{evaluate._file_key(ckpt)}_{evaluate._safe(s.features_name)}_{s.key()}.npy"
    perfect = np.zeros((2 * len(issame), 16), dtype=np.float32)
    for k, same in enumerate(issame):  # the same vector for a same pair, orthogonal ones otherwise
        perfect[2 * k, k % 16] = 1
        perfect[2 * k + 1, k % 16 if same else (k + 1) % 16] = 1
    out.mkdir(parents=True)
    np.save(out / name, perfect)
    (out / f"{name}.hmac").write_text("0" * 64 + "\n")  # a forged signature changes nothing
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--bin", str(bin_path), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "not written by this installation" in text and "computing" in text
    (rec,) = json.loads((out / "results.json").read_text())["results"]
    assert rec["cached"] is False
    # float32 embeddings against the float64 reference: the 40 cosines move by ~1e-7, far from any accuracy step
    assert rec["accuracy"] == pytest.approx(_plain_accuracy(ckpt, bin_path), abs=1e-9)
    assert rec["accuracy"] < 0.9
    assert "cache" not in (out / "results.md").read_text()
    # what eval wrote itself is signed, trusted on the next run, and the report says so
    assert main(["eval", str(ckpt), "--bin", str(bin_path), "--output", str(out)]) == 0
    (again,) = json.loads((out / "results.json").read_text())["results"]
    assert again["cached"] is True and again["accuracy"] == rec["accuracy"]
    assert "features read from this installation's cache" in (out / "results.md").read_text()
    # and a cache changed after it was signed is not
    features = np.load(out / name)
    np.save(out / name, features[::-1].copy())
    assert main(["eval", str(ckpt), "--bin", str(bin_path), "--output", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["results"][0]["cached"] is False


def test_the_cache_key_is_the_users_own(untrained: dict[str, Path]) -> None:
    from faceforge.core.fileio import installation_key

    key = installation_key()
    path = Path(os.environ["XDG_CACHE_HOME"]) / "faceforge" / "key"
    assert len(key) == 32 and path.read_bytes() == key and path.stat().st_mode & 0o777 == 0o600
    assert installation_key() == key


def _with_config(ckpt: Path, target: Path, **data: object) -> Path:
    state = load_checkpoint(ckpt)
    state["config"]["data"].update(data)
    return save_checkpoint(target, state)


def test_eval_reads_no_set_a_checkpoint_names_outside_its_run(untrained: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `faceforge eval other/last.pt` loaded the data.eval_bins paths of someone else's config."""
    outside, _ = T.pairs_bin(tmp_path / "private" / "mine.bin", pairs=8, seed=5)
    ckpt = _with_config(untrained["ckpt"], tmp_path / "theirs" / "last.pt", eval_bins=[str(outside)])
    capsys.readouterr()
    assert main(["eval", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.eval_bins names" in err and "outside the run folder" in err and "--bin" in err
    # a relative `..` out of the run is outside too; a .bin inside the run folder is used
    inside, _ = T.pairs_bin(tmp_path / "theirs" / "sets" / "in.bin", pairs=24, seed=6)
    os.chdir(tmp_path / "theirs")
    try:
        escape = _with_config(untrained["ckpt"], tmp_path / "theirs" / "esc.pt", eval_bins=["../private/mine.bin"])
        assert main(["eval", str(escape)]) == 2
        assert "data.eval_bins names '../private/mine.bin'" in capsys.readouterr().err
    finally:
        os.chdir(tmp_path)
    ok = _with_config(untrained["ckpt"], tmp_path / "theirs" / "ok.pt", eval_bins=[str(inside)], eval_pairs=0)
    assert main(["eval", str(ok), "--output", str(tmp_path / "o")]) == 0
    assert [r["set"] for r in json.loads((tmp_path / "o" / "results.json").read_text())["results"]] == ["in"]


def test_eval_does_not_search_a_font_folder_a_checkpoint_names(untrained: dict[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a glyph checkpoint's data.path was searched (rglob) wherever it pointed."""
    ckpt = _with_config(untrained["ckpt"], tmp_path / "theirs" / "last.pt", name="glyphs", path=str(Path.home()),
                        kwargs={})  # the synthetic source's kwargs are not the glyphs'
    capsys.readouterr()
    assert main(["eval", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.path names the font folder" in err and "outside the run folder" in err


@pytest.mark.parametrize("name", ["/etc/hostname", "../secret.bin", "shards/../../secret.bin", "", 7])
def test_row_shard_placeholders_must_name_a_file_inside_the_checkpoint_folder(tmp_path: Path, name: object) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "secret.bin").write_bytes(np.arange(8, dtype=np.float32).tobytes())
    entry = {shards.PLACEHOLDER_KEY: name, "shape": [2, 4], "dtype": "float32"}
    with pytest.raises(ValueError, match="row shard") as e:
        shards.resolve({"head": {"weight": entry}}, run)
    assert "\n" not in str(e.value)


def test_a_row_shard_link_out_of_the_folder_is_refused_and_a_real_one_read(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(8, dtype=np.float32).tobytes())
    (run / "shards" / "w.bin").symlink_to(secret)
    with pytest.raises(ValueError, match="leads out of the checkpoint's folder"):
        shards.read_rows(run, {shards.PLACEHOLDER_KEY: "shards/w.bin", "shape": [2, 4], "dtype": "float32"})
    (run / "shards" / "own.bin").write_bytes(np.arange(8, dtype=np.float32).tobytes())
    rows = shards.read_rows(run, {shards.PLACEHOLDER_KEY: "shards/own.bin", "shape": [2, 4], "dtype": "float32"})
    assert torch.equal(rows, torch.arange(8, dtype=torch.float32).reshape(2, 4))


def test_train_init_from_a_checkpoint_naming_an_outside_file_is_one_line(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Before: model.init_from read /any/path into the head's weights and trained on."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones((8, 16), dtype=np.float32).tobytes())  # head W: 8 classes x 16-D
    crafted = tmp_path / "download" / "last.pt"
    T.tiny_run(crafted.parent, model_files=False)
    state = load_checkpoint(crafted)
    state["head"] = {"weight": {shards.PLACEHOLDER_KEY: str(secret), "shape": [8, 16], "dtype": "float32"}}
    save_checkpoint(crafted, state)
    config = {**T.CONFIG, "output": str(tmp_path / "mine"), "model": {**T.CONFIG["model"], "init_from": str(crafted)}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "row shard" in err and "secret.bin" in err


def test_a_nan_weight_is_an_error_naming_the_model_and_the_image(untrained: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Before: eval scored NaN embeddings (exit 0)."""
    state = load_checkpoint(untrained["ckpt"])
    first = next(k for k, v in state["backbone"].items() if v.is_floating_point() and v.ndim == 4)
    state["backbone"][first] = state["backbone"][first].clone()
    state["backbone"][first].view(-1)[0] = float("nan")
    bad = save_checkpoint(tmp_path / "nan" / "last.pt", state)
    capsys.readouterr()
    assert main(["eval", str(bad), "--bin", str(untrained["bin"]), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err  # after the progress bar of the embedding pass
    (line,) = [line for line in err.splitlines() if line.startswith("faceforge eval:")]
    assert err.endswith(line + "\n") and str(bad) in line and "non-finite" in line
    assert f"{untrained['bin']} image 0 (pair 0)" in line
    assert not (tmp_path / "o" / "results.md").exists() and not list((tmp_path / "o").glob("emb_*.npy"))
