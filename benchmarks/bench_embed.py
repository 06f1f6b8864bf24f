"""Embedding throughput on CPU: faceforge's embedding paths against a plain PyTorch loop, same model and images.

    python benchmarks/bench_embed.py                  # r18 (quarter width), 112x112, 256 images
    python benchmarks/bench_embed.py --images 64 --repeats 1   # quick check

Both sides compute ``normalize(f(x) + f(flip(x)))`` in eval mode under ``torch.no_grad()``, in batches of
``--batch``, and their outputs are compared (max abs difference):

(a) in memory: ``faceforge.eval.verify.embed`` on a uint8 ``(N, 112, 112, 3)`` array (what ``.bin`` sets
    use) against ``for batch: x = (batch - 127.5) / 127.5; model(x) + model(flip(x))``;
(b) from disk: ``faceforge.eval.sets.open_images(folder).embed`` (decode, size check,
    ``embed_batches``; what ``--probes`` / ``--distractors`` / ``--retrieval`` use) on a folder of PNGs
    against the same loop reading each file with PIL.

After one untimed warm-up batch, each side runs ``--repeats`` times, alternating, and the best time counts. Absolute images/s depend on
the machine and its load; compare the ratios (faceforge / plain: 1.00 = no overhead).

    python benchmarks/bench_embed.py --memory 1000 10000   # `faceforge embed`'s peak RSS against N

``--memory N...``: the peak RSS (``ru_maxrss`` of the child) of ``faceforge embed MODEL FOLDER --out x.npy`` on
folders of N aligned 112 x 112 PNGs (hard links to 16 files: each is decoded), one fresh process per N, for
the code on ``sys.path`` and, with ``--baseline PATH``, for another checkout (``PYTHONPATH=PATH``). The model is
:class:`PoolNet` (average pooling + a linear layer to 512-D, named ``bench_embed:PoolNet`` in its model.json and
loaded with ``--trust-code``), so that the time goes to the pipeline being measured, not to convolutions.
Streaming means the peak is flat in N (a batch of images and the N x D embeddings); decoding every image
first grows by N x 112 x 112 x 3 bytes (37.6 KB per image).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from timing import timed  # benchmarks/timing.py

from faceforge.backbones import build
from faceforge.data.synthetic import render_images
from faceforge.eval.sets import open_images
from faceforge.eval.verify import embed


def plain_loop(model: torch.nn.Module, batches) -> np.ndarray:
    """The reference: a bare loop over uint8 (B, H, W, 3) batches."""
    model.eval()
    out = []
    with torch.no_grad():
        for batch in batches:
            x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() - 127.5) / 127.5
            out.append(F.normalize(model(x) + model(torch.flip(x, dims=[3])), dim=1))
    return torch.cat(out).numpy()


def compare(name: str, ours, plain, n: int, repeats: int) -> None:
    t_ours = t_plain = float("inf")
    for _ in range(repeats):  # alternate, so that load changes hit both sides
        t, e_plain = timed(plain)
        t_plain = min(t_plain, t)
        t, e_ours = timed(ours)
        t_ours = min(t_ours, t)
    diff = float(np.abs(e_ours - e_plain).max())
    print(f"{name}: faceforge {n / t_ours:.1f} images/s, plain loop {n / t_plain:.1f} images/s "
          f"-> ratio {t_plain / t_ours:.2f} (max |difference| {diff:.1e})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="r18")
    ap.add_argument("--width", type=float, default=0.25, help="IResNet width multiplier (default 0.25)")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--memory", type=int, nargs="+", default=None, metavar="N",
                    help="measure `faceforge embed`'s peak RSS on N images instead (default: the speed comparison)")
    ap.add_argument("--baseline", default=None, metavar="PATH", help="--memory: also a checkout at PATH")
    a = ap.parse_args(argv)
    if a.memory:
        return memory(a.memory, a.baseline, a.batch)
    torch.manual_seed(0)
    model = build(a.backbone, embedding_size=512, width=a.width, input_size=a.size)
    n = a.images
    images = render_images(np.arange(n) // 4, np.arange(n) % 4, image_size=a.size)
    print(f"{a.backbone} (width {a.width}) at {a.size}x{a.size}, {n} images, batch {a.batch}, "
          f"{torch.get_num_threads()} torch threads")

    plain_loop(model, [images[: a.batch]])  # warm-up (oneDNN primitives, allocator), not timed
    batches = lambda: (images[s : s + a.batch] for s in range(0, n, a.batch))  # noqa: E731
    compare("(a) in memory", lambda: embed(model, images, batch_size=a.batch), lambda: plain_loop(model, batches()),
            n, a.repeats)

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for k, image in enumerate(images):
            path = Path(tmp) / f"id_{k // 4:04d}" / f"{k % 4}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(image).save(path)
            paths.append(path)
        image_set = open_images(tmp)  # sorted identities, sorted files: the order written above
        everything = np.arange(n)

        def from_files():
            for s in range(0, n, a.batch):
                yield np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths[s : s + a.batch]])

        compare("(b) from PNG files", lambda: image_set.embed(model, everything, a.size, a.batch),
                lambda: plain_loop(model, from_files()), n, a.repeats)
    return 0


class PoolNet(torch.nn.Module):
    """A backbone that costs nothing: (B, 3, S, S) -> 4 x 4 average pool -> Linear(48, D)."""

    def __init__(self, embedding_size: int = 512, input_size: int = 112) -> None:
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.fc = torch.nn.Linear(48, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))


PEAK = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def memory(counts: list[int], baseline: str | None, batch: int) -> int:
    """Peak RSS of `faceforge embed` on folders of N images (module notes)."""
    from faceforge.deploy.modelfile import META_KEY, ModelInfo

    from safetensors.torch import save_file

    here = str(Path(__file__).resolve().parents[1])
    trees = [("this tree", here)] + ([("baseline", baseline)] if baseline else [])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        model = PoolNet(512, 112)
        info = ModelInfo(backbone="bench_embed:PoolNet", embedding_size=512, image_size=112, flip_test=False,
                         name="bench").to_json()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"),
                  metadata={META_KEY: info})
        (root / "model.json").write_text(info)
        sources = render_images(np.arange(16) // 4, np.arange(16) % 4, image_size=112)
        for k, image in enumerate(sources):
            Image.fromarray(image).save(root / f"src{k}.png")
        print(f"faceforge embed, PoolNet 512-D at 112x112, batch {batch}, load average {os.getloadavg()[0]:.1f}")
        for n in counts:
            folder = root / f"images_{n}"
            folder.mkdir()
            for k in range(n):
                os.link(root / f"src{k % 16}.png", folder / f"{k:06d}.png")
            for name, tree in trees:
                trust = ["--trust-code"] if tree == here else []  # an older checkout imports what model.json names
                cmd = [sys.executable, "-c", PEAK, sys.executable, "-m", "faceforge.cli", "embed", str(root),
                       str(folder), "--out", str(root / "x.npy"), "--quiet", "--batch-size", str(batch), *trust]
                path = os.pathsep.join([tree, str(Path(__file__).resolve().parent)])
                out = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True,
                                     check=True).stdout
                print(f"  N = {n:6d}  {name:9s}  peak RSS {int(out.split()[-1]) / 1024:7.0f} MiB  "
                      f"(load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
