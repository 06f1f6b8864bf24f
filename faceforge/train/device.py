"""Where a run computes and how the backbone is laid out there: ``train.device``, ``train.channels_last``,
``train.cudnn_benchmark`` and ``model.compile``.

- :func:`check_device`: ``train.device = cuda`` on a machine without CUDA is one error line before any work
  (the CLI turns the ConfigError into exit 2); ``auto`` is CUDA when present, else CPU.
- :func:`dist_backend`: the process-group backend for the device (gloo for ``cpu``, even on a CUDA machine).
- :func:`run_device`: this process's device (``cuda:LOCAL_RANK`` or ``cpu``).
- :func:`configure_backends`: ``torch.backends.cudnn.benchmark`` as ``train.cudnn_benchmark`` says.
- :func:`prepare_backbone`: channels_last weights and inputs (NHWC: tensor cores take convolutions without
  transposes), then ``nn.Module.compile()`` in place, so that state_dict keys stay those of the eager model
  (``torch.compile(m)`` would prefix them with ``_orig_mod.`` and break checkpoints and exports).

Pinned host memory and ``non_blocking`` copies need no key: the trainer pins when the device is CUDA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from faceforge.core.config import ConfigError

__all__ = ["DEVICES", "check_device", "configure_backends", "dist_backend", "prepare_backbone", "run_device"]

DEVICES = ("auto", "cpu", "cuda")


def check_device(device: str, *, cuda_available: bool | None = None) -> None:
    """Raise ConfigError (one line) unless ``device`` (``train.device``) can run here.

    cuda_available: for tests; default ``torch.cuda.is_available()``.
    """
    if device not in DEVICES:
        raise ConfigError(f"train.device = {device!r}: expected one of {', '.join(DEVICES)}")
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if device == "cuda" and not available:
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        raise ConfigError(f"train.device = 'cuda': no CUDA device is available here ({build}); "
                          "expected train.device = cpu or auto")


def dist_backend(device: str) -> str | None:
    """The process-group backend ``train.device`` needs: gloo for ``cpu``, torch's default (NCCL with CUDA) else."""
    return "gloo" if device == "cpu" else None


def run_device(device: str, found: torch.device) -> torch.device:
    """This process's device: ``found`` (``cuda:LOCAL_RANK`` when CUDA is there, from ``init_distributed``)
    unless ``train.device = cpu`` asks for the CPU."""
    return torch.device("cpu") if device == "cpu" else found


def configure_backends(cudnn_benchmark: bool) -> None:
    """``torch.backends.cudnn.benchmark``: let cuDNN time its convolution algorithms on the first batch of each
    shape and keep the fastest (fixed 112x112 batches: a one-off cost, then faster steps; results may differ
    in the last bits from run to run)."""
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)


def _to_channels_last(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4
                 else a for a in args)


def prepare_backbone(backbone: nn.Module, *, channels_last: bool = False, compile: bool = False) -> nn.Module:
    """The same module, laid out for the device: with ``channels_last`` its 4-D weights and every 4-D input
    (a forward pre-hook) in NHWC; with ``compile`` its forward compiled by ``torch.compile`` on first call
    (in place: parameter names unchanged). Values are those of the eager NCHW model up to float rounding."""
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
        backbone.register_forward_pre_hook(_to_channels_last)
    if compile:
        backbone.compile()
    return backbone
