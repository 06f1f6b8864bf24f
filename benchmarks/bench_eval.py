"""Time (and memory) of the evaluation metrics at benchmark scale, against baselines in the same run.

    python benchmarks/bench_eval.py                                   # full sizes (a few minutes)
    python benchmarks/bench_eval.py --pairs 1000000 --distractors 100000 --repeats 1   # quick check

(a) scoring: ``verify.evaluate_scores`` (every verification number: the exact ROC, TAR@FAR at 6 FARs,
    insightface's 10-fold accuracy, the best-threshold accuracy, EER, AUC, from one
    ``metrics.PairCounts``) of ``--pairs`` random scores / labels: 1% positives in float64 (15.6M = the
    IJB-C 1:1 template-pair count; target <= 5 s), the same scores as float32, and 50% positives with
    heavily overlapping scores (LFW-like; the 10-fold search prunes least there). Baseline: one
    ``np.sort`` of the same scores, and one ``np.argsort`` (what a sort that keeps the labels costs).
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
import sys
import time

import numpy as np
from rss import child_json, reset_peak_rss, status_kib  # benchmarks/rss.py
from timing import timed  # benchmarks/timing.py

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def part_scoring(n: int, repeats: int) -> dict:
    from faceforge.eval.verify import evaluate_scores

    rng = np.random.default_rng(0)
    ijb_labels = rng.random(n) < 0.01  # ~1% mated pairs, as in IJB-C 1:1
    ijb_scores = rng.normal(0.0, 0.1, n) + 0.5 * ijb_labels
    lfw_labels = rng.random(n) < 0.5
    lfw_scores = rng.normal(0.0, 0.1, n) + 0.1 * lfw_labels
    cases = {
        "1% positives, float64": (ijb_scores, ijb_labels),
        "1% positives, float32": (ijb_scores.astype(np.float32), ijb_labels),
        "50% positives, float64": (lfw_scores, lfw_labels),
    }
    out = {"pairs": n, "cases": {}}
    for name, (scores, labels) in cases.items():
        t_sort = t_argsort = t_eval = float("inf")
        for _ in range(repeats):  # the best of `repeats`: the machine is shared
            t_sort = min(t_sort, timed(lambda: np.sort(scores))[0])
            t_argsort = min(t_argsort, timed(lambda: np.argsort(scores))[0])
            t, r = timed(lambda: evaluate_scores(scores, labels, fars=FARS))
            t_eval = min(t_eval, t)
        out["cases"][name] = {"evaluate_scores_s": t_eval, "sort_s": t_sort, "argsort_s": t_argsort,
                              "tar@1e-6": r.tar_at_far[1e-6], "acc": r.accuracy}
    return out


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=15_600_000)
    ap.add_argument("--repeats", type=int, default=3, help="(a): the best of this many runs per case")
    ap.add_argument("--probes", type=int, default=1000)
    ap.add_argument("--distractors", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--block", type=int, default=8192, help="rows per generated distractor block")
    ap.add_argument("--chunk", type=int, default=8192, help="identify chunk_size")
    ap.add_argument("--part", choices=("a", "b", "base"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    flops = 2.0 * a.probes * a.distractors * a.dim
    if a.part == "a":
        print(json.dumps(part_scoring(a.pairs, a.repeats)))
        return 0
    if a.part == "b":
        print(json.dumps(part_identify(a.probes, a.distractors, a.dim, a.block, a.chunk)))
        return 0
    if a.part == "base":
        print(json.dumps(part_matmul(flops)))
        return 0
    common = ["--pairs", str(a.pairs), "--repeats", str(a.repeats), "--probes", str(a.probes),
              "--distractors", str(a.distractors),
              "--dim", str(a.dim), "--block", str(a.block), "--chunk", str(a.chunk)]
    ra = child_json([__file__, *common, "--part", "a"])
    print(f"(a) scoring {ra['pairs']:,} pairs with evaluate_scores (ROC, TAR@FAR x{len(FARS)}, 10-fold accuracy, "
          f"best-threshold accuracy, EER, AUC), best of {a.repeats}:")
    for name, c in ra["cases"].items():
        target = f" (target <= 5 s: {'OK' if c['evaluate_scores_s'] <= 5 else 'OVER'})" if name.startswith("1%") else ""
        print(f"    {name}: {c['evaluate_scores_s']:.2f} s{target}; baseline np.sort {c['sort_s']:.2f} s -> ratio "
              f"{c['evaluate_scores_s'] / c['sort_s']:.1f}x, np.argsort {c['argsort_s']:.2f} s   "
              f"[TAR@1e-6 {c['tar@1e-6']:.4f}, acc {c['acc']:.4f}]")
    rb = child_json([__file__, *common, "--part", "b"])
    rc = child_json([__file__, *common, "--part", "base"])
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
