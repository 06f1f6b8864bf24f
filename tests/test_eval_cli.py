"""`faceforge eval`: results.md / results.json / plots, cached embeddings, and --compare."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import faceforge.demo as demo
from faceforge.cli import main
from faceforge.data.pairs import write_bin
from faceforge.data.synthetic import synthetic_pairs
from faceforge.demo import EVAL_FARS, run_demo
from faceforge.eval.verify import evaluate_scores, pair_scores


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """A tiny trained checkpoint and a 32-pair .bin set: (checkpoint, bin, issame)."""
    root = tmp_path_factory.mktemp("eval_cli")
    run_demo(tiny=True, overrides=[f"output={root / 'run'}", "train.progress=false"])
    images, issame = synthetic_pairs(32, num_identities=200, image_size=32, split="test")
    write_bin(root / "pairs.bin", images, issame)
    return root / "run" / "last.pt", root / "pairs.bin", np.asarray(issame, dtype=bool)


def test_eval_writes_every_report_and_reuses_the_embeddings(
    trained: tuple[Path, Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ckpt, bin_path, issame = trained
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--bin", str(bin_path), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^\| last\.pt on pairs +\| \d+\.\d\d ±", text, re.M)
    for name in ("results.md", "results.json", "roc.png", "roc_eval.png", "hist_pairs.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "last.pt on pairs" in (out / "results.md").read_text()

    data = json.loads((out / "results.json").read_text())
    (rec,) = data["results"]
    assert rec["set"] == "pairs" and rec["checkpoint"] == "last.pt" and rec["cached"] is False
    assert rec["pairs"] == len(issame)
    emb = np.load(rec["embeddings"])
    assert Path(rec["embeddings"]).parent == out and emb.shape[0] == 2 * len(issame)
    expect = evaluate_scores(pair_scores(emb), issame, fars=EVAL_FARS)
    for key in ("accuracy", "accuracy_std", "best_threshold_accuracy", "threshold", "eer", "auc"):
        assert rec[key] == pytest.approx(getattr(expect, key), abs=1e-12), key
    assert set(rec["tar_at_far"]) == {"1e-04", "1e-03", "1e-02", "1e-01"}
    for far, tar in expect.tar_at_far.items():
        assert rec["tar_at_far"][f"{far:.0e}"] == pytest.approx(tar, abs=1e-12)

    # a re-run scores from the cache: the model must not run
    def no_model(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("embed() called although the embeddings are cached")

    monkeypatch.setattr(demo, "embed", no_model)
    results = demo.evaluate_checkpoint(ckpt, output=out, bins=[str(bin_path)])
    assert "cached" in capsys.readouterr().out
    assert results["pairs"].accuracy == rec["accuracy"]
    again = json.loads((out / "results.json").read_text())["results"][0]
    assert again["cached"] is True
    assert {k: v for k, v in again.items() if k != "cached"} == {k: v for k, v in rec.items() if k != "cached"}


def test_eval_default_output_is_eval_beside_the_checkpoint(trained: tuple[Path, Path, np.ndarray], tmp_path: Path) -> None:
    ckpt, bin_path, _ = trained
    copy = tmp_path / "ckpt" / "last.pt"
    copy.parent.mkdir()
    shutil.copyfile(ckpt, copy)
    assert main(["eval", str(copy), "--bin", str(bin_path)]) == 0
    assert (copy.parent / "eval" / "results.json").is_file() and (copy.parent / "eval" / "roc.png").is_file()


def test_compare_puts_every_checkpoint_and_set_in_one_table(
    trained: tuple[Path, Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, bin_path, _ = trained
    other = tmp_path / "other.pt"
    shutil.copyfile(ckpt, other)
    images, issame = synthetic_pairs(16, num_identities=100, image_size=32, split="test", seed=3)
    write_bin(tmp_path / "second.bin", images, issame)
    out = tmp_path / "cmp"
    capsys.readouterr()
    assert main(["eval", "--compare", str(ckpt), str(other), "--bin", str(bin_path),
                 "--bin", str(tmp_path / "second.bin"), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    table = (out / "results.md").read_text()
    for row in ("last.pt on pairs", "last.pt on second", "other.pt on pairs", "other.pt on second"):
        assert re.search(rf"^\| {re.escape(row)} +\| \d+\.\d\d ±", table, re.M), row
        assert row in text
    records = json.loads((out / "results.json").read_text())["results"]
    assert len(records) == 4
    # the same weights give the same numbers
    by = {(r["checkpoint"], r["set"]): r for r in records}
    assert by[("last.pt", "pairs")]["accuracy"] == by[("other.pt", "pairs")]["accuracy"]
    assert (out / "roc.png").is_file()
    assert len(list(out.glob("hist_*.png"))) == 4 and len(list(out.glob("emb_*.npy"))) == 2  # same content hash: one cache per set
