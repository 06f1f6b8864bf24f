"""BigFace-Distill on CPU: the cost of the teacher per training step, live and from the embedding cache.

    python benchmarks/bench_distill.py                 # teacher r50 (1/2 width), student r18 (1/8 width), 56 px
    python benchmarks/bench_distill.py --images 384 --batch 64 --mask-ratios 0,0.35

One epoch over `--images` synthetic images (random tensors; only the cost matters here) with the distillation
objective (`faceforge.train.distillation`: student forward + backward, teacher forward), measured three ways in
this process: the teacher live every step, the cache's first epoch (filling it) and a later epoch (reading it).
Flips are on, so the second epoch sees about half of the views for the first time; the third ("warm") epoch
reads what the first two wrote. Masked images are always embedded live. Times are medians over `--repeats`
epochs and depend on the machine's load; compare the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from faceforge.build import build_backbone
from faceforge.data.samplers import EpochSampler, SamplerContext
from faceforge.heads import CosFace
from faceforge.core.checkpoint import save_checkpoint
from faceforge.train.config import config_from_dict, to_dict
from faceforge.train.distillation import Distillation


def teacher_checkpoint(folder: Path, backbone: str, width: float, size: int, dim: int) -> Path:
    cfg = config_from_dict({"output": str(folder), "model": {"backbone": backbone, "embedding_size": dim,
                                                             "kwargs": {"width": width}},
                            "head": {"name": "cosface"}, "data": {"image_size": size}})
    path = folder / "teacher.pt"
    save_checkpoint(path, {"config": to_dict(cfg), "backbone": build_backbone(cfg).state_dict()})
    return path


def epoch_time(objective: Distillation, sampler: EpochSampler, epoch: int, micro: int) -> float:
    start = time.perf_counter()
    for batch in sampler.batches(epoch, 0):
        objective.zero_grad(set_to_none=True)
        sum(objective(batch).values()).backward()
    return (time.perf_counter() - start) / micro


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--teacher", default="r50")
    parser.add_argument("--teacher-width", type=float, default=0.5)
    parser.add_argument("--mask-ratios", default="0,0.35")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dataset = [(torch.rand(3, args.size, args.size) * 2 - 1, i % 16) for i in range(args.images)]
    micro = args.images // args.batch
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = teacher_checkpoint(tmp, args.teacher, args.teacher_width, args.size, 128)
        for ratio in [float(r) for r in args.mask_ratios.split(",")]:
            context = SamplerContext(dataset=dataset, batch_size=args.batch, world_size=1, rank=0, seed=0, grad_accum=1,
                                     micro_per_epoch=micro, mask_ratio=ratio)
            times = {}
            for mode in ("live", "cached"):
                cache = str(tmp / f"cache-{ratio}") if mode == "cached" else None
                student = build_backbone(config_from_dict({
                    "output": str(tmp), "model": {"backbone": "r18", "embedding_size": 64, "kwargs": {"width": 0.125}},
                    "head": {"name": "cosface"}, "data": {"image_size": args.size}}))
                objective = Distillation(student, CosFace(16, 64), teacher=str(teacher), cache=cache)
                objective.bind(context)
                sampler = EpochSampler(context)
                if mode == "live":
                    times["live"] = statistics.median(epoch_time(objective, sampler, e, micro) for e in range(args.repeats))
                else:
                    times["first epoch (filling)"] = epoch_time(objective, sampler, 0, micro)
                    epoch_time(objective, sampler, 1, micro)  # the other flips of most images
                    times["warm"] = statistics.median(epoch_time(objective, sampler, 2 + e, micro) for e in range(args.repeats))
                    times["hit rate"] = objective.cache.hits / max(1, objective.cache.hits + objective.cache.misses)
            rows.append((ratio, times))
            print(ratio, times, flush=True)
    print(f"\nTeacher {args.teacher} (width {args.teacher_width}), student r18 (width 0.125), {args.size}x{args.size}, "
          f"batch {args.batch}, {args.images} images, {args.threads} thread(s); seconds per step (forward + backward):\n")
    print("| mask ratio | teacher live | cache, first epoch | cache, warm | live / warm | cache hits (all epochs) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for ratio, t in rows:
        print(f"| {ratio:g} | {t['live']:.3f} | {t['first epoch (filling)']:.3f} | {t['warm']:.3f} | "
              f"{t['live'] / t['warm']:.2f}x | {t['hit rate']:.0%} |")


if __name__ == "__main__":
    main()
