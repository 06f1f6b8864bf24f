"""Using a model: ``faceforge.load_model(path) -> Recognizer`` with ``embed``, ``verify`` and ``search``,
and :class:`Gallery`, a faiss index of identities that can be saved, reloaded, rebuilt and appended to.

``load_model`` takes a run folder, a ``faceforge train`` checkpoint (``last.pt``), a
``model.safetensors`` (+ ``model.json``) or an ``.onnx`` file: one exported by ``faceforge export``
(its metadata says everything), or any face-embedding ONNX model with one NCHW image input given its
normalisation (``mean``, ``std``, ``channel_order``), e.g. OpenCV's SFace.

Images are file paths, PIL images or uint8 RGB arrays ``(H, W, 3)`` (or a stack ``(N, H, W, 3)``):
aligned ``S x S`` crops (S = the model's image size), or any photo with ``detect=True`` (YuNet + the
ArcFace 5-point alignment; the optional ``faceforge[detect]`` extra).

Embeddings are float32 ``(N, D)``, L2-normalised; with ``flip_test`` they are ``normalize(f(x) +
f(flip(x)))``, as ``faceforge eval`` computes them. Scores are cosines. A NaN or infinite embedding is an
error naming the model and the image (``faceforge.eval.finite``), never a result.

A model file is data: its metadata may name only registered backbones unless ``trust_code=True``
(``docs/inference.md``, "What is safe to load"). A :class:`Gallery` records the fingerprint of the model that
built it (:meth:`Recognizer.fingerprint`); searching it with another model is refused unless forced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from faceforge.deploy.modelfile import META_KEY, MODEL_JSON, MODEL_WEIGHTS, ModelFileError, ModelInfo

__all__ = [
    "Gallery",
    "as_backbone",
    "ImageError",
    "Match",
    "Recognizer",
    "Verification",
    "load_images",
    "load_model",
]

INDEX_KINDS = ("flat", "ivf", "hnsw")
ONNX_LOG_SEVERITY = 3  # onnxruntime: 0 verbose, 1 info, 2 warning, 3 error -- only errors reach the user


class ImageError(ValueError):
    """An image that cannot be decoded, has the wrong size, or (with detection) shows no face; names it."""


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def _describe(item: Any, k: int) -> str:
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"image {k}"


def _as_rgb(item: Any, name: str) -> np.ndarray:
    """uint8 RGB (H, W, 3) of a path, a PIL image or an array."""
    if isinstance(item, (str, os.PathLike)):
        from faceforge.data.folder import DatasetError, decode_image

        try:
            return decode_image(item)
        except DatasetError as e:
            raise ImageError(str(e)) from None
    if hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image
        from faceforge.data.images import to_rgb

        return to_rgb(item, name, error=ImageError)
    a = np.asarray(item)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ImageError(f"{name}: expected a path, a PIL image or a uint8 (H, W, 3) RGB array, got "
                         f"{a.dtype} array of shape {a.shape}")
    return a


def _items(images: Any) -> list[Any]:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "convert"):
        return [images]
    return list(images)


def load_images(
    images: Any,
    image_size: int,
    detect: bool = False,
    skip_bad: bool = False,
    detector: Callable[[np.ndarray], list] | None = None,
) -> tuple[np.ndarray, list[str], list[str]]:
    """Decode (and with ``detect`` detect and align) images into aligned crops.

    Returns:
        ``(crops uint8 (N, S, S, 3), names of the N images kept, "name: reason" of each one skipped)``.
        Without ``skip_bad`` the first bad image raises :class:`ImageError` naming it.
    """
    items = _items(images)
    if detect and detector is None:
        from faceforge.data.detect import YuNetDetector

        detector = YuNetDetector()
    batches = list(_crop_batches(items, image_size, detector if detect else None, skip_bad, max(len(items), 1)))
    crops = [c for b in batches for c in b[0]]
    stacked = np.stack(crops) if crops else np.zeros((0, image_size, image_size, 3), np.uint8)
    return stacked, [n for b in batches for n in b[1]], [x for b in batches for x in b[2]]


def _crop_batches(items: Sequence[Any], image_size: int, detector: Callable | None, skip_bad: bool,
                  batch_size: int) -> Iterable[tuple[list[np.ndarray], list[str], list[str], int]]:
    """``(crops, names kept, skipped "name: reason", images read)`` per ``batch_size`` items, decoded lazily
    (memory holds one batch of images, whatever their number)."""
    for start in range(0, len(items), batch_size):
        crops, names, skipped = [], [], []
        chunk = items[start : start + batch_size]
        for k, item in enumerate(chunk, start):
            name = _describe(item, k)
            try:
                crops.append(_crop(item, name, image_size, detector))
                names.append(name)
            except ImageError as e:
                if not skip_bad:
                    raise
                skipped.append(str(e))
        yield crops, names, skipped, len(chunk)


def _crop(item: Any, name: str, size: int, detector: Callable | None) -> np.ndarray:
    rgb = _as_rgb(item, name)
    if detector is None:
        if rgb.shape[:2] != (size, size):
            raise ImageError(f"{name}: image is {rgb.shape[1]}x{rgb.shape[0]}, expected a {size}x{size} aligned face "
                             "(or detect and align it: --detect / detect=True)")
        return rgb
    from faceforge.data.align import align_face
    from faceforge.data.detect import best_face

    face = best_face(detector.detect(rgb) if hasattr(detector, "detect") else detector(rgb))
    if face is None:
        raise ImageError(f"{name}: no face detected")
    return align_face(rgb, face[1], size)


# --------------------------------------------------------------------------------------------------
# Backends: float32 NCHW batch -> (B, D) numpy
# --------------------------------------------------------------------------------------------------


class TorchBackend:
    """A PyTorch backbone in eval mode, under ``torch.no_grad``. ``digest()``: sha256 of its weights."""

    def __init__(self, module: Any, device: str | None = None) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device) if device else next(module.parameters()).device
        self.module = module.to(self.device).eval()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self.module(self.torch.from_numpy(x).to(self.device)).float().cpu().numpy()

    def digest(self) -> str:
        """sha256 of the state dict (names, dtypes, shapes, bytes): equal for a run's last.pt and its
        model.safetensors, different for any changed weight."""
        h = hashlib.sha256()
        for name, t in sorted(self.module.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(self.torch.uint8).numpy().tobytes())
        return h.hexdigest()


class OnnxBackend:
    """An ONNX model run by onnxruntime (CPU): one NCHW float input, the first output is the embedding."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        options.log_severity_level = ONNX_LOG_SEVERITY
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
            if len(self.session.get_inputs()) > 1:  # e.g. SFace int8bq: dangling weight names listed as inputs
                self.session = ort.InferenceSession(_without_dangling_inputs(path), options,
                                                    providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelFileError(f"{path}: cannot load ONNX model: {e}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            got = [(i.name, i.shape) for i in inputs]
            raise ModelFileError(f"{path}: expected one NCHW image input (B, 3, H, W), got inputs {got}")
        self.input_name = inputs[0].name
        self.input_shape = inputs[0].shape

        batch = self.input_shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None  # SFace: fixed batch 1

    def __call__(self, x: np.ndarray) -> np.ndarray:
        step = self.fixed_batch or max(len(x), 1)
        if self.fixed_batch and len(x) % step:
            raise ValueError(f"this ONNX model takes batches of exactly {step} images, got {len(x)}")
        outs = [self.session.run(None, {self.input_name: np.ascontiguousarray(x[s : s + step])})[0]
                for s in range(0, len(x), step)]
        return np.concatenate([np.asarray(o, dtype=np.float32).reshape(len(o), -1) for o in outs])

    def digest(self) -> str:
        """sha256 of the ONNX file."""
        return _file_sha256(self.path)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _without_dangling_inputs(path: str | os.PathLike) -> bytes:
    """The model with the graph inputs that no node reads (or that a node or an initializer provides)
    removed, serialised. Some quantised exports (OpenCV Zoo's SFace int8bq) list such names as inputs,
    which onnxruntime then requires to be fed."""
    import onnx

    model = onnx.load(os.fspath(path))
    consumed = {name for node in model.graph.node for name in node.input}
    provided = {name for node in model.graph.node for name in node.output} | {i.name for i in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name in consumed and i.name not in provided]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return model.SerializeToString()


# --------------------------------------------------------------------------------------------------
# The recogniser
# --------------------------------------------------------------------------------------------------


@dataclass
class Verification:
    """One comparison: ``cosine`` and ``same = cosine >= threshold`` (None without a threshold)."""

    cosine: float
    same: bool | None
    threshold: float | None
    threshold_far: float | None = None
    threshold_source: str | None = None


@dataclass
class Match:
    """A gallery entry found for a probe: its identity, cosine score and file."""

    identity: str
    score: float
    file: str = ""


_VECTORS, _SCALARS = (True, np.float32), (False, np.float64)  # Recognizer._stream's outputs: embeddings, norms


@dataclass
class Recognizer:
    """A face-embedding model with its :class:`~faceforge.deploy.modelfile.ModelInfo`.

    ``backend`` maps a float32 ``(B, 3, S, S)`` batch, already normalised, to ``(B, D)``.
    """

    backend: Callable[[np.ndarray], np.ndarray]
    info: ModelInfo
    source: str = ""
    detector: Any = field(default=None, repr=False)
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def image_size(self) -> int:
        return self.info.image_size

    def preprocess(self, crops: np.ndarray) -> np.ndarray:
        """uint8 RGB ``(N, S, S, 3)`` -> float32 ``(N, 3, S, S)``: channel order, then ``(x - mean) / std``."""
        x = crops[..., ::-1] if self.info.channel_order == "BGR" else crops
        mean = np.asarray(self.info.mean, np.float32)
        std = np.asarray(self.info.std, np.float32)
        return np.ascontiguousarray(((x.astype(np.float32) - mean) / std).transpose(0, 3, 1, 2))

    @property
    def name(self) -> str:
        """The model as errors name it: the file it was loaded from, else its metadata name."""
        return self.source or self.info.name or "model"

    def fingerprint(self) -> str:
        """What a gallery records of the model that built it: sha256 (hex) of the weights (the state dict of a
        torch model, the file of an ONNX model) and of how images are fed (image size, mean, std, channel order,
        flip test). "" for a backend that cannot say what its weights are."""
        if self._fingerprint is None:
            digest = getattr(self.backend, "digest", None)
            feed = {k: getattr(self.info, k) for k in ("image_size", "mean", "std", "channel_order", "flip_test")}
            self._fingerprint = "" if digest is None else hashlib.sha256(
                json.dumps({"weights": digest(), **feed}, sort_keys=True).encode()).hexdigest()
        return self._fingerprint

    def _embed_batch(self, crops: np.ndarray, names: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 ``(B, D)`` of one batch of uint8 crops ``(B, S, S, 3)``; a non-finite
        embedding is a NonFiniteEmbeddingError naming the model and ``names[i]``."""
        return self._embed_and_norm(crops, names)[0]

    def _embed_and_norm(self, crops: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(L2-normalised float32 (B, D), float64 (B,) |f(x)|)`` of one batch: the embeddings of
        :meth:`_embed_batch` and the norm of the raw output of the unflipped image (:meth:`quality`)."""
        from faceforge.eval.finite import require_finite

        x, e = self._raw(crops, names)
        norms = np.linalg.norm(e.astype(np.float64), axis=1)
        if self.info.flip_test:
            e = e + self.backend(np.ascontiguousarray(x[..., ::-1]))  # flip the width axis
        require_finite(e, self.name, names)
        return (e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)).astype(np.float32), norms

    def _raw(self, crops: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(the network's input float32 (B, 3, S, S), its raw output float32 (B, D))``; a non-finite output is a
        NonFiniteEmbeddingError naming the model and ``names[i]``."""
        from faceforge.eval.finite import require_finite

        x = self.preprocess(crops)
        e = self.backend(x).astype(np.float32)
        require_finite(e, self.name, names)
        return x, e

    def _norm_batch(self, crops: np.ndarray, names: Sequence[str]) -> np.ndarray:
        """float64 ``(B,)``: ``|f(x)|``, the norm of the backbone's raw output (no flip, before normalisation)."""
        return np.linalg.norm(self._raw(crops, names)[1].astype(np.float64), axis=1)

    def quality_note(self) -> str | None:
        """None when this model's head trains its embedding norm as a quality (MagFace, AdaFace: ``model.json``'s
        ``norm_is_quality``), else the one-line note that its norm is not a calibrated quality score."""
        from faceforge.deploy.modelfile import quality_note

        return quality_note(self.info)

    def _note_quality(self) -> None:
        note = self.quality_note()
        if note:
            logging.getLogger("faceforge").warning("note: %s", note)

    def quality(self, images: Any, detect: bool = False, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """float64 ``(N,)``: each image's embedding norm ``|f(x)|`` before normalisation (the backbone's raw output
        for the image as given, no flip): MagFace's magnitude, the quality score of a model trained with a
        norm-aware head (MagFace, AdaFace; higher = better). For any other model the norm is still returned, with a
        one-line logged note that it is not a calibrated quality score. Images as for :meth:`embed`."""
        self._note_quality()
        return self._stream(images, detect, False, batch_size, progress, lambda c, n: (self._norm_batch(c, n),),
                            [_SCALARS])[0][0]

    def embed_crops(self, crops: np.ndarray, batch_size: int = 64, progress: bool = False,
                    names: Sequence[str] | None = None) -> np.ndarray:
        """L2-normalised float32 ``(N, D)`` of aligned uint8 crops ``(N, S, S, 3)``; ``names`` (default
        "image k") name them in errors."""
        _check_batch_size(batch_size)
        names = list(names) if names is not None else [f"image {k}" for k in range(len(crops))]
        bar = _progress(len(crops), progress)
        out = [np.zeros((0, self.info.embedding_size), np.float32)]
        for s in range(0, len(crops), batch_size):
            out.append(self._embed_batch(crops[s : s + batch_size], names[s : s + batch_size]))
            bar.update(len(out[-1]))
        bar.close()
        return np.concatenate(out)

    def embed(self, images: Any, detect: bool = False, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """L2-normalised float32 ``(N, D)`` embeddings of paths, PIL images or uint8 arrays (see module notes).
        A bad image raises :class:`ImageError` naming it."""
        return self.embed_files(images, detect=detect, batch_size=batch_size, progress=progress)[0]

    def embed_files(self, images: Any, detect: bool = False, skip_bad: bool = False, batch_size: int = 64,
                    progress: bool = False) -> tuple[np.ndarray, list[str], list[str]]:
        """``(embeddings (N, D), names kept, skipped "name: reason")``; bad images skipped only with ``skip_bad``.

        Streams: images are decoded ``batch_size`` at a time, so memory holds one batch of images and the
        ``(N, D)`` embeddings, whatever N; the progress bar counts images."""
        (emb,), kept, skipped = self._stream(images, detect, skip_bad, batch_size, progress,
                                             lambda c, n: (self._embed_batch(c, n),), [_VECTORS])
        return emb, kept, skipped

    def embed_files_with_quality(self, images: Any, detect: bool = False, skip_bad: bool = False,
                                 batch_size: int = 64, progress: bool = False
                                 ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        """``(embeddings (N, D), quality float64 (N,), names kept, skipped)``: :meth:`embed_files` and, from the same
        forward pass, each image's :meth:`quality` (with its note for a model whose norm is not a quality)."""
        self._note_quality()
        (emb, quality), kept, skipped = self._stream(images, detect, skip_bad, batch_size, progress,
                                                     self._embed_and_norm, [_VECTORS, _SCALARS])
        return emb, quality, kept, skipped

    def _stream(self, images: Any, detect: bool, skip_bad: bool, batch_size: int, progress: bool,
                step: Callable[[np.ndarray, list[str]], tuple[np.ndarray, ...]],
                shapes: Sequence[tuple[bool, type]]) -> tuple[list[np.ndarray], list[str], list[str]]:
        """``step(crops, names)`` on every batch of decoded crops, each of its outputs concatenated over the
        batches; ``shapes``: ``(per-image vectors (N, D) or scalars (N,), dtype)`` of each output, for no image."""
        _check_batch_size(batch_size)
        items = _items(images)
        bar = _progress(len(items), progress)
        d = self.info.embedding_size
        parts: list[list[np.ndarray]] = [[np.zeros((0, d) if width else (0,), dtype)] for width, dtype in shapes]
        kept: list[str] = []
        skipped: list[str] = []
        for crops, names, bad, read in _crop_batches(items, self.image_size, self._detector(detect), skip_bad,
                                                     batch_size):
            if crops:
                for found, out in zip(parts, step(np.stack(crops), names)):
                    found.append(out)
            kept += names
            skipped += bad
            bar.update(read)
        bar.close()
        return [np.concatenate(p) for p in parts], kept, skipped

    def _detector(self, detect: bool) -> Any:
        if detect and self.detector is None:
            from faceforge.data.detect import YuNetDetector

            self.detector = YuNetDetector()
        return self.detector if detect else None

    def verify(self, a: Any, b: Any, threshold: float | None = None, detect: bool = False) -> Verification:
        """Cosine of two faces and the decision at ``threshold`` (a cosine in [-1, 1]; default: the model's own,
        if it has one)."""
        if threshold is not None and not (_is_real(threshold) and -1.0 <= threshold <= 1.0):
            raise ValueError(f"threshold: got {threshold!r}, expected a cosine in [-1, 1]")
        e = self.embed([a, b], detect=detect)
        cosine = float(np.dot(e[0].astype(np.float64), e[1].astype(np.float64)))
        own = threshold is None
        t = self.info.threshold if own else float(threshold)
        return Verification(cosine, None if t is None else cosine >= t, t,
                            self.info.threshold_far if own else None, self.info.threshold_source if own else "given")

    def search(self, gallery: "Gallery | str | os.PathLike", probes: Any, top: int = 5,
               detect: bool = False, force: bool = False) -> list[list[Match]]:
        """The ``top`` best gallery matches of each probe, best first. The gallery must have been built by this
        model (:meth:`check_gallery`; ``force`` skips the fingerprint comparison, never the dimension's)."""
        g = gallery if isinstance(gallery, Gallery) else Gallery.load(gallery)
        self.check_gallery(g, force)
        return g.search(self.embed(probes, detect=detect), top)

    def check_gallery(self, g: "Gallery", force: bool = False) -> None:
        """ValueError naming both models when ``g`` was built by another model (another dimension; or, unless
        ``force``, another :meth:`fingerprint`, or none recorded): its embeddings are not comparable."""
        where = g.folder or "gallery"
        if g.dim != self.info.embedding_size:
            raise ValueError(f"{where}: its embeddings are {g.dim}-D (model {g.model or '?'}), this model's are "
                             f"{self.info.embedding_size}-D ({self.name}); rebuild it with `faceforge search build`")
        mine = self.fingerprint()
        if not force and (not mine or g.fingerprint != mine):
            theirs = f"fingerprint {g.fingerprint[:12]}" if g.fingerprint else "no fingerprint recorded"
            raise ValueError(f"{where}: built with model {g.model or '?'} ({theirs}), not with {self.name} "
                             f"(fingerprint {mine[:12] or 'unknown'}); embeddings of different models are not "
                             "comparable: rebuild it with `faceforge search build`, or --force (force=True)")


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool) and math.isfinite(x)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, show: bool) -> Any:
    """A tqdm bar counting images (or one that shows nothing)."""
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="embed", unit="image")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def onnx_model_info(path: str | os.PathLike) -> ModelInfo | None:
    """The faceforge metadata stored in an ONNX file by ``faceforge export``, or None (a foreign model)."""
    import onnx

    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as e:
        raise ModelFileError(f"{path}: cannot read ONNX model: {e}") from None
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props:
        return None
    try:
        data = json.loads(props[META_KEY])
    except ValueError as e:
        raise ModelFileError(f"{path}: ONNX metadata {META_KEY!r}: not JSON: {e}") from None
    return ModelInfo.from_dict(data, f"{path} (ONNX metadata)")


FOREIGN_KEYS = ("mean", "std")


def _foreign_info(path: Path, backend: OnnxBackend, given: dict[str, Any]) -> ModelInfo:
    missing = [k for k in FOREIGN_KEYS if k not in given]
    if missing:
        raise ModelFileError(
            f"{path}: no faceforge metadata (not written by `faceforge export`); {', '.join(missing)}: missing, "
            "expected the model's normalisation: load_model(path, mean=(m, m, m), std=(s, s, s), "
            "channel_order='RGB'|'BGR') or --mean/--std/--channel-order")
    shape = backend.input_shape
    size = given.get("image_size") or (shape[2] if isinstance(shape[2], int) else None)
    if size is None:
        raise ModelFileError(f"{path}: image_size: the input's height is dynamic ({shape}); pass image_size")
    out = backend.session.get_outputs()[0].shape
    dim = out[-1] if isinstance(out[-1], int) else None
    if dim is None:
        dim = int(backend(np.zeros((1, 3, size, size), np.float32)).shape[1])
    keys = {"mean", "std", "channel_order", "flip_test", "threshold", "threshold_source", "threshold_far", "name"}
    extra = {k: v for k, v in given.items() if k in keys}
    data = {"backbone": f"onnx:{path.name}", "embedding_size": int(dim), "image_size": int(size),
            "flip_test": False, "name": path.stem, **extra}
    if "threshold" in extra and "threshold_source" not in extra:
        data["threshold_source"] = "given"
    return ModelInfo.from_dict(data, str(path))


def load_model(path: str | os.PathLike, device: str | None = None, threads: int | None = None,
               trust_code: bool = False, **foreign: Any) -> Recognizer:
    """A :class:`Recognizer` from a run folder, a checkpoint (``.pt``), ``model.safetensors`` or ``.onnx``.

    Args:
        path: a run folder (its ``model.safetensors``, else its ``last.pt``), a file of one of these kinds.
        device: PyTorch device for torch models (default CPU); ONNX models run on the CPU.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        trust_code: let the file's metadata (``model.json``, the safetensors header, a checkpoint's config)
            name a backbone to import (``"package.module:callable"``). Default False: only registered
            backbones, so a file from a stranger cannot run code. Set it only for files whose author you trust.
        foreign: for an ONNX model without faceforge metadata: ``mean``, ``std`` (3 numbers each, 0..255
            scale), optionally ``channel_order`` ("RGB" default or "BGR"), ``image_size``, ``flip_test``
            (default False), ``threshold``; or the same keys in ``<model>.json`` beside the ``.onnx``
            (arguments win). With faceforge metadata, any of these overrides it.

    Raises:
        ModelFileError naming the file and what is missing or wrong (an import named without
        ``trust_code`` included: nothing is imported). Nothing is unpickled: checkpoints load with
        ``weights_only=True``.
    """
    from faceforge.deploy.modelfile import backbone_from_checkpoint, load_backbone, resolve_model_path

    p = resolve_model_path(path)
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        backend = OnnxBackend(p, threads)
        info = onnx_model_info(p)
        if info is None:
            info = _foreign_info(p, backend, {**_sidecar(p), **foreign})
        elif foreign:
            info = ModelInfo.from_dict({**_info_dict(info), **foreign}, f"{p} (metadata with overrides)")
        return Recognizer(backend, info, str(p))
    if suffix == ".safetensors":
        module, info = load_backbone(p, trust_code=trust_code)
    elif suffix == ".json":
        raise ModelFileError(f"{p}: give the weights ({MODEL_WEIGHTS}) or the run folder, not {MODEL_JSON}")
    else:
        module, info = backbone_from_checkpoint(p, trust_code=trust_code)
    if foreign:
        info = ModelInfo.from_dict({**_info_dict(info), **foreign}, f"{p} (metadata with overrides)")
    return Recognizer(TorchBackend(module, device or "cpu"), info, str(p))


def _info_dict(info: ModelInfo) -> dict[str, Any]:
    return json.loads(info.to_json())


def _sidecar(path: Path) -> dict[str, Any]:
    """``<model>.json`` beside a foreign ONNX model: its normalisation etc. (the keys of ``model.json``), or {}."""
    side = path.with_suffix(".json")
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{side}: cannot read JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{side}: expected a JSON object (mean, std, channel_order, ...), got {type(data).__name__}")
    return data


def as_backbone(recognizer: Recognizer) -> Any:
    """The recogniser as a faceforge backbone for :mod:`faceforge.eval` (which adds the flip itself):
    ``(B, 3, S, S)`` float images normalised as ``(x - 127.5) / 127.5`` -> ``(B, D)``. A faceforge torch
    model is returned as is; any other is wrapped so that each batch is fed the model's own way."""
    backend = recognizer.backend
    info = recognizer.info
    default = info.mean == (127.5,) * 3 and info.std == (127.5,) * 3 and info.channel_order == "RGB"
    if isinstance(backend, TorchBackend) and default:
        return backend.module
    return _RecognizerBackbone(recognizer)


def _RecognizerBackbone(recognizer: Recognizer) -> Any:
    import torch

    class RecognizerBackbone(torch.nn.Module):
        """A :class:`Recognizer` behind the backbone interface of :func:`as_backbone`."""

        def __init__(self) -> None:
            super().__init__()
            self.recognizer = recognizer
            self.input_size = recognizer.image_size

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            info = self.recognizer.info
            u = x.detach().float().cpu().numpy() * 127.5 + 127.5  # back to 0..255 RGB
            if info.channel_order == "BGR":
                u = u[:, ::-1]
            mean = np.asarray(info.mean, np.float32).reshape(1, 3, 1, 1)
            std = np.asarray(info.std, np.float32).reshape(1, 3, 1, 1)
            out = self.recognizer.backend(np.ascontiguousarray((u - mean) / std, dtype=np.float32))
            return torch.from_numpy(out).to(x.device)

    return RecognizerBackbone()


# --------------------------------------------------------------------------------------------------
# Gallery: a faiss index of identities
# --------------------------------------------------------------------------------------------------


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError('the search index needs faiss: pip install "faceforge[search]" (faiss-cpu==1.15.1)') from e
    return faiss


def make_index(embeddings: np.ndarray, kind: str = "flat", nlist: int | None = None, nprobe: int = 16,
               hnsw_m: int = 32, ef_search: int = 64, seed: int = 0) -> Any:
    """A faiss inner-product index over L2-normalised float32 ``(N, D)`` embeddings (cosine = inner product).

    kind: ``flat`` (exact, ``IndexFlatIP``), ``ivf`` (``IndexIVFFlat``: ``nlist`` k-means cells, default
    ``4 sqrt(N)``, trained on the embeddings; ``nprobe`` cells searched) or ``hnsw`` (``IndexHNSWFlat``,
    ``hnsw_m`` links, ``ef_search``).
    """
    faiss = _faiss()
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        cells = nlist or max(1, min(int(4 * math.sqrt(max(n, 1))), max(n // 39, 1)))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, cells, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(x)
        index.nprobe = min(nprobe, cells)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    else:
        raise ValueError(f"index kind {kind!r}: expected one of {', '.join(INDEX_KINDS)}")
    index.add(x)
    return index


# faiss options a gallery may carry (gallery.json "options", Gallery.rebuild): name -> (low, high); nlist is
# also bounded by the number of embeddings (k-means needs at least one point per cell)
INDEX_OPTIONS: dict[str, tuple[int, int]] = {"nlist": (1, 1 << 20), "nprobe": (1, 1 << 20), "hnsw_m": (2, 256),
                                             "ef_search": (1, 1 << 16), "seed": (0, (1 << 31) - 1)}
# the faiss class of each kind (index.faiss is compared with gallery.json before it is used)
INDEX_CLASSES = {"flat": "IndexFlatIP", "ivf": "IndexIVFFlat", "hnsw": "IndexHNSWFlat"}


def check_index_options(options: Any, n: int, where: str) -> dict[str, int]:
    """``options`` (a dict of :data:`INDEX_OPTIONS`, ints in range) or ValueError naming ``where`` and the key."""
    if not isinstance(options, dict):
        raise ValueError(f"{where}: options: expected a JSON object of {', '.join(INDEX_OPTIONS)}, "
                         f"got {type(options).__name__}")
    for key, value in options.items():
        if key not in INDEX_OPTIONS:
            raise ValueError(f"{where}: options.{key}: unknown (expected one of {', '.join(INDEX_OPTIONS)})")
        low, high = INDEX_OPTIONS[key]
        high = min(high, max(n, 1)) if key == "nlist" else high
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{where}: options.{key}: got {_short(value)}, expected an int in [{low}, {high}]")
    return dict(options)


def _short(value: Any, limit: int = 60) -> str:
    """A value for an error message: its repr cut to ``limit`` characters (a file's value may be huge)."""
    text = repr(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class Gallery:
    """Gallery embeddings with their identities and files, and a faiss index over them.

    Saved as a folder: ``embeddings.npy`` (float32 (N, D), the source of truth: the index can always be
    rebuilt from it), ``gallery.json`` (identities, files, index kind and options, the model's name and
    :meth:`Recognizer.fingerprint`) and ``index.faiss``.
    """

    embeddings: np.ndarray
    identities: list[str]
    files: list[str]
    kind: str = "flat"
    options: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    folder: str = ""
    index: Any = field(default=None, repr=False)
    fingerprint: str = ""

    def __post_init__(self) -> None:
        self.embeddings = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        if self.embeddings.ndim != 2 or not (len(self.embeddings) == len(self.identities) == len(self.files)):
            raise ValueError(f"gallery: embeddings {self.embeddings.shape}, {len(self.identities)} identities and "
                             f"{len(self.files)} files must agree (N, D), N, N")
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index kind {self.kind!r}: expected one of {', '.join(INDEX_KINDS)}")
        self.options = check_index_options(self.options, len(self.embeddings), self.folder or "gallery")
        if self.index is None:
            self.rebuild()

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.identities)

    def rebuild(self, kind: str | None = None, **options: Any) -> None:
        """(Re)build the index from the stored embeddings (e.g. to switch ``flat`` -> ``ivf``)."""
        self.kind = kind or self.kind
        self.options = check_index_options({**self.options, **options}, len(self.embeddings), self.folder or "gallery")
        self.index = make_index(self.embeddings, self.kind, **self.options)

    def add(self, embeddings: np.ndarray, identities: Sequence[str], files: Sequence[str]) -> None:
        """Append entries (an IVF index keeps its trained cells; rebuild it after large additions)."""
        e = np.ascontiguousarray(embeddings, dtype=np.float32)
        if e.ndim != 2 or e.shape[1] != self.dim or len(e) != len(identities) or len(e) != len(files):
            raise ValueError(f"gallery add: embeddings {e.shape}, {len(identities)} identities, {len(files)} files; "
                             f"expected (N, {self.dim}), N, N")
        self.index.add(e)
        self.embeddings = np.concatenate([self.embeddings, e])
        self.identities += list(identities)
        self.files += list(files)

    def search_raw(self, queries: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss's ``(scores (Q, k), rows (Q, k))``, best first; rows are -1 where fewer than k were found."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        return self.index.search(q, min(top, len(self)))

    def search(self, queries: np.ndarray, top: int = 5) -> list[list[Match]]:
        """The ``top`` best :class:`Match` es of each query embedding, best first."""
        if top < 1:
            raise ValueError(f"top must be >= 1, got {top}")
        scores, rows = self.search_raw(queries, top)
        return [[Match(self.identities[r], float(s), self.files[r]) for s, r in zip(srow, rrow) if r >= 0]
                for srow, rrow in zip(scores, rows)]

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the three files together, atomically (``faceforge.core.fileio``: no torn file, no link followed)."""
        from faceforge.core.fileio import atomic_files

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "options": self.options, "model": self.model, "fingerprint": self.fingerprint,
                "dim": self.dim, "identities": self.identities, "files": self.files}
        index_bytes = _faiss().serialize_index(self.index).tobytes()
        with atomic_files((out / "embeddings.npy", "wb"), (out / "gallery.json", "w"),
                          (out / "index.faiss", "wb")) as (fe, fm, fi):
            np.save(fe, self.embeddings, allow_pickle=False)
            json.dump(meta, fm, indent=1)
            fi.write(index_bytes)
        self.folder = os.fspath(out)
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Gallery":
        """Read a saved gallery, every field checked (:func:`_gallery_meta`). The index is rebuilt from
        ``embeddings.npy`` if ``index.faiss`` is missing; one that cannot be read, or whose kind, metric,
        dimension or size differs from ``gallery.json``, is an error naming it (``search build`` remakes it)."""
        root = Path(folder)
        meta_path, emb_path = root / "gallery.json", root / "embeddings.npy"
        for p in (meta_path, emb_path):
            if not p.is_file():
                raise ValueError(f"{p}: not found (expected a gallery folder written by `faceforge search build`)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise ValueError(f"{meta_path}: cannot read JSON: {_short(str(e), 200)}") from None
        try:
            embeddings = np.load(emb_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{emb_path}: cannot read: {e}; expected a float32 (N, D) array") from None
        if embeddings.dtype != np.float32 or embeddings.ndim != 2 or not np.isfinite(embeddings).all():
            raise ValueError(f"{emb_path}: {embeddings.dtype} array of shape {embeddings.shape}; expected finite "
                             "float32 (N, D) embeddings written by `faceforge search build`")
        meta = _gallery_meta(meta, len(embeddings), embeddings.shape[1], meta_path)
        index = _read_index(root / "index.faiss", meta["kind"], embeddings.shape) if (root / "index.faiss").is_file() else None
        return cls(embeddings, meta["identities"], meta["files"], meta["kind"], meta["options"], meta["model"],
                   os.fspath(root), index, meta["fingerprint"])


def _gallery_meta(meta: Any, n: int, dim: int, where: Path) -> dict[str, Any]:
    """``gallery.json`` checked against ``embeddings.npy`` (N rows of D): every key's type, N identities and
    files (strings), a known index kind, bounded options. ValueError naming the file and the key."""
    def bad(key: str, got: Any, expected: str) -> ValueError:
        return ValueError(f"{where}: {key}: got {_short(got)}, expected {expected}")

    if not isinstance(meta, dict):
        raise bad("top level", meta, "a JSON object (kind, options, model, fingerprint, dim, identities, files)")
    for key in ("identities", "files"):
        v = meta.get(key)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise bad(key, v, "a list of strings, one per embedding")
        if len(v) != n:
            raise bad(key, f"{len(v)} entries", f"{n}, one per row of embeddings.npy")
    kind = meta.get("kind", "flat")
    if kind not in INDEX_KINDS:
        raise bad("kind", kind, f"one of {', '.join(INDEX_KINDS)}")
    if meta.get("dim", dim) != dim:
        raise bad("dim", meta.get("dim"), f"{dim}, the width of embeddings.npy")
    for key in ("model", "fingerprint"):
        if not isinstance(meta.get(key, ""), str):
            raise bad(key, meta.get(key), "a string")
    return {"identities": meta["identities"], "files": meta["files"], "kind": kind,
            "options": check_index_options(meta.get("options", {}), n, str(where)),
            "model": meta.get("model", ""), "fingerprint": meta.get("fingerprint", "")}


def _read_index(path: Path, kind: str, shape: tuple[int, int]) -> Any:
    """``index.faiss``, checked: readable, of the faiss class of ``kind``, inner product, D wide, N entries."""
    faiss = _faiss()
    remake = "`faceforge search build` remakes it (or delete it: it is rebuilt from embeddings.npy)"
    try:
        index = faiss.read_index(os.fspath(path))  # already of its own class (IndexFlatIP, ...)
    except Exception as e:  # faiss raises RuntimeError for a corrupt or truncated file
        raise ValueError(f"{path}: cannot read the faiss index (corrupt or truncated: "
                         f"{_short(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, 120)}); "
                         f"{remake}") from None
    got = (type(index).__name__, index.metric_type == faiss.METRIC_INNER_PRODUCT, index.d, index.ntotal)
    want = (INDEX_CLASSES[kind], True, shape[1], shape[0])
    if got != want:
        raise ValueError(f"{path}: a {got[0]} ({'inner product' if got[1] else 'not inner product'}, {got[2]}-D, "
                         f"{got[3]} entries); gallery.json says {want[0]} (inner product, {want[2]}-D, {want[3]} "
                         f"entries); {remake}")
    return index


def gallery_entries(folder: str | os.PathLike) -> tuple[list[str], list[str]]:
    """``(image paths, identity per image)`` of a folder with one sub-folder per identity."""
    from faceforge.data.folder import scan_identity_folders

    names, files = scan_identity_folders(folder)
    paths = [f for group in files for f in group]
    identities = [n for n, group in zip(names, files) for _ in group]
    return paths, identities


def build_gallery(recognizer: Recognizer, folder: str | os.PathLike, kind: str = "flat", detect: bool = False,
                  skip_bad: bool = False, batch_size: int = 64, progress: bool = False,
                  **options: Any) -> tuple[Gallery, list[str]]:
    """Embed every image of an identity folder into a :class:`Gallery`; returns it and the skipped images."""
    paths, identities = gallery_entries(folder)
    return embed_gallery(recognizer, paths, identities, kind, detect, skip_bad, batch_size, progress, **options)


def embed_gallery(recognizer: Recognizer, paths: Sequence[str], identities: Sequence[str], kind: str = "flat",
                  detect: bool = False, skip_bad: bool = False, batch_size: int = 64, progress: bool = False,
                  **options: Any) -> tuple[Gallery, list[str]]:
    """A :class:`Gallery` of these images (``identities[i]`` of ``paths[i]``), recording the model's name and
    fingerprint; returns it and the skipped images."""
    embeddings, kept, skipped = recognizer.embed_files(list(paths), detect=detect, skip_bad=skip_bad,
                                                       batch_size=batch_size, progress=progress)
    who = dict(zip(paths, identities))
    return Gallery(embeddings, [who[k] for k in kept], kept, kind, options, recognizer.name,
                   fingerprint=recognizer.fingerprint()), skipped
