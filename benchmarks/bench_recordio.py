"""Reading insightface RecordIO: images/s of RecordIODataset against decoding the same JPEGs from memory.

    python benchmarks/bench_recordio.py [--images 2000] [--size 112] [--workers 2]

Writes a .rec/.idx of synthetic 112x112 faces as JPEG (quality 95, as insightface's sets are), then:

  decode    Pillow decode of the same JPEG bytes held in a Python list (the work no reader avoids)
  dataset   RecordIODataset[i] in a shuffled order: seek, read, parse the header, decode to RGB uint8
  loader    a torch DataLoader over the dataset with --workers processes and to_tensor, batch 128

All in one process on the same files; the ratio dataset/decode is the cost of the format itself.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from faceforge.data.recordio import RecordIODataset, encode_image, write
from faceforge.data.synthetic import render_images
from faceforge.data.transforms import to_tensor


def _rate(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    ids = np.arange(args.images) // 20
    images = render_images(ids, np.arange(args.images) % 20, image_size=args.size)
    encoded = [encode_image(im, "jpeg", 95) for im in images]
    order = np.random.default_rng(0).permutation(args.images)
    with tempfile.TemporaryDirectory() as folder:
        prefix = Path(folder) / "train"
        write(prefix, list(zip(encoded, ids.tolist())))
        ds = RecordIODataset(prefix)

        def decode() -> None:
            for i in order:
                np.asarray(Image.open(io.BytesIO(encoded[i])).convert("RGB"))

        def dataset() -> None:
            for i in order:
                ds[int(i)]

        def loader() -> None:
            tensors = RecordIODataset(prefix, transform=to_tensor)
            for _ in torch.utils.data.DataLoader(tensors, batch_size=128, shuffle=True, num_workers=args.workers):
                pass

        decode()  # warm the page cache and Pillow
        rates = {"decode": _rate(decode, args.images), "dataset": _rate(dataset, args.images),
                 "loader": _rate(loader, args.images)}
    mb = sum(len(e) for e in encoded) / 2**20
    print(f"{args.images} JPEG images {args.size}x{args.size} ({mb:.1f} MiB), torch threads {torch.get_num_threads()}, "
          f"loader workers {args.workers}")
    print(f"{'variant':<10}{'images/s':>10}{'ratio to decode':>17}")
    for name, rate in rates.items():
        print(f"{name:<10}{rate:>10.0f}{rate / rates['decode']:>17.2f}")


if __name__ == "__main__":
    main()
