"""The quality score of a deployed model: ``Recognizer.quality`` is the raw embedding norm |f(x)| (MagFace's
magnitude), calibrated for a model trained with a norm-aware head (MagFace, AdaFace: ``model.json`` records the head
and ``norm_is_quality``), a one-line note for any other; ``faceforge embed`` writes it as a column."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import _tiny_run as T  # tests/ is on sys.path
from faceforge.cli import main
from faceforge.deploy.inference import load_model
from faceforge.deploy.modelfile import (
    MODEL_JSON,
    ModelFileError,
    ModelInfo,
    head_norm_is_quality,
    write_model_files,
)
from faceforge.train.config import config_from_dict

NOTE = "is not a calibrated quality score"


def model_folder(folder: Path, head: dict[str, Any], seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """model.safetensors + model.json of an untrained r18 (quarter width, 16-D, 32 px) whose config trains ``head``,
    written as a checkpoint save writes them."""
    from faceforge.build import build_backbone

    cfg = config_from_dict({**T.CONFIG, "output": str(folder), "head": head})
    torch.manual_seed(seed)
    backbone = build_backbone(cfg).eval()
    write_model_files(folder, backbone, cfg, dict(T.METRICS), None, T.STEP)
    return folder, backbone


def float64_norms(backbone: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """|f(x)| of the raw backbone output in float64, x = (image - 127.5) / 127.5, no flip."""
    b = backbone.double().eval()
    with torch.no_grad():
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).double() - 127.5) / 127.5
        return torch.linalg.vector_norm(b(x), dim=1).numpy()


def faces(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, T.SIZE, T.SIZE, 3), dtype=np.uint8)


# float32 forward passes agree with float64 to a few 1e-7 relative per layer of a small net: 1e-5 relative on a
# norm; a normalised embedding (norm 1) or the norm of f(x) + f(flip x) (about twice) would be far off
RTOL = 1e-5


@pytest.mark.parametrize("head", ["magface", "adaface"])
def test_quality_of_a_norm_aware_model_is_its_raw_norm_without_a_note(tmp_path: Path, head: str,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    folder, backbone = model_folder(tmp_path / head, {"name": head})
    meta = json.loads((folder / MODEL_JSON).read_text())
    assert meta["head"] == head and meta["norm_is_quality"] is True
    r = load_model(folder)
    images = faces(6)
    with caplog.at_level(logging.WARNING, logger="faceforge"):
        q = r.quality(images, batch_size=4)
    assert NOTE not in caplog.text and r.quality_note() is None
    expect = float64_norms(backbone, images)
    assert q.dtype == np.float64 and q.shape == (6,)
    np.testing.assert_allclose(q, expect, rtol=RTOL, atol=0)
    assert not np.allclose(q, 1.0, rtol=0.01)  # the norm before normalisation, not the unit embedding's
    # from the same forward pass as the embeddings: equal to quality(), embeddings equal to embed()
    emb, q2, kept, skipped = r.embed_files_with_quality(list(images), batch_size=4)
    assert np.array_equal(q2, q) and np.array_equal(emb, r.embed(images, batch_size=4)) and len(kept) == 6
    # a run resumed from its checkpoint (last.pt) knows the head too
    assert load_model(folder / "model.safetensors").info.norm_is_quality is True


def test_quality_of_another_model_is_its_norm_with_a_one_line_note(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    folder, backbone = model_folder(tmp_path / "arc", {"name": "arcface"})
    r = load_model(folder)
    assert r.info.head == "arcface" and r.info.norm_is_quality is False
    images = faces(3)
    with caplog.at_level(logging.WARNING, logger="faceforge"):
        q = r.quality(images)
    np.testing.assert_allclose(q, float64_norms(backbone, images), rtol=RTOL, atol=0)
    (record,) = [rec for rec in caplog.records if NOTE in rec.getMessage()]
    message = record.getMessage()
    assert "the norm of a model trained with head 'arcface' is not a calibrated quality score" in message
    assert "\n" not in message


def test_the_head_rule_follows_the_registry_and_wrappers() -> None:
    assert head_norm_is_quality("magface", {}) and head_norm_is_quality("AdaFace", {})
    assert not head_norm_is_quality("arcface", {}) and not head_norm_is_quality("sphereface2", {})
    assert head_norm_is_quality("broadface", {"head": "magface", "queue_size": 4})
    assert not head_norm_is_quality("broadface", {"head": "cosface"})
    assert not head_norm_is_quality("my.module:MagFace", {})  # never imported to ask


def test_older_and_foreign_metadata_load_with_an_unknown_head(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import _modelfiles as M

    path = M.write_model(tmp_path / "old")  # ModelInfo defaults: no head recorded
    meta = json.loads((tmp_path / "old" / MODEL_JSON).read_text())
    meta.pop("head"), meta.pop("norm_is_quality")  # a model.json written before these keys
    (tmp_path / "old" / MODEL_JSON).write_text(json.dumps(meta))
    r = load_model(path)
    assert r.info.head is None and r.info.norm_is_quality is False
    with caplog.at_level(logging.WARNING, logger="faceforge"):
        assert r.quality(M.faces(2)).shape == (2,)
    assert "trained with an unknown head (its metadata names none) is not a calibrated quality score" in caplog.text
    with pytest.raises(ModelFileError, match="norm_is_quality: got 'yes', expected true or false"):
        ModelInfo.from_dict({**meta, "norm_is_quality": "yes"}, "m.json")


def test_embed_writes_the_quality_column(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         caplog: pytest.LogCaptureFixture) -> None:
    from PIL import Image

    folder, backbone = model_folder(tmp_path / "mag", {"name": "magface"})
    images = faces(5, seed=3)
    (tmp_path / "img").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "img" / f"{i}.png")
    out = tmp_path / "feats.npy"
    assert main(["embed", str(folder), str(tmp_path / "img"), "--out", str(out), "--quiet", "--batch-size", "2"]) == 0
    text = capsys.readouterr()
    assert f"quality:    {tmp_path / 'feats.csv'}" in text.out and NOTE not in text.err
    with open(tmp_path / "feats.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "quality"] and len(rows) == 6
    files = (tmp_path / "feats.txt").read_text().split()
    assert [r[0] for r in rows[1:]] == files  # one row per embedding row, in order
    q = np.array([float(r[1]) for r in rows[1:]])
    np.testing.assert_allclose(q, float64_norms(backbone, images), rtol=RTOL, atol=0)
    assert np.load(out).shape == (5, 16)
    assert NOTE not in caplog.text
    # another head: the same column, and the note (logged: on stderr, one line, where no logging is configured)
    arc, _ = model_folder(tmp_path / "arc", {"name": "arcface"})
    with caplog.at_level(logging.WARNING, logger="faceforge"):
        assert main(["embed", str(arc), str(tmp_path / "img"), "--out", str(tmp_path / "a.npy"), "--quiet"]) == 0
    assert "not a calibrated quality for this model" in capsys.readouterr().out
    (line,) = [rec.getMessage() for rec in caplog.records if NOTE in rec.getMessage()]
    assert "head 'arcface'" in line and "\n" not in line
