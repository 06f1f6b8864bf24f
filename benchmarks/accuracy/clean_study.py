"""Sub-center ArcFace's cleaning step, measured on the harness's noisy runs (issue 29).

For every finished ``subcenter_noise`` run of Sub-center ArcFace with label noise whose ``last.pt`` was kept
(``harness.py --experiments subcenter_noise --keep-checkpoints``), it runs ``faceforge clean`` on its training set
(``faceforge.eval.clean.clean_run``: each class's dominant sub-centre, samples farther than 75 degrees dropped),
scores the dropped set against the labels ``data.label_noise`` flipped (precision, recall), then trains ArcFace
(s 32, m 0.5) on the cleaned ``.rec`` at the harness's equal budget and scores it on the same held-out gallery and
pairs as the harness. Beside it: the harness's own ArcFace trained on the noisy labels (same seed and noise).

    python benchmarks/accuracy/clean_study.py                       # runs/accuracy/heads
    python benchmarks/accuracy/clean_study.py --out runs/accuracy/heads

Prints a Markdown table (mean ± std over seeds) and writes ``OUT/clean_study.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gallery  # noqa: E402  (benchmarks/accuracy/gallery.py)
from experiments import GALLERY  # noqa: E402

from faceforge.build import load_backbone  # noqa: E402
from faceforge.core.checkpoint import load_checkpoint  # noqa: E402
from faceforge.eval.clean import clean_run  # noqa: E402
from faceforge.train import train  # noqa: E402
from faceforge.train.config import config_from_dict  # noqa: E402

ARCFACE = {"name": "arcface", "kwargs": {"s": 32.0, "m": 0.5}}


def _score(checkpoint: Path, config: dict, size: str) -> float:
    """10-fold accuracy (%) of a checkpoint's backbone on the harness's gallery and pairs of ``config``'s data."""
    cfg = config_from_dict(config)
    images, labels = gallery.held_out_gallery(cfg, GALLERY[size]["per_identity"])
    backbone, _ = load_backbone(load_checkpoint(checkpoint))
    metrics = gallery.evaluate_gallery(backbone, images, labels, GALLERY[size]["pairs"], cfg.seed)
    return 100.0 * metrics["accuracy"]


def study_run(run_dir: Path, size: str) -> dict[str, float]:
    """Clean one noisy sub-centre run, retrain ArcFace on what is kept, score it."""
    config = json.loads((run_dir / "result.json").read_text())["config"]
    cleaned = clean_run(run_dir, out=run_dir / "cleaned")
    report = cleaned.report()
    retrain = copy.deepcopy(config)
    retrain["head"] = {**retrain["head"], **ARCFACE}
    image_size, batch = config["data"]["image_size"], config["data"]["batch_size"]
    retrain["data"] = {"name": "recordio", "path": str(run_dir / "cleaned"), "image_size": image_size,
                       "batch_size": batch}
    retrain["output"] = str(run_dir / "retrain_arcface")
    result = train(config_from_dict(retrain), resume=True)
    return {"noise": 100.0 * config["data"]["label_noise"], "seed": config["seed"],
            "dropped": 100.0 * report["dropped"] / report["samples"], "precision": 100.0 * report["precision"],
            "recall": 100.0 * report["recall"], "retrained_arcface": _score(result.checkpoint, config, size),
            "subcenter": 100.0 * json.loads((run_dir / "result.json").read_text())["metrics"]["accuracy"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/accuracy/heads", help="the harness's output folder")
    parser.add_argument("--size", default="default")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    noisy_arcface: dict[tuple[float, int], float] = {}
    rows = []
    for result in sorted((out / "runs").glob("*/result.json")):
        record = json.loads(result.read_text())
        config, noise = record["config"], record["config"]["data"].get("label_noise") or 0.0
        if config["head"]["name"] == "arcface" and noise and not any((config["data"].get("augment") or {}).values()):
            noisy_arcface[(100.0 * noise, config["seed"])] = 100.0 * record["metrics"]["accuracy"]
        elif config["head"]["name"] == "subcenter_arcface" and noise and (result.parent / "last.pt").exists():
            rows.append(study_run(result.parent, args.size))
    for row in rows:
        row["noisy_arcface"] = noisy_arcface.get((row["noise"], row["seed"]), float("nan"))
    columns = ["dropped", "precision", "recall", "noisy_arcface", "subcenter", "retrained_arcface"]
    print(f"| label noise (seeds) | {' | '.join(columns)} |")
    print(f"| --- | {' | '.join('---:' for _ in columns)} |")
    for noise in sorted({r["noise"] for r in rows}):
        group = [r for r in rows if r["noise"] == noise]
        cells = [f"{np.mean([r[c] for r in group]):.2f} ± {np.std([r[c] for r in group]):.2f}" for c in columns]
        print(f"| {noise:.0f} % ({len(group)}) | {' | '.join(cells)} |")
    (out / "clean_study.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
