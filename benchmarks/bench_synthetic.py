"""Speed of the synthetic face renderer against the training step it feeds, at 56 and 112 pixels.

    python benchmarks/bench_synthetic.py                 # 1024 images per timing
    python benchmarks/bench_synthetic.py --n 256         # quick

Both numbers come from this process, on one CPU thread each (OMP/MKL threads and torch threads = 1),
at the same image size:

  render    ``render_images`` of n images (n/8 identities x 8 images, identities sampled afresh)
  baseline  the demo's training step on one batch of 64 of the same images: ``to_tensor`` + IResNet-18
            (width 0.25, 128-d, the model of configs/demo.yaml) forward + ArcFace loss + backward + SGD step

``ratio`` = render images/s / baseline images/s: how many training processes one rendering thread
keeps fed. Above 1 the data is not the bottleneck of a CPU run even without caching. Rates are
best-of-repeats and use CPU time of this process (wall time is printed too; on a machine shared with
other jobs the CPU-time rate is the one that reflects the code).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from faceforge.backbones import build as build_backbone  # noqa: E402
from faceforge.data.synthetic import identity_params, render_images  # noqa: E402
from faceforge.data.transforms import to_tensor  # noqa: E402
from faceforge.heads import ArcFace  # noqa: E402


def _best(fn, repeats: int) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds) of ``fn()`` over ``repeats`` calls."""
    wall = cpu = float("inf")
    for r in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn(r)
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return wall, cpu


def render_rate(size: int, n: int, difficulty: float, repeats: int) -> tuple[float, float]:
    """(images/s wall, images/s CPU) of rendering ``n`` images at ``size``."""
    ids = np.repeat(np.arange(n // 8), 8)
    samples = np.tile(np.arange(8), n // 8)

    def run(r: int) -> None:
        identity_params.cache_clear()  # count the identity sampling too
        render_images(ids, samples + 8 * r, seed=0, difficulty=difficulty, image_size=size)

    wall, cpu = _best(run, repeats)
    return len(ids) / wall, len(ids) / cpu


def train_step_rate(size: int, difficulty: float, steps: int, batch: int = 64, classes: int = 200) -> tuple[float, float]:
    """(images/s wall, images/s CPU) of the demo's training step on one rendered batch at ``size``."""
    torch.manual_seed(0)
    model = build_backbone("r18", embedding_size=128, input_size=size, width=0.25)
    head = ArcFace(classes, 128, s=32.0, m=0.5)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
    ids = np.arange(batch) % classes
    images = render_images(ids, np.zeros(batch, dtype=int), seed=0, difficulty=difficulty, image_size=size)
    labels = torch.from_numpy(ids)

    def step(_: int) -> None:
        opt.zero_grad(set_to_none=True)
        loss = head(model(to_tensor(images)), labels)
        loss.backward()
        opt.step()

    step(0)  # warm-up (allocator, first-call overheads)
    wall, cpu = _best(step, steps)
    return batch / wall, batch / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024, help="images per render timing (a multiple of 8)")
    parser.add_argument("--difficulty", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="render timings (best is kept)")
    parser.add_argument("--steps", type=int, default=5, help="training-step timings (best is kept)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"render_images vs the demo training step (r18 w0.25 + ArcFace, batch 64), 1 thread, difficulty {args.difficulty:g}")
    print(f"{'size':>4}  {'render img/s CPU':>16}  {'(wall)':>7}  {'train img/s CPU':>15}  {'(wall)':>7}  {'ratio':>6}")
    for size in (56, 112):
        r_wall, r_cpu = render_rate(size, args.n, args.difficulty, args.repeats)
        t_wall, t_cpu = train_step_rate(size, args.difficulty, args.steps)
        print(f"{size:4d}  {r_cpu:16.0f}  {r_wall:7.0f}  {t_cpu:15.0f}  {t_wall:7.0f}  {r_cpu / t_cpu:5.1f}x", flush=True)


if __name__ == "__main__":
    main()
