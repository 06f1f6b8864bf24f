"""``faceforge export``: a trained backbone to ONNX, BN folded, dynamic batch, parity checked.

The backbone (from a run folder, ``last.pt`` or ``model.safetensors``) is put in eval mode, its BNs
are folded into the convolutions before them (:func:`faceforge.backbones.fuse.fuse_bn`), and it is
exported with the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, which needs
no onnxscript) at opset :data:`DEFAULT_OPSET`. Input ``images`` float32 ``(B, 3, S, S)``, normalised
as ``model.json`` says; output ``embeddings`` ``(B, D)``, not normalised, no flip. ``model.json`` is
stored in the ONNX metadata (key ``faceforge``) with the opset and the BN counts.

**Parity.** onnxruntime's embeddings of a fixed batch of real aligned faces must match the eval-mode
PyTorch backbone (before folding) to within ``1 - cos <= 1e-4`` for every image, or the export fails
and no file is left. The batch is the 12 aligned real photos of ``docs/alignment.md`` (shipped as
``faceforge/assets/aligned_real.png``), resized to the model's image size if it is not 112.

**int8** (``quantize="dynamic"|"static"``): onnxruntime quantisation, written beside the float model
as ``<name>.int8.onnx``; static quantisation is calibrated on the images of a given folder. Its agreement
with the float model is reported (cosine of the embeddings, and verification accuracy and TAR@FAR on
the real faces or on a labelled folder), never asserted: it depends on the data. The calibration folder
is read and checked before anything is exported.

**Files.** Everything is built in a private temporary folder; the ``.onnx`` (and ``.int8.onnx``) are
written to their destinations together, atomically (``faceforge.core.fileio``), only when every step has
succeeded: a failed export, parity check or quantisation leaves no file behind (and an older file as it was).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from faceforge.deploy.modelfile import META_KEY, MODEL_WEIGHTS, ModelFileError, ModelInfo

__all__ = [
    "DEFAULT_OPSET",
    "PARITY_TOLERANCE",
    "REAL_FACE_IDENTITIES",
    "ExportError",
    "ExportReport",
    "check_parity",
    "export_backbone",
    "export_onnx",
    "load_source",
    "real_faces",
]

DEFAULT_OPSET = 17
PARITY_TOLERANCE = 1e-4  # on 1 - cosine, per image
ASSET = Path(__file__).parents[1] / "assets" / "aligned_real.png"  # faceforge/assets
# The 12 crops of assets/aligned_real.png (6 x 2 grid of 112 px tiles, 2 px apart), left to right, top
# to bottom: face_recognition 1.3.0's obama.jpg, obama2.jpg, obama3.jpg, biden.jpg; insightface 2.1's
# Tom_Hanks_54745.png and the same crop re-aligned by faceforge; the 6 people of insightface's t1.jpg.
REAL_FACE_IDENTITIES = ("obama", "obama", "obama", "biden", "hanks", "hanks", "t1-1", "t1-2", "t1-3", "t1-4",
                        "t1-5", "t1-6")


class ExportError(ValueError):
    """The exported model does not match the PyTorch one (parity); the message says by how much."""


def real_faces(size: int = 112) -> np.ndarray:
    """The 12 aligned real faces as uint8 RGB ``(12, size, size, 3)`` (bilinear resize when size != 112)."""
    from PIL import Image

    with Image.open(ASSET) as sheet:
        sheet = sheet.convert("RGB")
        tiles = [sheet.crop(((i % 6) * 114, (i // 6) * 114, (i % 6) * 114 + 112, (i // 6) * 114 + 112))
                 for i in range(12)]
    if size != 112:
        tiles = [t.resize((size, size), Image.BILINEAR) for t in tiles]
    return np.stack([np.asarray(t, dtype=np.uint8) for t in tiles])


def load_source(source: str | os.PathLike, trust_code: bool = False) -> tuple[Any, ModelInfo]:
    """``(backbone in eval mode, info)`` from a run folder, a checkpoint or ``model.safetensors`` (its metadata
    may name only registered backbones unless ``trust_code``)."""
    from faceforge.deploy.modelfile import backbone_from_checkpoint, load_backbone, resolve_model_path

    p = resolve_model_path(source)
    if p.suffix.lower() == ".onnx":
        raise ModelFileError(f"{p}: already ONNX; expected a run folder, last.pt or {MODEL_WEIGHTS}")
    loader = load_backbone if p.suffix.lower() == ".safetensors" else backbone_from_checkpoint
    return loader(p, trust_code=trust_code)


def _preprocess(info: ModelInfo, crops: np.ndarray) -> np.ndarray:
    from faceforge.deploy.inference import Recognizer

    return Recognizer(lambda x: x, info).preprocess(crops)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.einsum("nd,nd->n", a, b) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)


def _session(path: str | os.PathLike) -> Any:
    import onnxruntime as ort

    from faceforge.deploy.inference import ONNX_LOG_SEVERITY

    options = ort.SessionOptions()
    options.log_severity_level = ONNX_LOG_SEVERITY
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def check_parity(reference: Callable[[np.ndarray], np.ndarray], onnx_path: str | os.PathLike, x: np.ndarray,
                 tolerance: float = PARITY_TOLERANCE, name: str | None = None) -> float:
    """The smallest per-image cosine between ``reference(x)`` and onnxruntime's output on ``x`` (float32
    ``(B, 3, S, S)``); :class:`ExportError` naming ``name`` (default ``onnx_path``) when ``1 - cosine``
    exceeds ``tolerance`` for any image."""
    session = _session(onnx_path)
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    cos = _cosines(reference(x), got)
    worst = float(cos.min())
    if not 1.0 - worst <= tolerance:
        raise ExportError(f"{name or onnx_path}: parity check failed: onnxruntime vs PyTorch cosine {worst:.6f} on image "
                          f"{int(cos.argmin())} of {len(x)}, expected >= {1 - tolerance:.6f} on every image")
    return worst


@dataclass
class ExportReport:
    """What ``faceforge export`` did and measured."""

    path: Path
    opset: int
    bn_folded: int
    bn_left: list[str]
    parity_min_cosine: float
    parity_images: int
    int8_path: Path | None = None
    int8: dict[str, Any] = field(default_factory=dict)
    copied_from: Path | None = None  # the source was already a faceforge ONNX file: copied unchanged

    def lines(self) -> list[str]:
        if self.copied_from is not None:
            out = [f"onnx:    {self.path} (opset {self.opset}; copied unchanged from {self.copied_from})",
                   f"BN:      {self.bn_folded} folded when it was exported, {len(self.bn_left)} left",
                   "parity:  not re-checked (the source is this ONNX model; it was checked when it was exported)"]
        else:
            out = self._export_lines()
        if self.int8_path is not None:
            out.append(f"int8:    {self.int8_path} ({self.int8.get('mode')})")
            for k, v in self.int8.items():
                if k != "mode":
                    out.append(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
        return out

    def _export_lines(self) -> list[str]:
        out = [f"onnx:    {self.path} (opset {self.opset}, dynamic batch)",
               f"BN:      {self.bn_folded} folded into the conv/linear before them, {len(self.bn_left)} left"
               + (f" ({', '.join(sorted({n.rsplit('.', 1)[-1] for n in self.bn_left}))})" if self.bn_left else ""),
               f"parity:  onnxruntime vs PyTorch, min cosine {self.parity_min_cosine:.7f} on {self.parity_images} "
               f"real aligned faces (tolerance 1 - cos <= {PARITY_TOLERANCE:g})"]
        return out


def _write_onnx(model: Any, path: Path, size: int, opset: int) -> None:
    import torch

    example = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the input-shape checks, constant under a trace
        torch.onnx.export(
            model, (example,), os.fspath(path), dynamo=False, opset_version=opset, input_names=["images"],
            output_names=["embeddings"], dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
            do_constant_folding=True,
        )


def _set_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    model = onnx.load(os.fspath(path))
    keep = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, os.fspath(path))


def export_onnx(
    source: str | os.PathLike,
    output: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    fuse: bool = True,
    tolerance: float = PARITY_TOLERANCE,
    quantize: str | None = None,
    calibration: str | os.PathLike | None = None,
    eval_folder: str | os.PathLike | None = None,
    transform: Callable[[Any], Any] | None = None,
    trust_code: bool = False,
) -> ExportReport:
    """Export ``source`` (run folder, ``last.pt`` or ``model.safetensors``) to ``output`` (see module notes).
    A faceforge ``.onnx`` source is copied unchanged (its int8 copy made with ``quantize``).

    Args:
        opset: ONNX opset (default 17). fuse: fold BNs first (default True).
        tolerance: parity bound on ``1 - cosine`` per image.
        quantize: None, ``"dynamic"`` or ``"static"`` (needs ``calibration``, a folder of aligned crops).
        eval_folder: a folder of identity sub-folders of aligned crops on which int8 and float are
            compared (verification accuracy, TAR@FAR); default the 12 real faces.
        transform: applied to the (fused) module just before export; for tests that corrupt a weight.
        trust_code: let the source's metadata name a backbone to import (default: registered ones only).

    Raises:
        ExportError when parity fails; ModelFileError for a bad source; ValueError for a calibration folder
        without usable images (checked before exporting). No file is written unless every step succeeds.
    """
    if quantize not in (None, "dynamic", "static"):
        raise ValueError(f"quantize={quantize!r}: expected 'dynamic' or 'static'")
    if quantize == "static" and calibration is None:
        raise ValueError("quantize='static' needs a calibration folder of aligned face crops")
    from faceforge.deploy.modelfile import resolve_model_path

    src = resolve_model_path(source)
    from_onnx = src.suffix.lower() == ".onnx"
    reference, info = (None, _onnx_source_info(src)) if from_onnx else load_source(src, trust_code)
    batches = calibration_batches(calibration, info) if quantize == "static" else None
    out = Path(output)
    int8_out = out.with_name(out.stem + ".int8.onnx")
    with tempfile.TemporaryDirectory(prefix="faceforge-export-") as work:
        float_tmp, int8_tmp = Path(work) / "model.onnx", Path(work) / "model.int8.onnx"
        report = (_copy_onnx(src, float_tmp, out) if from_onnx
                  else _export_checked(reference, info, float_tmp, out, opset, fuse, tolerance, transform))
        if quantize:
            quantize_onnx(float_tmp, int8_tmp, quantize, info, batches)
            report.int8 = compare_int8(float_tmp, int8_tmp, info, eval_folder) | {"mode": quantize}
            report.int8_path = int8_out
        _commit([(float_tmp, out)] + ([(int8_tmp, int8_out)] if quantize else []))
    return report


def _onnx_source_info(path: Path) -> ModelInfo:
    """The metadata of a faceforge ONNX file given as an export source (a foreign model is refused)."""
    from faceforge.deploy.inference import onnx_model_info

    info = onnx_model_info(path)
    if info is None:
        raise ModelFileError(f"{path}: no faceforge metadata (not written by `faceforge export`); expected a run "
                             f"folder, last.pt, {MODEL_WEIGHTS} or a faceforge .onnx file")
    return info


def _copy_onnx(source: Path, tmp: Path, out: Path) -> ExportReport:
    """Copy a faceforge ONNX file (no external data) to ``tmp``; its report, read from its metadata."""
    import onnx

    model = onnx.load(os.fspath(source), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ModelFileError(f"{source}: its weights are in external data files; expected a self-contained .onnx")
    props = {p.key: p.value for p in model.metadata_props}
    tmp.write_bytes(source.read_bytes())
    try:
        left = json.loads(props.get("faceforge_bn_left", "[]"))
        left = [str(x) for x in left] if isinstance(left, list) else []
        folded = int(props.get("faceforge_bn_folded", "0"))
    except (ValueError, RecursionError):
        left, folded = [], 0
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ExportReport(out, int(opset), folded, left, 1.0, 0, copied_from=source)


def _commit(pairs: list[tuple[Path, Path]]) -> None:
    """Copy each finished temporary file to its destination, all together and atomically."""
    from faceforge.core.fileio import atomic_files

    for _, dest in pairs:
        dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_files(*[(dest, "wb") for _, dest in pairs]) as files:
        for (tmp, _), f in zip(pairs, files):
            f.write(tmp.read_bytes())


def export_backbone(
    reference: Any,
    info: ModelInfo,
    output: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    fuse: bool = True,
    tolerance: float = PARITY_TOLERANCE,
    transform: Callable[[Any], Any] | None = None,
) -> ExportReport:
    """Export a backbone (any ``nn.Module`` ``(B, 3, S, S) -> (B, D)``, S = ``info.image_size``) to
    ``output`` with ``info`` as metadata: BN folded (``fuse``), then the parity check on the real faces
    against ``reference`` in eval mode. On failure nothing is written at ``output``."""
    out = Path(output)
    with tempfile.TemporaryDirectory(prefix="faceforge-export-") as work:
        tmp = Path(work) / "model.onnx"
        report = _export_checked(reference, info, tmp, out, opset, fuse, tolerance, transform)
        _commit([(tmp, out)])
    return report


def _export_checked(reference: Any, info: ModelInfo, tmp: Path, out: Path, opset: int, fuse: bool, tolerance: float,
                    transform: Callable[[Any], Any] | None) -> ExportReport:
    """Export to ``tmp`` (a private temporary file) and check parity; the report names ``out``."""
    import torch

    from faceforge.backbones.fuse import batchnorms, fuse_bn

    reference = reference.float().eval()
    model = fuse_bn(reference) if fuse else reference
    if transform is not None:
        model = transform(model)
    x = _preprocess(info, real_faces(info.image_size))

    def torch_reference(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return reference(torch.from_numpy(batch)).numpy()

    _write_onnx(model, tmp, info.image_size, opset)
    left = batchnorms(model)
    folded = len(batchnorms(reference)) - len(left)
    _set_metadata(tmp, {META_KEY: info.to_json(), "faceforge_opset": str(opset), "faceforge_bn_folded": str(folded),
                        "faceforge_bn_left": json.dumps(left)})
    worst = check_parity(torch_reference, tmp, x, tolerance, name=str(out))
    return ExportReport(out, opset, folded, left, worst, len(x))


def calibration_batches(folder: str | os.PathLike, info: ModelInfo) -> list[np.ndarray]:
    """The images of a calibration folder as model inputs, float32 ``(<=16, 3, S, S)`` batches. ValueError
    naming the folder (no images) or the image (unreadable, not S x S); called before exporting."""
    from faceforge.deploy.inference import load_images

    if not Path(folder).is_dir():
        raise ValueError(f"{folder}: calibration: not a folder (expected aligned face crops)")
    paths = sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and _is_image(p))
    if not paths:
        raise ValueError(f"{folder}: calibration: no images found (expected aligned {info.image_size}x"
                         f"{info.image_size} face crops)")
    crops, _, _ = load_images(paths, info.image_size)
    x = _preprocess(info, crops)
    return [x[s : s + 16] for s in range(0, len(x), 16)]


class _Calibration:
    """onnxruntime's CalibrationDataReader over prepared batches."""

    def __init__(self, batches: list[np.ndarray], input_name: str) -> None:
        self.batches = iter([{input_name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def _is_image(path: Path) -> bool:
    from faceforge.data.folder import IMAGE_EXTENSIONS

    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def quantize_onnx(float_path: Path, int8_path: Path, mode: str, info: ModelInfo,
                  calibration: str | os.PathLike | list[np.ndarray] | None = None) -> Path:
    """int8 copy of an exported model: ``dynamic`` (weights int8 ahead of time, activations at run time;
    uint8 weights, the type onnxruntime's CPU ConvInteger runs) or ``static`` (QDQ, per-channel weights,
    activations calibrated on ``calibration``: a folder, or its :func:`calibration_batches`). The faceforge
    metadata is kept."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    metadata = {p.key: p.value for p in onnx.load(os.fspath(float_path)).metadata_props}
    if mode == "dynamic":
        quantize_dynamic(os.fspath(float_path), os.fspath(int8_path), weight_type=QuantType.QUInt8)
    else:
        if calibration is None:
            raise ValueError("quantize='static' needs a calibration folder of aligned face crops")
        batches = calibration if isinstance(calibration, list) else calibration_batches(calibration, info)
        reader = _Calibration(batches, "images")
        quantize_static(os.fspath(float_path), os.fspath(int8_path), reader, quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    _set_metadata(int8_path, metadata | {"faceforge_quantized": mode})
    return int8_path


def compare_int8(float_path: Path, int8_path: Path, info: ModelInfo,
                 eval_folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """int8 against float: mean / min cosine of their embeddings, and each one's best-threshold accuracy
    and TAR@FAR=1e-1 on every pair of the images (``eval_folder`` of identity sub-folders, default the
    12 real faces)."""
    from faceforge.eval.metrics import best_threshold_accuracy, tar_at_far
    from faceforge.deploy.inference import Recognizer, gallery_entries, load_images

    if eval_folder is not None:
        paths, labels = gallery_entries(eval_folder)
        crops, _, _ = load_images(paths, info.image_size)
        where = f"{len(paths)} images of {eval_folder}"
    else:
        crops, labels, where = real_faces(info.image_size), list(REAL_FACE_IDENTITIES), "the 12 real faces"
    from faceforge.deploy.inference import OnnxBackend

    e_float = Recognizer(OnnxBackend(float_path), info).embed_crops(crops)
    e_int8 = Recognizer(OnnxBackend(int8_path), info).embed_crops(crops)
    i, j = np.triu_indices(len(labels), 1)
    same = np.asarray(labels)[i] == np.asarray(labels)[j]
    result: dict[str, Any] = {"images": where, "pairs": f"{len(i)} ({int(same.sum())} same-identity)"}
    cos = _cosines(e_float, e_int8)
    result["cosine int8 vs float, mean"] = float(cos.mean())
    result["cosine int8 vs float, min"] = float(cos.min())
    for name, e in (("float", e_float), ("int8", e_int8)):
        scores = np.einsum("nd,nd->n", e[i].astype(np.float64), e[j].astype(np.float64))
        if 0 < same.sum() < len(same):
            result[f"{name} best-threshold accuracy"] = float(best_threshold_accuracy(scores, same)[0])
            result[f"{name} TAR@FAR=1e-1"] = float(tar_at_far(scores, same, 0.1))
    return result
