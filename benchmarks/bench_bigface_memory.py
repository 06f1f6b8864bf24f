"""BigFace memory: peak training memory against depth with and without activation checkpointing, and the
optimiser state per rank with and without ZeRO.

    python benchmarks/bench_bigface_memory.py                       # depths r50 .. r1200, B = 8, 112 px
    python benchmarks/bench_bigface_memory.py --depths r50,r100 --modes off,block
    python benchmarks/bench_bigface_memory.py --zero-only           # the ZeRO table only (2 gloo ranks)

Depth table: each (backbone, checkpointing) in a fresh process: the backbone (512-D) and a CosFace head
(s = 64, m = 0.4, 1000 classes) are built, then ONE training step runs (forward, backward, a plain SGD
step): the peak RSS growth of that step (activations + gradients + workspace; VmHWM, Linux), the
resident weights, and the step's time. `--max-gib` skips a run whose estimated peak (4 x parameters x 2
+ the activations extrapolated from the measured runs of the same mode) exceeds it, so that this shared
machine is not pushed into swap; the table says which were skipped.

ZeRO table: 2 gloo ranks build r50 with SGD (momentum 0.9) plainly or inside ZeroRedundancyOptimizer,
take one step on zero gradients, and report the bytes of optimiser state each rank holds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from rss import child_json, peak_growth_bytes, status_kib  # benchmarks/rss.py

GIB = 1024.0**3
DEPTHS = ("r50", "r100", "r200", "r240", "r600", "r1200")
MODES = ("off", "block", "stage")


def one_step(name: str, mode: str, batch: int, size: int, threads: int) -> dict:
    from faceforge.backbones import build, count_parameters
    from faceforge.heads import CosFace

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    backbone = build(name, input_size=size)
    if mode != "off":
        backbone.set_grad_checkpointing(True, granularity=mode)
    head = CosFace(1000, 512, s=64.0, m=0.4)
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(params, lr=1e-3)  # no momentum: no state beside the gradients
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 1000, (batch,))
    timing = {}

    def step() -> None:
        start = time.perf_counter()
        loss = head(backbone(images), labels)
        loss.backward()
        optimizer.step()
        timing["seconds"] = time.perf_counter() - start
        timing["loss"] = float(loss)

    growth = peak_growth_bytes(step)
    return {
        "name": name, "mode": mode, "parameters": count_parameters(backbone), "growth": growth,
        "weights": sum(p.numel() * p.element_size() for p in params), "peak": status_kib("VmHWM") * 1024.0,
        **timing,
    }


def depth_table(depths: list[str], modes: list[str], batch: int, size: int, threads: int, max_gib: float) -> list[dict]:
    from faceforge.backbones import build, count_parameters

    rows: list[dict] = []
    for mode in modes:
        per_block: list[float] = []  # activation bytes per IBasicBlock, measured at this mode
        for name in depths:
            with torch.device("meta"):
                net = build(name, input_size=size)
            n_params, blocks = count_parameters(net), sum(net.blocks_per_stage)
            act = max(per_block) * blocks if per_block else 0.0
            estimate = 2 * 4 * n_params + act
            if estimate > max_gib * GIB:
                rows.append({"name": name, "mode": mode, "parameters": n_params, "skipped": estimate})
                print(f"{name} {mode}: skipped, estimated peak {estimate / GIB:.1f} GiB > --max-gib {max_gib}", flush=True)
                continue
            row = child_json([__file__, "--child", name, mode, "--batch", str(batch), "--size", str(size),
                              "--threads", str(threads)])
            per_block.append(max(0.0, row["growth"] - row["weights"]) / blocks)
            rows.append(row)
            print(f"{name} {mode}: growth {row['growth'] / GIB:.2f} GiB, weights {row['weights'] / GIB:.2f} GiB, "
                  f"{row['seconds']:.1f} s", flush=True)
    return rows


def format_depth_table(rows: list[dict], batch: int, size: int) -> str:
    by = {(r["name"], r["mode"]): r for r in rows}
    names = list(dict.fromkeys(r["name"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    head = "| backbone | parameters (M) | weights (GiB) | " + " | ".join(
        f"step peak growth, {m} (GiB)" for m in modes) + " | " + " | ".join(f"step time, {m} (s)" for m in modes) + " |"
    lines = [f"One training step, batch {batch}, {size}x{size}, CosFace head (1000 classes), plain SGD:", "", head,
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in modes * 2) + " |"]
    for name in names:
        first = next(by[(name, m)] for m in modes if (name, m) in by)
        weights = next((by[(name, m)]["weights"] for m in modes if "weights" in by.get((name, m), {})), None)
        cells = [name, f"{first['parameters'] / 1e6:.1f}", f"{weights / GIB:.2f}" if weights else "-"]
        for m in modes:
            r = by.get((name, m), {})
            cells.append(f"{r['growth'] / GIB:.2f}" if "growth" in r else
                         (f"skipped (est. > {r['skipped'] / GIB:.1f})" if "skipped" in r else "-"))
        for m in modes:
            r = by.get((name, m), {})
            cells.append(f"{r['seconds']:.1f}" if "seconds" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    ratios = [f"{n}: {by[(n, 'off')]['growth'] / by[(n, m)]['growth']:.1f}x less with {m}"
              for n in names for m in modes if m != "off" and "growth" in by.get((n, m), {})
              and "growth" in by.get((n, "off"), {})]
    if ratios:
        lines += ["", "Peak growth without / with checkpointing: " + "; ".join(ratios) + "."]
    return "\n".join(lines)


# --- ZeRO ---------------------------------------------------------------------------------------------


def _zero_rank(rank: int, port: int, use_zero: bool, out: str) -> None:
    import torch.distributed as dist

    from faceforge.backbones import build
    from faceforge.train.config import OptimConfig
    from faceforge.train.optim import build_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    backbone, head = build("r50"), torch.nn.Linear(512, 1000, bias=False)
    optimizer = build_optimizer(OptimConfig(name="sgd", lr=0.1, momentum=0.9), backbone, head, zero=use_zero)
    for p in [*backbone.parameters(), *head.parameters()]:
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()
    local = optimizer.optim if use_zero else optimizer
    state = sum(t.numel() * t.element_size() for s in local.state.values() for t in s.values() if torch.is_tensor(t))
    weights = sum(p.numel() * p.element_size() for p in [*backbone.parameters(), *head.parameters()])
    with open(f"{out}.{int(use_zero)}.{rank}", "w") as f:
        json.dump({"rank": rank, "zero": use_zero, "state": state, "weights": weights}, f)
    dist.barrier()  # no rank destroys the group while another still uses it
    dist.destroy_process_group()


def zero_table() -> str:
    import socket
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for use_zero in (False, True):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            torch.multiprocessing.spawn(_zero_rank, args=(port, use_zero, f"{tmp}/r"), nprocs=2)
            for rank in range(2):
                with open(f"{tmp}/r.{int(use_zero)}.{rank}") as f:
                    rows.append(json.load(f))
    lines = ["r50 + a 1000-class FC, SGD momentum 0.9, 2 gloo ranks: optimiser state each rank holds", "",
             "| optimiser | rank | state (MiB) | weights (MiB) |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {'ZeroRedundancyOptimizer(SGD)' if r['zero'] else 'SGD'} | {r['rank']} | "
                     f"{r['state'] / 2**20:.1f} | {r['weights'] / 2**20:.1f} |")
    plain = max(r["state"] for r in rows if not r["zero"])
    zero = max(r["state"] for r in rows if r["zero"])
    lines += ["", f"Largest per-rank state: ZeRO / plain = {zero / plain:.2f}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", default=",".join(DEPTHS))
    parser.add_argument("--modes", default="off,block")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-gib", type=float, default=6.5)
    parser.add_argument("--zero-only", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("NAME", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_step(*args.child, args.batch, args.size, args.threads)))
        return
    if not args.zero_only:
        rows = depth_table(args.depths.split(","), args.modes.split(","), args.batch, args.size, args.threads, args.max_gib)
        print(format_depth_table(rows, args.batch, args.size))
    print()
    print(zero_table())


if __name__ == "__main__":
    sys.exit(main())
