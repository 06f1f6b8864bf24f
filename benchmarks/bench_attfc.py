"""AttFC against the chunked full FC: head memory and time per training step, the class encoder's bytes,
and the per-step cost of k class images.

    python benchmarks/bench_attfc.py head --classes 100000 1000000 --ratios 0.3 0.1     # section 13.1
    python benchmarks/bench_attfc.py limit --budget-gib 24 --fit 20000 50000 --check 100000 1000000
    python benchmarks/bench_attfc.py encoder --backbone r50 --batch 16 32                # 13.3
    python benchmarks/bench_attfc.py k --ks 2 3 4 5                                      # 13.4

Every memory number is the peak RSS growth of one step in a fresh subprocess (benchmarks/rss.py), after a
warm-up at a small size, with the head's state (W, its optimiser state; the container) created inside the
window: "what a training step of this head needs". A step of the full FC is forward + backward of
``heads.ArcFace`` (chunked) + one SGD step (momentum 0.9, so W, grad W and the momentum buffer); a step of
AttFC is forward + backward of ``heads.AttFC`` and its enqueue (no parameters, no optimiser state). Times
are medians of interleaved runs in one process; only ratios are meant to be compared on this shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
from rss import child_json, peak_growth_bytes  # benchmarks/rss.py

from faceforge.heads import ArcFace, AttFC

GIB = 2.0**30


# ---------------------------------------------------------------------------------------------- head steps


def full_fc_step(classes: int, dim: int, batch: int) -> Callable[[], None]:
    """One training step of the chunked full FC (ArcFace s 64 m 0.5) with SGD momentum: builds W lazily."""
    state: dict = {}

    def step() -> None:
        if not state:
            torch.manual_seed(0)
            state["head"] = ArcFace(classes, dim)
            state["opt"] = torch.optim.SGD(state["head"].parameters(), lr=0.1, momentum=0.9)
            state["x"] = torch.randn(batch, dim, requires_grad=True)
            state["y"] = torch.randint(0, classes, (batch,))
        state["head"](state["x"], state["y"]).backward()
        state["opt"].step()
        state["opt"].zero_grad(set_to_none=True)
        state["x"].grad = None

    return step


def attfc_step(classes: int, dim: int, batch: int, ratio: float, k: int = 2) -> Callable[[], None]:
    """One training step of the AttFC head (container of ratio x classes), class features given."""
    state: dict = {}

    def step() -> None:
        if not state:
            torch.manual_seed(0)
            state["head"] = AttFC(classes, dim, ratio=ratio, batch_size=batch)
            state["x"] = torch.randn(batch, dim, requires_grad=True)
            state["K"] = torch.randn(batch, k, dim)
            state["y"] = torch.randint(0, classes, (batch,))
        state["head"](state["x"], state["y"], state["K"]).backward()
        state["x"].grad = None

    return step


def make_step(variant: str, classes: int, dim: int, batch: int, ratio: float) -> Callable[[], None]:
    return full_fc_step(classes, dim, batch) if variant == "fc" else attfc_step(classes, dim, batch, ratio)


def memory_child(variant: str, classes: int, dim: int, batch: int, ratio: float, threads: int) -> dict:
    """In a fresh process: warm up at 20,000 classes, then the peak RSS growth of building + one step."""
    torch.set_num_threads(threads)
    warm = make_step(variant, 20_000, dim, batch, 0.3)
    warm()
    warm()
    return {"bytes": peak_growth_bytes(make_step(variant, classes, dim, batch, ratio))}


def measure_memory(variant: str, classes: int, args: argparse.Namespace, ratio: float = 0.3) -> float:
    return child_json([__file__, "memory-child", "--variant", variant, "--classes", str(classes), "--dim",
                       str(args.dim), "--batch", str(args.batch), "--ratio", str(ratio), "--threads",
                       str(args.threads)])["bytes"]


def median_times(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per step of each, after one warm-up (which builds the state), interleaved."""
    for step in steps.values():
        step()
    runs: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            runs[name].append(time.perf_counter() - t0)
    return {name: statistics.median(r) for name, r in runs.items()}


def predicted_fc_bytes(classes: int, dim: int, batch: int) -> float:
    """The full FC's step, counted: W, grad W, SGD momentum (3 x C D x 4 bytes) + the (B, C) logit buffer."""
    return classes * (3 * dim + batch) * 4.0


def predicted_attfc_bytes(classes: int, dim: int, batch: int, ratio: float) -> float:
    """AttFC's head, counted: the container S x D x 4 + its labels S x 8 (the (B, chunk) block is O(1) in C)."""
    size = int(ratio * classes / batch) * batch
    return size * (dim * 4.0 + 8.0)


def cmd_head(args: argparse.Namespace) -> None:
    print(f"dim={args.dim} batch={args.batch} threads={args.threads} torch {torch.__version__}")
    print("| C | head | S | predicted GiB | measured GiB | s / step | time / full FC |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for classes in args.classes:
        run_fc = predicted_fc_bytes(classes, args.dim, args.batch) < args.max_gib * GIB
        variants = ([("fc", None)] if run_fc else []) + [("attfc", r) for r in args.ratios]
        memory = {}
        for variant, ratio in variants:
            predicted = (predicted_fc_bytes(classes, args.dim, args.batch) if variant == "fc"
                         else predicted_attfc_bytes(classes, args.dim, args.batch, ratio))
            memory[(variant, ratio)] = (predicted, measure_memory(variant, classes, args, ratio or 0.3))
        torch.set_num_threads(args.threads)
        steps = {f"{v}:{r}": make_step(v, classes, args.dim, args.batch, r or 0.3) for v, r in variants}
        times = median_times(steps, args.repeats)
        base = times.get("fc:None")
        if not run_fc:
            p = predicted_fc_bytes(classes, args.dim, args.batch)
            print(f"| {classes:,} | full FC | - | {p / GIB:.2f} | not run (> {args.max_gib} GiB) | - | - |")
        for (variant, ratio), (predicted, measured) in memory.items():
            name = "full FC" if variant == "fc" else f"AttFC {ratio}"
            size = "-" if variant == "fc" else f"{int(ratio * classes / args.batch) * args.batch:,}"
            t = times[f"{variant}:{ratio}"]
            rel = f"{t / base:.3f}" if base else "-"
            print(f"| {classes:,} | {name} | {size} | {predicted / GIB:.3f} | {measured / GIB:.3f} | {t:.3f} | {rel} |")
        del steps


def cmd_limit(args: argparse.Namespace) -> None:
    """Bytes per class of the full FC step from two measured sizes, checked at larger ones; the largest C that
    fits the budget; AttFC at twice that C (measured only when its prediction is under --attfc-max-gib)."""
    fit = [(c, measure_memory("fc", c, args)) for c in args.fit]
    (c0, b0), (c1, b1) = fit[0], fit[-1]
    per_class = (b1 - b0) / (c1 - c0)
    offset = b0 - per_class * c0
    print(f"full FC step, measured at C = {c0:,}, {c1:,}: {b0 / GIB:.3f}, {b1 / GIB:.3f} GiB -> "
          f"{per_class:.1f} bytes per class + {offset / 2**20:.1f} MiB "
          f"(counted: (3 D + B) x 4 = {(3 * args.dim + args.batch) * 4} bytes per class)")
    for c in args.check:
        measured = measure_memory("fc", c, args)
        predicted = offset + per_class * c
        print(f"check C = {c:,}: predicted {predicted / GIB:.3f} GiB, measured {measured / GIB:.3f} GiB "
              f"({measured / predicted:.3f} x)")
    budget = args.budget_gib * GIB - args.reserve_gib * GIB
    limit = int((budget - offset) / per_class)
    print(f"budget {args.budget_gib} GiB - {args.reserve_gib} GiB reserved (backbone, data, OS) -> full FC fits up to "
          f"C = {limit:,}")
    twice = 2 * limit
    for ratio in args.ratios:
        predicted = predicted_attfc_bytes(twice, args.dim, args.batch, ratio)
        if predicted < args.attfc_max_gib * GIB:
            measured = measure_memory("attfc", twice, args, ratio)
            print(f"AttFC {ratio} at C = {twice:,} (2 x the limit): predicted {predicted / GIB:.3f} GiB, one step "
                  f"measured {measured / GIB:.3f} GiB (full FC would need {predicted_fc_bytes(twice, args.dim, args.batch) / GIB:.1f} GiB)")
        else:
            print(f"AttFC {ratio} at C = {twice:,}: predicted {predicted / GIB:.2f} GiB >= {args.attfc_max_gib}: not run")


# ---------------------------------------------------------------------------------------------- the class encoder


def encoder_child(backbone: str, images: int, size: int, threads: int) -> dict:
    """In a fresh process: the class encoder's parameter + buffer bytes, and the peak RSS growth of one no-grad,
    train-mode forward of ``images`` images (the k B extra forwards of a step)."""
    from faceforge.backbones import BACKBONES
    from faceforge.train.momentum import MomentumEncoder

    torch.set_num_threads(threads)
    net = BACKBONES.build(backbone, embedding_size=512, input_size=size)
    encoder = MomentumEncoder(net, 0.999)
    encoder.update(net)
    state_bytes = sum(t.numel() * t.element_size() for t in encoder.encoder.state_dict().values())
    encoder.encode(torch.randn(2, 3, size, size))  # warm-up
    x = torch.randn(images, 3, size, size)
    t0 = time.perf_counter()
    grown = peak_growth_bytes(lambda: encoder.encode(x))
    return {"state_bytes": state_bytes, "forward_bytes": grown, "seconds": time.perf_counter() - t0}


def cmd_encoder(args: argparse.Namespace) -> None:
    print(f"class encoder = momentum copy of {args.backbone}, {args.size}x{args.size} images, {args.threads} threads")
    rows = []
    for n in args.batch:
        r = child_json([__file__, "encoder-child", "--backbone", args.backbone, "--images", str(n), "--size",
                        str(args.size), "--threads", str(args.threads)])
        rows.append((n, r))
        print(f"  {n} class images: encoder state {r['state_bytes'] / 2**20:.1f} MiB, no-grad forward peak "
              f"+{r['forward_bytes'] / 2**20:.1f} MiB ({r['forward_bytes'] / n / 2**20:.2f} MiB per image), {r['seconds']:.2f} s")
    (n0, r0), (n1, r1) = rows[0], rows[-1]
    per_image = (r1["forward_bytes"] - r0["forward_bytes"]) / (n1 - n0)
    for k in (2, 3, 4, 5):
        print(f"  k = {k}, B = 128: k B = {k * 128} class images -> about {(r0['forward_bytes'] + per_image * (k * 128 - n0)) / GIB:.2f} GiB "
              f"peak for their forward (linear fit), + {r0['state_bytes'] / 2**20:.0f} MiB encoder")


# ---------------------------------------------------------------------------------------------- k


def cmd_k(args: argparse.Namespace) -> None:
    """Training-step time of plain classification (ArcFace, full FC) against AttFC with k = 2..5, the same
    backbone and batch; images/s counts the query images and the extra class images separately."""
    from faceforge.backbones import BACKBONES
    from faceforge.data.samplers import CLASS_IMAGES, Batch
    from faceforge.train.objectives import AttFCObjective, Classification

    torch.set_num_threads(args.threads)
    size, batch, classes = args.size, args.batch_size, args.classes

    def objective(kind: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        net = BACKBONES.build(args.backbone, embedding_size=128, input_size=size, width=args.width)
        if kind == "plain":
            obj = Classification(net, ArcFace(classes, 128, s=32.0))
        else:
            obj = AttFCObjective(net, AttFC(classes, 128, ratio=0.3, batch_size=batch, s=32.0), momentum=0.999)
        return obj, torch.optim.SGD(obj.parameters(), lr=0.01, momentum=0.9)

    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, classes, (batch,))
    steps = {}
    for kind in ["plain"] + [f"k={k}" for k in args.ks]:
        obj, opt = objective(kind)
        extras = {} if kind == "plain" else {CLASS_IMAGES: torch.randn(batch, int(kind[2:]), 3, size, size)}
        b = Batch(images=images, labels=labels, sample_ids=torch.arange(batch), flipped=torch.zeros(batch, dtype=torch.bool),
                  extras=extras)

        def step(obj=obj, opt=opt, b=b) -> None:
            sum(obj(b).values()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[kind] = step
    times = median_times(steps, args.repeats)
    base = times["plain"]
    print(f"{args.backbone} width {args.width}, {size}x{size}, batch {batch}, {classes} classes, {args.threads} threads, "
          f"median of {args.repeats}")
    print("| objective | s / step | time / plain | query images/s | + class images/s | predicted (1 + k/3) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, t in times.items():
        k = 0 if kind == "plain" else int(kind[2:])
        print(f"| {kind} | {t:.3f} | {t / base:.2f} | {batch / t:.1f} | {k * batch / t:.1f} | {1 + k / 3:.2f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dim", type=int, default=512)
    common.add_argument("--batch", type=int, nargs="+", default=[128])
    common.add_argument("--threads", type=int, default=2)
    common.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("head", parents=[common])
    p.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.1])
    p.add_argument("--max-gib", type=float, default=5.5, help="run the full FC only below this predicted peak")
    p = sub.add_parser("limit", parents=[common])
    p.add_argument("--fit", type=int, nargs=2, default=[20_000, 50_000])
    p.add_argument("--check", type=int, nargs="+", default=[100_000])
    p.add_argument("--budget-gib", type=float, default=24.0)
    p.add_argument("--reserve-gib", type=float, default=2.0)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.1])
    p.add_argument("--attfc-max-gib", type=float, default=8.0)
    p = sub.add_parser("memory-child")
    p.add_argument("--variant", choices=("fc", "attfc"))
    for name, kind in (("--classes", int), ("--dim", int), ("--batch", int), ("--ratio", float), ("--threads", int)):
        p.add_argument(name, type=kind)
    p = sub.add_parser("encoder", parents=[common])
    p.add_argument("--backbone", default="r50")
    p.add_argument("--size", type=int, default=112)
    p = sub.add_parser("encoder-child")
    p.add_argument("--backbone")
    p.add_argument("--images", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--threads", type=int)
    p = sub.add_parser("k", parents=[common])
    p.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4, 5])
    p.add_argument("--backbone", default="r18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.command == "memory-child":
        print(json.dumps(memory_child(args.variant, args.classes, args.dim, args.batch, args.ratio, args.threads)))
    elif args.command == "encoder-child":
        print(json.dumps(encoder_child(args.backbone, args.images, args.size, args.threads)))
    else:
        if args.command in ("head", "limit"):
            args.batch = args.batch[0]
        {"head": cmd_head, "limit": cmd_limit, "encoder": cmd_encoder, "k": cmd_k}[args.command](args)


if __name__ == "__main__":
    main()
