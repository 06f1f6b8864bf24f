"""Image transforms as pure functions: uint8 HWC images -> normalised float tensors, flips."""

from __future__ import annotations

import numpy as np
import torch

MEAN = 127.5
STD = 127.5


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 RGB images -> float32 tensor normalised as ``(x - 127.5) / 127.5`` (range [-1, 1]).

    ``images``: ``(H, W, 3)`` or ``(N, H, W, 3)`` uint8. Returns ``(3, H, W)`` or ``(N, 3, H, W)``.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
        raise TypeError(f"to_tensor expects a uint8 numpy array, got {got}")
    if images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f"to_tensor expects (H, W, 3) or (N, H, W, 3) images, got shape {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    x = x.movedim(-1, -3).contiguous()
    return x.sub_(MEAN).div_(STD)


def hflip(images: torch.Tensor) -> torch.Tensor:
    """Mirror images left-right: ``(..., H, W)`` -> same shape (the last axis is reversed)."""
    if not isinstance(images, torch.Tensor) or images.ndim < 2:
        raise ValueError(f"hflip expects a tensor (..., H, W), got {type(images).__name__}")
    return torch.flip(images, dims=(-1,))
