"""Tiny evaluation data for tests/test_eval_cli.py and tests/test_eval_sets.py (importable as `_eval_data`).

* ``tiny_checkpoint``: an untrained ``faceforge train``-style checkpoint of ``_train_worker:TinyNet`` at 32x32
  (no training: the tests check the evaluation arithmetic, not the accuracy).
* ``identity_folder`` / ``flat_folder``: rendered synthetic faces, one sub-folder per identity / nested.
* ``mini_ijb``: an IJB-C release: 4 subjects x 2 templates x 2 images (2 medias in the first template of
  each), every template pair in the 1:1 list, galleries G1 (subjects 0, 1) and G2 (2, 3) of the first
  templates, and the second templates as mixed probes.
* Plain-loop references: ``loop_tar_at_far``, ``loop_rank``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from faceforge.data.synthetic import render_images
from faceforge.core.checkpoint import save_checkpoint
from faceforge.train.config import config_from_dict, to_dict

SIZE = 32

CONFIG = {
    "seed": 0,
    "output": "unused",
    "model": {"backbone": "_train_worker:TinyNet", "embedding_size": 16},
    "head": {"name": "arcface"},
    "data": {"num_identities": 8, "images_per_identity": 4, "image_size": SIZE, "batch_size": 16,
             "eval_pairs": 16, "eval_identities": 20},
    "train": {"steps": 1, "progress": False},
}


def tiny_checkpoint(path: Path, seed: int = 0, threshold: float | None = None) -> Path:
    from faceforge.train.engine import build_backbone

    cfg = config_from_dict(CONFIG)
    torch.manual_seed(seed)
    state = {"config": to_dict(cfg), "backbone": build_backbone(cfg).state_dict()}
    if threshold is not None:
        state["verification_threshold"] = threshold
    return save_checkpoint(path, state)


def identity_folder(root: Path, identities: int, per_identity: int, seed: int = 0, split: str = "test",
                    size: int = SIZE) -> Path:
    """``root/id_XX/img_YY.png``: ``per_identity`` renders of each of ``identities`` people."""
    ids = np.repeat(np.arange(identities), per_identity)
    samples = np.tile(np.arange(per_identity), identities)
    for i, s, image in zip(ids, samples, render_images(ids, samples, seed=seed, split=split, image_size=size)):
        (root / f"id_{i:02d}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / f"id_{i:02d}" / f"img_{s:02d}.png")
    return root


def flat_folder(root: Path, n: int, seed: int = 5) -> list[Path]:
    """``n`` renders of ``n`` other people under ``root/a/`` and ``root/b/c/``; their paths, sorted."""
    paths = []
    for k, image in enumerate(render_images(np.arange(n), np.zeros(n, int), seed=seed, split="train",
                                            image_size=SIZE)):
        folder = root / ("a" if k % 2 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"{k:03d}.png")
        Image.fromarray(image).save(paths[-1])
    return sorted(paths, key=str)


# subject s: template 10 s + 1 (medias 100 s + 1 and 100 s + 2, one image each), template 10 s + 2 (media
# 100 s + 3, two images)
SUBJECTS = 4


def mini_ijb(root: Path) -> Path:
    """An IJB-C release under ``root/IJBC`` (see the module notes); returns that folder."""
    rel = root / "IJBC"
    (rel / "meta").mkdir(parents=True)
    (rel / "loose_crop").mkdir()
    ids = np.repeat(np.arange(SUBJECTS), 4)
    samples = np.tile(np.arange(4), SUBJECTS)
    images, landmarks = render_images(ids, samples, split="test", image_size=112, return_landmarks=True)
    tid_mid, pts = [], []
    for k, (s, j) in enumerate(zip(ids, samples)):
        name = f"{k}.png"
        Image.fromarray(images[k]).save(rel / "loose_crop" / name)
        template = 10 * s + (1 if j < 2 else 2)
        media = 100 * s + (1 + j if j < 2 else 3)
        tid_mid.append(f"{name} {template} {media}\n")
        pts.append(f"{name} {' '.join(f'{v:.3f}' for v in landmarks[k].ravel())} {0.5 + 0.1 * j:.2f}\n")
    templates = [10 * s + t for s in range(SUBJECTS) for t in (1, 2)]
    pairs = [f"{a} {b} {int(a // 10 == b // 10)}\n" for i, a in enumerate(templates) for b in templates[i + 1:]]
    (rel / "meta" / "ijbc_face_tid_mid.txt").write_text("".join(tid_mid))
    (rel / "meta" / "ijbc_name_5pts_score.txt").write_text("".join(pts))
    (rel / "meta" / "ijbc_template_pair_label.txt").write_text("".join(pairs))
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
    for gallery, subjects in (("G1", (0, 1)), ("G2", (2, 3))):
        (rel / "meta" / f"ijbc_1N_gallery_{gallery}.csv").write_text(
            header + "".join(f"{10 * s + 1},{s},x.png\n" for s in subjects))
    (rel / "meta" / "ijbc_1N_probe_mixed.csv").write_text(
        header + "".join(f"{10 * s + 2},{s},y.png\n" for s in range(SUBJECTS)))
    return rel


def loop_tar_at_far(scores, labels, far: float) -> float:
    """Largest TPR over thresholds {+inf} U scores (accept score >= t) with FP / N_neg <= far."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    best = 0.0
    for t in [math.inf] + sorted(set(float(s) for s in scores)):
        if sum(s >= t for s in neg) <= far * len(neg):
            best = max(best, sum(s >= t for s in pos) / len(pos))
    return best


def loop_rank(mate_scores, other_scores) -> int:
    """1 + the non-mated scores at or above the best mate score."""
    best = max(mate_scores)
    return 1 + sum(s >= best for s in other_scores)
