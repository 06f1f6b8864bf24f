"""`faceforge demo`: train a small IResNet with ArcFace on synthetic identities and show what it learned.

The demo evaluates the untrained network and the trained one on the same held-out pairs (identities
never seen in training) and prints a table of 10-fold accuracy and TAR@FAR=1e-3, plus where the
checkpoint, the log and the ROC plot were written.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from faceforge.eval.report import markdown_table, plot_roc, score_histogram
from faceforge.eval.metrics import roc
from faceforge.eval.verify import VerificationResult, embed, evaluate_scores, pair_scores, verify_pairs
from faceforge.train.checkpoint import load_checkpoint
from faceforge.train.config import Config, config_from_dict, load_config
from faceforge.data.pairs import load_bin
from faceforge.train.data import build_verification_sets, synthetic_held_out_pairs
from faceforge.train.engine import build_backbone, train

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

# A seconds-long version of the demo for tests: same code path, toy sizes.
TINY_OVERRIDES = (
    "data.num_identities=16",
    "data.images_per_identity=8",
    "data.image_size=32",
    "data.batch_size=16",
    "data.eval_pairs=64",
    "train.epochs=1",
    "train.eval_every=0",
    "train.checkpoint_every=4",
    "model.backbone=iresnet",
    "model.kwargs.layers=[1,1,1,1]",
)


def _untrained_backbone(cfg: Config) -> torch.nn.Module:
    """The backbone exactly as `train(cfg)` initialises it (same seed, same input size)."""
    torch.manual_seed(cfg.seed)
    return build_backbone(cfg)


def _row(name: str, r: VerificationResult) -> dict[str, str]:
    return {
        "model": name,
        "10-fold accuracy": f"{100 * r.accuracy:.2f} ± {100 * r.accuracy_std:.2f} %",
        "TAR@FAR=1e-3": f"{100 * r.tar_at_far[1e-3]:.2f} %",
        "EER": f"{100 * r.eer:.2f} %",
    }


def _curve(r: VerificationResult) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, _ = roc(r.scores, r.labels)
    return fpr, tpr


def run_demo(config: str | Path | None = None, overrides: Sequence[str] = (), tiny: bool = False) -> dict[str, VerificationResult]:
    """Train the demo model and print the untrained-vs-trained table. Returns both results."""
    cfg = load_config(config or DEMO_CONFIG, [*(TINY_OVERRIDES if tiny else ()), *overrides])
    images, issame = synthetic_held_out_pairs(cfg)
    print(
        f"faceforge demo: {cfg.model.backbone} + {cfg.head.name} on {cfg.data.num_identities} synthetic identities "
        f"x {cfg.data.images_per_identity} images ({cfg.data.image_size}x{cfg.data.image_size}); "
        f"held-out: {len(issame)} pairs of unseen identities"
    )
    untrained = verify_pairs(_untrained_backbone(cfg), images, issame, fars=(1e-3,))

    start = time.perf_counter()
    result = train(cfg)
    minutes = (time.perf_counter() - start) / 60

    trained_model = _untrained_backbone(cfg)
    trained_model.load_state_dict(load_checkpoint(result.checkpoint)["backbone"])
    trained = verify_pairs(trained_model, images, issame, fars=(1e-3,))

    out = Path(result.output)
    roc_path = plot_roc({"untrained": _curve(untrained), "trained": _curve(trained)}, out / "roc.png",
                        title="faceforge demo: held-out synthetic identities")
    print()
    print(markdown_table([_row("untrained", untrained), _row("trained", trained)],
                         ["model", "10-fold accuracy", "TAR@FAR=1e-3", "EER"]))
    print()
    print(f"trained in {minutes:.1f} min at {result.images_per_second:.0f} images/s")
    print(f"checkpoint: {result.checkpoint}")
    print(f"log:        {result.log}")
    print(f"ROC plot:   {roc_path}")
    return {"untrained": untrained, "trained": trained}


EVAL_FARS = (1e-4, 1e-3, 1e-2, 1e-1)


def _file_key(path: Path) -> str:
    """A content hash of a checkpoint file: the cache key of its embeddings."""
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _set_key(images: np.ndarray, issame: np.ndarray) -> str:
    """A short hash of a pair set's contents, so a changed set (another --pairs, another .bin) is re-embedded."""
    h = hashlib.blake2b(digest_size=4)
    h.update(np.ascontiguousarray(np.asarray(images)).tobytes())
    h.update(np.asarray(issame, dtype=bool).tobytes())
    return h.hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "set"


def _labels(checkpoints: Sequence[Path]) -> list[str]:
    """Short distinct names of checkpoints: the file name, else parent/name, else the whole path."""
    for make in (lambda p: p.name, lambda p: f"{p.parent.name}/{p.name}", lambda p: str(p)):
        labels = [make(p) for p in checkpoints]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{p}" for i, p in enumerate(checkpoints)]


def _eval_row(name: str, r: VerificationResult) -> dict[str, object]:
    row: dict[str, object] = {
        "model": name,
        "10-fold accuracy": f"{100 * r.accuracy:.2f} ± {100 * r.accuracy_std:.2f} %",
        "best-threshold accuracy": f"{100 * r.best_threshold_accuracy:.2f} % @ {r.threshold:.3f}",
    }
    row.update({f"TAR@FAR={far:.0e}": f"{100 * tar:.2f} %" for far, tar in r.tar_at_far.items()})
    row.update({"EER": f"{100 * r.eer:.2f} %", "AUC": f"{r.auc:.4f}"})
    return row


def _result_json(label: str, path: Path, key: str, name: str, r: VerificationResult,
                 embeddings: Path, cached: bool) -> dict[str, object]:
    return {
        "checkpoint": label,
        "checkpoint_path": str(path),
        "checkpoint_key": key,
        "set": name,
        "pairs": int(len(r.labels)),
        "positive_pairs": int(np.sum(r.labels)),
        "accuracy": float(r.accuracy),
        "accuracy_std": float(r.accuracy_std),
        "best_threshold_accuracy": float(r.best_threshold_accuracy),
        "threshold": float(r.threshold),
        "tar_at_far": {f"{far:.0e}": float(tar) for far, tar in r.tar_at_far.items()},
        "eer": float(r.eer),
        "auc": float(r.auc),
        "embeddings": str(embeddings),
        "cached": bool(cached),
    }


def evaluate_checkpoints(
    checkpoints: Sequence[str | Path],
    num_pairs: int = 3000,
    output: str | Path | None = None,
    bins: Sequence[str] = (),
    fars: Sequence[float] = EVAL_FARS,
) -> dict[tuple[str, str], VerificationResult]:
    """Verification of one or more `faceforge train` checkpoints, side by side.

    The sets are the given ``.bin`` files when there are any, else each checkpoint config's own held-out
    sets (``num_pairs`` pairs of unseen synthetic identities, or its ``data.eval_bins``).

    Writes into ``output`` (default: ``eval/`` beside the first checkpoint): ``results.md`` (the table
    printed), ``results.json`` (every number, per checkpoint and set), ``roc.png`` (every curve, log FPR;
    also as ``roc_eval.png``), ``hist_<set>.png`` (positive vs negative score histograms; named
    ``hist_<checkpoint>_<set>.png`` when comparing), and the embeddings as ``emb_<ckpt>_<set>_<data>.npy``,
    keyed by the checkpoint's content hash and the set's contents: a re-run re-scores from them without
    running the model.

    Returns:
        ``{(checkpoint label, set name): result}``; labels are file names (made distinct if needed).
    """
    if not checkpoints:
        raise ValueError("no checkpoint given")
    paths = [Path(c) for c in checkpoints]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint not found: {p}")
    labels = _labels(paths)
    out = Path(output) if output else paths[0].parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    bin_sets = {Path(b).stem: load_bin(b) for b in bins} if bins else None
    compare = len(paths) > 1

    results: dict[tuple[str, str], VerificationResult] = {}
    records: list[dict[str, object]] = []
    hists: list[Path] = []
    for path, label in zip(paths, labels):
        key = _file_key(path)
        state = load_checkpoint(path)
        cfg = config_from_dict(state["config"], source=str(path))
        cfg.data.eval_pairs = num_pairs
        if bin_sets is not None:
            cfg.data.eval_bins = list(bins)
            sets = bin_sets
        else:
            sets = build_verification_sets(cfg)
        if not sets:
            raise ValueError(f"{path}: its config (data.name = {cfg.data.name!r}) has no verification sets; "
                             "pass .bin files with --bin")
        model = None
        for raw_name, (images, issame) in sets.items():
            name = raw_name or "held-out"
            issame = np.asarray(issame, dtype=bool)
            if len(images) != 2 * len(issame):
                raise ValueError(f"set {name!r}: {len(issame)} pairs but {len(images)} images")
            cache = out / f"emb_{key}_{_safe(name)}_{_set_key(images, issame)}.npy"
            cached = cache.is_file()
            if cached:
                embeddings = np.load(cache)
                print(f"embeddings: {label} on {name}: cached {cache}")
            else:
                if model is None:
                    model = _untrained_backbone(cfg)
                    model.load_state_dict(state["backbone"])
                print(f"embeddings: {label} on {name}: computing {len(images)} images")
                embeddings = embed(model, images, progress=True)
                np.save(cache, embeddings)
            r = evaluate_scores(pair_scores(embeddings), issame, fars=fars)
            results[(label, name)] = r
            records.append(_result_json(label, path, key, name, r, cache, cached))
            stem = f"{_safe(label)}_{_safe(name)}" if compare else _safe(name)
            hists.append(score_histogram(r.scores, r.labels, out / f"hist_{stem}.png",
                                         title=f"{label} on {name}: pair scores"))

    curves = {f"{label} on {name}": _curve(r) for (label, name), r in results.items()}
    title = " vs ".join(labels) if compare else str(paths[0])
    roc_path = plot_roc(curves, out / "roc.png", title=title)
    shutil.copyfile(roc_path, out / "roc_eval.png")  # the name of earlier versions
    rows = [_eval_row(f"{label} on {name}", r) for (label, name), r in results.items()]
    table = markdown_table(rows, list(rows[0]))
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(
        {"checkpoints": {label: str(p) for label, p in zip(labels, paths)},
         "fars": [float(f) for f in fars],
         "results": records}, indent=2) + "\n")
    print(table)
    print(f"results:    {out / 'results.md'}, {out / 'results.json'}")
    print(f"ROC plot:   {roc_path}")
    print(f"histograms: {', '.join(str(h) for h in hists)}")
    return results


def evaluate_checkpoint(
    checkpoint: str | Path, num_pairs: int = 3000, output: str | Path | None = None, bins: Sequence[str] = ()
) -> dict[str, VerificationResult]:
    """Verification of one `faceforge train` checkpoint: :func:`evaluate_checkpoints` of it alone.

    Returns:
        ``{set name: result}``; the held-out set of a synthetic config is named "held-out".
    """
    results = evaluate_checkpoints([checkpoint], num_pairs=num_pairs, output=output, bins=bins)
    return {name: r for (_, name), r in results.items()}
