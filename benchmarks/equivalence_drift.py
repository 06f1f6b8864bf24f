"""How far two equivalent runs drift apart when only the order of their sums differs (issue 11).

Trains the tests' tiny config (TinyNet + ArcFace, 10 steps, lr 0.1, momentum 0.9) once with batch 16 and
once with grad_accum 2 x batch 8, in float32 and in float64, and prints the largest relative difference of
the final weights and momentum buffers (max |a - b| / max |b| per tensor). Run it under different CPU
kernels to see the float32 verdict move and the float64 one stay ~1e-15:

    ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 python benchmarks/equivalence_drift.py
    ATEN_CPU_CAPABILITY=avx2    OMP_NUM_THREADS=1 python benchmarks/equivalence_drift.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_train as T  # noqa: E402  (the tests' config and helpers)


def drift(float64: bool) -> float:
    plain = T.PLAIN if float64 else {"model": {"kwargs": {"dropout": 0.0}}, "train": {"clip_grad_norm": 0.0}}
    root = Path(tempfile.mkdtemp())
    ref = T.train(T.make_config(root / "one", plain))
    acc = T.train(T.make_config(root / "accum", plain, data={"batch_size": 8}, train={"grad_accum": 2}))
    a, e = T.load_checkpoint(acc.checkpoint), T.load_checkpoint(ref.checkpoint)
    worst = 0.0
    for x, y in zip(T._tensors([a["backbone"], a["optimizer"]]), T._tensors([e["backbone"], e["optimizer"]])):
        if x.is_floating_point():
            worst = max(worst, ((x - y).abs().max() / y.abs().max()).item())
    return worst


if __name__ == "__main__":
    torch.set_num_threads(1)
    import logging

    logging.getLogger("faceforge.train").setLevel(logging.ERROR)
    cap = torch.backends.cpu.get_cpu_capability()
    print(f"cpu capability {cap}: float32 drift {drift(False):.2e}, float64 drift {drift(True):.2e}")
