"""MobileFaceNet (Chen et al. 2018) as insightface's `mbf`: inverted-residual bottlenecks and a GDC output.

Layout for `blocks=(1, 4, 6, 2)`, `scale=2`, at 112x112 (about 0.45 G multiply-accumulates):

    conv3x3 s2 (3 -> 64s) - grouped conv3x3 (64s -> 64s)                      56x56
    bottleneck s2 (64s, expand 128) + blocks[1] bottlenecks                    28x28
    bottleneck s2 (64s -> 128s, expand 256) + blocks[2] bottlenecks (256)      14x14
    bottleneck s2 (128s, expand 512) + blocks[3] bottlenecks (256)             7x7
    conv1x1 (128s -> 512) - GDC: depthwise 7x7 conv + BN - Dropout - Linear(512, D) - BN1d

A bottleneck is conv1x1 (expand) - BN - PReLU - depthwise conv3x3 (stride) - BN - PReLU - conv1x1 -
BN, with an identity shortcut inside the stacks. The expansion widths (128/256/512) do not change
with `scale`, as in insightface. The GDC kernel is the final feature-map side, ceil(S / 16).

Module names follow insightface (`layers`, `conv_sep`, `features`), so an arcface_torch `mbf`
state_dict loads with `load_state_dict`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from faceforge.backbones.checkpointing import GradCheckpointing
from faceforge.backbones.iresnet import (
    check_backbone_args,
    check_images,
    downsampled_size,
    square_input_size,
)


class ConvBNPReLU(nn.Module):
    """conv (no bias) - BN - PReLU. (B, C_in, H, W) -> (B, C_out, H', W')."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ConvBN(nn.Module):
    """conv (no bias) - BN, no activation (the "linear" block). (B, C_in, H, W) -> (B, C_out, H', W')."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand to `expanded` - depthwise 3x3 (stride) - 1x1 linear projection."""

    def __init__(
        self, in_channels: int, out_channels: int, expanded: int, stride: int, residual: bool
    ) -> None:
        super().__init__()
        if residual and (stride != 1 or in_channels != out_channels):
            raise ValueError(
                f"a residual bottleneck needs stride 1 and equal widths; got stride {stride}, "
                f"{in_channels} -> {out_channels}"
            )
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBNPReLU(in_channels, expanded),
            ConvBNPReLU(expanded, expanded, kernel=3, stride=stride, padding=1, groups=expanded),
            ConvBN(expanded, out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return out + x if self.residual else out


class BottleneckStack(nn.Module):
    """`num_blocks` residual bottlenecks at a fixed width `channels`."""

    def __init__(self, channels: int, num_blocks: int, expanded: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[Bottleneck(channels, channels, expanded, stride=1, residual=True) for _ in range(num_blocks)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv output: (B, C, k, k) -> depthwise kxk conv + BN - Linear - BN1d -> (B, D).

    Dropout (default 0.0) sits before the Linear.
    """

    def __init__(self, channels: int, embedding_size: int, kernel: int, dropout: float = 0.0) -> None:
        super().__init__()
        # Flatten and Dropout share index 1 so the parameter names stay those of insightface.
        self.layers = nn.Sequential(
            ConvBN(channels, channels, kernel=kernel, groups=channels),
            nn.Sequential(nn.Flatten(), nn.Dropout(dropout)),
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _check_blocks(blocks: Sequence[int]) -> tuple[int, int, int, int]:
    values = tuple(blocks)
    if len(values) != 4 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in values):
        raise ValueError(f"blocks must be 4 positive ints; got {blocks!r}")
    return values  # type: ignore[return-value]


class MobileFaceNet(GradCheckpointing, nn.Module):
    """MobileFaceNet: (B, 3, S, S) images normalised as (x - 127.5) / 127.5 -> (B, embedding_size).

    Activation checkpointing: ``set_grad_checkpointing()``; a block is a conv or bottleneck, a stage ends
    at each stride-2 bottleneck (stem; then three down-sampling bottlenecks with their stacks).

    Args:
        embedding_size: D, the output dimension (default 512).
        input_size: S, the image side in pixels (default 112; >= 16; square only).
        blocks: bottlenecks per stage (default (1, 4, 6, 2), insightface `mbf`; (2, 8, 12, 4) is `mbf_large`).
        scale: channel multiplier, an int >= 1 (default 2; `mbf_large` uses 4).
        dropout: drop probability before the final Linear (default 0.0).
    """

    def __init__(
        self,
        embedding_size: int = 512,
        input_size: int | Sequence[int] = 112,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        blocks = _check_blocks(blocks)
        if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
            raise ValueError(f"scale must be an int >= 1; got {scale!r}")
        check_backbone_args(embedding_size, dropout)
        self.input_size = square_input_size(input_size)
        self.embedding_size = embedding_size
        self.blocks_per_stage = blocks
        c1, c2 = 64 * scale, 128 * scale

        first = (
            ConvBNPReLU(c1, c1, kernel=3, padding=1, groups=64)
            if blocks[0] == 1
            else BottleneckStack(c1, blocks[0], expanded=128)
        )
        self.layers = nn.ModuleList(
            [
                ConvBNPReLU(3, c1, kernel=3, stride=2, padding=1),
                first,
                Bottleneck(c1, c1, expanded=128, stride=2, residual=False),
                BottleneckStack(c1, blocks[1], expanded=128),
                Bottleneck(c1, c2, expanded=256, stride=2, residual=False),
                BottleneckStack(c2, blocks[2], expanded=256),
                Bottleneck(c2, c2, expanded=512, stride=2, residual=False),
                BottleneckStack(c2, blocks[3], expanded=256),
            ]
        )
        self.conv_sep = ConvBNPReLU(c2, 512)
        self.feature_map_size = downsampled_size(self.input_size, 4)
        self.features = GDC(512, embedding_size, kernel=self.feature_map_size, dropout=dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        # insightface's initialisation: Kaiming normal (fan_out) for conv and linear, BN scale 1 shift 0.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float images -> (B, D) unnormalised embeddings."""
        check_images(x, self.input_size, type(self).__name__)
        return self.features(self.conv_sep(self.run_stages(x)))

    def checkpoint_stages(self) -> list[list[nn.Module]]:
        """Four stages: the stem (+ its stack), then each stride-2 bottleneck with the stack after it."""

        def blocks(layer: nn.Module) -> list[nn.Module]:
            return list(layer.layers) if isinstance(layer, BottleneckStack) else [layer]

        layers = list(self.layers)
        return [[*blocks(layers[i]), *blocks(layers[i + 1])] for i in range(0, len(layers), 2)]
