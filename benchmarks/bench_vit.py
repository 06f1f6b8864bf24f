"""CPU throughput and peak memory of the ViTs beside IResNet-18/50 at 112x112 (issue 30, "Measured").

    python benchmarks/bench_vit.py                          # vit_t vit_s r18 r50, batch 8, 3 timed iterations
    python benchmarks/bench_vit.py --models vit_t r18 --batch 16 --iters 5

Each backbone is measured in a fresh process (``benchmarks/rss.py``), so that its peak RSS is its own:

  infer  forward in eval mode without gradients (images/s)
  train  forward + backward + AdamW step in train mode (images/s; the ViTs with their default token masking)
  peak   the process's peak RSS over both, MiB (the model, AdamW's state and the activations of one batch)

Ratios are against r18 measured in the same run; the load average (1 min) is printed before and after, since
on a shared machine the absolute numbers move with it and the ratios less.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]


def measure(model: str, batch: int, iters: int, warmup: int, threads: int) -> dict:
    """One backbone in this process: images/s of inference and of a training step, peak RSS (MiB)."""
    import torch

    from faceforge.backbones import build
    from rss import status_kib

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build(model, 512, input_size=112)
    images = torch.randn(batch, 3, 112, 112)

    def rate(step) -> float:
        for _ in range(warmup):
            step()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        return batch * iters / (time.perf_counter() - t0)

    net.eval()
    with torch.no_grad():
        infer = rate(lambda: net(images))
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        net(images).square().mean().backward()
        optimizer.step()

    train = rate(train_step)
    params = sum(p.numel() for p in net.parameters())
    return {"model": model, "params_m": params / 1e6, "infer": infer, "train": train,
            "peak_mib": status_kib("VmHWM") / 1024.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["r18", "r50", "vit_t", "vit_s"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.iters, args.warmup, args.threads)))
        return 0

    from rss import child_json

    models = list(dict.fromkeys(["r18", *args.models]))  # the reference, measured in the same run
    load_before = os.getloadavg()[0]
    rows = [child_json([__file__, "--child", m, "--batch", str(args.batch), "--iters", str(args.iters),
                        "--warmup", str(args.warmup), "--threads", str(args.threads)]) for m in models]
    load_after = os.getloadavg()[0]
    ref = rows[0]
    print(f"112x112, batch {args.batch}, {args.iters} timed iterations after {args.warmup}, {args.threads} threads; "
          f"load average (1 min) {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs")
    print("| backbone | params (M) | infer images/s | x r18 | train images/s | x r18 | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['params_m']:.1f} | {r['infer']:.1f} | {r['infer'] / ref['infer']:.2f} | "
              f"{r['train']:.1f} | {r['train'] / ref['train']:.2f} | {r['peak_mib']:.0f} |")
    if max(load_before, load_after) > 2:
        print(f"taken on a busy machine (load average above 2 on {os.cpu_count()} CPUs): absolute rates are low and "
              "noisy; the ratios against r18 of the same run are the comparable numbers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
