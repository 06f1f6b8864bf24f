"""faiss gallery query time: exact (IndexFlatIP) against approximate (IVF, HNSW) at 10k, 100k and 1M
gallery vectors of D = 512 float32 (1M = 2 GB), with recall@1 of the approximate index against exact.

The gallery is random unit vectors; each query is a gallery vector plus noise (cosine about 0.7 to it,
like a same-person pair), so the exact top-1 is almost always its source. Times: ``--queries`` queries
searched as one batch (ms per query) and single-query latency (mean of 20). Vectors are generated in
seeded chunks straight into each index, so at most two 1M indexes (4 GB) are alive at once.

    OMP_NUM_THREADS=1 python benchmarks/bench_search.py --sizes 10000 100000 1000000 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import timed  # noqa: E402

D = 512
CHUNK = 50_000


def chunk(n: int, k: int) -> np.ndarray:
    """Rows ``k*CHUNK .. min((k+1)*CHUNK, n)`` of the gallery: seeded, unit norm, float32."""
    rng = np.random.default_rng(1000 + k)
    x = rng.standard_normal((min(CHUNK, n - k * CHUNK), D), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fill(index, n: int) -> None:
    for k in range((n + CHUNK - 1) // CHUNK):
        index.add(chunk(n, k))


def queries(n: int, q: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    rows = rng.choice(n, size=q, replace=False)
    src = np.concatenate([chunk(n, k)[rows[rows // CHUNK == k] % CHUNK] for k in range((n + CHUNK - 1) // CHUNK)])
    noise = rng.standard_normal(src.shape, dtype=np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    x = 0.7 * src + 0.714 * noise  # cos(x, src) ~ 0.7
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def times(index, x: np.ndarray) -> tuple[float, float]:
    index.search(x[:1], 1)  # warm-up
    batch, _ = timed(lambda: index.search(x, 5))
    single = [timed(lambda i=i: index.search(x[i : i + 1], 5))[0] for i in range(min(20, len(x)))]
    return 1e3 * batch / len(x), 1e3 * float(np.mean(single))


def main() -> None:
    import faiss

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hnsw-max", type=int, default=10_000, help="largest gallery to build HNSW for (default 10000: slow to build)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    p.add_argument("--max-nlist", type=int, default=1024, help="IVF cells at most (default 1024; 4 sqrt(N) below)")
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, {args.threads} threads, D = {D}, {args.queries} queries")
    print("| gallery | index | build s | ms/query (batch) | ms (single query) | recall@1 vs exact |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in args.sizes:
        x = queries(n, args.queries)
        flat = faiss.IndexFlatIP(D)
        build, _ = timed(lambda: fill(flat, n))
        b, s = times(flat, x)
        _, exact = flat.search(x, 1)
        del flat
        print(f"| {n:,} | flat (exact) | {build:.1f} | {b:.3f} | {s:.3f} | 1 |", flush=True)
        nlist = min(int(4 * np.sqrt(n)), args.max_nlist)
        t0 = time.perf_counter()
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, nlist, faiss.METRIC_INNER_PRODUCT)
        train = np.concatenate([chunk(n, k) for k in range(min((n + CHUNK - 1) // CHUNK, (64 * nlist + CHUNK - 1) // CHUNK))])
        ivf.cp.max_points_per_centroid = 64  # train on at most 64 points per cell, 10 k-means rounds: minutes, not
        ivf.cp.niter = 10  # hours, on one shared core
        ivf.train(train[: 64 * nlist])
        del train
        fill(ivf, n)
        build = time.perf_counter() - t0
        for nprobe in args.nprobe:
            ivf.nprobe = nprobe
            b, s = times(ivf, x)
            _, got = ivf.search(x, 1)
            print(f"| {n:,} | IVF{nlist}, nprobe {nprobe} | {build:.1f} | {b:.3f} | {s:.3f} | "
                  f"{float((got[:, 0] == exact[:, 0]).mean()):.3f} |", flush=True)
        del ivf
        if n <= args.hnsw_max:
            hnsw = faiss.IndexHNSWFlat(D, 32, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efSearch = 64
            build, _ = timed(lambda: fill(hnsw, n))
            b, s = times(hnsw, x)
            _, got = hnsw.search(x, 1)
            print(f"| {n:,} | HNSW32, efSearch 64 | {build:.1f} | {b:.3f} | {s:.3f} | "
                  f"{float((got[:, 0] == exact[:, 0]).mean()):.3f} |", flush=True)
            del hnsw


if __name__ == "__main__":
    main()
