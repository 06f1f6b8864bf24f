"""`faceforge demo`: train a small IResNet with ArcFace on synthetic identities and show what it learned.

The demo evaluates the untrained network and the trained one on the same held-out pairs (identities
never seen in training) and prints a table of 10-fold accuracy and TAR@FAR=1e-3, plus where the
checkpoint, the log and the ROC plot were written.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch

from faceforge.eval.report import markdown_table, plot_roc
from faceforge.eval.verify import VerificationResult, verify_pairs
from faceforge.core.checkpoint import load_checkpoint
from faceforge.train.config import Config, load_config
from faceforge.train.data import synthetic_held_out_pairs
from faceforge.build import build_backbone
from faceforge.train.engine import train

# Package data (pyproject's package-data), so that an installed wheel has it; configs/demo.yaml in the
# repository is a link to it.
DEMO_CONFIG = "configs/demo.yaml"

# A seconds-long version of the demo for tests: same code path, toy sizes.
TINY_OVERRIDES = (
    "data.kwargs.num_identities=16",
    "data.kwargs.images_per_identity=8",
    "data.image_size=32",
    "data.batch_size=16",
    "data.kwargs.eval_pairs=64",
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


def load_demo_config(config: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """``config`` (default: the packaged demo config) with ``overrides``."""
    if config is not None:
        return load_config(config, overrides)
    with resources.as_file(resources.files("faceforge").joinpath(DEMO_CONFIG)) as path:
        return load_config(path, overrides)


def fresh_output(cfg: Config) -> Config:
    """The demo never reuses a run folder (``faceforge train`` refuses to): ``runs/demo``, else the first of
    ``runs/demo-2``, ``runs/demo-3``, ... that holds no run."""
    from faceforge.train.preflight import run_files

    base, k = Path(cfg.output), 1
    while run_files(Path(cfg.output)):
        k += 1
        cfg.output = f"{base}-{k}"
    return cfg


def run_demo(config: str | Path | None = None, overrides: Sequence[str] = (), tiny: bool = False) -> dict[str, VerificationResult]:
    """Train the demo model and print the untrained-vs-trained table. Returns both results."""
    cfg = fresh_output(load_demo_config(config, [*(TINY_OVERRIDES if tiny else ()), *overrides]))
    images, issame = synthetic_held_out_pairs(cfg)
    print(
        f"faceforge demo: {cfg.model.backbone} + {cfg.head.name} on {cfg.data.kwargs['num_identities']} synthetic identities "
        f"x {cfg.data.kwargs['images_per_identity']} images ({cfg.data.image_size}x{cfg.data.image_size}); "
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
    roc_path = plot_roc({"untrained": untrained.roc_curve(), "trained": trained.roc_curve()}, out / "roc.png",
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
