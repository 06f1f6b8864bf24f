"""benchmarks/accuracy: equal budgets, run keys, skip and resume, missing heads, the gallery protocol, the report,
fine-tuning from another run (init_from), BroadFace diagnostics, Recall@K and the learned threshold.

The harness runs at a "tiny" size added here (TinyNet from _train_worker, 8 synthetic identities at 16 px,
4 steps), so every run takes well under a second.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "accuracy"))

import experiments as ex  # noqa: E402
import gallery  # noqa: E402
import harness  # noqa: E402
import tables  # noqa: E402

from faceforge.eval.verify import verify_pairs  # noqa: E402
from faceforge.train.config import to_dict  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> str:
    """A size "tiny": seconds-long runs of every tuple-variant experiment on synthetic data."""
    monkeypatch.setitem(ex.BASE, "tiny", {
        "model": {"backbone": "_train_worker:TinyNet", "embedding_size": 16, "kwargs": {}},
        "optim": {"name": "sgd", "lr": 0.05},
        "schedule": {"name": "constant"},
        "train": {"steps": 4, "log_every": 1, "checkpoint_every": 1, "progress": False},
    })
    monkeypatch.setitem(ex.DATASETS["synthetic"], "tiny", {
        "name": "synthetic", "num_identities": 8, "images_per_identity": 8, "image_size": 16, "cache": True,
        "batch_size": 16, "eval_pairs": 0, "eval_identities": 6,
    })
    monkeypatch.setitem(ex.GALLERY, "tiny", {"per_identity": 4, "pairs": 200})
    monkeypatch.setitem(ex.CURVE, "tiny", {"every": 2, "pairs": 20})
    monkeypatch.setitem(ex.DIAGNOSTICS_EVERY, "tiny", 2)
    return "tiny"


@pytest.fixture
def finetune(tiny: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """An experiment "finetune" at the tiny size, like the BroadFace ones: plain ArcFace and BroadFace
    (queue 24) fine-tuned for 2 steps from table6's ArcFace run, with a learning curve and diagnostics."""
    variants = (ex.Variant("ArcFace", ex.ARCFACE), ex.Variant("BroadFace q=24", ex._broadface(tiny, 24, True, s=32.0, m=0.5)))
    monkeypatch.setitem(ex.EXPERIMENTS, "finetune", ex.Experiment(
        "fine-tune", variants, overrides=("train.steps=2", "optim.lr=0.01"), curve=True, init_from=("table6", "ArcFace")))
    return "finetune"


def _without(cfg, *paths: str) -> dict:
    d = to_dict(cfg)
    for path in paths:
        section, _, name = path.partition(".")
        if name:
            d[section].pop(name)
        else:
            d.pop(section)
    return d


def test_variants_differ_only_in_the_head_and_their_own_data_option(tiny: str, tmp_path: Path) -> None:
    runs = harness.plan(tiny, ["table6", "table3", "noise"], ["synthetic"], 2, tmp_path)
    assert len(runs) == 2 * (5 + 4 + 8)
    for seed in (0, 1):
        same = [_without(r.cfg, "head", "output", "data.label_noise") for r in runs if r.seed == seed]
        assert all(d == same[0] for d in same)  # the equal budget: backbone, data, steps, optimiser, schedule
    noisy = [r for r in runs if r.experiment == "noise" and r.seed == 0]
    assert [r.cfg.data.label_noise for r in noisy] == [0.0, 0.2, 0.4, 0.6] * 2
    assert {r.cfg.head.name for r in noisy} == {"cosface", "sphereface2"}


def test_run_keys_follow_the_resolved_config(tiny: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = harness.plan(tiny, ["table6", "noise"], ["synthetic"], 1, tmp_path)
    by_label = {(r.experiment, r.variant.label): r for r in runs}
    # the same resolved config is the same run, whatever experiment declares it
    assert by_label[("noise", "CosFace 0%")].key == by_label[("table6", "CosFace")].key
    assert by_label[("noise", "CosFace 0%")].folder == by_label[("table6", "CosFace")].folder
    assert len({r.key for r in runs}) == 5 + 8 - 2
    before = by_label[("table6", "ArcFace")].key
    monkeypatch.setitem(ex.BASE["tiny"]["train"], "steps", 5)
    after = harness.resolve(tiny, "synthetic", "table6", by_label[("table6", "ArcFace")].variant, 0, tmp_path)
    assert after.key != before  # a changed config is never mistaken for a finished run


def test_finished_runs_are_skipped_and_killed_runs_resume(tiny: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from faceforge.train import train

    runs = harness.plan(tiny, ["table6"], ["synthetic"], 1, tmp_path, only=["ArcFace", "CosFace"])
    arc, cos = runs[1], runs[0]
    assert (arc.variant.label, cos.variant.label) == ("ArcFace", "CosFace")

    class Killed(Exception):
        pass

    def kill_at_2(step: int) -> None:
        if step == 2:
            raise Killed

    with pytest.raises(Killed):  # a run killed after its step-2 checkpoint
        train(arc.cfg, on_step=kill_at_2)
    assert harness.read_result(arc) is None
    lines: list[str] = []
    done = harness.run_all(runs, log=lines.append)
    assert "resumed from" in (arc.folder / "train.log").read_text() and "at step 2" in (arc.folder / "train.log").read_text()
    assert [record["steps"] for _, record in done] == [4, 4]
    assert not (arc.folder / "last.pt").exists()  # checkpoints are removed once the result is written
    for _, record in done:
        assert set(record["metrics"]) >= {"accuracy", "tar@far=1e-03", "tar@far=1e-04", "eer", "recall@1"}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(harness, "execute", no_training)
    again: list[str] = []
    redone = harness.run_all(runs, log=again.append)
    assert all("done before" in line for line in again)
    assert [r["metrics"] for _, r in redone] == [r["metrics"] for _, r in done]
    # a result written for another key does not count as finished
    record = json.loads((arc.folder / harness.RESULT_NAME).read_text())
    record["key"] = "0" * 16
    (arc.folder / harness.RESULT_NAME).write_text(json.dumps(record))
    assert harness.read_result(arc) is None


def test_missing_heads_are_skipped_and_reported(tiny: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from faceforge.heads import HEADS

    monkeypatch.setattr(HEADS, "_factories", {k: v for k, v in HEADS._factories.items() if k != "sphereface2"})
    runs = harness.plan(tiny, ["table6"], ["synthetic"], 1, tmp_path, only=["Softmax", "SphereFace2"])
    assert harness.missing_heads(runs[1].cfg) == ["sphereface2"]
    lines: list[str] = []
    done = harness.run_all(runs, log=lines.append)
    assert done[1][1] is None and "head 'sphereface2' is not registered" in lines[1]
    tables.write_report(done, tmp_path, tiny)
    report = (tmp_path / "report.md").read_text()
    assert "| SphereFace2 |     0 | not run" in report
    statuses = [r["status"] for r in json.loads((tmp_path / "results.json").read_text())]
    assert statuses == ["done", "not run"]


def test_report_tables_plots_and_curves(tiny: str, tmp_path: Path) -> None:
    runs = harness.plan(tiny, ["table6", "noise"], ["synthetic"], 2, tmp_path, only=["Softmax", "ArcFace", "CosFace 0%", "CosFace 20%"])
    done = harness.run_all(runs, log=lambda line: None)
    paths = tables.write_report(done, tmp_path, tiny)
    assert {p.name for p in paths} >= {"report.md", "results.json", "table6_synthetic.png", "noise_synthetic.png"}
    report = (tmp_path / "report.md").read_text()
    softmax = [r["metrics"]["accuracy"] for run, r in done if run.variant.label == "Softmax"]
    arc = [r["metrics"]["accuracy"] for run, r in done if run.variant.label == "ArcFace"]
    mean, std = np.mean(softmax) * 100, np.std(softmax, ddof=1) * 100
    assert f"{mean:.2f} ± {std:.2f}" in report  # mean ± sample std over the two seeds
    diff = (np.array(arc) - np.array(softmax)) * 100
    assert f"{diff.mean():.2f} ± {diff.std(ddof=1):.2f}" in report  # the paired difference
    assert "| variant" in report and "TAR@FAR=1e-4" in report
    assert len(json.loads((tmp_path / "results.json").read_text())) == len(runs)


def test_learning_curve_from_the_trainer_log(tiny: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ex.EXPERIMENTS, "curve", ex.Experiment("a curve", (ex.Variant("ArcFace", ex.ARCFACE),), curve=True))
    run, = harness.plan(tiny, ["curve"], ["synthetic"], 1, tmp_path)
    assert run.cfg.train.eval_every == 2 and run.cfg.data.kwargs["eval_pairs"] == 20
    record = harness.execute(run)
    assert [p["step"] for p in record["curve"]] == [2.0, 4.0]
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in record["curve"])
    log = tmp_path / "train.log"
    log.write_text("x INFO eval step 3: accuracy 0.5000 eer 0.4\nx INFO eval step 3: accuracy 0.6000 eer 0.3\n")
    assert harness.learning_curve(log) == [{"step": 3.0, "accuracy": 0.6, "eer": 0.3}]  # resumed: the last wins


class _Pixels(nn.Module):
    """A fixed 'backbone': the flattened, centred pixels of a downsampled image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(x, 4).flatten(1) - 0.5


def test_gallery_scores_equal_the_trainers_pair_protocol(tiny: str, tmp_path: Path) -> None:
    run, = harness.plan(tiny, ["table6"], ["synthetic"], 1, tmp_path, only=["ArcFace"])
    images, labels = gallery.held_out_gallery(run.cfg, per_identity=4)
    assert images.shape == (6 * 4, 16, 16, 3) and np.array_equal(labels, np.repeat(np.arange(6), 4))
    metrics = gallery.evaluate_gallery(_Pixels(), images, labels, num_pairs=300, seed=0)
    # the same pairs, laid out as 2N images and scored by faceforge.eval.verify as the trainer does
    from faceforge.data.glyphs import sample_pairs

    first, second, issame = sample_pairs(labels, 300, 0)
    plain = verify_pairs(_Pixels(), images[np.stack([first, second], 1).ravel()], issame).as_dict()
    for key in ("accuracy", "tar@far=1e-03", "tar@far=1e-04", "eer", "best_threshold_accuracy"):
        assert metrics[key] == pytest.approx(plain[key], abs=1e-9)
    assert 0.0 <= metrics["recall@1"] <= 1.0 and metrics["pairs"] == 300


def test_glyph_gallery_is_the_benchmarks_test_set(tmp_path: Path) -> None:
    fonts = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
    (tmp_path / "fonts").mkdir()
    for name in ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf"):
        (tmp_path / "fonts" / name).symlink_to(fonts / name)
    data = {**ex.DATASETS["glyphs"]["default"], "path": str(tmp_path / "fonts"), "glyph_charset": "latin_greek_cyrillic",
            "num_identities": 10, "eval_identities": 5, "image_size": 16}
    from faceforge.train.config import config_from_dict
    from faceforge.train.data import glyph_benchmark_of

    cfg = config_from_dict({"output": "x", "model": {"backbone": "r18"}, "head": {"name": "arcface"}, "data": data})
    images, labels = gallery.held_out_gallery(cfg)
    expected, expected_labels = glyph_benchmark_of(cfg).test_gallery()
    assert np.array_equal(images, expected) and np.array_equal(labels, expected_labels) and images.shape[0] == 15


def test_init_from_is_the_same_dataset_and_seed_and_enters_the_key(tiny: str, finetune: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    runs = harness.plan(tiny, [finetune], ["synthetic"], 2, tmp_path)
    assert len(runs) == 4
    for run in runs:
        start = run.start
        assert (start.experiment, start.variant.label, start.dataset, start.seed) == ("table6", "ArcFace", "synthetic", run.seed)
        assert start.key == harness.resolve(tiny, "synthetic", "table6", start.variant, run.seed, tmp_path).key
        assert run.cfg.model.init_from == str(start.folder / "last.pt")
        assert (run.cfg.train.steps, start.cfg.train.steps) == (2, 4)
    # keyed by the start's key, not by where OUT is
    assert [r.key for r in harness.plan(tiny, [finetune], ["synthetic"], 2, tmp_path / "elsewhere")] == [r.key for r in runs]
    # the same fine-tune of another start (a longer table6 run) is another run
    arc = runs[0]
    monkeypatch.setitem(ex.BASE["tiny"]["train"], "steps", 5)
    moved = harness.resolve(tiny, "synthetic", finetune, arc.variant, 0, tmp_path)
    assert _without(moved.cfg, "model.init_from", "output") == _without(arc.cfg, "model.init_from", "output")
    assert moved.start.key != arc.start.key and moved.key != arc.key
    monkeypatch.setitem(ex.EXPERIMENTS, "bad", ex.Experiment("bad", ex.EXPERIMENTS[finetune].variants, init_from=("table6", "NoSuch")))
    with pytest.raises(ValueError, match="'table6' has no variant 'NoSuch'"):
        harness.plan(tiny, ["bad"], ["synthetic"], 1, tmp_path)


def test_the_start_runs_first_keeps_its_checkpoint_and_is_retrained_without_it(
        tiny: str, finetune: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = harness.plan(tiny, [finetune], ["synthetic"], 1, tmp_path)
    start = runs[0].start
    lines: list[str] = []
    done = harness.run_all(runs, log=lines.append)
    assert len(lines) == 3 and "its init_from table6 / synthetic / ArcFace / seed 0" in lines[0]
    assert (start.folder / "last.pt").is_file() and harness.read_result(start) is not None
    for run, record in done:
        assert record["init_from"] == start.key and record["steps"] == 2
        assert f"initialised from {start.folder / 'last.pt'}" in (run.folder / "train.log").read_text()
        assert not (run.folder / "last.pt").exists()
        assert [p["step"] for p in record["curve"]] == [2.0]
    arc, broad = (record for _, record in done)
    assert arc["diagnostics"] == []  # plain ArcFace has no queue
    point, = broad["diagnostics"]  # BroadFace Fig. 5a at step 2: the 24 queued rows against their current embeddings
    assert point["step"] == 2.0 and point["samples"] == 24.0
    assert 0.0 < point["cos_error"] <= 2.0 and 0.0 < point["cos_error_compensated"] <= 2.0

    # the start's checkpoint deleted (e.g. by an older harness): it is trained again, the fine-tunes are not
    (start.folder / "last.pt").unlink()
    again: list[str] = []
    harness.run_all(runs, log=again.append)
    assert "trained again: the earlier metrics reproduced exactly" in again[0]
    assert (start.folder / "last.pt").is_file()
    assert all("done before" in line for line in again[1:])
    # --redo trains a finished run again (resuming from its checkpoint if it has one)
    redo: list[str] = []
    harness.run_all(runs[1:], log=redo.append, redo={runs[1].key})
    assert "done before" in redo[0] and "trained again" in redo[1]


def test_diagnostics_lines_of_the_trainer_log(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_text(
        "x INFO diagnostics step 40: none\n"
        "x INFO diagnostics step 80: cos_error 0.25 cos_error_compensated 0.125 samples 1024\n"
        "x INFO eval step 80: accuracy 0.9\n"
        "x INFO diagnostics step 120: cos_error 0.5 cos_error_compensated 0.25 samples 1024\n"
        "x INFO diagnostics step 80: cos_error 0.375 cos_error_compensated 0.0625 samples 512\n"
    )
    assert harness.diagnostics(log) == [  # "none" (no queued ids yet) skipped; a resumed run's repeat: the last wins
        {"step": 80.0, "cos_error": 0.375, "cos_error_compensated": 0.0625, "samples": 512.0},
        {"step": 120.0, "cos_error": 0.5, "cos_error_compensated": 0.25, "samples": 1024.0},
    ]
    assert harness.learning_curve(log) == [{"step": 80.0, "accuracy": 0.9}]
    assert harness.diagnostics(tmp_path / "absent.log") == []
    log.write_text("x INFO diagnostics step 40: cos_error\n")
    with pytest.raises(ValueError, match="train.log.*expected 'name value' pairs"):
        harness.diagnostics(log)


def test_gallery_recall_at_k_and_accuracy_at_a_learned_threshold(tiny: str, tmp_path: Path) -> None:
    from faceforge.data.glyphs import sample_pairs
    from faceforge.eval.verify import embed

    run, = harness.plan(tiny, ["table6"], ["synthetic"], 1, tmp_path, only=["ArcFace"])
    images, labels = gallery.held_out_gallery(run.cfg, per_identity=4)
    e = embed(_Pixels(), images, flip=True).astype(np.float64)
    first, second, issame = sample_pairs(labels, 300, 0)
    scores = (e[first] * e[second]).sum(1)
    threshold = float(np.median(scores))
    metrics = gallery.evaluate_gallery(_Pixels(), images, labels, num_pairs=300, seed=0, threshold=threshold)
    # Recall@K (BroadFace Table 5): a query scores when one of its K nearest other items shares its label
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    nearest = np.argsort(-sim, axis=1, kind="stable")
    for k in (1, 10, 20):
        plain = np.mean([(labels[nearest[i, :k]] == labels[i]).any() for i in range(len(labels))])
        assert metrics[f"recall@{k}"] == pytest.approx(plain, abs=1e-12)
    assert "recall@30" not in metrics  # 24 items: no 30 others
    # accuracy at a threshold fixed in advance: (score >= threshold) == same identity
    assert metrics["fixed_threshold"] == threshold
    assert metrics["fixed_threshold_accuracy"] == pytest.approx(np.mean((scores >= threshold) == issame), abs=1e-12)
    assert 0.3 < metrics["fixed_threshold_accuracy"] < 1.0


def test_broadface_long_fine_tunes_the_many_class_queue_rows_for_1000_steps(tmp_path: Path) -> None:
    runs = harness.plan("many", ["broadface_long", "broadface_queue"], ["glyphs"], 1, tmp_path)
    long = [r for r in runs if r.experiment == "broadface_long"]
    short = {r.variant.label: r for r in runs if r.experiment == "broadface_queue"}
    assert [r.variant.label for r in long] == list(short)  # the same three variants, trained again for longer
    for run in long:
        assert (run.start.experiment, run.start.variant.label) == ("table6", "ArcFace")
        assert (run.cfg.train.steps, run.cfg.schedule.milestones, run.cfg.optim.lr) == (1000, [625, 875], 0.01)
        assert run.key != short[run.variant.label].key and run.cfg.data.kwargs["num_identities"] == 5000
        assert _without(run.cfg, "output", "train.steps", "schedule.milestones") == _without(
            short[run.variant.label].cfg, "output", "train.steps", "schedule.milestones")


def test_broadface_experiments_fine_tune_from_table6_under_one_budget(tmp_path: Path) -> None:
    runs = harness.plan("default", list(ex.BROADFACE_EXPERIMENTS), ["synthetic"], 2, tmp_path)
    queue = [r for r in runs if r.experiment == "broadface_queue"]
    cosface = [r for r in runs if r.experiment == "broadface_cosface"]
    # the curve (Fig. 7b) and retrieval (Table 5) experiments are views of the queue runs: no extra training
    assert {r.key for r in runs} == {r.key for r in queue + cosface} and len({r.key for r in runs}) == 2 * (7 + 2)
    assert {r.cfg.head.kwargs.get("queue_size", 0) for r in queue} == {0, 2048, 8192, 32768}
    for run in runs:
        start = "CosFace" if run in cosface else "ArcFace"
        assert (run.start.experiment, run.start.variant.label, run.start.seed) == ("table6", start, run.seed)
        assert (run.cfg.train.steps, run.cfg.optim.lr, run.cfg.schedule.name) == (320, 0.01, "step")
        assert run.cfg.train.eval_every > 0 and run.cfg.train.diagnostics_every == (run.cfg.head.name == "broadface") * 40
    for seed in (0, 1):  # one budget: only the head (its queue), its diagnostics and the start differ
        same = [_without(r.cfg, "head", "output", "model.init_from", "train.diagnostics_every") for r in runs if r.seed == seed]
        assert all(d == same[0] for d in same)


def test_teacher_unlabelled_masked_and_momentum_encoder_runs(tiny: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """BigFace's and AttFC's harness parts: a variant taught by another run's checkpoint (the teacher runs first and
    keeps it; the key names the teacher's key, not OUT), generated unlabelled images for semi-supervised KD, the
    masked gallery scores, and an AttFC run scored with both of its encoders."""
    distill = ("objective.name=distillation", "objective.kwargs={lam: 9.0}")
    teacher = ("table6", "ArcFace")
    attfc = (*ex._head("attfc", container_size=16, batch_size=16, s=32.0, m2=0.5), "objective.name=attfc",
             "objective.kwargs={momentum: 0.9}", "data.sampler=attfc", "data.sampler_kwargs={k: 2}")
    variants = (ex.Variant("plain", ex.COSFACE),
                ex.Variant("distilled + unlabelled", (*ex.COSFACE, *distill, "data.unlabelled_ratio=0.5"),
                           teacher=teacher, unlabelled=24),
                ex.Variant("AttFC", attfc))
    monkeypatch.setitem(ex.EXPERIMENTS, "kd", ex.Experiment("kd", variants, masked=True,
                                                            columns=("accuracy", "masked/accuracy")))
    runs = harness.plan(tiny, ["kd"], ["synthetic"], 1, tmp_path)
    plain, taught, att = runs
    arcface = next(v for v in ex.EXPERIMENTS["table6"].variants_for(tiny) if v.label == "ArcFace")
    assert taught.teacher.key == harness.resolve(tiny, "synthetic", "table6", arcface, 0, tmp_path).key
    assert taught.cfg.objective.kwargs["teacher"] == str(taught.teacher.folder / "last.pt")
    assert [r.key for r in harness.plan(tiny, ["kd"], ["synthetic"], 1, tmp_path / "elsewhere")] == [r.key for r in runs]
    lines: list[str] = []
    done = dict((run.variant.label, record) for run, record in harness.run_all(runs, log=lines.append))
    assert "its teacher table6 / synthetic / ArcFace / seed 0" in lines[1]
    assert (taught.teacher.folder / "last.pt").is_file()  # a teacher keeps its checkpoint
    pngs = sorted(Path(taught.cfg.data.unlabelled).glob("*.png"))
    assert len(pngs) == 24
    log = (taught.folder / "train.log").read_text()
    assert "distillation" in log
    for record in done.values():
        m = record["metrics"]
        assert 0.0 < m["masked/accuracy"] <= 1.0 and 0.0 < m["accuracy"] <= 1.0
        assert m["masked/accuracy"] != m["accuracy"]  # the masked side changes the scores
        assert record["backbone_parameters"] > 0
    assert "momentum/accuracy" in done["AttFC"]["metrics"] and "momentum/accuracy" not in done["plain"]["metrics"]
    assert done["AttFC"]["metrics"]["momentum/recall@1"] != done["AttFC"]["metrics"]["recall@1"]
    # a finished run that lacks masked scores (done before by an experiment without them) is trained again
    record = json.loads((plain.folder / "result.json").read_text())
    record["metrics"] = {k: v for k, v in record["metrics"].items() if not k.startswith("masked/")}
    (plain.folder / "result.json").write_text(json.dumps(record))
    again: list[str] = []
    harness.run_all(runs[:1], log=again.append)
    assert "trained again" in again[0]


def test_bigface_widths_match_their_parameter_counts() -> None:
    """experiments.BACKBONE_WIDTHS (the x axis of the scaling law) are the parameters of the backbones they name."""
    from faceforge.backbones import BACKBONES

    for width, params in ex.BACKBONE_WIDTHS.items():
        model = BACKBONES.build("iresnet", embedding_size=128, input_size=32, layers=[1, 1, 1, 1], width=width)
        assert sum(p.numel() for p in model.parameters()) == params, width


def test_power_law_fit_recovers_its_exponent() -> None:
    """tables.power_law on seed means lying exactly on error = 0.2 x^-0.3 (plus a point's noise-free twin seeds)."""
    rows = []
    for x in (0.1, 0.2, 0.4, 0.8, 1.6):
        acc = 1.0 - 0.2 * x ** -0.3
        records = {seed: {"metrics": {"accuracy": acc, "eer": 0.5 * x ** -0.1}} for seed in range(2)}
        rows.append({"variant": ex.Variant(f"x {x}", (), "s", x), "records": records})
    a, b, r2 = tables.power_law(rows)
    assert abs(a - 0.2) < 1e-9 and abs(b - 0.3) < 1e-9 and abs(r2 - 1.0) < 1e-12
    a, b, _ = tables.power_law(rows, "eer")
    assert abs(a - 0.5) < 1e-9 and abs(b - 0.1) < 1e-9
    assert tables.power_law(rows[:2]) is None


def test_an_experiment_for_some_datasets_only_skips_the_others(tiny: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Experiment.datasets: bigface_masks (face-template masks) plans synthetic runs only."""
    monkeypatch.setitem(ex.EXPERIMENTS, "faces_only", ex.Experiment(
        "faces only", (ex.Variant("ArcFace", ex.ARCFACE),), datasets=("synthetic",)))
    monkeypatch.setitem(ex.DATASETS["glyphs"], "tiny", ex.DATASETS["synthetic"]["tiny"])  # planned, never run
    runs = harness.plan(tiny, ["faces_only", "table6"], ["synthetic", "glyphs"], 1, tmp_path, only=["ArcFace"])
    assert [(r.experiment, r.dataset) for r in runs] == [
        ("faces_only", "synthetic"), ("table6", "synthetic"), ("table6", "glyphs")]
    assert ex.EXPERIMENTS["bigface_masks"].datasets == ("synthetic",)


def test_plots_and_power_law_lines_with_a_metric_some_runs_lack(tmp_path: Path) -> None:
    """A run shared with an experiment that scores no masked pairs has no ``masked/`` metric: the plot leaves
    it out of that panel (it does not fail), and a rising error prints a positive exponent (^+0.100)."""
    rows = []
    for x in (0.1, 0.2, 0.4):
        metrics = {"accuracy": 1.0 - 0.1 * x ** 0.1, "tar@far=1e-03": 0.5}
        if x > 0.1:
            metrics["masked/accuracy"] = 0.8
        rows.append({"variant": ex.Variant(f"x {x}", (), "s", x), "records": {0: {"metrics": metrics}}})
    assert tables.plot_lines(rows, "t", "x", tmp_path / "lines.png", ("accuracy", "masked/accuracy")).exists()
    assert tables.plot_bars(rows, "t", tmp_path / "bars.png", ("masked/accuracy", "accuracy")).exists()
    (line,) = tables.power_law_lines(rows, ["accuracy"])
    assert "^+0.100 " in line
