"""train() on real-format data: a RecordIO set and an image folder, with .bin verification sets.

Tiny: 4 identities x 8 synthetic 32x32 images, TinyNet, batch 8 (4 steps per epoch), one thread.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from faceforge.data import recordio
from faceforge.data.pairs import write_bin
from faceforge.data.synthetic import render_images, synthetic_pairs
from faceforge.train.config import ConfigError, config_from_dict
from faceforge.train.data import LABEL_MAP_NAME, build_dataset
from faceforge.train.engine import train

pytestmark = pytest.mark.usefixtures("one_thread")

IDS, PER_ID, SIZE = 4, 8, 32




@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("data")
    labels = np.repeat(np.arange(IDS), PER_ID)
    images = render_images(labels, np.tile(np.arange(PER_ID), IDS), image_size=SIZE)
    prefix = base / "train"
    recordio.write(prefix, zip(images, labels.tolist()))
    folder = base / "folder"
    for k, (img, label) in enumerate(zip(images, labels)):
        person = folder / f"person_{label:02d}"
        person.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(person / f"{k:03d}.png")
    pair_images, issame = synthetic_pairs(10, num_identities=IDS, image_size=SIZE)
    write_bin(base / "pairs.bin", pair_images, issame)
    return {"prefix": str(prefix), "folder": folder, "bin": str(base / "pairs.bin"), "base": base}


def make_config(output: Path, **data: Any) -> Any:
    return config_from_dict(
        {
            "seed": 0,
            "output": str(output),
            "model": {"backbone": "_train_worker:TinyNet", "embedding_size": 16},
            "head": {"name": "arcface", "kwargs": {"s": 16.0}},
            "data": {"image_size": SIZE, "batch_size": 8, **data},
            "optim": {"name": "sgd", "lr": 0.05},
            "train": {"steps": 4, "log_every": 1, "progress": False},
        },
        "<test>",
    )


def assert_trained(result: Any, steps: int = 4, ran: int | None = None) -> None:
    assert result.step == steps and len(result.losses) == (steps if ran is None else ran)
    assert all(math.isfinite(v) for v in result.losses)
    assert result.checkpoint.is_file()


def test_recordio_with_bin(data: dict[str, Any], tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "rec", name="recordio", path=data["prefix"], eval_bins=[data["bin"]])
    ds = build_dataset(cfg)
    assert ds.num_classes == IDS and len(ds) == IDS * PER_ID
    image, label = ds[PER_ID + 1]
    assert image.dtype == torch.float32 and image.shape == (3, SIZE, SIZE) and label == 1
    assert -1.0 <= image.min() and image.max() <= 1.0
    result = train(cfg)
    assert_trained(result)
    assert {"pairs/accuracy", "pairs/auc", "pairs/eer"} <= set(result.metrics)
    assert all(math.isfinite(v) for v in result.metrics.values())


def test_folder_without_bins_skips_verification(data: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "folder"
    cfg = make_config(out, name="folder", path=str(data["folder"]), eval_bins=[data["bin"], data["bin"]])
    result = train(cfg)
    assert_trained(result)
    assert {"pairs/accuracy", "pairs_2/accuracy"} <= set(result.metrics)
    labels = (out / LABEL_MAP_NAME).read_text()
    assert '"person_00": 0' in labels and '"person_03": 3' in labels

    plain = make_config(tmp_path / "plain", name="folder", path=str(data["folder"]))
    plain.train.eval_every = 1
    result = train(plain)
    assert_trained(result)
    assert result.metrics == {}
    log = (tmp_path / "plain" / "train.log").read_text()
    assert log.count("no evaluation sets: data.eval_pairs / eval_bins give no held-out pairs for data.name 'folder'") == 1


def test_folder_resume_keeps_label_map(data: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = make_config(out, name="folder", path=str(data["folder"]))
    train(cfg)
    # The map in the run folder wins over the sorted folder names when a checkpoint is there.
    (out / LABEL_MAP_NAME).write_text('{"person_03": 0, "person_02": 1, "person_01": 2, "person_00": 3}')
    ds = build_dataset(cfg)
    assert ds[0][1] == 3  # person_00's first image
    cfg.train.steps = 6
    assert_trained(train(cfg, resume=True), steps=6, ran=2)


def test_data_errors(data: dict[str, Any], tmp_path: Path) -> None:
    for name in ("recordio", "folder"):
        with pytest.raises(ConfigError, match="data.path is required"):
            build_dataset(make_config(tmp_path / name, name=name))
    bad = tmp_path / "bad"
    (bad / "a").mkdir(parents=True)
    for k in range(8):
        Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(bad / "a" / f"{k}.png")
    Image.fromarray(np.zeros((SIZE - 2, SIZE, 3), np.uint8)).save(bad / "a" / "3.png")
    ds = build_dataset(make_config(tmp_path / "o", name="folder", path=str(bad)))
    ds[0]
    with pytest.raises(ValueError, match=r"3\.png: image is 32x30 but data.image_size is 32"):
        ds[3]
    with pytest.raises(ValueError, match=r"train\.rec: index 0 \(key 1\): image is 32x32 but data.image_size is 24"):
        build_dataset(make_config(tmp_path / "r", name="recordio", path=data["prefix"], image_size=24))[0]
    small, issame = synthetic_pairs(10, num_identities=IDS, image_size=16)
    write_bin(tmp_path / "small.bin", small, issame)
    cfg = make_config(tmp_path / "e", name="recordio", path=data["prefix"], eval_bins=[str(tmp_path / "small.bin")])
    cfg.train.steps = 1
    with pytest.raises(ValueError, match=r"small\.bin: verification images are 16x16 but data.image_size is 32"):
        train(cfg)
