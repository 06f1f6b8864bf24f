"""A frozen distillation teacher: a faceforge checkpoint (any backbone) or an ONNX model run by onnxruntime.

``load_teacher(source, dtype="float32") -> Teacher``; ``teacher(images (B, 3, S, S)) -> (B, D)`` float32
embeddings, computed under ``torch.no_grad()`` with the model in eval mode whatever ``train()`` is called
with, its parameters frozen (``requires_grad=False``). So the teacher never takes part in a backward pass and
never changes (BatchNorm uses its running statistics and does not update them).

- ``source`` ending in ``.onnx``: ``onnxruntime.InferenceSession`` on the CPU (CUDA when onnxruntime has it
  and the images are on a GPU); the model takes NCHW float32 images normalised as faceforge's
  ``(x - 127.5) / 127.5`` RGB (as insightface's recognition models do) and returns (B, D). A pretrained
  model of another toolkit can teach this way. Optional extra: ``pip install faceforge[export]``.
- otherwise a ``faceforge train`` checkpoint (``last.pt``, a ``step_*.pt``, or a run folder holding
  ``last.pt``): its backbone, built from the run's config, with its weights. That config is data: it may
  name only a registered backbone (an import, ``package.module:Class``, is refused before anything is
  imported) unless ``load_teacher(..., trust_code=True)``.

``dtype="bfloat16"`` keeps a checkpoint teacher's weights in bfloat16 (half the memory of a 1.2K-layer
teacher) and feeds it bfloat16 images; its embeddings are returned in float32.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from faceforge.core.checkpoint import CHECKPOINT_NAME

__all__ = ["TEACHER_DTYPES", "Teacher", "BackboneTeacher", "OnnxTeacher", "load_teacher"]

TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Teacher(nn.Module):
    """The frozen-teacher contract: ``teacher(images) -> (B, D)`` float32, no gradient, always in eval mode.

    Attributes: ``source`` (where it was read from), ``embedding_size`` (D), ``kind`` (``checkpoint`` / ``onnx``).
    """

    source: str
    embedding_size: int
    kind: str

    def train(self, mode: bool = True) -> "Teacher":  # noqa: ARG002 - a teacher is never trained
        return super().train(False)

    def identity(self) -> dict[str, Any]:
        """What a cache of its embeddings is keyed by: the file (path, size, modification time) and kind."""
        path = Path(self.source)
        stat = path.stat()
        return {"kind": self.kind, "path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def describe(self) -> str:
        return f"{self.kind} teacher {self.source} (D = {self.embedding_size})"


class BackboneTeacher(Teacher):
    """A faceforge backbone as a frozen teacher (weights in ``dtype``)."""

    kind = "checkpoint"

    def __init__(self, backbone: nn.Module, source: str, embedding_size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = backbone.to(dtype).requires_grad_(False)
        self.dtype = dtype
        self.source = source
        self.embedding_size = embedding_size
        self.train(False)

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model(images.to(self.dtype)).float()

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "dtype": str(self.dtype)}


class OnnxTeacher(Teacher):
    """An ONNX model as a frozen teacher, through onnxruntime (no parameters here; nothing to train)."""

    kind = "onnx"

    def __init__(self, path: str, threads: int | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError(f"{path}: an ONNX teacher needs onnxruntime (pip install faceforge[export])") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3  # onnxruntime: errors only (as faceforge.deploy.inference.ONNX_LOG_SEVERITY)
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.__dict__["session"] = ort.InferenceSession(path, options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ValueError(f"{path}: cannot load the ONNX teacher: {e}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ValueError(f"{path}: expected an ONNX model with one NCHW image input; got "
                             f"{[(i.name, i.shape) for i in inputs]}")
        self.input_name = inputs[0].name
        self.source = path
        dim = outputs[0].shape[-1] if outputs and len(outputs[0].shape) == 2 else None
        if not isinstance(dim, int):
            side = inputs[0].shape[-1] if isinstance(inputs[0].shape[-1], int) else 112
            dim = int(self._run(np.zeros((1, 3, side, side), dtype=np.float32)).shape[-1])
        self.embedding_size = int(dim)

    def _run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: images})[0]

    def forward(self, images: Tensor) -> Tensor:
        out = self._run(np.ascontiguousarray(images.detach().float().cpu().numpy()))
        if out.ndim != 2 or out.shape[0] != images.shape[0]:
            raise ValueError(f"{self.source}: the ONNX teacher returned shape {out.shape}; expected (B, D) for B = "
                             f"{images.shape[0]}")
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(images.device)


def _checkpoint_path(source: str) -> Path:
    path = Path(source)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise ValueError(f"{source}: teacher not found (expected a faceforge checkpoint, a run folder with "
                         f"{CHECKPOINT_NAME}, or an .onnx file)")
    return path


def load_teacher(source: str | os.PathLike, dtype: str = "float32", map_location: str | torch.device = "cpu",
                 trust_code: bool = False) -> Teacher:
    """The frozen teacher at ``source`` (module doc). ``dtype``: ``float32`` or ``bfloat16`` (checkpoints only).
    ``trust_code``: let the checkpoint's config name a backbone to import (default: registered ones only)."""
    source = os.fspath(source)
    if dtype not in TEACHER_DTYPES:
        raise ValueError(f"teacher dtype {dtype!r}: expected one of {sorted(TEACHER_DTYPES)}")
    if source.lower().endswith(".onnx"):
        if not Path(source).is_file():
            raise ValueError(f"{source}: ONNX teacher not found")
        if dtype != "float32":
            raise ValueError(f"{source}: an ONNX teacher runs as exported; teacher dtype {dtype!r} needs a checkpoint")
        return OnnxTeacher(source)
    from faceforge.build import load_backbone

    path = _checkpoint_path(source)
    backbone, cfg = load_backbone(path, map_location=map_location, trust_code=trust_code)
    return BackboneTeacher(backbone, str(path), cfg.model.embedding_size, TEACHER_DTYPES[dtype])
