"""Time (and memory) of the evaluation metrics at benchmark scale, against baselines in the same run.

    python benchmarks/bench_eval.py                                   # full sizes (a few minutes)
    python benchmarks/bench_eval.py --pairs 1000000 --distractors 100000   # quick check

(a) scoring: ``metrics.roc`` + ``metrics.tar_at_far`` at 6 FARs + ``metrics.verification_accuracy``
    (10 folds) on ``--pairs`` random scores / labels (15.6M = the IJB-C 1:1 template-pair count order);
    baseline: one ``np.sort`` of the same float64 scores. Target: <= 5 s.
(b) identification: ``identify.identify_with_distractors`` of ``--probes`` probes against
    ``--distractors`` random normalised float32 distractors of dimension ``--dim``, generated block by
    block (never all in memory), rank-1 and TAR@FAR=1e-6; the time to generate the same blocks alone
    is measured too and subtracted. Baseline: one plain float32 matmul of the same FLOPs
    ``(4096, 4096) @ (4096, n)``. Peak RSS growth (VmHWM) is measured in the process running (b).

Each part runs in its own subprocess so that peak RSS is not inherited. Absolute times depend on the
machine and its load; compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
from rss import reset_peak_rss, status_kib  # benchmarks/rss.py

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def part_scoring(n: int) -> dict:
    from faceforge.eval import metrics as M

    rng = np.random.default_rng(0)
    labels = rng.random(n) < 0.01  # ~1% mated pairs, as in IJB-C 1:1
    scores = rng.normal(0.0, 0.1, n) + 0.5 * labels
    t0 = time.perf_counter()
    np.sort(scores)
    t_sort = time.perf_counter() - t0
    t0 = time.perf_counter()
    M.roc(scores, labels)
    t_roc = time.perf_counter() - t0
    t0 = time.perf_counter()
    tars = M.tar_at_far(scores, labels, FARS)
    t_tar = time.perf_counter() - t0
    t0 = time.perf_counter()
    acc, _ = M.verification_accuracy(scores, labels)
    t_acc = time.perf_counter() - t0
    total = t_roc + t_tar + t_acc
    return {
        "pairs": n, "sort_s": t_sort, "roc_s": t_roc, "tar_at_far_s": t_tar, "verification_accuracy_s": t_acc,
        "total_s": total, "ratio_vs_sort": total / t_sort, "tar@1e-6": float(tars[0]), "acc": acc,
    }


def _blocks(n: int, dim: int, block: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    for start in range(0, n, block):
        d = rng.standard_normal((min(block, n - start), dim), dtype=np.float32)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        yield d


def part_identify(probes: int, distractors: int, dim: int, block: int, chunk: int) -> dict:
    from faceforge.eval.identify import identify_with_distractors

    rng = np.random.default_rng(0)
    ids = probes // 2
    centres = rng.standard_normal((ids, dim), dtype=np.float32)
    p_lab = np.arange(probes) % ids
    probe = centres[p_lab] + 2.0 * rng.standard_normal((probes, dim), dtype=np.float32)
    g_lab = np.arange(ids)
    gallery = centres + 2.0 * rng.standard_normal((ids, dim), dtype=np.float32)
    t0 = time.perf_counter()
    for _ in _blocks(distractors, dim, block):
        pass
    t_gen = time.perf_counter() - t0
    reset_peak_rss()  # so the generation pass above does not count
    rss0 = status_kib("VmRSS")
    t0 = time.perf_counter()
    res = identify_with_distractors(
        probe, p_lab, gallery, g_lab, _blocks(distractors, dim, block), ks=(1, 10), fars=(1e-6,),
        num_distractors=distractors, chunk_size=chunk,
    )
    t_total = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    return {
        "probes": probes, "distractors": distractors, "dim": dim, "chunk": chunk,
        "generate_s": t_gen, "identify_incl_generate_s": t_total, "identify_s": t_total - t_gen,
        "peak_rss_growth_mib": (peak - rss0) / 1024,
        "distractor_bytes_mib": distractors * dim * 4 / 2**20,
        "rank1": res.rank_k[1], "tar@1e-6": res.tar_at_far[1e-6], "neg_pairs": res.num_negative_pairs,
    }


def part_matmul(flops: float) -> dict:
    k = 4096
    n = int(round(flops / (2 * k * k)))
    rng = np.random.default_rng(0)
    a = rng.standard_normal((k, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    out = np.empty((k, n), dtype=np.float32)
    np.matmul(a, b[:, :256], out=out[:, :256])  # warm-up
    t0 = time.perf_counter()
    np.matmul(a, b, out=out)
    t = time.perf_counter() - t0
    return {"shape": f"({k},{k})@({k},{n})", "matmul_s": t, "gflops": 2 * k * k * n / t / 1e9}


def _sub(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=15_600_000)
    ap.add_argument("--probes", type=int, default=1000)
    ap.add_argument("--distractors", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--block", type=int, default=8192, help="rows per generated distractor block")
    ap.add_argument("--chunk", type=int, default=8192, help="identify chunk_size")
    ap.add_argument("--part", choices=("a", "b", "base"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    flops = 2.0 * a.probes * a.distractors * a.dim
    if a.part == "a":
        print(json.dumps(part_scoring(a.pairs)))
        return 0
    if a.part == "b":
        print(json.dumps(part_identify(a.probes, a.distractors, a.dim, a.block, a.chunk)))
        return 0
    if a.part == "base":
        print(json.dumps(part_matmul(flops)))
        return 0
    common = ["--pairs", str(a.pairs), "--probes", str(a.probes), "--distractors", str(a.distractors),
              "--dim", str(a.dim), "--block", str(a.block), "--chunk", str(a.chunk)]
    ra = _sub([*common, "--part", "a"])
    print(f"(a) scoring {ra['pairs']:,} pairs: roc {ra['roc_s']:.2f} s + tar_at_far x{len(FARS)} "
          f"{ra['tar_at_far_s']:.2f} s + verification_accuracy {ra['verification_accuracy_s']:.2f} s "
          f"= {ra['total_s']:.2f} s (target <= 5 s: {'OK' if ra['total_s'] <= 5 else 'OVER'})")
    print(f"    baseline np.sort {ra['sort_s']:.2f} s -> ratio {ra['ratio_vs_sort']:.1f}x   "
          f"[TAR@1e-6 {ra['tar@1e-6']:.4f}, acc {ra['acc']:.4f}]")
    rb = _sub([*common, "--part", "b"])
    rc = _sub([*common, "--part", "base"])
    print(f"(b) identify {rb['probes']} probes vs {rb['distractors']:,} distractors, D={rb['dim']} float32, "
          f"chunk {rb['chunk']}: {rb['identify_s']:.2f} s (+ {rb['generate_s']:.2f} s generating the distractors)")
    print(f"    peak RSS growth {rb['peak_rss_growth_mib']:.0f} MiB (all distractors would be "
          f"{rb['distractor_bytes_mib']:.0f} MiB; P x M scores {rb['probes'] * rb['distractors'] * 4 / 2**20:.0f} MiB)")
    print(f"    baseline one matmul {rc['shape']} same FLOPs: {rc['matmul_s']:.2f} s ({rc['gflops']:.0f} GFLOP/s) "
          f"-> ratio {rb['identify_s'] / rc['matmul_s']:.2f}x   "
          f"[rank-1 {rb['rank1']:.4f}, TAR@1e-6 {rb['tar@1e-6']:.4f}, {rb['neg_pairs']:,} negative pairs]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
