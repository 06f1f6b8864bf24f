"""Time and peak memory of one forward + backward of the margin-softmax head against two references.

    python benchmarks/bench_head.py --classes 1000000 --dim 512 --batch 128
    python benchmarks/bench_head.py --classes 100000              # quick check
    python benchmarks/bench_head.py --classes 1000000 --variants baseline,sphereface2,sphereface2_plain
    python benchmarks/bench_head.py --classes 1000000 --variants baseline,ours,ours_release

Variants, for ArcFace (s = 64, m = 0.5) with W of shape (classes, dim) in float32:
  baseline  the three matmuls no implementation can avoid: x W^T, g^T x, g W (outputs preallocated)
  ours      faceforge.heads.ArcFace: chunked custom autograd function (buffers="auto": "reuse" on CPU)
  ours_release  the same head with buffers="release": nothing kept between steps
  plain     F.normalize(W), full logits, margin on the target column, F.cross_entropy, autograd
and, on request (--variants), for SphereFace2 (lambda = 0.7, r = 30, m = 0.4, t = 3, the same W):
  sphereface2        faceforge.heads.SphereFace2: chunked custom autograd function
  sphereface2_plain  its plain (B, C) logits (head.logits), softplus over every column, autograd

Times: warm-up, then the median of --repeats runs, all in this process (so `ours` runs in steady state,
reusing its buffers as a training loop does: faceforge/heads/buffers.py). Memory: each variant in a fresh
subprocess, peak RSS (VmHWM from /proc/self/status) minus the RSS once W, x and labels exist, as a
multiple of |W| (the gradient of W counts), and what stays allocated once the step is over and its
gradients are dropped (`held`: the head's kept buffers; weight.grad adds 1.0 |W| until zero_grad). Absolute
times depend on the machine and its load; only the ratios are meant to be compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from rss import child_json, held_kib, peak_growth_bytes  # benchmarks/rss.py

from faceforge.heads import ArcFace, SphereFace2, apply_margin
from faceforge.heads.softmax import DEFAULT_CHUNK_SIZE
from faceforge.heads.sphereface2 import DEFAULT_CHUNK_SIZE as SF2_CHUNK_SIZE

VARIANTS = ("baseline", "ours", "ours_release", "plain", "sphereface2", "sphereface2_plain")
DEFAULT_VARIANTS = ("baseline", "ours", "plain")


def make_inputs(
    classes: int, dim: int, batch: int, seed: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[ArcFace, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    head = ArcFace(classes, dim, chunk_size=chunk_size)  # weight N(0, 0.01^2), filled in place: no temporary copy
    x = torch.randn(batch, dim, requires_grad=True)
    labels = torch.randint(0, classes, (batch,))
    return head, x, labels


def sphereface2_sharing(head: ArcFace, chunk_size: int = SF2_CHUNK_SIZE) -> SphereFace2:
    """A SphereFace2 head (paper defaults) whose `weight` IS `head.weight` (built on meta: no second |W|)."""
    with torch.device("meta"):
        sf2 = SphereFace2(head.num_classes, head.embedding_size, chunk_size=chunk_size)
    sf2.weight = head.weight
    sf2.bias = torch.nn.Parameter(torch.tensor([sf2.initial_bias()]))
    return sf2


def release_sharing(head: ArcFace) -> ArcFace:
    """The same ArcFace head with buffers="release", whose `weight` IS `head.weight` (no second |W|)."""
    with torch.device("meta"):
        other = ArcFace(head.num_classes, head.embedding_size, chunk_size=head.chunk_size, buffers="release")
    other.weight = head.weight
    return other


def make_step(
    variant: str, head: ArcFace, x: torch.Tensor, labels: torch.Tensor, sf2_chunk_size: int = SF2_CHUNK_SIZE
) -> Callable[[], None]:
    """A closure running one forward + backward of `variant` (gradients are dropped after each run)."""
    weight = head.weight
    sf2 = sphereface2_sharing(head, sf2_chunk_size) if variant.startswith("sphereface2") else None
    released = release_sharing(head) if variant == "ours_release" else None

    def ours() -> None:
        head(x, labels).backward()
        weight.grad = x.grad = None

    def ours_release() -> None:
        released(x, labels).backward()
        weight.grad = x.grad = None

    def plain() -> None:
        cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()
        logits = head.s * apply_margin(cos, labels, head.m1, head.m2, head.m3)
        F.cross_entropy(logits, labels).backward()
        weight.grad = x.grad = None

    def sphereface2() -> None:
        sf2(x, labels).backward()
        weight.grad = x.grad = sf2.bias.grad = None

    def sphereface2_plain() -> None:
        z = sf2.logits(x, labels)
        target = F.one_hot(labels, z.shape[1]).bool()
        positive = sf2.lamb / sf2.r * F.softplus(-z[target])
        negative = (1 - sf2.lamb) / sf2.r * F.softplus(z).masked_fill(target, 0.0).sum(1)
        (positive + negative).mean().backward()
        weight.grad = x.grad = sf2.bias.grad = None

    w = weight.detach()
    xd = x.detach()
    logits = torch.empty(xd.shape[0], w.shape[0])
    grad_logits = torch.randn_like(logits)
    grad_w = torch.empty_like(w)
    grad_x = torch.empty_like(xd)

    def baseline() -> None:
        torch.mm(xd, w.t(), out=logits)  # x W^T
        torch.mm(grad_logits.t(), xd, out=grad_w)  # g^T x
        torch.mm(grad_logits, w, out=grad_x)  # g W

    steps = {"baseline": baseline, "ours": ours, "ours_release": ours_release, "plain": plain, "sphereface2": sphereface2,
             "sphereface2_plain": sphereface2_plain}
    return steps[variant]


def time_variants(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds per run of each step: one warm-up each, then `repeats` rounds that interleave the variants,
    so that a change in the machine's load hits them all alike."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def measure_memory_here(
    variant: str, classes: int, dim: int, batch: int, threads: int, chunk_size: int, sf2_chunk_size: int
) -> dict[str, float]:
    """In this (fresh) process: peak RSS growth of one forward + backward, in bytes."""
    torch.set_num_threads(threads)
    small_head, small_x, small_labels = make_inputs(1000, dim, batch)
    make_step("ours", small_head, small_x, small_labels)()  # load kernels and thread pools outside the window
    make_step("plain", small_head, small_x, small_labels)()
    make_step("sphereface2", small_head, small_x, small_labels)()
    head, x, labels = make_inputs(classes, dim, batch, chunk_size=chunk_size)
    step = make_step(variant, head, x, labels, sf2_chunk_size)  # baseline preallocates its outputs here (outside)
    before = held_kib()
    extra = peak_growth_bytes(step)
    held = (held_kib() - before) * 1024.0  # what the step left allocated, its gradients dropped
    return {"extra_bytes": extra, "held_bytes": held, "weight_bytes": float(head.weight.numel() * 4)}


def measure_memory(variant: str, args: argparse.Namespace) -> dict[str, float]:
    return child_json([
        __file__, "--memory-child", variant, "--classes", str(args.classes),
        "--dim", str(args.dim), "--batch", str(args.batch), "--threads", str(args.threads),
        "--chunk-size", str(args.chunk_size), "--sf2-chunk-size", str(args.sf2_chunk_size),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median reported)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="classes per block of the head")
    parser.add_argument("--sf2-chunk-size", type=int, default=SF2_CHUNK_SIZE, help="classes per block of SphereFace2")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS)
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child:
        print(json.dumps(measure_memory_here(
            args.memory_child, args.classes, args.dim, args.batch, args.threads, args.chunk_size, args.sf2_chunk_size
        )))
        return

    variants = [v.strip() for v in args.variants.split(",")]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; expected some of {list(VARIANTS)}")
    # memory first, in fresh subprocesses, while this process holds nothing
    memory = {} if args.no_memory else {v: measure_memory(v, args) for v in variants}
    torch.set_num_threads(args.threads)
    print(
        f"classes={args.classes} dim={args.dim} batch={args.batch} threads={args.threads} chunk={args.chunk_size} "
        f"sf2_chunk={args.sf2_chunk_size} "
        f"float32, torch {torch.__version__}"
    )
    head, x, labels = make_inputs(args.classes, args.dim, args.batch, chunk_size=args.chunk_size)
    weight_bytes = head.weight.numel() * 4
    runs = time_variants({v: make_step(v, head, x, labels, args.sf2_chunk_size) for v in variants}, args.repeats)
    times = {v: statistics.median(runs[v]) for v in variants}
    fastest = {v: min(runs[v]) for v in variants}

    base = times.get("baseline")
    print(f"|W| = {weight_bytes / 2**30:.3f} GiB")
    print(f"{'variant':<18}{'median s':>10}{'min s':>8}{'time/baseline':>15}{'peak extra GiB':>16}{'extra/|W|':>11}"
          f"{'held/|W|':>10}")  # fmt: skip
    for variant in variants:
        ratio = f"{times[variant] / base:.2f}" if base else "-"
        mem = memory.get(variant)
        gib = f"{mem['extra_bytes'] / 2**30:.3f}" if mem else "-"
        rel = f"{mem['extra_bytes'] / weight_bytes:.2f}" if mem else "-"
        held = f"{mem['held_bytes'] / weight_bytes:.2f}" if mem else "-"
        print(f"{variant:<18}{times[variant]:>10.3f}{fastest[variant]:>8.3f}{ratio:>15}{gib:>16}{rel:>11}{held:>10}")
    print("time/baseline is the ratio of medians; memory is measured in one fresh subprocess per variant; held is what "
          "a step leaves allocated once its gradients are dropped (weight.grad adds 1.00 until zero_grad)")


if __name__ == "__main__":
    main()
