"""Vision Transformers (faceforge/backbones/vit.py): arcface_torch's shapes and key names, token masking,
checkpointing, cost, BN folding, ONNX export, and a few training steps through `faceforge train`.

The full-size presets are only built on the meta device (shapes, key names, GFLOPs); everything that runs
uses a small width. The expected key names, shapes and counts are written out here from arcface_torch's
module structure (insightface recognition/arcface_torch/backbones/vit.py), independent of the code.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from faceforge.backbones import BACKBONES, build, count_flops, count_parameters
from faceforge.backbones.fuse import batchnorms, foldable_pairs, fuse_bn, unfoldable
from faceforge.backbones.vit import VisionTransformer, kept_tokens, random_token_order

# arcface_torch's presets: (width C, depth, heads), 9x9 patches, 112x112 -> 12 x 12 = 144 tokens.
PRESETS = {"vit_t": (256, 12, 8), "vit_s": (512, 12, 8), "vit_b": (512, 24, 8), "vit_l": (768, 24, 8)}
TOKENS = 144
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def arcface_torch_shapes(c: int, depth: int, n: int = TOKENS, d: int = 512, patch: int = 9) -> dict[str, tuple]:
    """Key -> shape of an arcface_torch VisionTransformer(embed_dim=c, depth, num_classes=d, norm_layer="ln")
    state dict: PatchEmbed.proj conv, pos_embed, Block(norm1, attn.qkv (no bias), attn.proj, norm2, mlp.fc1,
    mlp.fc2), norm, feature = Sequential(Linear(n c, c, no bias), BN1d(c), Linear(c, d, no bias), BN1d(d)),
    mask_token. Dropouts and DropPath hold no tensors."""
    shapes: dict[str, tuple] = {"pos_embed": (1, n, c), "patch_embed.proj.weight": (c, 3, patch, patch),
                                "patch_embed.proj.bias": (c,)}
    for i in range(depth):
        p = f"blocks.{i}."
        shapes |= {p + "norm1.weight": (c,), p + "norm1.bias": (c,), p + "attn.qkv.weight": (3 * c, c),
                   p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,), p + "norm2.weight": (c,),
                   p + "norm2.bias": (c,), p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,),
                   p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,)}
    shapes |= {"norm.weight": (c,), "norm.bias": (c,), "feature.0.weight": (c, n * c), "feature.2.weight": (d, c)}
    for bn, width in (("feature.1", c), ("feature.3", d)):
        shapes |= {f"{bn}.{k}": (() if k == "num_batches_tracked" else (width,)) for k in BN_KEYS}
    shapes["mask_token"] = (1, 1, c)
    return shapes


def arcface_torch_state_dict(c: int, depth: int, n: int = TOKENS, d: int = 512, seed: int = 0,
                             dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors under arcface_torch's names and shapes (BN variances positive, counters int64)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in arcface_torch_shapes(c, depth, n, d).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=g, dtype=dtype)
        elif key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "1.weight", "3.weight")):
            state[key] = 0.5 + torch.rand(shape, generator=g, dtype=dtype)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=g, dtype=dtype)
    return state


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, depth: int, heads: int, patch: int = 9) -> torch.Tensor:
    """arcface_torch's ViT in eval mode written out with plain formulas (explicit softmax attention)."""

    def layer_norm(t: torch.Tensor, key: str) -> torch.Tensor:
        mean = t.mean(-1, keepdim=True)
        var = ((t - mean) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm
        return (t - mean) / torch.sqrt(var + 1e-5) * sd[key + ".weight"] + sd[key + ".bias"]

    def batch_norm(t: torch.Tensor, key: str) -> torch.Tensor:
        return (t - sd[key + ".running_mean"]) / torch.sqrt(sd[key + ".running_var"] + 2e-5) * sd[key + ".weight"] + sd[key + ".bias"]

    t = torch.nn.functional.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2) + sd["pos_embed"]
    b, n, c = t.shape
    hd = c // heads
    for i in range(depth):
        p = f"blocks.{i}."
        h = layer_norm(t, p + "norm1")
        q, k, v = (h @ sd[p + "attn.qkv.weight"].T).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)
        o = (a @ v).transpose(1, 2).reshape(b, n, c)
        t = t + o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        h = layer_norm(t, p + "norm2")
        h = torch.clamp(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"], 0.0, 6.0)  # ReLU6
        t = t + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    f = layer_norm(t, "norm").reshape(b, n * c)
    f = batch_norm(f @ sd["feature.0.weight"].T, "feature.1")
    return batch_norm(f @ sd["feature.2.weight"].T, "feature.3")


def on_meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return build(name, **kwargs)


def small_vit(dim: int = 32, depth: int = 2, heads: int = 4, **kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**{"embedding_size": 16, "dim": dim, "depth": depth, "num_heads": heads, **kwargs})


# ---------------------------------------------------------------------------------------------- shapes, names


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_arcface_torch_state_dict_keys_and_shapes(name):
    c, depth, heads = PRESETS[name]
    model = on_meta(name)
    assert name in BACKBONES.names()
    assert (model.dim, model.depth, model.num_heads, model.num_patches) == (c, depth, heads, TOKENS)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == arcface_torch_shapes(c, depth)
    rates = [float(b.drop_path.p) for b in model.blocks]  # torch.linspace(0, 0.1, depth), as arcface_torch
    assert rates == pytest.approx(torch.linspace(0, 0.1, depth, dtype=torch.float64).tolist(), abs=1e-12)
    assert model.mask_ratio == 0.1


def test_vit_t_loads_an_arcface_torch_state_dict_strictly():
    model = build("vit_t")
    state = arcface_torch_state_dict(256, 12)
    assert model.load_state_dict(state, strict=True)  # no missing or unexpected keys
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_forward_equals_arcface_torch_formulas_in_float64():
    # float64: SDPA and the explicit softmax differ by summation order only (~1e-15 relative); 1e-10
    # leaves a wide margin and is far below any formula error (a wrong scale or norm changes O(1e-2)).
    model = VisionTransformer(embedding_size=16, dim=32, depth=2, num_heads=4).double().eval()
    state = arcface_torch_state_dict(32, 2, d=16, dtype=torch.float64)
    model.load_state_dict(state, strict=True)
    x = torch.randn(3, 3, 112, 112, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, expected = model(x), reference_forward(state, x, depth=2, heads=4)
    assert got.shape == (3, 16)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("size", "tokens"), [(112, 144), (56, 36), (16, 1)])
def test_output_shape_and_token_count(size, tokens):
    model = small_vit(input_size=size).eval()
    assert model.num_patches == tokens and model.feature[0].in_features == tokens * 32
    assert model(torch.randn(2, 3, size, size)).shape == (2, 16)


def test_presets_refuse_their_fixed_shape_and_bad_arguments_are_clear():
    with pytest.raises(TypeError, match="'vit_t' fixes dim=256, depth=12"):
        build("vit_t", depth=3)
    assert on_meta("vit_s", width=0.125).dim == 64  # width scales C, kept a multiple of the heads
    for kwargs, match in (({"mask_ratio": 1.0}, "mask_ratio must be in"), ({"drop_path": -0.1}, "drop_path"),
                          ({"dim": 30, "num_heads": 4}, "not divisible by num_heads"),
                          ({"input_size": 8}, "at least 9")):
        with pytest.raises(ValueError, match=match):
            VisionTransformer(**kwargs)
    with pytest.raises(ValueError, match=r"input_size=112, expected \(B, 3, 112, 112\)"):
        small_vit()(torch.zeros(1, 3, 56, 56))


# ---------------------------------------------------------------------------------------------- masking


def test_kept_tokens_is_arcface_torch_count():
    assert kept_tokens(144, 0.1) == 129  # int(144 * 0.9): 15 tokens masked per image
    assert kept_tokens(144, 0.05) == 136 and kept_tokens(144, 0.0) == 144 and kept_tokens(1, 0.5) == 1


def test_masked_tokens_become_the_mask_token_and_the_rest_see_only_kept_tokens():
    model = small_vit(drop_path=0.0, mask_ratio=0.1).double().train()
    x = torch.randn(4, 3, 112, 112, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    got = model.tokens(x)
    torch.manual_seed(5)
    order = random_token_order(4, TOKENS)  # the same draw: the masking is the first random use
    keep = 129
    with torch.no_grad():
        h = model.patch_embed(x) + model.pos_embed
        h = torch.gather(h, 1, order[:, :keep, None].expand(4, keep, 32))
        for block in model.blocks:
            h = block(h)
        h = model.norm(h)
    for i in range(4):
        assert sorted(order[i].tolist()) == list(range(TOKENS))  # a permutation: each token once
        masked, kept = order[i, keep:], order[i, :keep]
        assert len(masked) == 15
        assert torch.equal(got[i, masked], model.mask_token[0].expand(15, 32).to(got.dtype))
        torch.testing.assert_close(got[i, kept], h[i], rtol=0, atol=0)
    # different images get different masks
    assert len({tuple(sorted(order[i, keep:].tolist())) for i in range(4)}) == 4
    # the mask token receives a gradient while training, and the output depends on which tokens are masked
    model.zero_grad()
    model(x).sum().backward()
    assert model.mask_token.grad.abs().sum() > 0


def test_no_masking_in_eval_or_at_ratio_zero():
    x = torch.randn(2, 3, 112, 112, dtype=torch.float64)
    masked = small_vit(drop_path=0.0, mask_ratio=0.1).double()
    with torch.no_grad():
        assert torch.equal(masked.eval().tokens(x), masked.eval().tokens(x))  # deterministic in eval
        off = small_vit(drop_path=0.0, mask_ratio=0.0).double()
        torch.testing.assert_close(off.train().tokens(x), off.eval().tokens(x), rtol=0, atol=0)
        assert not torch.equal(masked.train().tokens(x), masked.eval().tokens(x))


# ---------------------------------------------------------------------------------------------- checkpointing


def test_checkpointing_per_block_gives_identical_outputs_and_gradients_with_masking_and_drop_path():
    # float64, same seed: the mask is drawn outside the blocks, DropPath's draws inside are replayed by the
    # checkpoint; the recomputation runs the same kernels on the same inputs (1e-12 relative is ~1e3 ulps).
    plain = small_vit(drop_path=0.3, mask_ratio=0.1).double().train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    assert ckpt.checkpoint_stages() == [list(ckpt.blocks)]
    x = torch.randn(4, 3, 112, 112, dtype=torch.float64)
    outs = []
    for model in (plain, ckpt):
        torch.manual_seed(3)
        out = model(x)
        (out * torch.arange(16, dtype=torch.float64)).sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-14)
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-12, atol=1e-14, msg=name)


# ---------------------------------------------------------------------------------------------- cost


def vit_macs(c: int, depth: int, n: int = TOKENS, d: int = 512, patch: int = 9) -> int:
    """MACs of one 112x112 image by hand: patch conv, per block qkv + proj + MLP + q k^T + attn v, feature."""
    block = n * c * 3 * c + n * c * c + 2 * n * c * 4 * c + 2 * n * n * c
    return n * c * 3 * patch * patch + depth * block + n * c * c + c * d


def vit_parameters(c: int, depth: int, n: int = TOKENS, d: int = 512, patch: int = 9) -> int:
    block = 2 * c + 3 * c * c + c * c + c + 2 * c + 4 * c * c + 4 * c + 4 * c * c + c
    return c * 3 * patch * patch + c + n * c + c + depth * block + 2 * c + n * c * c + 2 * c + c * d + 2 * d


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameters_and_macs_match_hand_arithmetic(name):
    c, depth, _ = PRESETS[name]
    model = on_meta(name)
    assert count_parameters(model) == vit_parameters(c, depth)
    assert count_flops(model) == vit_macs(c, depth)


@pytest.mark.parametrize(("name", "gflops"), [("vit_t", 1.5), ("vit_b", 11.0)])
def test_gflops_agree_with_arcface_torch_names(name, gflops):
    # arcface_torch's model names: ViT-T-1.5G, ViT-B-11G (attention's products counted); within 5 %
    g = count_flops(on_meta(name)) / 1e9
    assert abs(g / gflops - 1) < 0.05, g


def test_complexity_table_lists_the_vits():
    from faceforge.backbones.complexity import complexity_row, format_table, preset_names

    assert preset_names()[-4:] == ["vit_t", "vit_s", "vit_b", "vit_l"]  # the table's last rows, by size
    for name in ("vit_t", "vit_b"):
        c, depth, _ = PRESETS[name]
        row = format_table([(name, "", *complexity_row(name, 112))]).splitlines()[-1]
        assert row == f"| {name} |  | ({depth},) | {vit_parameters(c, depth) / 1e6:.1f} | {vit_macs(c, depth) / 1e9:.3f} |"


# ---------------------------------------------------------------------------------------------- deployment


def test_bn_folding_folds_both_feature_bns_and_leaves_layernorms():
    from test_fuse import randomise_batchnorms

    model = randomise_batchnorms(small_vit().double()).eval()
    assert foldable_pairs(model) == [("feature.0", "feature.1"), ("feature.2", "feature.3")]
    x = torch.randn(3, 3, 112, 112, dtype=torch.float64)
    with torch.no_grad():
        expected, fused = model(x), fuse_bn(model)
        got = fused(x)
    assert batchnorms(fused) == []
    # float64: folding changes rounding only (~1e-15 relative)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


class _Unfoldable(nn.Module):
    """One BN of each kind that cannot be folded, and one that can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.shared = nn.BatchNorm2d(3)  # its conv output is also added to the result
        self.after_relu = nn.BatchNorm2d(3)  # follows a ReLU, not a conv
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.batch_stats = nn.BatchNorm2d(3, track_running_stats=False)  # no running statistics
        self.conv3 = nn.Conv2d(3, 3, 1)
        self.folds = nn.BatchNorm2d(3)
        self.unused = nn.BatchNorm2d(3)  # never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return (self.shared(y) + y + self.after_relu(torch.relu(x)) + self.batch_stats(self.conv2(x))
                + self.folds(self.conv3(x)))


def test_bn_folding_names_what_it_skips_and_why():
    from test_fuse import randomise_batchnorms

    model = _Unfoldable().double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
            randomise_batchnorms(m)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    reasons = unfoldable(model, x)
    assert list(reasons) == ["shared", "after_relu", "batch_stats", "unused"]
    assert "output of conv is also read elsewhere" in reasons["shared"]
    assert "not the output of a conv / Linear" in reasons["after_relu"]
    assert "no running statistics" in reasons["batch_stats"]
    assert "never ran it" in reasons["unused"]
    fused = fuse_bn(model, x)
    assert batchnorms(fused) == list(reasons)  # exactly the skipped ones stay
    torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)
    # an IResNet: each block's bn1 and the output bn2 stay, each with its reason; a ViT: nothing stays
    r = unfoldable(build("iresnet", layers=(1, 1, 1, 1), input_size=32, width=0.125, embedding_size=8))
    assert set(r) == {"bn2", *(f"layer{i}.0.bn1" for i in range(1, 5))}
    assert all("not the output of a conv / Linear" in why for why in r.values())
    assert unfoldable(small_vit()) == {}


def test_onnx_export_parity_and_recognizer(tmp_path: Path, one_thread):
    pytest.importorskip("onnxruntime")
    from test_inference import small_backbone

    from faceforge.deploy.export import compare_int8, export_backbone, quantize_onnx, real_faces
    from faceforge.deploy.inference import Recognizer, TorchBackend, load_model

    model, info = small_backbone("vit_t", 112)
    assert model.dim == 32  # the helper scales the width
    report = export_backbone(model, info, tmp_path / "vit.onnx")
    assert report.parity_min_cosine >= 1 - 1e-4 and report.parity_images == 12
    assert report.bn_folded == 2 and report.bn_left == []
    r = load_model(tmp_path / "vit.onnx")
    crops = real_faces(112)
    e_onnx, e_torch = r.embed(crops), Recognizer(TorchBackend(model), info).embed(crops)
    cos = np.einsum("nd,nd->n", e_onnx.astype(np.float64), e_torch.astype(np.float64))
    assert cos.min() >= 1 - 1e-4  # float32 ONNX vs float32 PyTorch, different kernels: ~1e-6 typical
    assert r.embed(np.concatenate([crops, crops[:3]])).shape == (15, 16)  # dynamic batch
    # dynamic int8: weights rounded to 1/255 of their range, the embedding direction stays (measured 0.99993)
    quantize_onnx(tmp_path / "vit.onnx", tmp_path / "vit.int8.onnx", "dynamic", info)
    assert compare_int8(tmp_path / "vit.onnx", tmp_path / "vit.int8.onnx", info)["cosine int8 vs float, min"] > 0.99


# ---------------------------------------------------------------------------------------------- training


def vit_config(output: Path, mask_ratio: float, checkpointing: str | bool) -> dict:
    return {
        "seed": 0, "output": str(output),
        "model": {"backbone": "vit_t", "embedding_size": 32, "grad_checkpointing": checkpointing,
                  "kwargs": {"width": 0.125, "mask_ratio": mask_ratio, "drop_path": 0.1}},
        "head": {"name": "arcface", "kwargs": {"s": 16.0}},
        "data": {"num_identities": 8, "images_per_identity": 4, "image_size": 112, "batch_size": 16, "cache": True,
                 "eval_pairs": 0},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
        "train": {"steps": 3, "log_every": 1, "checkpoint_every": 3, "progress": False},
    }


@pytest.mark.parametrize(("mask_ratio", "checkpointing"), [(0.1, "block"), (0.0, False)])
def test_a_tiny_vit_trains_through_faceforge_train(mask_ratio, checkpointing, tmp_path: Path, one_thread):
    from faceforge.build import build_backbone
    from faceforge.cli import main
    from faceforge.deploy.export import real_faces
    from faceforge.deploy.inference import Recognizer, TorchBackend, load_model
    from faceforge.deploy.modelfile import backbone_from_checkpoint
    from faceforge.core.checkpoint import load_checkpoint
    from faceforge.train.config import config_from_dict

    run = tmp_path / "run"
    data = vit_config(run, mask_ratio, checkpointing)
    (tmp_path / "vit.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", str(tmp_path / "vit.yaml")]) == 0

    losses = [float(line.split("loss ")[1].split()[0]) for line in (run / "train.log").read_text().splitlines()
              if "loss " in line]
    assert losses and all(math.isfinite(v) for v in losses)
    torch.manual_seed(0)
    start = build_backbone(config_from_dict(data, "<test>")).state_dict()  # as train() initialises it
    trained = load_checkpoint(run / "last.pt")
    assert trained["step"] == 3
    backbone, info = backbone_from_checkpoint(run / "last.pt")
    assert isinstance(backbone, VisionTransformer) and backbone.mask_ratio == mask_ratio
    moved = [k for k, v in backbone.state_dict().items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert "mask_token" in moved or mask_ratio == 0.0
    assert {"pos_embed", "patch_embed.proj.weight", "blocks.11.mlp.fc2.weight", "feature.2.weight"} <= set(moved)

    # the run's model file loads into a Recognizer and embeds as the checkpoint's backbone does
    r = load_model(run)
    crops = real_faces(112)
    e_file, e_ckpt = r.embed(crops), Recognizer(TorchBackend(backbone), info).embed(crops)
    assert np.isfinite(e_file).all() and e_file.shape == (12, 32)
    np.testing.assert_allclose(e_file, e_ckpt, rtol=0, atol=1e-6)  # same weights, same float32 forward


# ---------------------------------------------------------------------------------------------- import-weights


def arcface_torch_iresnet_shapes(layers: tuple[int, ...], d: int = 512) -> dict[str, tuple]:
    """Key -> shape of arcface_torch's IResNet (iresnet.py): conv1/bn1/prelu stem, IBasicBlocks
    (bn1, conv1, bn2, prelu, conv2, bn3, downsample.0/1 in each stage's first block), bn2, fc, features."""
    def bn(prefix: str, c: int) -> dict[str, tuple]:
        return {f"{prefix}.{k}": (() if k == "num_batches_tracked" else (c,)) for k in BN_KEYS}

    shapes = {"conv1.weight": (64, 3, 3, 3), **bn("bn1", 64), "prelu.weight": (64,)}
    c_in = 64
    for stage, (c, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for j in range(n):
            p, ci = f"layer{stage}.{j}", (c_in if j == 0 else c)
            shapes |= {**bn(f"{p}.bn1", ci), f"{p}.conv1.weight": (c, ci, 3, 3), **bn(f"{p}.bn2", c),
                       f"{p}.prelu.weight": (c,), f"{p}.conv2.weight": (c, c, 3, 3), **bn(f"{p}.bn3", c)}
            if j == 0:
                shapes |= {f"{p}.downsample.0.weight": (c, ci, 1, 1), **bn(f"{p}.downsample.1", c)}
        c_in = c
    return shapes | bn("bn2", 512) | {"fc.weight": (d, 512 * 7 * 7), "fc.bias": (d,)} | bn("features", d)


def random_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.tensor(3) if k.endswith("num_batches_tracked") else
                0.5 + torch.rand(s, generator=g) if k.endswith("running_var") else 0.05 * torch.randn(s, generator=g))
            for k, s in shapes.items()}


def imported(out: Path) -> dict[str, torch.Tensor]:
    from faceforge.deploy.modelfile import load_backbone

    backbone, info = load_backbone(out / "model.safetensors")
    assert info.image_size == 112
    return backbone.state_dict()


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_import_weights_vit_t_into_a_model_file_that_eval_and_embed_take(tmp_path: Path, capsys, one_thread):
    from faceforge.cli import main
    from faceforge.data.pairs import write_bin
    from faceforge.deploy.export import real_faces
    from faceforge.deploy.inference import load_model

    state = arcface_torch_state_dict(256, 12)
    torch.save(state, tmp_path / "model.pt")
    out = tmp_path / "vit_t"
    assert main(["import-weights", str(tmp_path / "model.pt"), "--backbone", "vit_t", "--out", str(out)]) == 0
    assert "model.json" in capsys.readouterr().out
    assert_same_tensors(imported(out), state)
    assert json.loads((out / "model.json").read_text())["backbone"] == "vit_t"
    crops = real_faces(112)
    e = load_model(out).embed(crops)
    assert e.shape == (12, 512) and np.isfinite(e).all()
    # faceforge eval scores the imported model on a .bin pair set
    write_bin(tmp_path / "pairs.bin", [crops[i % 12] for i in range(20)], [i % 2 == 0 for i in range(10)])  # 10 folds
    assert main(["eval", str(out / "model.safetensors"), "--bin", str(tmp_path / "pairs.bin"),
                 "--output", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "results.json").is_file()


def test_import_weights_reads_training_checkpoints_and_ddp_prefixes(tmp_path: Path):
    from faceforge.deploy.import_weights import import_weights

    r18 = random_state(arcface_torch_iresnet_shapes((2, 2, 2, 2)))
    # arcface_torch's checkpoint_gpu_<rank>.pt: the backbone under state_dict_backbone beside the rest
    torch.save({"epoch": 3, "global_step": 1000, "state_dict_backbone": r18,
                "state_dict_softmax_fc": {"weight": torch.zeros(4, 512)}}, tmp_path / "ckpt.pt")
    import_weights(tmp_path / "ckpt.pt", "r18", tmp_path / "r18")
    assert_same_tensors(imported(tmp_path / "r18"), r18)

    with torch.device("meta"):
        mbf_keys = {k: tuple(v.shape) for k, v in build("mbf").state_dict().items()}  # arcface_torch's names:
    mbf = random_state(mbf_keys)                                                   # test_backbones checks them
    torch.save({f"module.{k}": v for k, v in mbf.items()}, tmp_path / "mbf.pth")  # a DDP-wrapped save
    import_weights(tmp_path / "mbf.pth", "mbf", tmp_path / "mbf")
    assert_same_tensors(imported(tmp_path / "mbf"), mbf)


def test_import_weights_names_the_keys_that_do_not_map_in_one_line(tmp_path: Path, capsys):
    from faceforge.cli import main

    state = arcface_torch_state_dict(256, 12)
    state["head.weight"] = torch.zeros(3)  # only in the file
    del state["blocks.11.mlp.fc2.bias"]  # missing from the file
    torch.save(state, tmp_path / "bad.pt")
    out = tmp_path / "out"
    assert main(["import-weights", str(tmp_path / "bad.pt"), "--backbone", "vit_t", "--out", str(out),
                 "--embedding-size", "128"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("faceforge import-weights: ")
    assert "keys that do not map: not in the backbone (1): head.weight" in err
    assert "missing from the file (1): blocks.11.mlp.fc2.bias" in err
    assert "feature.2.weight (512, 256) vs (128, 256)" in err  # a 512-D checkpoint is no 128-D backbone
    assert not out.exists()  # nothing written

    class Hostile:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"x": Hostile()}, tmp_path / "hostile.pt")
    assert main(["import-weights", str(tmp_path / "hostile.pt"), "--backbone", "vit_t", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "ran" not in captured.out and "not a torch state dict of tensors" in captured.err
