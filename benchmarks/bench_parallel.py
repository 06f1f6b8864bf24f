"""Class-sharded heads on 2 gloo CPU ranks: per-rank memory and step time against C, the communication per step
(computed and measured), and Partial FC's sparse optimiser step against a dense one (RESULTS.md section 16).

    OMP_NUM_THREADS=1 python benchmarks/bench_parallel.py --classes 100000 400000 1000000 --dim 128 --batch 64

``--queues``: the sharded BroadFace queue and the sharded AttFC container instead: per-rank megabytes against one
process's, and the bytes each rank sends per step (measured), at one C:

    OMP_NUM_THREADS=1 python benchmarks/bench_parallel.py --queues --classes 20000 --queue 4096 --ratio 0.3

Each size runs in 2 fresh spawned ranks (gloo), one thread each. Per rank and step: the head's forward and
backward on the gathered batch and the optimiser step; the backbone is left out (the embeddings are a leaf),
as in SphereFace2's Fig. 10. Memory: the growth of each rank's peak RSS over one step after a warm-up
(``rss.peak_growth_bytes``) plus the resident W, its gradient and momentum. Ratios are against full FC (r = 1)
measured in the same run, so the machine's load cancels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rss import peak_growth_bytes  # noqa: E402

from faceforge.heads.parallel import ShardedHead  # noqa: E402
from faceforge.train.optim import LazyRowSGD  # noqa: E402

WORLD = 2


class _Counter:
    """Bytes sent through all_gather / all_reduce by this rank (wrapping torch.distributed's functions)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._saved = {}

    def __enter__(self) -> _Counter:
        for name in ("all_gather", "all_reduce"):
            real = getattr(dist, name)
            self._saved[name] = real

            def wrapped(*args, _real=real, _name=name, **kwargs):
                tensor = args[1] if _name == "all_gather" else args[0]
                self.bytes += tensor.numel() * tensor.element_size()
                return _real(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for name, real in self._saved.items():
            setattr(dist, name, real)


def _step(head, optimizer, x, y) -> float:
    start = time.perf_counter()
    loss = head(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    head.after_optimizer_step(1)
    return time.perf_counter() - start


def _measure(head, optimizer, batch: int, dim: int, classes: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(dist.get_rank())
    batches = [(torch.randn(batch, dim, generator=g, requires_grad=True), torch.randint(0, classes, (batch,), generator=g))
               for _ in range(repeats + 1)]
    _step(head, optimizer, *batches[0])  # warm-up: buffers, optimiser state
    grow = peak_growth_bytes(lambda: _step(head, optimizer, *batches[1]))
    times = [_step(head, optimizer, *b) for b in batches[1:]]
    with _Counter() as counter:
        _step(head, optimizer, *batches[0])
    resident = sum(t.numel() * t.element_size() for t in head.parameters())
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return {"step_s": min(times), "peak_growth_mb": grow / 2**20, "resident_mb": (resident + state) / 2**20,
            "comm_bytes": counter.bytes}


def _optimizer_only(rows: int, dim: int, rate: float, repeats: int) -> dict:
    """The optimiser step alone on a (rows, D) shard: LazyRowSGD on a sparse gradient of rate x rows rows against
    torch's SGD on the dense gradient (zeros outside them), as insightface's PartialFC_V2 steps."""
    g = torch.Generator().manual_seed(0)
    w_sparse = torch.nn.Parameter(torch.randn(rows, dim, generator=g) * 0.01)
    w_dense = torch.nn.Parameter(w_sparse.detach().clone())
    lazy = LazyRowSGD([w_sparse], lr=0.1, momentum=0.9, weight_decay=5e-4)
    dense = torch.optim.SGD([w_dense], lr=0.1, momentum=0.9, weight_decay=5e-4)
    k = max(1, int(rate * rows))
    sparse_t, dense_t = [], []
    for step in range(repeats + 1):
        index = torch.randperm(rows, generator=g)[:k].sort().values
        values = torch.randn(k, dim, generator=g)
        w_sparse.grad = torch.sparse_coo_tensor(index[None], values, (rows, dim), is_coalesced=True,
                                               check_invariants=False)
        start = time.perf_counter()
        lazy.step()
        sparse_t.append(time.perf_counter() - start)
        w_dense.grad = torch.zeros(rows, dim).index_copy_(0, index, values)
        start = time.perf_counter()
        dense.step()
        dense_t.append(time.perf_counter() - start)
    return {"sparse_step_s": min(sparse_t[1:]), "dense_step_s": min(dense_t[1:])}


def _rank(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=600))
    try:
        results = {}
        for name, rate in (("full", 1.0), ("pfc", args.rate)):
            head = ShardedHead("arcface", args.classes, args.dim, sample_rate=rate, s=64.0)
            optimizer = LazyRowSGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
            head.use_optimizer(optimizer)
            results[name] = _measure(head, optimizer, args.batch, args.dim, args.classes, args.repeats)
            del head, optimizer
        if rank == 0:
            rows = head_rows = args.classes // WORLD
            results["optimizer"] = _optimizer_only(head_rows, args.dim, args.rate, args.repeats)
            results["rows"] = rows
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()  # no rank destroys the group while another still uses it
    finally:
        dist.destroy_process_group()


def _tensor_mb(*tensors: torch.Tensor) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _rank_queues(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    """Sharded BroadFace and sharded AttFC: per-rank bytes of the queue / container and the bytes sent per step."""
    from faceforge.heads.parallel import build_sharded

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=600))
    try:
        g = torch.Generator().manual_seed(rank)
        b, d, b_g = args.batch, args.dim, WORLD * args.batch
        results = {}
        bf = build_sharded("broadface", args.classes, d, queue_size=args.queue, head="arcface", head_kwargs={"s": 64.0})
        for step in range(args.queue // b_g + 2):  # fill the queue, then one measured step
            x, y = torch.randn(b, d, generator=g, requires_grad=True), torch.randint(0, args.classes, (b,), generator=g)
            with _Counter() as counter:
                bf(x, y).backward()
        results["broadface"] = {
            "replicated_mb": _tensor_mb(bf.queue_embeddings, bf.queue_labels, bf.queue_sample_ids),
            "owned_mb": _tensor_mb(bf.queue_owned_weights, bf.queue_owned_slots),
            "owned_rows": int(bf.queue_owned_slots.numel()), "comm_bytes": counter.bytes,
        }
        del bf
        container = int(args.ratio * args.classes) // b_g * b_g
        att = build_sharded("attfc", args.classes, d, batch_size=b_g, container_size=container, s=64.0)
        for step in range(2):
            x, y = torch.randn(b, d, generator=g, requires_grad=True), torch.randint(0, args.classes, (b,), generator=g)
            K = torch.randn(b, 2, d, generator=g)
            with _Counter() as counter:
                att(x, y, K).backward()
        results["attfc"] = {"container": container, "slots": list(att.slots),
                            "container_mb": _tensor_mb(att.container, att.container_labels), "comm_bytes": counter.bytes}
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()  # no rank destroys the group while another still uses it
    finally:
        dist.destroy_process_group()


def queues(args: argparse.Namespace) -> None:
    """``--queues``: the sharded BroadFace queue and AttFC container per rank, against one process's (computed)."""
    ranks = _spawn(_rank_queues, args)
    q, d, c = args.queue, args.dim, args.classes
    whole_bf = (2 * q * d * 4 + 2 * q * 8) / 2**20  # e- and W-_y float32, labels and ids int64
    print(f"C={c:,} D={d} B={args.batch}/rank x {WORLD} ranks; BroadFace Q={q:,}; AttFC ratio {args.ratio}")
    print("| head | rank | per-rank MB (sharded) | one process MB | rows held | comm bytes / rank / step |")
    print("|---|---|---|---|---|---|")
    for r, res in enumerate(ranks):
        bf = res["broadface"]
        print(f"| BroadFace queue | {r} | {bf['replicated_mb'] + bf['owned_mb']:.1f} (e- {bf['replicated_mb']:.1f} "
              f"+ W-_y {bf['owned_mb']:.1f}) | {whole_bf:.1f} | {bf['owned_rows']:,} of {q:,} W-_y rows | "
              f"{bf['comm_bytes']:,} |")
    for r, res in enumerate(ranks):
        att = res["attfc"]
        whole = att["container"] * (d * 4 + 8) / 2**20
        print(f"| AttFC container | {r} | {att['container_mb']:.1f} | {whole:.1f} | slots {att['slots']} of "
              f"{att['container']:,} | {att['comm_bytes']:,} |")


def _spawn(worker, args: argparse.Namespace) -> list[dict]:
    """Run ``worker(rank, port, args, out)`` on WORLD spawned ranks; each rank's ``rank<r>.json``, in rank order."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.start_processes(worker, args=(port, args, out), nprocs=WORLD, start_method="spawn")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD)]


def run(args: argparse.Namespace) -> list[dict]:
    return _spawn(_rank, args)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 400_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queues", action="store_true", help="sharded BroadFace queue and AttFC container instead")
    parser.add_argument("--queue", type=int, default=4096, help="--queues: BroadFace's queue size Q")
    parser.add_argument("--ratio", type=float, default=0.3, help="--queues: AttFC's S / C")
    args = parser.parse_args()
    if args.queues:
        args.classes = args.classes[0]
        return queues(args)
    b_g = WORLD * args.batch
    # per step and rank: all_gather of the embeddings (B_r x D) and labels, all-reduce of their gradient
    # (B_g x D), all-reduces of (B_g,) vectors (max, sum of exp, target terms) and the two batch-size counts
    computed = 4 * (args.batch * args.dim + b_g * args.dim) + 8 * args.batch + 4 * 3 * b_g + 2 * 8
    print(f"D={args.dim} B={args.batch}/rank x {WORLD} ranks, r={args.rate}; communication per step and rank, "
          f"computed: {computed} bytes (independent of C)")
    print("| C | rows/rank | full FC: step s, resident MB, peak growth MB | PFC r: step s, resident MB, peak growth MB "
          "| comm bytes measured (full / PFC) | optimiser step: sparse s, dense s, ratio |")
    print("|---|---|---|---|---|---|")
    for classes in args.classes:
        args.classes = classes
        ranks = run(argparse.Namespace(**vars(args)))
        full = max(r["full"]["step_s"] for r in ranks), max(r["full"]["resident_mb"] for r in ranks), \
            max(r["full"]["peak_growth_mb"] for r in ranks)
        pfc = max(r["pfc"]["step_s"] for r in ranks), max(r["pfc"]["resident_mb"] for r in ranks), \
            max(r["pfc"]["peak_growth_mb"] for r in ranks)
        opt = ranks[0]["optimizer"]
        print(f"| {classes:,} | {ranks[0]['rows']:,} | {full[0]:.3f}, {full[1]:.0f}, {full[2]:.0f} | "
              f"{pfc[0]:.3f} ({pfc[0] / full[0]:.2f}x), {pfc[1]:.0f}, {pfc[2]:.0f} | "
              f"{ranks[0]['full']['comm_bytes']} / {ranks[0]['pfc']['comm_bytes']} | "
              f"{opt['sparse_step_s']:.4f}, {opt['dense_step_s']:.4f}, {opt['dense_step_s'] / opt['sparse_step_s']:.1f}x |",
              flush=True)


if __name__ == "__main__":
    main()
