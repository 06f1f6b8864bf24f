"""faceforge.eval.ijb: IJB image features, 1:1 verification, 1:N identification, 1:N CSV files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from faceforge.data.ijb import IJBMeta, iter_aligned
from faceforge.data.synthetic import render_images
from faceforge.eval.ijb import (
    ijb_embeddings,
    ijb_identification,
    ijb_verification,
    read_1n_gallery,
    read_1n_probes,
)

# 6 images, 3 templates (11: one media of 2 images; 12: media 20 (1 image) + 21 (2 images); 13: one image)
NAMES = ["1.png", "2.png", "3.png", "4.png", "5.png", "6.png"]
TEMPLATES = [11, 11, 12, 12, 12, 13]
MEDIAS = [10, 10, 20, 21, 21, 30]
FACENESS = [0.9, 0.8, 0.95, 0.5, 0.7, 0.99]
PAIRS = [(11, 12, 1), (11, 13, 0), (12, 13, 0), (13, 11, 0)]
SIZE = 112


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    images, landmarks = render_images([0, 0, 1, 1, 1, 2], [0, 1, 0, 1, 2, 0], image_size=SIZE,
                                      return_landmarks=True)
    root = tmp_path_factory.mktemp("ijb") / "IJBC"
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    for name, image in zip(NAMES, images):
        Image.fromarray(image).save(root / "loose_crop" / name)
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text(
        "".join(f"{n} {t} {m}\n" for n, t, m in zip(NAMES, TEMPLATES, MEDIAS)))
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("".join(
        f"{n} {' '.join(f'{v:.4f}' for v in lm.ravel())} {s}\n" for n, lm, s in zip(NAMES, landmarks, FACENESS)))
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("".join(f"{a} {b} {c}\n" for a, b, c in PAIRS))
    return root


def linear_model(dim: int = 8) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, dim))
    model.train()
    return model


def expected_features(model: nn.Module, meta: IJBMeta, root: Path, flip: bool) -> np.ndarray:
    images = np.concatenate([b.images for b in iter_aligned(meta, root, size=SIZE)])
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).double() - 127.5) / 127.5
    w, b = model[1].weight.detach().double(), model[1].bias.detach().double()
    out = x.flatten(1) @ w.T + b
    if flip:
        out = out + torch.flip(x, dims=[3]).flatten(1) @ w.T + b
    return out.numpy()


def hand_meta(templates, medias=None, pairs=((1, 2, 1), (1, 3, 0))) -> IJBMeta:
    n = len(templates)
    medias = list(range(n)) if medias is None else medias
    p = np.array(pairs, dtype=np.int64).reshape(-1, 3)
    return IJBMeta(name="IJBC", image_names=np.array([f"{i}.jpg" for i in range(n)]),
                   templates=np.array(templates, dtype=np.int64), medias=np.array(medias, dtype=np.int64),
                   landmarks=np.zeros((n, 5, 2), np.float32), faceness=np.ones(n, np.float32),
                   p1=p[:, 0], p2=p[:, 1], labels=p[:, 2])


# --------------------------------------------------------------------------------------------------
# image features and the cache
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flip", [True, False])
def test_embeddings_are_unnormalised_flip_sums(release, flip):
    meta = IJBMeta.load(release)
    model = linear_model()
    feats = ijb_embeddings(model, meta, release, batch_size=4, flip=flip)
    assert feats.dtype == np.float32 and feats.shape == (6, 8)
    np.testing.assert_allclose(feats, expected_features(model, meta, release, flip), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.linalg.norm(feats, axis=1), 1.0)  # the norm is kept (insightface "N1")
    assert model.training  # train mode restored


def test_cache_round_trip_and_mismatch(release, tmp_path):
    meta = IJBMeta.load(release)
    cache = tmp_path / "sub" / "feats.npy"
    feats = ijb_embeddings(linear_model(), meta, release, cache=cache)
    assert cache.is_file()
    np.testing.assert_array_equal(np.load(cache), feats)

    class Boom(nn.Module):
        def forward(self, x):
            raise AssertionError("the cache must be used")

    np.testing.assert_array_equal(ijb_embeddings(Boom(), meta, release, cache=cache), feats)
    # a cache path without ".npy" is written exactly there
    other = tmp_path / "feats.bin"
    ijb_embeddings(linear_model(), meta, release, cache=other)
    assert other.is_file() and not (tmp_path / "feats.bin.npy").exists()

    np.save(cache, np.zeros((5, 8), np.float32))
    with pytest.raises(ValueError, match=r"feats\.npy.*\(5, 8\).*6"):
        ijb_embeddings(Boom(), meta, release, cache=cache)
    np.save(cache, np.zeros(6, np.float32))
    with pytest.raises(ValueError, match=r"feats\.npy"):
        ijb_embeddings(Boom(), meta, release, cache=cache)


# --------------------------------------------------------------------------------------------------
# 1:1 verification
# --------------------------------------------------------------------------------------------------


def test_verification_end_to_end(release):
    meta = IJBMeta.load(release)
    feats = ijb_embeddings(linear_model(), meta, release)
    out = ijb_verification(feats, meta)
    assert set(out["tar_at_far"]) == {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1}
    assert out["scores"].shape == (4,) and out["labels"].tolist() == [1, 0, 0, 0]
    assert np.all(np.abs(out["scores"]) <= 1 + 1e-9)
    assert all(0.0 <= v <= 1.0 for v in out["tar_at_far"].values())


def test_verification_constructed_case():
    # templates 1..4, one image each; pairs: (1,2) genuine with cosine 0.6, (3,4) genuine with cosine 1,
    # (1,3) impostor with cosine 0.8, (2,4) impostor with cosine 0.
    feats = np.array([[1, 0], [0.6, 0.8], [0.8, 0.6], [0.8, 0.6]], dtype=np.float32) * [[2], [3], [1], [5]]
    pairs = ((1, 2, 1), (3, 4, 1), (1, 3, 0), (2, 4, 0))
    meta = hand_meta([1, 2, 3, 4], pairs=pairs)
    out = ijb_verification(feats, meta, fars=(0.1, 0.5, 1.0))
    np.testing.assert_allclose(out["scores"], [0.6, 1.0, 0.8, 0.96], atol=1e-6)
    # impostors score 0.8 and 0.96: no false accept allowed -> only the 1.0 pair; one -> still 1.0 only
    # (0.8 > 0.6); both -> all.
    assert out["tar_at_far"] == {0.1: 0.5, 0.5: 0.5, 1.0: 1.0}
    assert out["labels"].tolist() == [1, 1, 0, 0]
    # AUC = P(genuine score > impostor score) over the 2 x 2 pairs: 1.0 beats 0.8 and 0.96, 0.6 beats neither
    assert out["auc"] == pytest.approx(2 / 4, abs=1e-12)


def test_faceness_weight_changes_templates():
    # template 1: two medias; weighting one by faceness turns the template's direction
    meta = hand_meta([1, 1, 2, 3], medias=[0, 1, 2, 3], pairs=((1, 2, 1), (1, 3, 0)))
    meta.faceness = np.array([1.0, 0.0, 1.0, 1.0], np.float32)
    feats = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], np.float32)
    plain = ijb_verification(feats, meta, fars=(0.5,))
    weighted = ijb_verification(feats, meta, faceness_weight=True, fars=(0.5,))
    np.testing.assert_allclose(plain["scores"], [2 ** -0.5, 2 ** -0.5], atol=1e-6)
    np.testing.assert_allclose(weighted["scores"], [1.0, 0.0], atol=1e-6)


def test_feature_rows_must_match_meta():
    meta = hand_meta([1, 2, 3])
    with pytest.raises(ValueError, match=r"\(N, D\) with N = 3"):
        ijb_verification(np.zeros((2, 4)), meta)


# --------------------------------------------------------------------------------------------------
# 1:N identification
# --------------------------------------------------------------------------------------------------

GALLERY = {1: 100, 2: 200, 3: 300}


def id_case(probe_rows):
    """Gallery templates 1..3 with features e1..e3; probe templates 4.. with the given features."""
    gallery_feats = np.eye(4)[:3]
    feats = np.concatenate([gallery_feats, np.asarray(probe_rows, dtype=np.float64)])
    return feats, hand_meta(list(range(1, len(feats) + 1)))


def test_identification_probes_equal_to_their_gallery_template():
    feats, meta = id_case([[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1]])
    probes = {4: 100, 5: 200, 6: 999}  # 6 is non-mated, orthogonal to the gallery
    out = ijb_identification(feats, meta, GALLERY, probes)
    assert out["mated"] == 2 and out["non_mated"] == 1
    assert out["rank"] == {1: 1.0, 5: 1.0, 10: 1.0}  # ranks past the gallery size clip to it
    assert out["tpir_at_fpir"] == {0.01: 1.0, 0.1: 1.0}
    assert out["similarity"].shape == (3, 3)
    assert out["probe_templates"].tolist() == [4, 5, 6] and out["gallery_templates"].tolist() == [1, 2, 3]
    np.testing.assert_allclose(out["similarity"], [[1, 0, 0], [0, 1, 0], [0, 0, 0]], atol=1e-12)


def test_identification_known_misses():
    # probe 4 (subject 100) is nearer gallery 2 than its mate 1 (rank 2); probe 5 (200) equals gallery 2;
    # the non-mated probe 6 scores 0.6 against gallery 3; probe 7 (300) finds its mate 3 first, at 0.5.
    feats, meta = id_case([[0.3, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0.6, 0.8],
                           [0.3, 0, 0.5, (1 - 0.34) ** 0.5]])
    probes = {4: 100, 5: 200, 6: 999, 7: 300}
    out = ijb_identification(feats, meta, GALLERY, probes, fpirs=(0.5, 1.0), ranks=(1, 2))
    assert out["rank"][1] == pytest.approx(2 / 3)  # probe 4 misses rank 1
    assert out["rank"][2] == pytest.approx(1.0)
    # FPIR 0.5 of 1 non-mated probe: no false alarm allowed, threshold above 0.6: only probe 5 (score 1)
    assert out["tpir_at_fpir"][0.5] == pytest.approx(1 / 3)
    # FPIR 1: every threshold allowed; rank-1 identified probes are 5 and 7
    assert out["tpir_at_fpir"][1.0] == pytest.approx(2 / 3)


def test_identification_closed_set_gives_nan_tpir():
    feats, meta = id_case([[1, 0, 0, 0]])
    out = ijb_identification(feats, meta, GALLERY, {4: 100})
    assert np.isnan(out["tpir_at_fpir"][0.01]) and out["rank"][1] == 1.0


def test_identification_unknown_template_is_named():
    feats, meta = id_case([[1, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"probes: 1 of its 2 templates .*\[42\]"):
        ijb_identification(feats, meta, GALLERY, {4: 100, 42: 200})
    with pytest.raises(ValueError, match=r"gallery: 1 of its 2 templates .*\[77\]"):
        ijb_identification(feats, meta, {1: 100, 77: 1}, {4: 100})


# --------------------------------------------------------------------------------------------------
# 1:N CSV files
# --------------------------------------------------------------------------------------------------

HEADER = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID\n"


def test_reads_gallery_and_probes(tmp_path):
    g = tmp_path / "ijbc_1N_gallery_G1.csv"
    g.write_text(HEADER + "1,100,img/1.jpg,5\n1,100,img/2.jpg,6\n\n2,200,frames/3.png,7\n")
    assert read_1n_gallery(g) == {1: 100, 2: 200}
    p = tmp_path / "probe.csv"
    p.write_text("\ufeffsubject_id,FILENAME,template_id\n300,a.jpg,9\n 400 ,b.jpg, 10 \n")  # BOM, any order/case
    assert read_1n_probes(p) == {9: 300, 10: 400}


@pytest.mark.parametrize("text,match", [
    ("FILENAME,SUBJECT_ID\n1,a.jpg\n", r"bad.csv:1: .*TEMPLATE_ID"),
    (HEADER + "1,100,a.jpg,1\n2\n", r"bad.csv:3: .*fields"),
    (HEADER + "1,100,a.jpg,1\nx,100,b.jpg,1\n", r"bad.csv:3: TEMPLATE_ID .*'x'"),
    (HEADER + "1,1e2,a.jpg,1\n", r"bad.csv:2: SUBJECT_ID"),
    (HEADER + "1,100,a.jpg,1\n\n1,101,b.jpg,1\n", r"bad.csv:4: template 1 has subject 101.*line 2"),
    ("", r"bad.csv: empty"),
    (HEADER, r"bad.csv: .*no rows"),
])
def test_csv_errors_name_file_and_line(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_1n_gallery(path)


def test_missing_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_1n_probes(tmp_path / "nope.csv")


def test_eval_ijb_does_not_import_train():
    import ast

    import faceforge.eval.ijb as module

    tree = ast.parse(Path(module.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert names and not any(name.startswith("faceforge.train") or name == "train" for name in names)
