"""Inference speed on this CPU: PyTorch eager vs BN folded vs ONNX Runtime float32 vs int8 (dynamic, static).

For each backbone and batch size: images/s of each variant (best of ``--iters`` timed calls at batch < 16,
``--large-iters`` at larger batches, variants timed round robin, after a one-image warm-up) and the ratio against PyTorch eager measured in the same run, plus the cosine agreement of
each variant with eager on the same batch (random-weight backbones: speed does not depend on the
weights). Images are the 12 aligned real faces, repeated to the batch size.

    OMP_NUM_THREADS=1 python benchmarks/bench_export.py --models r18 r50 r100 --batches 1 64 --iters 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import timed  # noqa: E402

from faceforge.backbones import build  # noqa: E402
from faceforge.backbones.fuse import fuse_bn  # noqa: E402
from faceforge.deploy.export import export_backbone, quantize_onnx, real_faces  # noqa: E402
from faceforge.deploy.inference import OnnxBackend, Recognizer  # noqa: E402
from faceforge.deploy.modelfile import ModelInfo  # noqa: E402


def with_batch_statistics(model: torch.nn.Module, faces: np.ndarray) -> torch.nn.Module:
    """The model in eval mode with BN running statistics of the faces (one train-mode pass, cumulative
    averages): at insightface's random initialisation a 100-layer net's eval-mode activations overflow to
    NaN, which the export's parity check rightly refuses."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    x = torch.from_numpy(Recognizer(lambda a: a, ModelInfo(backbone="-", embedding_size=1)).preprocess(faces))
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float((np.einsum("nd,nd->n", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["r18", "r50", "r100"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--iters", type=int, default=3, help="timed calls per variant at batch < 16 (best kept)")
    p.add_argument("--large-iters", type=int, default=1, help="timed calls per variant at batch >= 16")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and onnxruntime threads (default 1: on this shared 2-core machine 2 threads ran 4x slower)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, best of {args.iters} calls at batch < 16 and "
          f"{args.large_iters} at batch >= 16, after a one-image warm-up; 112 x 112 input")
    print("| backbone | batch | PyTorch eager | BN folded | ORT float32 | ORT int8 dynamic | ORT int8 static (QDQ) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    faces = real_faces(112)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            torch.manual_seed(0)
            model = with_batch_statistics(build(name), faces)
            info = ModelInfo(backbone=name, embedding_size=512)
            fused = fuse_bn(model)
            f32 = Path(tmp) / f"{name}.onnx"
            export_backbone(model, info, f32)
            dyn, static = Path(tmp) / f"{name}.dyn.onnx", Path(tmp) / f"{name}.static.onnx"
            quantize_onnx(f32, dyn, "dynamic", info)
            calib = Path(tmp) / "calib"
            calib.mkdir(exist_ok=True)
            from PIL import Image

            for k, face in enumerate(faces):
                Image.fromarray(face).save(calib / f"{k}.png")
            quantize_onnx(f32, static, "static", info, calib)
            sessions = {k: OnnxBackend(path, threads=args.threads) for k, path in
                        (("f32", f32), ("dyn", dyn), ("static", static))}
            for batch in args.batches:
                crops = faces[np.arange(batch) % len(faces)]
                x = Recognizer(lambda a: a, info).preprocess(crops)
                xt = torch.from_numpy(x)
                iters = args.iters if batch < 16 else args.large_iters

                def eager(m=model, inputs=xt):
                    with torch.no_grad():
                        return m(inputs).numpy()

                for m in (model, fused):  # warm-up on one image
                    eager(m, xt[:1])
                for sess in sessions.values():
                    sess(x[:1])
                calls = {"eager": eager, "fused": lambda: eager(fused)}
                calls |= {k: (lambda sess=sess: sess(x)) for k, sess in sessions.items()}
                first = {k: timed(f) for k, f in calls.items()}  # the first timed call also gives the outputs
                agree = {k: cosine(first["eager"][1], out) for k, (_, out) in first.items()}
                best = {k: t for k, (t, _) in first.items()}
                for _ in range(iters - 1):  # round robin: a change of load hits every variant alike
                    for k, f in calls.items():
                        best[k] = min(best[k], timed(f)[0])
                rates = {k: batch / t for k, t in best.items()}
                cells = [f"{rates['eager']:.1f}"] + [
                    f"{rates[k]:.1f} (x{rates[k] / rates['eager']:.2f}, cos {agree[k]:.4f})"
                    for k in ("fused", "f32", "dyn", "static")]
                print(f"| {name} | {batch} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
