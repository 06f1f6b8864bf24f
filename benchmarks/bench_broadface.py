"""Extra time and memory of a BroadFace step against plain ArcFace, for several queue sizes.

    python benchmarks/bench_broadface.py --classes 85742 --queues 2048,8192,32768     # the paper's MS1MV2 size
    python benchmarks/bench_broadface.py --classes 10000 --queues 512,2048 --repeats 2  # quick check

One step is a forward + backward of the head on a fixed batch of embeddings (B, D), no backbone, W (C, D)
in float32, ArcFace s = 64, m = 0.5:
  arcface       faceforge.heads.ArcFace
  broadface_Q   faceforge.heads.BroadFace(ArcFace, queue_size=Q), the queue full of Q random past rows (each
                step enqueues the batch, so it stays full), compensation on, row_chunk as given

Times: one warm-up each, then the median of --repeats rounds that interleave the variants, in this process
(the heads reuse their buffers as in a training loop). Memory: each variant in a fresh subprocess, peak RSS
(VmHWM) of one step minus the RSS once W, the batch and the full queue exist, as GiB and as a multiple of
|W| (gradients included). The queue itself is held all the time and is reported apart. Only the ratios
against `arcface` are meant to be compared across machines.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable

import torch
from bench_head import time_variants  # benchmarks/bench_head.py
from rss import child_json, peak_growth_bytes  # benchmarks/rss.py

from faceforge.heads import ArcFace, BroadFace
from faceforge.heads.broadface import DEFAULT_ROW_CHUNK


def make_head(variant: str, classes: int, dim: int, row_chunk: int, seed: int = 0) -> torch.nn.Module:
    """`arcface`, or `broadface_Q` with a full queue of Q random rows (raw embeddings of norm ~1, W- rows near W)."""
    torch.manual_seed(seed)
    arcface = ArcFace(classes, dim)
    if variant == "arcface":
        return arcface
    queue = int(variant.removeprefix("broadface_"))
    head = BroadFace(arcface, queue_size=queue, row_chunk=row_chunk)
    for start in range(0, queue, 8192):  # in slices: no queue-sized temporaries
        n = min(8192, queue - start)
        labels = torch.randint(0, classes, (n,))
        past_weights = arcface.weight.detach()[labels] * (1 + 0.01 * torch.randn(n, 1))
        head.enqueue(torch.randn(n, dim) / dim**0.5, labels, past_weights)
    return head


def make_step(head: torch.nn.Module, batch: int, seed: int = 1) -> Callable[[], None]:
    """One forward + backward on a fixed batch; gradients are dropped after each run (zero_grad(set_to_none))."""
    g = torch.Generator().manual_seed(seed)
    weight = head.weight
    x = torch.randn(batch, weight.shape[1], generator=g).requires_grad_(True)
    labels = torch.randint(0, weight.shape[0], (batch,), generator=g)

    def step() -> None:
        head(x, labels).backward()
        weight.grad = x.grad = None

    return step


def queue_bytes(head: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in head.buffers())


def measure_memory_here(variant: str, args: argparse.Namespace) -> dict[str, float]:
    """In this (fresh) process: the peak RSS growth of one step, in bytes."""
    torch.set_num_threads(args.threads)
    make_step(make_head("broadface_64", 1000, args.dim, args.row_chunk), args.batch)()  # kernels, thread pools
    head = make_head(variant, args.classes, args.dim, args.row_chunk)
    return {"extra_bytes": peak_growth_bytes(make_step(head, args.batch)), "queue_bytes": float(queue_bytes(head))}


def measure_memory(variant: str, args: argparse.Namespace) -> dict[str, float]:
    return child_json([
        __file__, "--memory-child", variant, "--classes", str(args.classes), "--dim", str(args.dim),
        "--batch", str(args.batch), "--threads", str(args.threads), "--row-chunk", str(args.row_chunk),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=85_742)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--queues", default="2048,8192,32768", help="comma-separated queue sizes")
    parser.add_argument("--row-chunk", type=int, default=DEFAULT_ROW_CHUNK, help="queue rows per block")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child:
        print(json.dumps(measure_memory_here(args.memory_child, args)))
        return

    variants = ["arcface"] + [f"broadface_{int(q)}" for q in args.queues.split(",")]
    # memory first, in fresh subprocesses, while this process holds nothing
    memory = {} if args.no_memory else {v: measure_memory(v, args) for v in variants}
    torch.set_num_threads(args.threads)
    print(
        f"classes={args.classes} dim={args.dim} batch={args.batch} row_chunk={args.row_chunk} threads={args.threads} "
        f"float32, torch {torch.__version__}"
    )
    heads = {v: make_head(v, args.classes, args.dim, args.row_chunk) for v in variants}
    runs = time_variants({v: make_step(h, args.batch) for v, h in heads.items()}, args.repeats)
    times = {v: statistics.median(runs[v]) for v in variants}
    weight_bytes = args.classes * args.dim * 4
    base_time, base_mem = times["arcface"], memory.get("arcface", {}).get("extra_bytes")

    print(f"|W| = {weight_bytes / 2**30:.3f} GiB")
    print(
        f"{'variant':<18}{'median s':>10}{'min s':>9}{'time/arcface':>14}{'peak extra GiB':>16}{'extra/|W|':>11}"
        f"{'minus arcface GiB':>19}{'queue GiB':>11}"
    )
    for v in variants:
        mem = memory.get(v)
        cells = ["-"] * 4
        if mem:
            extra = mem["extra_bytes"]
            cells = [
                f"{extra / 2**30:.3f}", f"{extra / weight_bytes:.2f}", f"{(extra - base_mem) / 2**30:.3f}",
                f"{mem['queue_bytes'] / 2**30:.3f}",
            ]
        print(
            f"{v:<18}{times[v]:>10.3f}{min(runs[v]):>9.3f}{times[v] / base_time:>14.1f}{cells[0]:>16}{cells[1]:>11}"
            f"{cells[2]:>19}{cells[3]:>11}"
        )
    print("time/arcface is the ratio of medians; memory is measured in one fresh subprocess per variant")


if __name__ == "__main__":
    main()
