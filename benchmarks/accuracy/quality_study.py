"""Is an embedding's norm a quality score? MagFace's claim, measured on the harness's finished runs (issue 29).

For every finished run of the chosen heads (default ArcFace, AdaFace and MagFace: ``modern_heads``' runs, 3 seeds;
runs with label noise or augmentations are left out) it
loads the run's ``model.safetensors`` (``faceforge.deploy.load_model``), embeds the held-out gallery of its
dataset and seed (``gallery.held_out_gallery``) and scores the same sampled pairs as the harness
(``gallery.sample_pairs``, flip test as there). A pair's quality is the smaller of its two images' norms
(``Recognizer.quality``: the backbone's raw output, before normalisation). Then, at FMR 1e-2 (the threshold fixed
on all pairs first), the FNMR after rejecting the lowest-quality 10/20/30 % of the pairs and the area of the
0-30 % curve (``faceforge.eval.quality.error_versus_reject``, the ISO/IEC 29794-1 error-versus-reject curve that
the MagFace paper plots), against random rejection, whose expected FNMR stays the FNMR at 0 %.

    python benchmarks/accuracy/quality_study.py                          # runs/accuracy/heads, modern_heads
    python benchmarks/accuracy/quality_study.py --out runs/accuracy/heads --heads arcface magface

Prints a Markdown table (mean ± std over seeds) and writes ``OUT/quality_study.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gallery  # noqa: E402  (benchmarks/accuracy/gallery.py)
from experiments import GALLERY  # noqa: E402

from faceforge.deploy.inference import load_model  # noqa: E402
from faceforge.eval.quality import error_versus_reject, pair_quality  # noqa: E402
from faceforge.train.config import config_from_dict  # noqa: E402

FMR = 1e-2  # 1e-3 is resolved too (100,000 pairs), but at 32 px its FNMR is near 1 for every head here
REJECTED = (0.1, 0.2, 0.3)


def study_run(run_dir: Path, size: str) -> dict[str, float]:
    """The error-versus-reject numbers of one finished harness run (its folder holds config.yaml and the model)."""
    import yaml

    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()), str(run_dir / "config.yaml"))
    images, labels = gallery.held_out_gallery(cfg, GALLERY[size]["per_identity"])
    recognizer = load_model(run_dir)
    embeddings = recognizer.embed_crops(images).astype(np.float64)  # flip test as the run's model.json says
    norms = recognizer.quality(images)
    first, second, issame = gallery.sample_pairs(labels, GALLERY[size]["pairs"], cfg.seed)
    scores = np.einsum("nd,nd->n", embeddings[first], embeddings[second])
    quality = pair_quality(np.stack([norms[first], norms[second]], axis=1).reshape(-1))
    (curve,) = error_versus_reject(scores, issame, quality, fmrs=(FMR,))
    out = {"fnmr@0": curve.fnmr[0.0], "area": curve.area, "random_area": curve.random_area,
           "norm_mean": float(norms.mean()), "norm_cv": float(norms.std() / norms.mean())}
    out.update({f"fnmr@{r:.1f}": curve.fnmr[r] for r in REJECTED})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/accuracy/heads", help="the harness's output folder")
    parser.add_argument("--heads", nargs="+", default=["arcface", "adaface", "magface"])
    parser.add_argument("--size", default="default")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rows: dict[str, list[dict[str, float]]] = {}
    for result in sorted((out / "runs").glob("*/result.json")):  # finished runs on clean labels, no augmentation
        config = json.loads(result.read_text())["config"]
        data = config["data"]
        if config["head"]["name"] in args.heads and not data.get("label_noise") and not any(
                (data.get("augment") or {}).values()):
            rows.setdefault(config["head"]["name"], []).append(study_run(result.parent, args.size))
    columns = ["fnmr@0", *(f"fnmr@{r:.1f}" for r in REJECTED), "area", "random_area", "norm_cv"]
    print(f"| variant (seeds) | {' | '.join(columns)} |")
    print(f"| --- | {' | '.join('---:' for _ in columns)} |")
    for variant in args.heads:
        values = rows.get(variant, [])
        if not values:
            continue
        cells = [f"{100 * np.mean([v[c] for v in values]):.2f} ± {100 * np.std([v[c] for v in values]):.2f}"
                 if c != "norm_cv" else f"{np.mean([v[c] for v in values]):.3f}" for c in columns]
        print(f"| {variant} ({len(values)}) | {' | '.join(cells)} |")
    (out / "quality_study.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
