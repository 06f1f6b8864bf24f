"""`faceforge demo`: train a small IResNet with ArcFace on synthetic identities and show what it learned.

The demo evaluates the untrained network and the trained one on the same held-out pairs (identities
never seen in training) and prints a table of 10-fold accuracy and TAR@FAR=1e-3, plus where the
checkpoint, the log and the ROC plot were written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from faceforge.data.synthetic import synthetic_pairs
from faceforge.eval.report import markdown_table, plot_roc
from faceforge.eval.metrics import roc
from faceforge.eval.verify import VerificationResult, verify_pairs
from faceforge.train.checkpoint import load_checkpoint
from faceforge.train.config import Config, config_from_dict, load_config
from faceforge.data.pairs import load_bin
from faceforge.train.engine import build_backbone, build_verification_sets, train

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


def _held_out_pairs(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    d = cfg.data
    return synthetic_pairs(
        d.eval_pairs,
        num_identities=d.eval_identities,
        seed=cfg.seed,
        difficulty=d.difficulty,
        image_size=d.image_size,
        split="test",
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
    images, issame = _held_out_pairs(cfg)
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


def evaluate_checkpoint(
    checkpoint: str | Path, num_pairs: int = 3000, output: str | Path | None = None, bins: Sequence[str] = ()
) -> dict[str, VerificationResult]:
    """Verification of a `faceforge train` checkpoint; prints a table and writes a ROC plot of every set.

    The sets are the given ``.bin`` files when there are any, else the checkpoint config's own held-out
    sets: ``num_pairs`` pairs of unseen synthetic identities, or its ``data.eval_bins``.
    """
    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"], source=str(checkpoint))
    cfg.data.eval_pairs = num_pairs
    if bins:
        cfg.data.eval_bins = list(bins)
        sets = {Path(b).stem: load_bin(b) for b in bins}
    else:
        sets = build_verification_sets(cfg)
    if not sets:
        raise ValueError(f"{checkpoint}: its config (data.name = {cfg.data.name!r}) has no verification sets; "
                         "pass .bin files with --bin")
    model = _untrained_backbone(cfg)
    model.load_state_dict(state["backbone"])
    results = {name or "held-out": verify_pairs(model, images, issame, fars=(1e-3, 1e-4), progress=True)
               for name, (images, issame) in sets.items()}
    out = Path(output) if output else Path(checkpoint).parent
    roc_path = plot_roc({name: _curve(r) for name, r in results.items()}, out / "roc_eval.png", title=str(checkpoint))
    columns = ["model", "10-fold accuracy", "TAR@FAR=1e-3", "EER"]
    print(markdown_table([_row(f"{Path(checkpoint).name} on {name}", r) for name, r in results.items()], columns))
    print(f"ROC plot: {roc_path}")
    return results
