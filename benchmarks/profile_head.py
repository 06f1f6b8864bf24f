"""Where the chunked ArcFace head's time goes, pass by pass, against the three GEMMs no implementation avoids.

    python benchmarks/profile_head.py --classes 1000000 --threads 1

One forward + backward of `faceforge.heads.ArcFace` (s 64, m 0.5; D 512, B 128, float32) under `torch.profiler`,
after a warm-up step (its buffers are reused, as in training): the self CPU time of each ATen operator, summed
over the chunks and grouped into the passes of `faceforge/heads/softmax.py` (`_ChunkedMarginCE`), each with the
bytes it moves. The three GEMMs (x W^T forward, p W and p^T x backward) are the floor; every other pass is what
the head adds. Prints the load average before and after: a profile taken on a busy machine is not a result.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

import torch
from bench_head import make_inputs  # benchmarks/bench_head.py
from torch.profiler import ProfilerActivity, profile

# ATen operator -> the pass of _ChunkedMarginCE it is (forward F, backward B); the rest is "other"
PASSES = {
    "aten::mm": "GEMMs: x W^T (F), p^T x (B)",
    "aten::addmm_": "GEMMs: grad x += p W (B)",
    "aten::addmm": "GEMMs: grad x += p W (B)",
    "aten::linalg_vector_norm": "row norms |W_j| (F): reads W",
    "aten::div_": "z / |W_j| (F): (B, C)",
    "aten::index_put_": "target column to -inf (F)",
    "aten::amax": "chunk row max (F): (B, C)",
    "aten::sub": "z - max (F), z - lse (B): (B, C)",
    "aten::exp_": "exp (F and B): (B, C)",
    "aten::mv": "row sums (F), rho_j (B): (B, C)",
    "aten::mul": "z * p (B): (B, C)",
    "aten::mul_": "p * s / |W_j| (B): (B, C)",
    "aten::addcmul_": "grad W -= rho_j / |W_j|^2 W_j (B): reads W, grad W",
}


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {load()}")
    head, x, labels = make_inputs(args.classes, args.dim, args.batch)
    weight = head.weight

    def step() -> None:
        head(x, labels).backward()
        weight.grad = x.grad = None

    step()  # warm-up: the buffers exist from here on, as in a training loop
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    per_pass: dict[str, float] = defaultdict(float)
    others: dict[str, float] = {}
    for event in prof.key_averages():
        per_pass[PASSES.get(event.key, "other")] += event.self_cpu_time_total / 1e6
        if event.key not in PASSES:
            others[event.key] = event.self_cpu_time_total / 1e6
    total = sum(per_pass.values())
    gemm = sum(s for name, s in per_pass.items() if name.startswith("GEMMs"))
    print(f"classes={args.classes} dim={args.dim} batch={args.batch} threads={args.threads}, torch {torch.__version__}")
    print("| pass | seconds | x the GEMMs | share of the step |")
    print("| --- | --- | --- | --- |")
    for name, seconds in sorted(per_pass.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {seconds:.3f} | {seconds / gemm:.3f} | {100 * seconds / total:.1f} % |")
    print(f"| step (profiled) | {total:.3f} | {total / gemm:.3f} | 100 % |")
    biggest = sorted(others.items(), key=lambda kv: -kv[1])[:6]
    print("other, the largest: " + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in biggest))
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
