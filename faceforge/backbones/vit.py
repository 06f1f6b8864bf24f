"""Vision Transformers as insightface's arcface_torch trains them for faces (ViT-T/S/B/L, 9x9 patches).

Layout (arcface_torch `backbones/vit.py`; its WebFace42M ViT-T-1.5G and ViT-B-11G models):

    patch_embed  Conv2d(3, C, 9, stride 9)                  (B, L, C), L = (S // 9)^2 = 144 at 112x112
    + pos_embed  learned (1, L, C); no class token
    [training]   random token masking: a random int(L (1 - mask_ratio)) tokens per image go on
    blocks       `depth` pre-norm blocks: x + DropPath(Attn(LN(x))), x + DropPath(MLP(LN(x)))
                 Attn: qkv = Linear(C, 3C, no bias), H heads, softmax(q k^T / sqrt(C/H)) v, proj Linear(C, C)
                 MLP: Linear(C, 4C) - ReLU6 - Linear(4C, C); DropPath rates rise linearly 0 .. drop_path
    norm         LayerNorm(C)
    [training]   the masked positions get the learned `mask_token` (after the blocks and the norm)
    feature      flatten (B, L C) - Linear(L C, C, no bias) - BN1d - Linear(C, D, no bias) - BN1d (eps 2e-5)

Presets (width C / depth / heads): vit_t 256/12/8, vit_s 512/12/8, vit_b 512/24/8, vit_l 768/24/8.
Module and parameter names are arcface_torch's (`patch_embed.proj`, `pos_embed`, `mask_token`,
`blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`, `feature.0..3`), so an arcface_torch
ViT state dict loads with `load_state_dict`. Attention runs through
`torch.nn.functional.scaled_dot_product_attention` (the fused kernels where the device has them).

One difference from arcface_torch: its `random_masking` always masks 10 % (the `mask_ratio` argument
only switches masking on or off, so its "mask 0.05" variants mask 0.1); here `mask_ratio` is the
fraction masked. Activation checkpointing per block: `set_grad_checkpointing()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from faceforge.backbones.checkpointing import GradCheckpointing
from faceforge.backbones.iresnet import check_backbone_args, check_images, square_input_size

__all__ = ["VIT_PRESETS", "VisionTransformer", "kept_tokens", "random_token_order", "vit_preset"]

# (width C, depth, heads) of arcface_torch's presets.
VIT_PRESETS: dict[str, tuple[int, int, int]] = {
    "vit_t": (256, 12, 8),
    "vit_s": (512, 12, 8),
    "vit_b": (512, 24, 8),
    "vit_l": (768, 24, 8),
}

PATCH_SIZE = 9
BN_EPS = 2e-5  # the feature head's BatchNorms, as arcface_torch


class DropPath(nn.Module):
    """Stochastic depth: while training, zero a residual branch for a random `p` of the samples and
    scale the others by 1 / (1 - p), so the expectation is unchanged. (B, ...) -> (B, ...)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


class Mlp(nn.Module):
    """Linear(C, hidden) - ReLU6 - Linear(hidden, C), per token: (B, L, C) -> (B, L, C)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention, (B, L, C) -> (B, L, C); qkv without bias, scale 1 / sqrt(C / H)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, C / H)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def macs(self, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
        """Multiply-accumulates of the two matrix products q k^T and attn v (the Linears count themselves):
        2 B L^2 C for (B, L, C) tokens."""
        b, n, c = inputs[0].shape
        return 2 * b * n * n * c


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))). (B, L, C)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided conv: (B, 3, S, S) -> (B, (S // p)^2, C)."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def random_token_order(batch: int, tokens: int, device: torch.device | None = None) -> torch.Tensor:
    """Per image, a random order of its tokens, kept ones first: (B, L) int64 indices, a uniform random
    permutation per row (argsort of uniform noise, as arcface_torch / MAE). The first
    ``kept_tokens(L, mask_ratio)`` of each row are kept."""
    return torch.argsort(torch.rand(batch, tokens, device=device), dim=1)


def kept_tokens(tokens: int, mask_ratio: float) -> int:
    """How many of `tokens` survive masking: int(L (1 - mask_ratio)) as arcface_torch (129 of 144 at 0.1),
    at least 1."""
    return max(1, int(tokens * (1.0 - mask_ratio)))


class VisionTransformer(GradCheckpointing, nn.Module):
    """ViT backbone: (B, 3, S, S) images normalised as (x - 127.5) / 127.5 -> (B, embedding_size).

    Args:
        embedding_size: D, the output dimension (default 512).
        input_size: S, the image side in pixels (default 112; >= patch_size; square only).
        dim / depth / num_heads: width C, number of blocks, attention heads (the presets fix them).
        width: multiplier on `dim` (rounded to a multiple of `num_heads`), for small CPU runs.
        patch_size: side of the square patches (default 9: 12 x 12 = 144 tokens at 112).
        mlp_ratio: hidden width of the MLP over C (default 4).
        drop_path: stochastic depth of the last block; block i gets drop_path * i / (depth - 1).
        mask_ratio: fraction of the tokens masked per image while training (default 0.1; 0 = off, and the
            unused `mask_token` is frozen: DDP would otherwise wait for its gradient).
    """

    def __init__(
        self,
        embedding_size: int = 512,
        input_size: int | Sequence[int] = 112,
        dim: int = 256,
        depth: int = 12,
        num_heads: int = 8,
        width: float = 1.0,
        patch_size: int = PATCH_SIZE,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.1,
        mask_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        check_backbone_args(embedding_size, 0.0, width)
        for name, value in (("dim", dim), ("depth", depth), ("num_heads", num_heads), ("patch_size", patch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1); got {drop_path!r}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1) (the fraction of tokens masked); got {mask_ratio!r}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0; got {mlp_ratio!r}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads={num_heads}")
        self.input_size = square_input_size(input_size, minimum=patch_size)
        self.embedding_size = embedding_size
        self.dim = max(1, round(dim * width / num_heads)) * num_heads
        self.depth, self.num_heads, self.patch_size = depth, num_heads, patch_size
        self.mask_ratio = float(mask_ratio)
        self.num_patches = (self.input_size // patch_size) ** 2
        self.blocks_per_stage = (depth,)  # one stage of `depth` blocks (the complexity table's column)

        c, n = self.dim, self.num_patches
        self.patch_embed = PatchEmbed(patch_size, c)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, c))
        rates = [drop_path * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]  # torch.linspace(0, p, depth)
        self.blocks = nn.ModuleList(Block(c, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(c)
        self.feature = nn.Sequential(
            nn.Linear(n * c, c, bias=False),
            nn.BatchNorm1d(c, eps=BN_EPS),
            nn.Linear(c, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=BN_EPS),
        )
        # without masking no forward reads the mask token: frozen, so that DDP (which waits for a gradient of every
        # trained parameter) and the optimiser leave it alone; it stays in the state dict (arcface_torch's keys)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c), requires_grad=self.mask_ratio > 0)
        self._init_weights()

    def _init_weights(self) -> None:
        # arcface_torch's: Linear weights and pos_embed truncated N(0, 0.02^2), Linear biases 0,
        # LayerNorm 1 / 0, mask token N(0, 0.02^2); the conv and BNs keep PyTorch's defaults.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that AdamW should not decay besides norms and biases (timm's method name)."""
        return {"pos_embed", "mask_token"}

    def checkpoint_stages(self) -> list[list[nn.Module]]:
        """One stage: the transformer blocks."""
        return [list(self.blocks)]

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, L, C) tokens after the blocks and the final LayerNorm, masked
        positions (while training with mask_ratio > 0) filled with `mask_token`."""
        check_images(x, self.input_size, type(self).__name__)
        x = self.patch_embed(x) + self.pos_embed
        b, n, c = x.shape
        order = None
        if self.training and self.mask_ratio > 0:
            order = random_token_order(b, n, device=x.device)
            keep = kept_tokens(n, self.mask_ratio)
            x = torch.gather(x, 1, order[:, :keep, None].expand(b, keep, c))
        x = self.norm(self.run_stages(x))
        if order is not None:
            full = torch.cat([x, self.mask_token.to(x.dtype).expand(b, n - x.shape[1], c)], dim=1)
            restore = torch.argsort(order, dim=1)  # position i of the image is entry restore[i] of `full`
            x = torch.gather(full, 1, restore[:, :, None].expand(b, n, c))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float images -> (B, D) unnormalised embeddings."""
        x = self.tokens(x)
        return self.feature(x.reshape(x.shape[0], -1))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, depth={self.depth}, heads={self.num_heads}, patch={self.patch_size}, "
                f"tokens={self.num_patches}, input_size={self.input_size}, mask_ratio={self.mask_ratio}")


def vit_preset(name: str) -> Any:
    """The factory of preset `name` (a key of VIT_PRESETS): VisionTransformer with its width, depth and
    heads fixed (`width=` still scales the width)."""
    dim, depth, heads = VIT_PRESETS[name]

    def factory(**kwargs: Any) -> VisionTransformer:
        fixed = sorted({"dim", "depth", "num_heads"} & set(kwargs))
        if fixed:
            raise TypeError(f"backbone {name!r} fixes dim={dim}, depth={depth}, num_heads={heads}; got {fixed[0]}= "
                            "(use width= to scale it, or VisionTransformer(...) for another shape)")
        return VisionTransformer(dim=dim, depth=depth, num_heads=heads, **kwargs)

    factory.__doc__ = f"arcface_torch's {name}: ViT of width {dim}, {depth} blocks, {heads} heads, 9x9 patches."
    return factory
