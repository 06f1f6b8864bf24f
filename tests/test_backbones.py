"""Backbones: shapes, published sizes and costs, presets, checkpointing, errors.

Big nets are built on the meta device (no memory); the expected counts are written out here as plain
arithmetic, independent of the code under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from faceforge.backbones import BACKBONES, IResNet, MobileFaceNet, SFNet, build, count_flops, count_parameters

# BigFace Table 1 and insightface's presets, copied here on purpose.
EXPECTED_LAYERS = {
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


def on_meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return build(name, **kwargs)


def halve(size: int, times: int = 4) -> int:
    for _ in range(times):
        size = (size + 1) // 2  # 3x3 conv, stride 2, padding 1: floor((n + 2 - 3) / 2) + 1
    return size


def iresnet_parameters(layers, width=1.0, embedding=512, size=112) -> int:
    """Parameter count of an IResNet, by hand: conv weights (no bias), BN (2 per channel), PReLU (1)."""
    w = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
    total = 3 * w[0] * 9 + 2 * w[0] + w[0]  # stem conv, BN, PReLU
    c_in = w[0]
    for c, n in zip(w, layers):
        for i in range(n):
            ci = c_in if i == 0 else c
            total += 2 * ci + ci * c * 9 + 2 * c + c + c * c * 9 + 2 * c  # BN conv BN PReLU conv BN
            if i == 0:
                total += ci * c + 2 * c  # 1x1 downsample conv + BN
        c_in = c
    s = halve(size)
    return total + 2 * w[3] + (w[3] * s * s * embedding + embedding) + 2 * embedding  # BN2d, FC, BN1d


def iresnet_macs(layers, width=1.0, embedding=512, size=112) -> int:
    """Multiply-accumulates of conv and linear layers for one image, by hand."""
    w = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
    total = size * size * w[0] * 3 * 9
    s, c_in = size, w[0]
    for c, n in zip(w, layers):
        t = (s + 1) // 2
        total += s * s * c * c_in * 9 + t * t * c * c * 9 + t * t * c * c_in  # first block
        total += (n - 1) * 2 * t * t * c * c * 9
        s, c_in = t, c
    return total + w[3] * s * s * embedding


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("size", "width"), [(32, 0.25), (48, 0.25), (50, 0.25), (56, 0.25), (64, 0.125), (112, 0.125)]
)
def test_iresnet_output_shape_and_fc_size(size, width):
    torch.manual_seed(0)
    model = IResNet(layers=(1, 1, 1, 1), embedding_size=32, input_size=size, width=width)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 32)
    assert torch.isfinite(out).all()
    side = halve(size)
    assert model.fc.in_features == round(512 * width) * side * side


def test_width_scales_every_channel_count():
    model = IResNet(layers=(1, 1, 1, 1), width=0.25, input_size=32)
    assert model.conv1.out_channels == 16
    assert [stage[0].conv2.out_channels for stage in model.stages] == [16, 32, 64, 128]


def test_r18_full_size_forward():
    model = build("r18").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512)
    assert model.fc.in_features == 512 * 7 * 7


@pytest.mark.parametrize(("size", "embedding"), [(112, 512), (56, 128), (48, 64)])
def test_mobilefacenet_output_shape(size, embedding):
    model = build("mobilefacenet", embedding_size=embedding, input_size=size, scale=1)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, embedding)
    gdc = model.features.layers[0].layers[0]
    assert gdc.kernel_size == (halve(size), halve(size)) and gdc.groups == 512


def test_build_passes_embedding_size_to_every_backbone():
    for name in BACKBONES.names():
        kwargs = {"layers": (1, 1, 1, 1)} if name == "iresnet" else {}
        model = on_meta(name, embedding_size=128, input_size=32, **kwargs)
        if name in EXPECTED_LAYERS:  # same forward code for every preset: check the FC, run the small ones
            assert model.fc.out_features == model.features.num_features == 128, name
            if sum(EXPECTED_LAYERS[name]) > 40:
                continue
        out = model.eval()(torch.zeros(1, 3, 32, 32, device="meta"))
        assert out.shape == (1, 128), name


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("name", "millions"), [("r18", 24.0), ("r34", 34.1), ("r50", 43.6), ("r100", 65.2), ("r200", 118.8)]
)
def test_published_parameter_counts(name, millions):
    assert round(count_parameters(on_meta(name)) / 1e6, 1) == millions


@pytest.mark.parametrize("name", list(EXPECTED_LAYERS))
def test_parameter_count_matches_hand_arithmetic(name):
    assert count_parameters(on_meta(name)) == iresnet_parameters(EXPECTED_LAYERS[name])


@pytest.mark.parametrize(("width", "size", "embedding"), [(0.25, 56, 512), (0.5, 48, 128)])
def test_parameter_count_of_demo_widths(width, size, embedding):
    model = on_meta("r50", width=width, input_size=size, embedding_size=embedding)
    assert count_parameters(model) == iresnet_parameters(EXPECTED_LAYERS["r50"], width, embedding, size)


def test_meta_and_real_construction_agree():
    real = build("r18", width=0.5, input_size=56)
    meta = on_meta("r18", width=0.5, input_size=56)
    assert count_parameters(real) == count_parameters(meta)
    shapes = {k: v.shape for k, v in real.state_dict().items()}
    assert shapes == {k: v.shape for k, v in meta.state_dict().items()}


@pytest.mark.parametrize("name", list(EXPECTED_LAYERS))
def test_presets_have_the_right_block_counts_and_strides(name):
    model = on_meta(name)
    assert tuple(len(stage) for stage in model.stages) == EXPECTED_LAYERS[name]
    for stage in model.stages:
        assert stage[0].conv2.stride == (2, 2) and stage[0].downsample is not None
        assert all(block.conv2.stride == (1, 1) and block.downsample is None for block in stage[1:])


def test_generic_iresnet_takes_layers_and_presets_refuse_them():
    assert count_parameters(on_meta("iresnet", layers=(3, 25, 88, 3))) == count_parameters(on_meta("r240"))
    with pytest.raises(TypeError, match="iresnet"):
        build("r50", layers=(1, 1, 1, 1))


def test_feature_bn_scale_is_fixed_to_one():
    model = IResNet(layers=(1, 1, 1, 1), width=0.25, input_size=32, embedding_size=16)
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(16))
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - 16


def test_insightface_state_dict_names():
    r50 = on_meta("r50").state_dict()
    assert r50["layer1.0.downsample.0.weight"].shape == (64, 64, 1, 1)
    assert r50["layer3.13.bn3.running_var"].shape == (256,)
    assert r50["fc.weight"].shape == (512, 512 * 7 * 7)
    assert r50["features.weight"].shape == (512,)
    mbf = on_meta("mbf").state_dict()
    assert mbf["layers.0.layers.0.weight"].shape == (128, 3, 3, 3)
    assert mbf["layers.1.layers.0.weight"].shape == (128, 2, 3, 3)  # groups=64 on 128 channels
    assert mbf["layers.2.layers.0.layers.0.weight"].shape == (128, 128, 1, 1)
    assert mbf["layers.3.layers.3.layers.1.layers.0.weight"].shape == (128, 1, 3, 3)
    assert mbf["conv_sep.layers.0.weight"].shape == (512, 256, 1, 1)
    assert mbf["features.layers.0.layers.0.weight"].shape == (512, 1, 7, 7)
    assert mbf["features.layers.2.weight"].shape == (512, 512)
    assert mbf["features.layers.3.running_mean"].shape == (512,)


# ---------------------------------------------------------------------------------------------- FLOPs


def test_count_flops_by_hand_on_a_tiny_net():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # 8x4x4 outputs, 3*9 MACs each
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # 8x4x4 outputs, 1*9 MACs each
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),  # 5 outputs, 128 MACs each
    ).train()
    assert count_flops(net, 8) == 128 * 27 + 128 * 9 + 5 * 128
    assert net.training  # mode restored


@pytest.mark.parametrize(("name", "width", "size"), [("r50", 1.0, 112), ("r34", 0.25, 56), ("r18", 0.5, 50)])
def test_count_flops_matches_hand_arithmetic(name, width, size):
    model = on_meta(name, width=width, input_size=size)
    assert count_flops(model, size) == iresnet_macs(EXPECTED_LAYERS[name], width, 512, size)


@pytest.mark.parametrize(
    ("name", "gflops", "tol"),
    [("r18", 2.6, 0.05), ("r50", 6.3, 0.05), ("r100", 12.1, 0.05), ("mbf", 0.45, 0.02)],
)
def test_published_gflops(name, gflops, tol):
    # insightface's numbers (ptflops) also count BN/PReLU; conv + linear MACs dominate.
    assert abs(count_flops(on_meta(name)) / 1e9 - gflops) < tol


# ---------------------------------------------------------------------------------------------- checkpointing


def saved_tensor_count(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return out, count


# One small instance of every backbone class in the registry (the presets share their class's code).
SMALL_BACKBONES = {
    "iresnet": lambda: IResNet((1, 2, 1, 1), embedding_size=16, input_size=32, width=0.25),
    "mobilefacenet": lambda: MobileFaceNet(embedding_size=16, input_size=32, scale=1, blocks=(2, 1, 2, 1)),
    "sfnet": lambda: SFNet((1, 2, 1, 1), embedding_size=16, input_size=32, width=0.125, batch_norm=True),
}


def test_every_registered_backbone_can_checkpoint():
    # the deep IResNet presets come from the same factory as r18/r34/r50 (building r1200's modules takes seconds)
    for name in (n for n in BACKBONES.names() if sum(EXPECTED_LAYERS.get(n, ())) <= 21):
        kwargs = {"layers": (1, 1, 1, 1)} if name == "iresnet" else {}
        model = on_meta(name, **kwargs)
        assert type(model).__name__ in {"IResNet", "MobileFaceNet", "SFNet", "VisionTransformer"}, name  # covered by SMALL_BACKBONES or tests/test_vit.py
        assert model.grad_checkpointing is None  # off by default
        model.set_grad_checkpointing()
        assert model.grad_checkpointing == "block"
        model.set_grad_checkpointing(False)
        assert model.grad_checkpointing is None
    with pytest.raises(ValueError, match="granularity"):
        on_meta("r18").set_grad_checkpointing(True, granularity="layer")


@pytest.mark.parametrize("granularity", ["block", "stage"])
@pytest.mark.parametrize("kind", sorted(SMALL_BACKBONES))
def test_checkpointing_gives_identical_outputs_gradients_and_running_stats(kind, granularity):
    # float64: the recomputed forward runs the same kernels on the same inputs, so outputs and gradients
    # agree to the last few ulps of float64 (1e-12 relative leaves a margin of ~1e3 ulps).
    torch.manual_seed(0)
    plain = SMALL_BACKBONES[kind]().double().train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True, granularity=granularity)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    weights = torch.randn(4, 16, dtype=torch.float64)

    out_plain, saved_plain = saved_tensor_count(plain, x)
    out_ckpt, saved_ckpt = saved_tensor_count(ckpt, x)
    (out_plain * weights).sum().backward()
    (out_ckpt * weights).sum().backward()

    assert saved_ckpt < saved_plain / 2  # activations inside the blocks are not kept
    torch.testing.assert_close(out_ckpt, out_plain, rtol=1e-12, atol=1e-14)
    grads_plain = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads_plain[name].grad, rtol=1e-12, atol=1e-14, msg=name)
    # the recomputation in backward must not apply the BN momentum update a second time
    buffers_plain = dict(plain.named_buffers())
    for name, b in ckpt.named_buffers():
        torch.testing.assert_close(b, buffers_plain[name], rtol=1e-12, atol=1e-14, msg=name)


def test_checkpointing_is_off_in_eval_and_without_grad():
    model = SMALL_BACKBONES["iresnet"]()
    model.set_grad_checkpointing(True, granularity="stage")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.train()(x)  # no checkpoint machinery without autograd: no error, plain forward
    _, saved_eval = saved_tensor_count(model.eval(), x)
    model.set_grad_checkpointing(False)
    _, saved_plain = saved_tensor_count(model.eval(), x)
    assert saved_eval == saved_plain


def test_every_trainable_parameter_gets_a_gradient():
    torch.manual_seed(0)
    for model in (
        IResNet(layers=(1, 2, 1, 1), embedding_size=16, input_size=32, width=0.25),
        MobileFaceNet(embedding_size=16, input_size=32, scale=1, blocks=(2, 1, 1, 1)),
    ):
        model(torch.randn(3, 3, 32, 32)).square().sum().backward()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        missing = [n for n, p in trainable if p.grad is None or not p.grad.any()]
        assert not missing


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    model = IResNet(layers=(1, 1, 1, 1), embedding_size=16, input_size=32, width=0.25, dropout=0.5).train()
    x = torch.randn(4, 3, 32, 32)
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_name_lists_the_registered_names():
    with pytest.raises(KeyError) as err:
        build("r51")
    for name in ("r50", "r1200", "iresnet", "mobilefacenet", "mbf"):
        assert name in str(err.value)


@pytest.mark.parametrize("cls", [IResNet, MobileFaceNet])
@pytest.mark.parametrize(
    ("shape", "dtype", "match"),
    [
        ((2, 1, 32, 32), torch.float32, r"\(B, 3, 32, 32\)"),
        ((3, 32, 32), torch.float32, r"\(B, 3, 32, 32\)"),
        ((2, 3, 48, 48), torch.float32, "input_size=32"),
        ((2, 3, 32, 28), torch.float32, "input_size=32"),
        ((2, 3, 32, 32), torch.uint8, "127.5"),
    ],
)
def test_bad_input_tensor_is_a_clear_error(cls, shape, dtype, match):
    kwargs = {"width": 0.25, "layers": (1, 1, 1, 1)} if cls is IResNet else {"scale": 1}
    model = cls(input_size=32, **kwargs)
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_size": (112, 96)}, "square"),
        ({"input_size": 8}, "at least 16"),
        ({"layers": (3, 4, 14)}, "4 positive ints"),
        ({"layers": (3, 0, 14, 3)}, "4 positive ints"),
        ({"width": 0.0}, "width"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_constructor_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        with torch.device("meta"):
            IResNet(**kwargs)


def test_square_tuple_input_size_is_accepted():
    assert IResNet(layers=(1, 1, 1, 1), width=0.25, input_size=(32, 32)).input_size == 32
    with pytest.raises(ValueError, match="scale"):
        MobileFaceNet(scale=0)
