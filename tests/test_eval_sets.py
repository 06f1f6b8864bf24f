"""faceforge.eval.sets in training: the trainer's evaluators (data.eval_ijb / eval_probes + eval_distractors /
eval_retrieval) log every set's numbers, the same numbers the sets give the final model."""

from __future__ import annotations

from pathlib import Path

import _eval_data as E  # tests/ is on sys.path
import numpy as np
import pytest

from faceforge.data.synthetic import synthetic_pairs
from faceforge.eval.sets import PairSet, enrol_first
from faceforge.eval.verify import verify_pairs
from faceforge.core.checkpoint import load_checkpoint
from faceforge.train.config import ConfigError, config_from_dict
from faceforge.train.preflight import open_evaluators
from faceforge.train.engine import build_backbone, train


def _cfg(tmp_path: Path, **data: object):
    raw = {**E.CONFIG, "output": str(tmp_path / "run"), "data": {**E.CONFIG["data"], **data},
           "train": {"steps": 2, "progress": False, "log_every": 1}}
    return config_from_dict(raw)


def test_trainer_logs_ijb_identification_and_retrieval(tmp_path: Path) -> None:
    ijb = E.mini_ijb(tmp_path)
    people = E.identity_folder(tmp_path / "people", identities=4, per_identity=3)
    E.flat_folder(tmp_path / "distractors", 12)
    cfg = _cfg(tmp_path, eval_ijb=str(ijb), eval_probes=str(people), eval_distractors=str(tmp_path / "distractors"),
               eval_retrieval=str(people))
    result = train(cfg)
    m = result.metrics
    for key in ("accuracy", "tar@far=1e-03", "IJBC/1:1/tar@far=1e-06", "IJBC/1:1/auc", "IJBC/1:N-G1/tpir@fpir=1e-01",
                "IJBC/1:N-G2/rank-5", "identification/d=10/rank-1", "identification/d=12/tar@far=1e-06",
                "retrieval/recall@1", "retrieval/recall@1000", "retrieval/map"):
        assert key in m, key
    log = result.log.read_text()
    assert "retrieval/map" in log and "IJBC/1:N-G1/rank-1" in log

    # the logged numbers are the sets' numbers on the final model
    model = build_backbone(cfg)
    model.load_state_dict(load_checkpoint(result.checkpoint)["backbone"])
    for s in open_evaluators(cfg):
        prefix = f"{s.name}/" if s.name else ""
        for k, v in s.evaluate(model, cfg.data.image_size).items():
            assert m[prefix + k] == pytest.approx(v, abs=1e-6), prefix + k


def test_probes_need_distractors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.eval_probes and data.eval_distractors go together"):
        open_evaluators(_cfg(tmp_path, eval_probes=str(tmp_path)))


def test_pair_set_gives_the_numbers_of_verify_pairs() -> None:
    """The trainer's held-out numbers did not change when they moved from verify_pairs to PairSet."""
    cfg = config_from_dict({**E.CONFIG})
    model = build_backbone(cfg)
    images, issame = synthetic_pairs(40, num_identities=30, image_size=E.SIZE, split="test")
    got = PairSet("x", images, issame, fars=(1e-3, 1e-4)).evaluate(model, E.SIZE, batch_size=16)
    assert got == verify_pairs(model, images, issame, batch_size=16, fars=(1e-3, 1e-4)).as_dict()
    # and the numbers themselves, from the images written out here in float64: f(x) + f(flip(x)) normalised,
    # cosine of pairs (2k, 2k + 1); AUC = P(genuine > impostor) + P(tie) / 2 (Mann-Whitney). The PairSet's float32
    # scores differ by ~1e-7: no pair of scores here is that close to a tie (checked), so the AUC is the same.
    import copy

    import torch

    net = copy.deepcopy(model).double().eval()
    x = (torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).double() - 127.5) / 127.5
    with torch.no_grad():
        f = net(x) + net(x.flip(-1))
    f = (f / f.norm(dim=1, keepdim=True)).numpy()
    scores = np.einsum("nd,nd->n", f[0::2], f[1::2])
    same = np.asarray(issame, dtype=bool)
    genuine, impostor = scores[same][:, None], scores[~same][None, :]
    assert np.abs(genuine - impostor).min() > 1e-5
    auc = float(np.mean((genuine > impostor) + 0.5 * (genuine == impostor)))
    assert got["auc"] == pytest.approx(auc, abs=1e-12), (got["auc"], auc)


def test_enrol_first() -> None:
    gallery, probes = enrol_first(np.array([3, 1, 3, 1, 2, 3]))
    np.testing.assert_array_equal(gallery, [0, 1, 4])  # the first image of labels 3, 1 and 2
    np.testing.assert_array_equal(probes, [2, 3, 5])
    with pytest.raises(ValueError, match="at least 2 images"):
        enrol_first(np.array([0, 1, 2]))
