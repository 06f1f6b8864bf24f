"""SFNet: the residual CNNs of SphereFace (Liu et al. 2017, Table 2) that SphereFace2 trains, as OpenSphere's
SFNet-20 / SFNet-64: no BatchNorm by default, PReLU, residual units, a 512-D embedding.

Layout for `layers=(1, 2, 4, 1)` (SFNet-20) at S x S (S = 112 in the papers' recipes):

    stage k = 1..4, widths 64/128/256/512 (times `width`):
        conv3x3 stride 2 (with bias) - PReLU                                  (B, w_k, S / 2^k, S / 2^k)
        layers[k] residual units:  x + PReLU(conv3x3(PReLU(conv3x3(x))))
    flatten (512 s s, s = ceil(S / 16): 7 at 112) - Dropout - Linear(512 s s, D)            (B, D)

Depth = 4 + 2 sum(layers) convolution layers: (1, 2, 4, 1) is the 20-layer net, (3, 8, 16, 3) the 64-layer
one. `batch_norm=True` puts BatchNorm after every convolution (which then loses its bias) and a BN1d on
the embedding, like OpenSphere's `sfnet*_bn` nets; the residual unit keeps SphereFace's form.

Initialisation as SphereFace's Caffe models: the stride-2 convolutions and the FC layer Xavier-normal, the
convolutions inside residual units N(0, 0.01^2), so that every unit starts close to the identity (with
no BatchNorm, this is what keeps the 64-layer net trainable); biases 0, PReLU slopes 0.25.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from faceforge.backbones.checkpointing import GradCheckpointing
from faceforge.backbones.iresnet import (
    check_backbone_args,
    check_images,
    check_layers,
    downsampled_size,
    scaled_width,
    square_input_size,
)

# Residual units per stage (OpenSphere `sfnet4` .. `sfnet64`; SphereFace Table 2).
SFNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "sfnet20": (1, 2, 4, 1),
    "sfnet64": (3, 8, 16, 3),
}

STAGE_WIDTHS = (64, 128, 256, 512)


class ConvPReLU(nn.Module):
    """conv3x3 (stride) - [BN] - PReLU. (B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride)).

    The convolution starts Xavier-normal (its bias at 0)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, batch_norm: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=not batch_norm)
        self.bn = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.prelu = nn.PReLU(out_channels)
        nn.init.xavier_normal_(self.conv.weight)
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu(self.bn(self.conv(x)))


class ResidualUnit(nn.Module):
    """x + PReLU(conv3x3(PReLU(conv3x3(x)))), SphereFace's residual unit; shape unchanged.

    Both convolutions start N(0, 0.01^2), so that the unit starts close to the identity."""

    def __init__(self, channels: int, batch_norm: bool) -> None:
        super().__init__()
        self.unit1 = ConvPReLU(channels, channels, 1, batch_norm)
        self.unit2 = ConvPReLU(channels, channels, 1, batch_norm)
        for unit in (self.unit1, self.unit2):
            nn.init.normal_(unit.conv.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.unit2(self.unit1(x))


class SFNet(GradCheckpointing, nn.Module):
    """SFNet backbone: (B, 3, S, S) images normalised as (x - 127.5) / 127.5 -> (B, embedding_size).

    Activation checkpointing per block (a conv or residual unit) or per stage: ``set_grad_checkpointing()``.

    Args:
        layers: residual units per stage: (1, 2, 4, 1) for SFNet-20, (3, 8, 16, 3) for SFNet-64.
        embedding_size: D (default 512).
        input_size: S, the image side in pixels (default 112; >= 16; square only).
        width: multiplier on every channel count (1.0 gives 64/128/256/512), for small CPU demos.
        dropout: drop probability before the FC layer (default 0.0).
        batch_norm: BatchNorm after every convolution and on the embedding (default False, as SphereFace).
    """

    def __init__(
        self,
        layers: Sequence[int] = SFNET_LAYERS["sfnet20"],
        embedding_size: int = 512,
        input_size: int | Sequence[int] = 112,
        width: float = 1.0,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.blocks_per_stage = check_layers(layers, minimum=0, what="residual units per stage")
        check_backbone_args(embedding_size, dropout, width)
        self.input_size = square_input_size(input_size)
        self.embedding_size = embedding_size
        self.widths = tuple(scaled_width(c, width) for c in STAGE_WIDTHS)
        self.batch_norm = batch_norm

        stages, in_channels = [], 3
        for channels, units in zip(self.widths, self.blocks_per_stage):
            stage = [ConvPReLU(in_channels, channels, 2, batch_norm)]
            stage += [ResidualUnit(channels, batch_norm) for _ in range(units)]
            stages.append(nn.Sequential(*stage))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_map_size = downsampled_size(self.input_size, 4)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(self.widths[3] * self.feature_map_size**2, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size) if batch_norm else nn.Identity()
        nn.init.xavier_normal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float images -> (B, D) unnormalised embeddings."""
        check_images(x, self.input_size, type(self).__name__)
        x = self.run_stages(x)
        return self.features(self.fc(self.dropout(torch.flatten(x, 1))))

    def checkpoint_stages(self) -> list[list[nn.Module]]:
        """The four stages, each its stride-2 conv then its residual units."""
        return [list(stage) for stage in self.stages]

    def extra_repr(self) -> str:
        return (
            f"layers={self.blocks_per_stage}, widths={self.widths}, input_size={self.input_size}, "
            f"batch_norm={self.batch_norm}"
        )
