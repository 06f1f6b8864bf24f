"""Elastic restarts under torchrun, counted: how many runs whose rank 1 is SIGKILLed finish, hang or fail.

    python benchmarks/bench_elastic.py --runs 8 --loops 2      # 2 loops side by side (their own load), 16 runs

Each run is ``torchrun --standalone --nproc-per-node 2 --max-restarts R`` of ``tests/_train_worker.py`` on a
sharded ArcFace (TinyNet, 8 classes, 4 steps, a checkpoint every 2, ``--resume``); rank 1 kills itself (SIGKILL)
after step 3 in the first attempt, and the agent restarts both ranks, which resume from step 2. A run is

- ``ok``: exit 0 and step 4 logged; ``attempts`` counts the agent's failed attempts (1 = the kill only; more =
  a restarted group that failed, e.g. to connect: ``mesh`` counts gloo's ``connectFullMesh failed``);
- ``failed``: torchrun exited non-zero (restarts used up);
- ``hung``: still running after ``--limit`` seconds (killed then, its workers' Python stacks written to its log
  by SIGUSR1, which tests/_train_worker.py registers with faulthandler).

Nothing here is timed against a baseline: the counts are the result; the wall times are printed for scale.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_train_worker.py"


def config(output: Path, timeout_s: float | None) -> dict:
    """2 ranks x 6 images of TinyNet with a sharded ArcFace, 4 steps of a constant lr, a checkpoint every 2."""
    return {
        "seed": 0, "output": str(output),
        "model": {"backbone": "_train_worker:TinyNet", "embedding_size": 16, "kwargs": {"dropout": 0.0}},
        "head": {"name": "arcface", "kwargs": {"s": 16.0}, "shard": True},
        "data": {"num_identities": 8, "images_per_identity": 8, "image_size": 32, "batch_size": 6, "cache": True,
                 "eval_pairs": 0},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"steps": 4, "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 5, "progress": False,
                  "clip_grad_norm": 1.0, **({"dist_timeout": timeout_s} if timeout_s is not None else {})},
    }


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (pgrep -P, recursively)."""
    found = [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]
    return [q for p in found for q in (p, *descendants(p))]


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def one_run(folder: Path, max_restarts: int, limit: float, timeout_s: float | None) -> dict:
    folder.mkdir(parents=True)
    output = folder / "run"
    path = output.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config(output, timeout_s)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", str(max_restarts), "--monitor-interval", "0.2", str(WORKER), str(path), "--resume",
               "--kill-rank", "1", "--kill-at-step", "3"]
    start = time.perf_counter()
    with open(folder / "torchrun.log", "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            code: int | str = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGSTOP)  # the agent starts no new attempt meanwhile
            workers = descendants(proc.pid)  # torchrun starts each worker in a session of its own
            signal_all(workers, signal.SIGUSR1)  # faulthandler: the workers' Python stacks into the log
            time.sleep(3)
            signal_all([proc.pid, *workers], signal.SIGKILL)
            proc.wait()
            code = "hung"
    seconds = time.perf_counter() - start
    text = (folder / "torchrun.log").read_text(errors="replace")
    train_log = output / "train.log"
    done = train_log.is_file() and "step 4/4" in train_log.read_text()
    outcome = "hung" if code == "hung" else ("ok" if code == 0 and done else "failed")
    return {"outcome": outcome, "seconds": seconds, "attempts": text.count("failed (exitcode"),
            "mesh": text.count("connectFullMesh failed")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per loop (default 5)")
    parser.add_argument("--loops", type=int, default=2, help="loops side by side, each its own load (default 2)")
    parser.add_argument("--max-restarts", type=int, default=2, help="torchrun --max-restarts (default 2)")
    parser.add_argument("--limit", type=float, default=150.0, help="seconds before a run counts as hung (150)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="train.dist_timeout in seconds (default: unset, the config's default 1800)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench_elastic_"))
    results: list[dict] = []
    lock = threading.Lock()

    def loop(index: int) -> None:
        for i in range(args.runs):
            r = one_run(root / f"loop{index}_run{i}", args.max_restarts, args.limit, args.timeout)
            with lock:
                results.append(r)
                print(f"loop {index} run {i}: {r['outcome']:6s} {r['seconds']:6.1f} s  failed attempts {r['attempts']}"
                      f"  connectFullMesh failures {r['mesh']}", flush=True)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(args.loops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    count = {k: sum(r["outcome"] == k for r in results) for k in ("ok", "failed", "hung")}
    clean = sum(r["outcome"] == "ok" and r["attempts"] == 1 for r in results)
    ok_times = [r["seconds"] for r in results if r["outcome"] == "ok"]
    print(f"{len(results)} runs: {count['ok']} finished ({clean} with the one restart of the kill only), "
          f"{count['failed']} failed, {count['hung']} hung; median time of the finished "
          f"{statistics.median(ok_times) if ok_times else float('nan'):.1f} s; logs in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
