"""`make bench`: run every benchmark in turn, each in its own process, and print what it prints.

    python benchmarks/run_all.py            # the sizes recorded in benchmarks/RESULTS.md (up to an hour on 2 cores)
    python benchmarks/run_all.py --quick    # small sizes, a minute or two

Each benchmark prints ratios against a baseline it measures in the same run; copy a run's output into
RESULTS.md together with the command and the date when you record it. The load average is printed before and
after each benchmark (timing.LoadWatch); one run at a load above the core count is marked TAKEN UNDER LOAD,
and with --refuse-under-load the command then fails (exit 3), so that its figures are not recorded.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from timing import LoadWatch  # noqa: E402

# (script, full-size arguments, quick arguments)
BENCHMARKS: list[tuple[str, list[str], list[str]]] = [
    ("bench_head.py", ["--classes", "1000000", "--repeats", "3"], ["--classes", "100000", "--repeats", "2"]),
    ("bench_broadface.py", ["--classes", "85742", "--threads", "1"], ["--classes", "10000", "--queues", "512,2048"]),
    ("bench_synthetic.py", [], ["--n", "256"]),
    ("bench_train.py", ["--steps", "30"], ["--steps", "5"]),
    ("bench_recordio.py", ["--images", "2000"], ["--images", "300"]),
    ("bench_eval.py", ["--distractors", "100000"], ["--pairs", "1000000", "--distractors", "20000", "--probes", "200"]),
    ("bench_embed.py", [], ["--images", "64", "--repeats", "1"]),
    ("bench_attfc.py", ["head", "--threads", "1", "--classes", "100000", "1000000", "--max-gib", "6.5"],
     ["head", "--threads", "1", "--classes", "30000", "--repeats", "1"]),
    ("bench_attfc.py", ["limit", "--threads", "1", "--check", "100000", "1000000"],
     ["limit", "--threads", "1", "--check", "60000", "--ratios", "0.1", "--budget-gib", "0.5", "--reserve-gib", "0.1"]),
    ("bench_attfc.py", ["k", "--threads", "1", "--repeats", "5"], ["k", "--threads", "1", "--ks", "2", "--repeats", "1",
                                                                    "--batch-size", "8"]),
    ("bench_peers.py", ["--classes", "10000,100000", "--repeats", "3", "--threads", "1"],
     ["--classes", "10000", "--repeats", "1", "--threads", "1", "--no-memory"]),
    ("bench_parallel.py", ["--classes", "100000", "400000", "1000000", "--repeats", "2"],
     ["--classes", "50000", "--repeats", "1"]),
    ("bench_export.py", ["--models", "r18", "r50", "r100", "--batches", "1", "--iters", "3"],
     ["--models", "r18", "--batches", "1", "--iters", "1"]),
    ("bench_search.py", ["--sizes", "10000", "100000", "1000000", "--queries", "200"],
     ["--sizes", "10000", "--queries", "50"]),
    ("bench_bigface_memory.py", ["--modes", "off,block"], ["--depths", "r50", "--modes", "off,block"]),
    ("bench_distill.py", [], ["--images", "64", "--repeats", "1"]),
    ("bench_elastic.py", ["--runs", "6", "--loops", "2"], ["--runs", "1", "--loops", "1"]),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not for RESULTS.md)")
    parser.add_argument("--refuse-under-load", action="store_true",
                        help="exit 3 if any benchmark ran at a load above the core count")
    args = parser.parse_args(argv)
    failed, loaded = [], []
    for script, full, quick in BENCHMARKS:
        command = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        print(f"\n$ python benchmarks/{script} {' '.join(command[2:])}", flush=True)
        start = time.perf_counter()
        with LoadWatch() as load:
            code = subprocess.run(command).returncode
        if code != 0:
            failed.append(script)
        print(f"({time.perf_counter() - start:.0f} s; load average {load.before:.2f} before, {load.after:.2f} after, "
              f"{load.cores} cores)", flush=True)
        if load.under_load:
            loaded.append(script)
            print(load.note(), flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    if loaded:
        print(f"\ntaken under load (not for RESULTS.md): {', '.join(loaded)}", file=sys.stderr)
        return 3 if args.refuse_under_load else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
