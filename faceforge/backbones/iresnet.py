"""IResNet: the "improved" residual network of ArcFace (insightface arcface_torch), any stage depths.

Layout (ArcFace Sec. 3.1 "BN-Dropout-FC-BN" output; insightface `iresnet.py`; BigFace Table 1 depths):

    stem      conv3x3(3, 64) stride 1 - BN - PReLU                       (B, 64, S, S)
    stage 1-4 IBasicBlocks, widths 64/128/256/512, first block stride 2  (B, 512, s, s), s = ceil(S / 16)
    output    BN2d - Dropout - Flatten - Linear(512*s*s, D) - BN1d       (B, D)

An IBasicBlock is BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus a shortcut (identity, or
conv1x1(stride) + BN when the stride or the width changes). Convolutions carry no bias. The final
BN1d ("features") has its scale fixed to 1.0 and not trained, as insightface does it.

Module names follow insightface (`conv1`, `bn1`, `prelu`, `layer1`..`layer4`, `bn2`, `fc`, `features`),
so an arcface_torch state_dict loads with `load_state_dict`.

This module also holds the small helpers that MobileFaceNet and SFNet share (input-size and argument
checks). Activation checkpointing: `set_grad_checkpointing()` (`backbones/checkpointing.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from faceforge.backbones.checkpointing import GradCheckpointing

# Blocks per stage. r18..r200 as insightface; r120..r1200 from BigFace Table 1.
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r120": (3, 13, 40, 3),
    "r140": (3, 15, 48, 3),
    "r200": (6, 26, 60, 6),
    "r240": (3, 25, 88, 3),
    "r600": (3, 70, 220, 3),
    "r1200": (3, 80, 512, 3),
}

STAGE_WIDTHS = (64, 128, 256, 512)
MIN_INPUT_SIZE = 16  # four stride-2 stages leave a 1x1 map at 16x16


# ----------------------------------------------------------------------------------------------
# Shared helpers (also used by mobilefacenet.py)


def square_input_size(input_size: int | Sequence[int], minimum: int = MIN_INPUT_SIZE) -> int:
    """Return the side of a square input; reject non-square or too-small sizes with a clear error."""
    if isinstance(input_size, Sequence) and not isinstance(input_size, str):
        sizes = tuple(input_size)
        if len(sizes) != 2 or sizes[0] != sizes[1]:
            raise ValueError(f"input_size must be one int or a square (H, W) pair; got {input_size!r}")
        input_size = sizes[0]
    if not isinstance(input_size, int) or isinstance(input_size, bool):
        raise ValueError(f"input_size must be an int (pixels); got {input_size!r}")
    if input_size < minimum:
        raise ValueError(f"input_size must be at least {minimum} pixels; got {input_size}")
    return input_size


def downsampled_size(size: int, num_stride2: int) -> int:
    """Side after `num_stride2` stride-2 convs (3x3 pad 1 or 1x1 pad 0): each gives ceil(n / 2)."""
    for _ in range(num_stride2):
        size = math.ceil(size / 2)
    return size


def check_images(x: torch.Tensor, input_size: int, model_name: str) -> None:
    """Raise ValueError unless `x` is a float batch shaped (B, 3, input_size, input_size)."""
    expected = f"(B, 3, {input_size}, {input_size})"
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{model_name} expects RGB images shaped {expected}; got {tuple(x.shape)}")
    if tuple(x.shape[-2:]) != (input_size, input_size):
        raise ValueError(
            f"{model_name} was built for input_size={input_size}, expected {expected}; got "
            f"{tuple(x.shape)} (build it with input_size={x.shape[-1]} for that size)"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"{model_name} expects float images normalised as (x - 127.5) / 127.5; got dtype {x.dtype}"
        )


# ----------------------------------------------------------------------------------------------
# IResNet


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus a shortcut.

    (B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=1e-5)
        self.prelu = nn.PReLU(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels, stride)
        self.bn3 = nn.BatchNorm2d(out_channels, eps=1e-5)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


def _make_stage(in_channels: int, out_channels: int, num_blocks: int) -> nn.Sequential:
    """One stage: a stride-2 block that changes the width, then `num_blocks - 1` identity blocks."""
    blocks = [IBasicBlock(in_channels, out_channels, stride=2)]
    blocks += [IBasicBlock(out_channels, out_channels) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def check_layers(layers: Sequence[int], minimum: int = 1, what: str = "blocks per stage") -> tuple[int, int, int, int]:
    """The 4 per-stage counts as a tuple; a ValueError unless they are 4 ints >= `minimum`."""
    values = tuple(layers)
    if len(values) != 4 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= minimum for n in values):
        kind = "positive ints" if minimum == 1 else f"ints >= {minimum}"
        raise ValueError(f"layers must be 4 {kind} ({what}); got {layers!r}")
    return values  # type: ignore[return-value]


def check_backbone_args(embedding_size: int, dropout: float, width: float = 1.0) -> None:
    """A ValueError naming the argument unless embedding_size >= 1, 0 <= dropout < 1 and width > 0."""
    if embedding_size < 1:
        raise ValueError(f"embedding_size must be a positive int; got {embedding_size!r}")
    if not width > 0:
        raise ValueError(f"width must be > 0; got {width!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")


def scaled_width(channels: int, width: float) -> int:
    """Channel count `channels * width`, rounded, at least 1."""
    return max(1, int(round(channels * width)))


class IResNet(GradCheckpointing, nn.Module):
    """IResNet backbone: (B, 3, S, S) images normalised as (x - 127.5) / 127.5 -> (B, embedding_size).

    Activation checkpointing per block or per stage: ``set_grad_checkpointing()`` (off by default).

    Args:
        layers: IBasicBlocks per stage, e.g. (3, 4, 14, 3) for r50.
        embedding_size: D, the output dimension (default 512).
        input_size: S, the image side in pixels (default 112; >= 16; square only).
        width: multiplier on every channel count (1.0 gives 64/128/256/512; 0.25 gives 16/32/64/128).
        dropout: drop probability before the FC layer (default 0.0).
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 14, 3),
        embedding_size: int = 512,
        input_size: int | Sequence[int] = 112,
        width: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.blocks_per_stage = check_layers(layers)
        check_backbone_args(embedding_size, dropout, width)
        self.input_size = square_input_size(input_size)
        self.embedding_size = embedding_size
        widths = [scaled_width(c, width) for c in STAGE_WIDTHS]
        self.widths = tuple(widths)

        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        self.layer1 = _make_stage(widths[0], widths[0], self.blocks_per_stage[0])
        self.layer2 = _make_stage(widths[0], widths[1], self.blocks_per_stage[1])
        self.layer3 = _make_stage(widths[1], widths[2], self.blocks_per_stage[2])
        self.layer4 = _make_stage(widths[2], widths[3], self.blocks_per_stage[3])

        side = downsampled_size(self.input_size, 4)
        self.feature_map_size = side
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(widths[3] * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights()

    def _init_weights(self) -> None:
        # insightface's initialisation: conv ~ N(0, 0.1), BN scale 1 and shift 0, FC left at default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def checkpoint_stages(self) -> list[list[nn.Module]]:
        """The four stages, each a list of its IBasicBlocks."""
        return [list(stage) for stage in self.stages]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float images -> (B, D) unnormalised embeddings."""
        check_images(x, self.input_size, type(self).__name__)
        x = self.run_stages(self.prelu(self.bn1(self.conv1(x))))
        x = self.dropout(self.bn2(x))
        return self.features(self.fc(torch.flatten(x, 1)))

    def extra_repr(self) -> str:
        return f"layers={self.blocks_per_stage}, widths={self.widths}, input_size={self.input_size}"
