"""faceforge.data.ijb (read, align) and faceforge.eval.ijb (score): a miniature IJB-C release written to disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from faceforge.data.align import align_face
from faceforge.data.ijb import IJBMeta, iter_aligned
from faceforge.eval.ijb import template_features, verification_scores
from faceforge.data.synthetic import render_images

# 6 images, 3 templates; template 11 has one media of 2 images, 12 has media 20 (1 image) and 21 (2), 13 one image.
NAMES = ["1.png", "2.png", "3.png", "4.png", "5.png", "6.png"]
TEMPLATES = [11, 11, 12, 12, 12, 13]
MEDIAS = [10, 10, 20, 21, 21, 30]
FACENESS = [0.9, 0.8, 0.95, 0.5, 0.7, 0.99]
PAIRS = [(11, 12, 1), (11, 13, 0), (12, 13, 0), (13, 11, 0)]


@pytest.fixture(scope="module")
def rendered():
    return render_images([0, 0, 1, 1, 1, 2], [0, 1, 0, 1, 2, 0], image_size=112, return_landmarks=True)


def write_release(root: Path, images: np.ndarray, landmarks: np.ndarray, prefix: str = "ijbc") -> Path:
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    for name, image in zip(NAMES, images):
        Image.fromarray(image).save(root / "loose_crop" / name)
    (root / "meta" / f"{prefix}_face_tid_mid.txt").write_text(
        "".join(f"{n} {t} {m}\n" for n, t, m in zip(NAMES, TEMPLATES, MEDIAS)))
    (root / "meta" / f"{prefix}_name_5pts_score.txt").write_text("".join(
        f"{n} {' '.join(f'{v:.4f}' for v in lm.ravel())} {s}\n" for n, lm, s in zip(NAMES, landmarks, FACENESS)))
    (root / "meta" / f"{prefix}_template_pair_label.txt").write_text("".join(f"{a} {b} {c}\n" for a, b, c in PAIRS))
    return root


@pytest.fixture
def release(tmp_path, rendered):
    return write_release(tmp_path / "IJBC", *rendered)


def test_parses_the_meta_files(release, rendered):
    meta = IJBMeta.load(release, "IJBC")
    assert len(meta) == 6 and meta.name == "IJBC"
    assert meta.image_names.tolist() == NAMES
    assert meta.templates.tolist() == TEMPLATES and meta.medias.tolist() == MEDIAS
    assert meta.landmarks.dtype == np.float32 and meta.landmarks.shape == (6, 5, 2)
    np.testing.assert_allclose(meta.landmarks, rendered[1], atol=1e-4)
    np.testing.assert_allclose(meta.faceness, FACENESS, rtol=1e-6)
    assert meta.p1.tolist() == [p[0] for p in PAIRS] and meta.p2.tolist() == [p[1] for p in PAIRS]
    assert meta.labels.tolist() == [p[2] for p in PAIRS]


def test_ijbb_file_names(tmp_path, rendered):
    root = write_release(tmp_path / "IJBB", *rendered, prefix="ijbb")
    assert IJBMeta.load(root, "IJBB").image_names.tolist() == NAMES
    with pytest.raises(FileNotFoundError, match="ijbc_face_tid_mid.txt"):
        IJBMeta.load(root, "IJBC")


def test_aligned_batches_in_file_order(release, rendered):
    meta = IJBMeta.load(release)
    batches = list(iter_aligned(meta, release, size=112, batch_size=4))
    assert [len(b.images) for b in batches] == [4, 2]
    images = np.concatenate([b.images for b in batches])
    assert images.dtype == np.uint8 and images.shape == (6, 112, 112, 3)
    assert np.concatenate([b.templates for b in batches]).tolist() == TEMPLATES
    assert np.concatenate([b.medias for b in batches]).tolist() == MEDIAS
    np.testing.assert_allclose(np.concatenate([b.faceness for b in batches]), FACENESS, rtol=1e-6)
    for i in (0, 5):  # PNG is lossless: the crop is align_face of the rendered image
        np.testing.assert_array_equal(images[i], align_face(rendered[0][i], meta.landmarks[i], 112))
    small = next(iter_aligned(meta, release, size=64, batch_size=8)).images
    assert small.shape == (6, 64, 64, 3)


def loop_template_features(feats, templates, medias, faceness=None):
    feats = np.asarray(feats, dtype=np.float64)
    if faceness is not None:
        feats = feats * np.asarray(faceness, dtype=np.float64)[:, None]
    out = {}
    for t in sorted(set(templates)):
        total = np.zeros(feats.shape[1])
        for m in sorted({m for tt, m in zip(templates, medias) if tt == t}):
            rows = [i for i in range(len(templates)) if templates[i] == t and medias[i] == m]
            total += feats[rows].mean(0)
        out[t] = total / np.linalg.norm(total)
    return out


@pytest.mark.parametrize("use_faceness", [False, True])
def test_template_features_match_a_plain_loop(use_faceness):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(6, 8))
    # shuffle the image order: grouping must not depend on it
    perm = rng.permutation(6)
    t, m, f = (np.array(TEMPLATES)[perm], np.array(MEDIAS)[perm], np.array(FACENESS)[perm])
    faceness = f if use_faceness else None
    ids, out = template_features(feats[perm], t, m, faceness=faceness)
    expect = loop_template_features(feats[perm], t.tolist(), m.tolist(), faceness)
    assert ids.tolist() == [11, 12, 13] and out.dtype == np.float64
    for k, tid in enumerate(ids.tolist()):
        np.testing.assert_allclose(out[k], expect[tid], atol=1e-12)
    ids32, out32 = template_features(feats[perm].astype(np.float32), t, m, faceness=faceness)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out, atol=1e-6)


def test_media_mean_then_template_sum():
    # template 12: media 20 is [1, 0], media 21 averages to [0, 1]: sum [1, 1] -> [1, 1] / sqrt 2
    feats = np.array([[1, 0], [1, 0], [1, 0], [0, 3], [0, -1], [0, 2]], dtype=np.float64)
    ids, out = template_features(feats, TEMPLATES, MEDIAS)
    np.testing.assert_allclose(out, [[1, 0], [2 ** -0.5, 2 ** -0.5], [0, 1]], atol=1e-12)
    ids_t, out_t = template_features(torch.tensor(feats, requires_grad=True), TEMPLATES, MEDIAS)  # a tensor works too
    assert ids_t.tolist() == [11, 12, 13]
    np.testing.assert_allclose(out_t, out, atol=1e-12)


def test_verification_scores_by_hand():
    ids = np.array([13, 11, 12])  # any row order
    feats = np.array([[0.0, 2.0], [1.0, 0.0], [1.0, 1.0]])
    p1, p2 = np.array([11, 11, 12, 13, 12]), np.array([12, 13, 13, 11, 12])
    expect = [2 ** -0.5, 0.0, 2 ** -0.5, 0.0, 1.0]
    for chunk in (1, 2, 100_000):
        np.testing.assert_allclose(verification_scores(ids, feats, p1, p2, chunk_size=chunk), expect, atol=1e-12)
    with pytest.raises(ValueError, match="template 99"):
        verification_scores(ids, feats, np.array([11, 99]), np.array([12, 12]), chunk_size=1)


def test_end_to_end_scores_on_the_release(release):
    meta = IJBMeta.load(release)
    feats = np.concatenate([b.images.reshape(len(b.images), -1)[:, ::97] for b in iter_aligned(meta, release)])
    ids, tf = template_features(feats.astype(np.float32), meta.templates, meta.medias, meta.faceness)
    scores = verification_scores(ids, tf, meta.p1, meta.p2)
    assert scores.shape == (4,) and np.all(np.abs(scores) <= 1 + 1e-6)


def replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("file,line,text,match", [
    ("ijbc_face_tid_mid.txt", 3, "3.png 12", r"ijbc_face_tid_mid.txt:3: .*2 fields"),
    ("ijbc_face_tid_mid.txt", 2, "2.png eleven 10", r"ijbc_face_tid_mid.txt:2: template_id"),
    ("ijbc_name_5pts_score.txt", 4, "4.png 1 2 3", r"ijbc_name_5pts_score.txt:4: .*4 fields"),
    ("ijbc_name_5pts_score.txt", 5, "5.png 1 2 3 4 5 6 7 8 9 x 0.5", r"ijbc_name_5pts_score.txt:5: .*number"),
    ("ijbc_template_pair_label.txt", 2, "11 13", r"ijbc_template_pair_label.txt:2: .*2 fields"),
    ("ijbc_template_pair_label.txt", 3, "12 13 yes", r"ijbc_template_pair_label.txt:3: label"),
    ("ijbc_template_pair_label.txt", 1, "11 12 2", r"ijbc_template_pair_label.txt:1: label"),
])
def test_malformed_lines_name_file_and_line(release, file, line, text, match):
    replace_line(release / "meta" / file, line, text)
    with pytest.raises(ValueError, match=match):
        IJBMeta.load(release)


def test_missing_landmarks_name_the_image(release):
    path = release / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"ijbc_name_5pts_score.txt.*'3.png'"):
        IJBMeta.load(release)


def test_landmarks_out_of_order(release):
    path = release / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"ijbc_name_5pts_score.txt:1: image '2.png' is out of order"):
        IJBMeta.load(release)


def test_missing_and_undecodable_images_are_named(release):
    meta = IJBMeta.load(release)
    (release / "loose_crop" / "5.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"loose_crop[/\\]5.png"):
        list(iter_aligned(meta, release, batch_size=2))
    (release / "loose_crop" / "5.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"loose_crop[/\\]5.png"):
        list(iter_aligned(meta, release, batch_size=2))
