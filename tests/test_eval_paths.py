"""`faceforge eval` takes every model path load_model takes (run folder, last.pt, .safetensors, .onnx); the
accuracy at the model's own threshold is filled the same way for each; a second eval on other sets keeps the
first report; the run's own data.eval_pairs is used; TAR@FAR is "—" (with the reason) where the negative
pairs cannot resolve the FAR."""

from __future__ import annotations

import json
import re
from pathlib import Path

import _tiny_run as T  # tests/ is on sys.path
import numpy as np
import pytest

from faceforge.cli import main
from faceforge.eval.report import UNRESOLVED, metrics_table
from faceforge.eval.sets import MODEL_THRESHOLD_COLUMN


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from faceforge.deploy.export import export_onnx

    root = tmp_path_factory.mktemp("eval_paths")
    ckpt = T.tiny_run(root / "run")
    export_onnx(ckpt, root / "run" / "model.onnx")
    bin_a, issame_a = T.pairs_bin(root / "a.bin", seed=1)
    bin_b, _ = T.pairs_bin(root / "b.bin", pairs=16, seed=2)
    return {"root": root, "run": root / "run", "ckpt": ckpt, "a": bin_a, "b": bin_b}


def _records(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["results"]


def test_every_model_path_evaluates_with_one_model_threshold(run: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a run folder was 'checkpoint not found', an .onnx file a torch unpickling error (the default
    output folder read it as a checkpoint), and only model files had the threshold column."""
    issame = None
    models = {"run folder": run["run"], "last.pt": run["ckpt"], "safetensors": run["run"] / "model.safetensors",
              "onnx": run["run"] / "model.onnx"}
    for what, model in models.items():
        assert main(["eval", str(model), "--bin", str(run["a"])]) == 0, what  # default output beside the model
    capsys.readouterr()
    outs = sorted((run["run"] / "eval").glob("*/a-*/results.json"))
    # last.pt's step (the run folder's too: the same file); a model file's name
    assert {p.parent.parent.name for p in outs} == {f"step_{T.STEP:07d}", "model.safetensors", "model.onnx"}
    assert main(["eval", "--compare", str(run["ckpt"]), str(run["run"] / "model.safetensors"),
                 str(run["run"] / "model.onnx"), "--bin", str(run["a"]), "--output", str(tmp_path / "cmp")]) == 0
    records = _records(tmp_path / "cmp")
    assert len(records) == 3
    from faceforge.data.pairs import load_bin

    _, issame = load_bin(run["a"])
    for rec in records:
        # the threshold model.json carries: the run's best-threshold on its held-out pairs, for every format
        assert rec["model_threshold"] == T.METRICS["threshold"], rec["checkpoint"]
        assert rec["model_threshold_source"] == "best-threshold accuracy on held-out pairs"
        emb = np.load(rec["embeddings"]).astype(np.float64)
        scores = np.sum(emb[0::2] * emb[1::2], axis=1) / np.linalg.norm(emb[0::2], axis=1) / np.linalg.norm(emb[1::2], axis=1)
        assert rec["accuracy_at_model_threshold"] == pytest.approx(np.mean((scores >= 0.3) == np.asarray(issame)), abs=1e-12)
    table = (tmp_path / "cmp" / "results.md").read_text()
    rows = [line for line in table.splitlines() if " on a " in line]
    header = next(line for line in table.splitlines() if MODEL_THRESHOLD_COLUMN in line)
    column = [c.strip() for c in header.split("|")].index(MODEL_THRESHOLD_COLUMN)
    assert len(rows) == 3 and all(re.fullmatch(r"\d+\.\d\d % @ 0\.300", r.split("|")[column].strip()) for r in rows)
    assert "accuracy@learned threshold" not in table


def test_a_run_folder_uses_its_checkpoint_and_its_own_eval_pairs(run: dict[str, Path]) -> None:
    """Before: a run folder was refused, and held-out sets had 3000 pairs whatever data.eval_pairs said."""
    assert main(["eval", str(run["run"])]) == 0
    (held_out,) = sorted((run["run"] / "eval" / f"step_{T.STEP:07d}").glob("held-out-*/results.json"))
    (rec,) = _records(held_out.parent)
    assert rec["checkpoint"] == "last.pt" and rec["pairs"] == T.CONFIG["data"]["eval_pairs"] == 40
    assert main(["eval", str(run["ckpt"]), "--pairs", "20"]) == 0  # an explicit --pairs still wins, in its own folder
    twenty = [p for p in (run["run"] / "eval" / f"step_{T.STEP:07d}").glob("held-out_20-pairs-*")]
    assert len(twenty) == 1 and _records(twenty[0])[0]["pairs"] == 20


def test_a_second_eval_on_other_sets_keeps_the_first_report(run: dict[str, Path], tmp_path: Path) -> None:
    """Before: both wrote eval/step_XXXXXXX/results.md; the second replaced the first and left hist_a.png."""
    ckpt = tmp_path / "r" / "last.pt"
    T.tiny_run(ckpt.parent, model_files=False)
    assert main(["eval", str(ckpt), "--bin", str(run["a"])]) == 0
    assert main(["eval", str(ckpt), "--bin", str(run["b"])]) == 0
    step = ckpt.parent / "eval" / f"step_{T.STEP:07d}"
    (first,), (second,) = sorted(step.glob("a-*")), sorted(step.glob("b-*"))
    assert "last.pt on a " in (first / "results.md").read_text() and (first / "hist_a.png").is_file()
    assert "last.pt on b " in (second / "results.md").read_text()
    assert sorted(p.name for p in second.glob("*.png")) == ["hist_b.png", "roc.png"]
    # one --output folder reused for other sets: the plots of the earlier sets go with their results
    out = tmp_path / "same"
    assert main(["eval", str(ckpt), "--bin", str(run["a"]), "--output", str(out)]) == 0
    assert main(["eval", str(ckpt), "--bin", str(run["b"]), "--output", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["hist_b.png", "roc.png"]
    assert "on a " not in (out / "results.md").read_text()


def test_tar_at_far_below_its_resolution_is_a_dash_with_the_reason() -> None:
    """1,500 negative pairs resolve FAR 1e-3 (1.5 false accepts) but not 1e-4 (which needs 10,000)."""
    metrics = {"lfw/accuracy": 0.99, "lfw/tar@far=1e-04": 0.9, "lfw/tar@far=1e-03": 0.95, "lfw/negative_pairs": 1500.0,
               "big/accuracy": 0.98, "big/tar@far=1e-04": 0.8, "big/tar@far=1e-03": 0.9, "big/negative_pairs": 10000.0}
    text = metrics_table(metrics)
    lines = text.splitlines()
    lfw = next(line for line in lines if line.startswith("| lfw"))
    big = next(line for line in lines if line.startswith("| big"))
    cells = [c.strip() for c in lfw.split("|")[1:-1]]
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    assert cells[header.index("tar@far=1e-04")] == UNRESOLVED == "—"
    assert cells[header.index("tar@far=1e-03")] == "0.95"
    assert UNRESOLVED not in big  # exactly 1 / FAR negatives resolve it
    assert lines[-1] == "— TAR@FAR=1e-04 on lfw: needs at least 10,000 negative pairs (one false accept in 1/FAR), " \
                        "there are 1,500"
    assert sum(UNRESOLVED in line for line in lines) == 2  # the cell and its one footnote


def test_eval_report_shows_the_dash_and_the_footnote(run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert main(["eval", str(run["ckpt"]), "--bin", str(run["a"]), "--output", str(out)]) == 0
    (rec,) = _records(out)
    negatives = rec["negative_pairs"]
    assert negatives == rec["pairs"] - rec["positive_pairs"] and 10 <= negatives < 100
    table = (out / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| last.pt on a"))
    assert row.count(UNRESOLVED) == 3  # 1e-4, 1e-3 and 1e-2 need 10,000 / 1,000 / 100 negative pairs; 1e-1 needs 10
    assert f"— TAR@FAR=1e-04 on a: needs at least 10,000 negative pairs (one false accept in 1/FAR), there are " \
           f"{negatives:,} (last.pt)" in table


def test_tar_cells_of_every_table_share_the_rule() -> None:
    """IJB 1:1 and identification rows use the same cells: a dash and its note below 1 / FAR negatives."""
    from faceforge.eval.report import tar_cells

    cells, notes = tar_cells({1e-6: 0.5, 1e-3: 0.75}, 999_999, "IJBC 1:1", lambda t: f"{100 * t:.2f} %", " @1M")
    assert cells == {"TAR@FAR=1e-06 @1M": "—", "TAR@FAR=1e-03 @1M": "75.00 %"}
    assert notes == ["— TAR@FAR=1e-06 on IJBC 1:1: needs at least 1,000,000 negative pairs (one false accept in "
                     "1/FAR), there are 999,999"]
