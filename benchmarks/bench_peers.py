"""ArcFace (s = 64, m = 0.5 rad) forward + backward: faceforge against its peers, side by side in one process.

    python benchmarks/bench_peers.py                              # C = 10k and 100k
    python benchmarks/bench_peers.py --classes 10000,100000,1000000 --threads 2 --repeats 3

Variants, all on ONE (C, D) float32 weight tensor (no peer gets a copy) and the same batch:
  gemm3      the three matrix products no implementation can avoid: x W^T, g^T x, g W (outputs preallocated);
             timed first and again last, so that a change in the machine's load shows
  faceforge  faceforge.heads.ArcFace (chunked, hand-written backward)
  textbook   F.normalize(x) @ F.normalize(W)^T, theta = acos, cos(theta_y + m) in the target column, x s,
             F.cross_entropy, autograd: the formulation of the paper, written plainly
  pml        pytorch-metric-learning's ArcFaceLoss(margin = 0.5 rad in degrees, scale = 64), its W a view of ours;
             skipped with a note when the package is not installed (`pip install --no-deps -c constraints.txt
             pytorch-metric-learning==2.8.1`, the `peers` extra: it must not replace torch)
  partialfc  a Partial-FC-style head written here from An et al. (2021)'s description, since insightface's
             PartialFC_V2 needs CUDA and torch.distributed: keep the batch's classes plus uniformly sampled
             others up to rate x C (at rate 1.0 every class, W used as it is), normalise the kept rows, margin
             on the target column as arcface_torch adds it (theta + m under no_grad, straight-through), x s,
             cross-entropy; the gradient reaches W through the gather

Before any time is printed, every variant's loss must equal the textbook's to 1e-6 relative (partialfc at
rate 1.0), in float32 or in float64 (at 1M classes the float32 textbook is itself 3e-6 off the float64
value); each variant's distance from both is printed. Each C runs in a fresh child process, one at a time; memory (peak RSS growth of one step, and
what stays allocated between steps once the step's gradients are dropped) is measured in one more fresh
child per variant. At C >= 1,000,000 the peers need about 10 GB each: they run only when `free` reports at
least --min-free-gib available, otherwise only gemm3 and faceforge run and the table says so.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from bench_head import make_inputs, make_step, time_variants  # benchmarks/bench_head.py
from rss import child_json, held_kib, peak_growth_bytes  # benchmarks/rss.py

from faceforge.heads import ArcFace

S, M = 64.0, 0.5
PEERS = ("textbook", "pml", "partialfc")
VARIANTS = ("gemm3", "faceforge") + PEERS


def textbook_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ArcFace Eq. 3, the plain way: full (B, C) cosines, the margin on the target column, cross-entropy."""
    cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()
    theta_y = torch.acos(cos.gather(1, labels.unsqueeze(1)).clamp(-1 + 1e-7, 1 - 1e-7))
    logits = cos.scatter(1, labels.unsqueeze(1), torch.cos(theta_y + M))
    return F.cross_entropy(S * logits, labels)


def partial_fc_loss(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rate: float, generator: torch.Generator
) -> torch.Tensor:
    """Partial FC (An et al. 2021) on one process: positive class centres + sampled negatives, rate x C in all."""
    num_classes = weight.shape[0]
    if rate < 1.0:
        positive = torch.unique(labels)
        keep = max(int(rate * num_classes), positive.numel())
        score = torch.rand(num_classes, generator=generator)
        score[positive] = 2.0  # the batch's own classes are always kept
        index = torch.topk(score, keep).indices.sort().values
        rows = weight[index]  # the gather: the gradient reaches W through it
        labels = torch.searchsorted(index, labels)
    else:
        rows = weight
    logits = F.normalize(x, dim=1) @ F.normalize(rows, dim=1).t()
    logits = logits.clamp(-1.0, 1.0)
    target = logits.gather(1, labels.unsqueeze(1))
    with torch.no_grad():  # arcface_torch's CombinedMarginLoss: the margin added to the angle as a constant
        shift = torch.cos(torch.acos(target) + M) - target
    logits = logits.scatter(1, labels.unsqueeze(1), target + shift)
    return F.cross_entropy(S * logits, labels)


def pml_loss_fn(weight: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """pytorch-metric-learning's ArcFaceLoss with its W (D, C) a view of `weight` (C, D); None if not installed."""
    try:
        from pytorch_metric_learning.losses import ArcFaceLoss
    except ImportError:
        return None
    num_classes, dim = weight.shape
    with torch.device("meta"):  # no second |W| for its own initial W
        loss = ArcFaceLoss(num_classes, dim, margin=math.degrees(M), scale=S)
    loss.W = torch.nn.Parameter(weight.detach().t())  # shares our memory (a transposed view)
    return loss


def make_steps(
    variants: list[str], head: ArcFace, x: torch.Tensor, labels: torch.Tensor, rate: float
) -> tuple[dict[str, Callable[[], None]], dict[str, Callable[[], torch.Tensor]], list[str]]:
    """(steps, losses, notes): a forward + backward closure and a loss-only closure per available variant."""
    weight = head.weight
    steps: dict[str, Callable[[], None]] = {}
    losses: dict[str, Callable[[], torch.Tensor]] = {}
    notes: list[str] = []
    generator = torch.Generator().manual_seed(0)
    pml = pml_loss_fn(weight) if "pml" in variants else None
    if "pml" in variants and pml is None:
        notes.append("pml skipped: pytorch-metric-learning is not installed (the `peers` extra)")
    if pml is not None:
        pml_weight = pml.W

    def run(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            loss_fn().backward()
            for p in params:
                p.grad = None
        return step

    makers = {
        "faceforge": (lambda: head(x, labels), [weight, x]),
        "textbook": (lambda: textbook_loss(x, weight, labels), [weight, x]),
        "partialfc": (lambda: partial_fc_loss(x, weight, labels, rate, generator), [weight, x]),
    }
    if pml is not None:
        makers["pml"] = (lambda: pml(x, labels), [pml_weight, x])
    for name in variants:
        if name == "gemm3":
            steps[name] = make_step("baseline", head, x, labels)
        elif name in makers:
            loss_fn, params = makers[name]
            steps[name], losses[name] = run(loss_fn, params), loss_fn
    return steps, losses, notes


def check_losses(
    losses: dict[str, Callable[[], torch.Tensor]], reference: float, rtol: float = 1e-6
) -> tuple[dict[str, float], list[str]]:
    """Every loss against the textbook's: equal to 1e-6 relative to the float32 textbook OR to the float64 one
    (`reference`; at C = 1M the float32 textbook itself is 3e-6 off it, its sums over 1M logits rounding).
    Raises SystemExit naming the variant otherwise; returns the values and one note per variant."""
    with torch.no_grad():
        values = {name: float(fn()) for name, fn in losses.items()}
    want = values.get("textbook", reference)
    notes = []
    for name, got in values.items():
        off32, off64 = abs(got - want) / abs(want), abs(got - reference) / abs(reference)
        notes.append(f"{name}: {off64:.1e} relative from the float64 textbook, {off32:.1e} from the float32 one")
        if off32 > rtol and off64 > rtol:
            raise SystemExit(f"bench_peers: {name} loss {got!r} differs from the textbook's {want!r} "
                             f"(float64: {reference!r}) by more than {rtol}")  # fmt: skip
    return values, notes


def float64_reference(head: ArcFace, x: torch.Tensor, labels: torch.Tensor) -> float:
    """The textbook loss in float64 (a transient float64 copy of W: 2 |W|)."""
    with torch.no_grad():
        return float(textbook_loss(x.detach().double(), head.weight.detach().double(), labels))


def free_gib() -> float:
    """MemAvailable from /proc/meminfo, GiB (what `free -g` shows as available)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def timing_child(args: argparse.Namespace, classes: int, variants: list[str]) -> dict:
    torch.set_num_threads(args.threads)
    head, x, labels = make_inputs(classes, args.dim, args.batch)
    steps, losses, notes = make_steps(variants, head, x, labels, args.rate)
    values, loss_notes = check_losses(losses, float64_reference(head, x, labels))
    notes += loss_notes
    names = [v for v in variants if v in steps and v != "gemm3"]
    before = time_variants({"gemm3": steps["gemm3"]}, args.repeats)["gemm3"]
    runs = time_variants({v: steps[v] for v in names}, args.repeats)
    after = time_variants({"gemm3": steps["gemm3"]}, args.repeats)["gemm3"]
    return {
        "classes": classes, "losses": values, "notes": notes,
        "gemm3_before": statistics.median(before), "gemm3_after": statistics.median(after),
        "median": {v: statistics.median(runs[v]) for v in names}, "min": {v: min(runs[v]) for v in names},
        "weight_bytes": head.weight.numel() * 4,
    }  # fmt: skip


def memory_child(args: argparse.Namespace, classes: int, variant: str) -> dict:
    torch.set_num_threads(args.threads)
    small_head, small_x, small_labels = make_inputs(1000, args.dim, args.batch)
    small_steps, _, _ = make_steps(list(VARIANTS), small_head, small_x, small_labels, args.rate)
    for step in small_steps.values():  # load kernels and thread pools outside the window
        step()
    head, x, labels = make_inputs(classes, args.dim, args.batch)
    steps, _, _ = make_steps([variant], head, x, labels, args.rate)
    if variant not in steps:
        return {}
    before = held_kib()
    peak = peak_growth_bytes(steps[variant])
    held = (held_kib() - before) * 1024.0  # after the step, its gradients dropped
    return {"peak": peak, "held": held, "weight_bytes": head.weight.numel() * 4}


def child_args(args: argparse.Namespace) -> list[str]:
    return ["--dim", str(args.dim), "--batch", str(args.batch), "--threads", str(args.threads),
            "--repeats", str(args.repeats), "--rate", str(args.rate)]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", default="10000,100000", help="comma-separated class counts, run in turn")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rate", type=float, default=1.0, help="partialfc's sample rate (1.0: the same loss)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--no-memory", action="store_true", help="skip the memory child processes")
    parser.add_argument("--min-free-gib", type=float, default=14.0, help="available memory the peers need at 1M")
    parser.add_argument("--timing-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; expected some of {list(VARIANTS)}")
    if "gemm3" not in variants:
        variants.insert(0, "gemm3")
    if args.timing_child:
        print(json.dumps(timing_child(args, args.timing_child, variants)))
        return
    if args.memory_child:
        print(json.dumps(memory_child(args, int(args.memory_child[1]), args.memory_child[0])))
        return

    print(f"ArcFace s={S} m={M}, dim={args.dim} batch={args.batch} threads={args.threads} float32, "
          f"torch {torch.__version__}, partialfc rate={args.rate}")  # fmt: skip
    for classes in (int(c) for c in args.classes.split(",")):
        run_variants = list(variants)
        if classes >= 1_000_000 and free_gib() < args.min_free_gib:
            run_variants = [v for v in run_variants if v not in PEERS]
            print(f"C={classes}: {free_gib():.1f} GiB available < {args.min_free_gib}: the peers are skipped")
        result = child_json([__file__, "--timing-child", str(classes), "--variants", ",".join(run_variants),
                             *child_args(args)])  # fmt: skip
        memory = {}
        if not args.no_memory:
            for v in run_variants:
                memory[v] = child_json([__file__, "--memory-child", v, str(classes), "--variants", v, *child_args(args)])
        report(result, memory)


def report(result: dict, memory: dict[str, dict]) -> None:
    base = (result["gemm3_before"] + result["gemm3_after"]) / 2
    weight_bytes = result["weight_bytes"]
    print(f"\nC={result['classes']}  |W| = {weight_bytes / 2**30:.3f} GiB  gemm3 {result['gemm3_before']:.3f} s before, "
          f"{result['gemm3_after']:.3f} s after (their mean is the unit)")  # fmt: skip
    for note in result["notes"]:
        print(f"  {note}")
    print(f"  {'variant':<11}{'loss':>12}{'median s':>10}{'min s':>8}{'x gemm3':>9}{'peak |W|':>10}{'held |W|':>10}")
    for v in ["gemm3", *result["median"]]:
        mem = memory.get(v) or {}
        peak = f"{mem['peak'] / weight_bytes:.2f}" if mem else "-"
        held = f"{mem['held'] / weight_bytes:.2f}" if mem else "-"
        if v == "gemm3":
            print(f"  {v:<11}{'':>12}{base:>10.3f}{'':>8}{1.0:>9.2f}{peak:>10}{held:>10}")
            continue
        loss = f"{result['losses'].get(v, float('nan')):.6f}"
        med = result["median"][v]
        print(f"  {v:<11}{loss:>12}{med:>10.3f}{result['min'][v]:>8.3f}{med / base:>9.2f}{peak:>10}{held:>10}")
    print("  losses equal the textbook's (float32 or float64) to 1e-6 relative, checked before timing; held = RSS left "
          "after a step whose gradients were dropped")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
