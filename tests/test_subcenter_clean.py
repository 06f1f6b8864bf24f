"""`faceforge clean` (faceforge/eval/clean.py): Sub-center ArcFace's cleaning step (Deng et al. 2020, Sec. 3).

- the rule on hand-made embeddings: each class's dominant sub-centre is the one most of its samples are nearest to,
  and a sample is dropped when its angle to it exceeds the threshold;
- a real run: an r18 (width 1/8, 32 px) trained with ``subcenter_arcface`` and ``head.shard: true`` (its W saved as
  row shards) on 16 synthetic identities x 20 images with 20 % of the labels shuffled (``data.label_noise``); the
  dropped set is strongly enriched in the flipped samples (thresholds below), the cleaned ``.rec`` holds exactly the
  kept images with their labels, and ``faceforge train`` reads it;
- the command's one-line errors (exit 2): a run without sub-centres, a missing run, a missing ``--data``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from _runs import make_config
from faceforge.cli.main import main
from faceforge.eval.clean import clean_run, flip_scores, select_clean, subcentre_weight
from faceforge.train.engine import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_rule_keeps_the_dominant_subcentre_and_drops_beyond_the_angle() -> None:
    """Class 0: sub-centres along e0, e1, e2; three samples near e1, one at e0, one at 80 degrees from e1 (towards
    e3, still nearest e1). Dominant = 1 (four of five nearest it), so the e0 sample (90 degrees from e1) and the
    80-degree one go at 75 degrees, and stay at 95."""
    e = torch.eye(4, dtype=torch.float64)
    weight = torch.stack([e[:3], e[1:]])  # (2, 3, 4): class 1's sub-centres e1, e2, e3
    ang = math.radians(80.0)
    x = torch.stack([e[1] + 0.1 * e[3], e[1] + 0.1 * e[0], e[1], e[0], math.cos(ang) * e[1] + math.sin(ang) * e[3],
                     e[2]])
    labels = torch.tensor([0, 0, 0, 0, 0, 1])
    keep, dominant, angles = select_clean(x, labels, weight, 75.0)
    assert dominant.tolist() == [1, 1]  # class 1: its one sample is nearest e2, its sub-centre 1
    assert keep.tolist() == [True, True, True, False, False, True]
    torch.testing.assert_close(angles[3:5], torch.tensor([90.0, 80.0], dtype=torch.float64))
    assert select_clean(x, labels, weight, 95.0)[0].all()
    assert flip_scores(np.array([3, 4]), np.array([4, 7])) == {"flipped": 2, "dropped_flipped": 1, "precision": 0.5,
                                                              "recall": 0.5}


def test_the_subcentres_are_found_in_a_plain_or_a_broadface_head_state() -> None:
    w = torch.zeros(4, 3, 2)
    assert subcentre_weight({"head": {"weight": w}}, "subcenter_arcface", "run") is not None
    broadface = {"head": {"head.weight": w, "queue_labels": torch.zeros(2)}}
    assert subcentre_weight(broadface, "broadface", "run").shape == w.shape
    with pytest.raises(ValueError, match="run: head 'cosface' has no sub-centres; expected a run trained with head"):
        subcentre_weight({"head": {"weight": torch.zeros(4, 2)}}, "cosface", "run")


NOISE = 0.2
RUN = {
    "head": {"name": "subcenter_arcface", "kwargs": {"s": 32.0, "m": 0.3}, "shard": True},
    "model": {"backbone": "r18", "kwargs": {"width": 0.125}, "embedding_size": 32},
    "data": {"num_identities": 16, "images_per_identity": 20, "batch_size": 64, "label_noise": NOISE,
             "kwargs": {"difficulty": 0.5}},
    "train": {"steps": 150, "checkpoint_every": 150, "log_every": 50},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The noisy run (module docstring): about 20 s on one thread."""
    folder = tmp_path_factory.mktemp("noisy") / "run"
    train(make_config(folder, **RUN))
    assert (folder / "shards").is_dir()  # the head's W is in row shards: clean assembles it
    return folder


def hypergeometric_tail(population: int, marked: int, drawn: int, hits: int) -> float:
    """P(X >= hits), X the marked items among ``drawn`` drawn at random without replacement."""
    total = math.comb(population, drawn)
    return sum(math.comb(marked, k) * math.comb(population - marked, drawn - k)
               for k in range(hits, min(marked, drawn) + 1)) / total


def test_cleaning_drops_mostly_the_flipped_labels(run: Path) -> None:
    """Measured: 44 of 320 dropped, 41 of them flipped (precision 0.93 against a base rate of 63 / 320 = 0.20),
    recall 0.65; the angle to the dominant sub-centre ranks a flipped sample above a clean one with probability 0.94.

    Thresholds, each far from what unrelated dropping gives: (1) the chance that a random set of that size holds at
    least as many flipped samples (hypergeometric tail) < 1e-6 (measured ~1e-30); (2) precision >= 2.5 x the base
    rate; (3) recall >= 0.3; (4) the AUC of the angle >= 0.8 (a random score: 0.5, sd sqrt((n1 + n2 + 1) / (12 n1
    n2)) ~ 0.04, so 0.8 is 7 sd above it)."""
    result = clean_run(run, write=False)
    assert result.flipped is not None and result.labels.size == 320
    flipped, dropped = result.flipped, result.dropped
    base = flipped.size / result.labels.size
    assert 0.15 < base < 0.25  # 20 % shuffled, a few landing on their own class
    scores = flip_scores(dropped, flipped)
    assert hypergeometric_tail(result.labels.size, flipped.size, dropped.size, scores["dropped_flipped"]) < 1e-6
    assert scores["precision"] >= 2.5 * base and scores["recall"] >= 0.3
    is_flipped = np.zeros(result.labels.size, dtype=bool)
    is_flipped[flipped] = True
    auc = (result.angles[is_flipped][:, None] > result.angles[~is_flipped][None, :]).mean()
    assert auc >= 0.8
    assert np.array_equal(np.sort(np.concatenate([result.kept, dropped])), np.arange(result.labels.size))


def test_the_command_writes_a_rec_that_faceforge_train_reads(run: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    prefix = tmp_path / "clean"
    assert main(["clean", str(run), "--out", str(prefix)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "clean.json").read_text())
    assert f"kept {report['kept']} of 320 samples" in printed and "precision" in printed
    assert report["kept"] + report["dropped"] == 320 and report["classes"] == 16
    expected = clean_run(run, write=False)
    assert report["dropped_ids"] == expected.dropped.tolist()

    # the .rec holds exactly the kept training images, with the labels they were trained with, grouped by class
    from faceforge.train.data import build_dataset

    cleaned = build_dataset(make_config(tmp_path / "x", data={"name": "recordio", "path": str(prefix),
                                                              "image_size": 32, "kwargs": {}}))
    original = build_dataset(make_config(run, **{**RUN, "data": {**RUN["data"], "image_size": 32}}))
    order = expected.kept[np.argsort(expected.labels[expected.kept], kind="stable")]
    assert len(cleaned) == len(order) and int(cleaned.num_classes) == 16
    for position in (0, len(order) // 2, len(order) - 1):
        image, label = cleaned[position]
        want_image, want_label = original[int(order[position])]
        assert label == want_label and torch.equal(image, want_image)  # PNG in the .rec: lossless

    # faceforge train reads it (data.name: recordio, data.path: the prefix)
    again = train(make_config(tmp_path / "retrain", data={"name": "recordio", "path": str(prefix), "image_size": 32,
                                                          "batch_size": 16, "kwargs": {}},
                              train={"steps": 2, "checkpoint_every": 2}))
    assert all(math.isfinite(float(v)) for v in again.losses)

    # --data: a .rec of the same classes is cleaned in place of the run's own set
    assert main(["clean", str(run), "--data", str(prefix), "--out", str(tmp_path / "twice")]) == 0
    assert json.loads((tmp_path / "twice.json").read_text())["samples"] == len(order)


def test_the_model_file_is_the_backbone_alone(run: Path) -> None:
    """Heads are dropped at export: the run's model file loads as a Recognizer and embeds, whatever the head's W."""
    import faceforge

    recognizer = faceforge.load_model(run)
    assert recognizer.embed(np.zeros((2, 32, 32, 3), dtype=np.uint8)).shape == (2, 32)


def test_one_line_errors(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plain = tmp_path / "arc"
    train(make_config(plain, train={"steps": 1, "checkpoint_every": 1}))  # BASE: head arcface, TinyNet
    capsys.readouterr()  # the training log
    cases = [
        (["clean", str(plain)], f"faceforge clean: {plain}: head 'arcface' has no sub-centres; expected a run trained "
                                "with head.name: subcenter_arcface"),
        (["clean", str(tmp_path / "nothing")], f"faceforge clean: {tmp_path / 'nothing'}: no run folder"),
        (["clean", str(run), "--data", str(tmp_path / "missing")],
         f"faceforge clean: {tmp_path / 'missing'}: not found"),
        (["clean", str(run), "--angle", "0"], "faceforge clean: --angle 0.0; expected degrees in (0, 180]"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and "\n" not in err, err
