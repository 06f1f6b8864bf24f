"""Training throughput of `faceforge train` against the bare backbone + head step it wraps.

    python benchmarks/bench_train.py                      # the demo config (configs/demo.yaml)
    python benchmarks/bench_train.py --config configs/x.yaml --steps 30

Both numbers come from this process, on the same config and batch size:

  bare     forward + backward + SGD step of backbone + head on one pre-rendered batch, in a loop
           (no data loading, no flips, no logging, no checkpoints, no scheduler)
  trainer  `faceforge.train.train(cfg)` for --steps optimiser steps (data rendered on the fly unless
           the config caches it; images/s as the trainer reports it, warm-up steps excluded)

The ratio trainer/bare says how much the data path and the bookkeeping cost: 1.00 means nothing.
Absolute images/s depend on the machine and its load; compare the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from faceforge.build import FaceModel, build_backbone, build_head
from faceforge.train.config import load_config
from faceforge.train.data import build_dataset
from faceforge.train.engine import train

REPO = Path(__file__).resolve().parents[1]


def bare_images_per_second(cfg, steps: int, warmup: int = 3) -> float:
    """Images/s of forward + backward + optimiser step on one fixed batch (the floor of any trainer)."""
    torch.manual_seed(cfg.seed)
    dataset = build_dataset(cfg)
    model = FaceModel(build_backbone(cfg), build_head(cfg, int(dataset.num_classes)))
    batch = [dataset[i] for i in range(cfg.data.batch_size)]
    images = torch.stack([image for image, _ in batch])
    labels = torch.tensor([label for _, label in batch])
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        model(images, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * len(labels) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=20, help="timed optimiser steps per variant")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"output={out}", f"train.steps={args.steps}", "data.eval_pairs=0", "train.checkpoint_every=0",
            "train.progress=false", *args.overrides,
        ]
        cfg = load_config(args.config, overrides)
        bare = bare_images_per_second(cfg, args.steps)
        result = train(cfg)
    trainer = result.images_per_second
    print(f"config {args.config}: {cfg.model.backbone} {cfg.model.kwargs} + {cfg.head.name}, "
          f"batch {cfg.data.batch_size}, {cfg.data.image_size}px, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'variant':<10}{'images/s':>10}{'ratio to bare':>15}")
    print(f"{'bare':<10}{bare:>10.1f}{1.0:>15.2f}")
    print(f"{'trainer':<10}{trainer:>10.1f}{trainer / bare:>15.2f}")


if __name__ == "__main__":
    main()
