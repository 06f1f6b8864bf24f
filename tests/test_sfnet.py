"""SFNet-20/64 (SphereFace's residual CNNs): sizes against the published model and hand arithmetic, shapes, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from faceforge.backbones import SFNet, build, count_flops, count_parameters


def on_meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return build(name, **kwargs)


def hand_parameters(units, widths=(64, 128, 256, 512), side=7, embedding=512):
    """Per stage: conv3x3 stride 2 with bias + PReLU, then units x 2 x (conv3x3 with bias + PReLU); then the FC."""
    total, c_in = 0, 3
    for c, n in zip(widths, units):
        total += (9 * c_in * c + c) + c + n * 2 * (9 * c * c + c + c)
        c_in = c
    return total + widths[-1] * side * side * embedding + embedding


def test_sfnet20_matches_the_published_sphereface_model():
    """OpenVINO's model zoo lists SphereFace's 20-layer Caffe model (112x96 input, 7x6 final map) at
    22.671 M parameters and 3.504 GFLOPs. At 112x112 the map is 7x7: the FC has one 7-pixel column more,
    and every convolution output is 7/6 as large."""
    model = on_meta("sfnet20")
    fc_column = 512 * 7 * 512
    assert round((count_parameters(model) - fc_column) / 1e6, 3) == 22.671
    fc_112, fc_96 = 512 * 7 * 7 * 512, 512 * 7 * 6 * 512
    macs_96 = (count_flops(model) - fc_112) * 6 / 7 + fc_96
    assert 2 * macs_96 / 1e9 == pytest.approx(3.504, rel=0.005)  # FLOPs = 2 x MACs (+ PReLU and biases there)


@pytest.mark.parametrize(("name", "units", "depth"), [("sfnet20", (1, 2, 4, 1), 20), ("sfnet64", (3, 8, 16, 3), 64)])
def test_depth_and_parameter_count_by_hand(name, units, depth):
    model = on_meta(name)
    assert model.blocks_per_stage == units
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == depth
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert count_parameters(model) == hand_parameters(units)


def test_demo_width_and_size_by_hand():
    model = on_meta("sfnet20", input_size=56, width=0.25, embedding_size=128)
    assert model.widths == (16, 32, 64, 128) and model.feature_map_size == 4
    assert count_parameters(model) == hand_parameters((1, 2, 4, 1), (16, 32, 64, 128), side=4, embedding=128)


@pytest.mark.parametrize(("size", "side"), [(112, 7), (56, 4), (32, 2), (20, 2)])
def test_output_shape_at_any_size(size, side):
    torch.manual_seed(0)
    model = build("sfnet20", input_size=size, width=0.25, embedding_size=64)
    assert model.fc.in_features == 128 * side * side
    assert model(torch.randn(2, 3, size, size)).shape == (2, 64)


def test_deep_net_without_batchnorm_starts_in_a_sane_range():
    """The near-identity start of the residual units keeps the 64-layer net's output finite and of order 1."""
    torch.manual_seed(0)
    model = build("sfnet64", input_size=32, width=0.25).eval()
    out = model(torch.rand(4, 3, 32, 32) * 2 - 1)
    assert torch.isfinite(out).all() and 0.01 < out.std().item() < 100.0


def test_batch_norm_variant():
    model = SFNet(layers=(1, 1, 1, 1), input_size=32, width=0.25, embedding_size=16, batch_norm=True)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(convs)
    assert isinstance(model.features, nn.BatchNorm1d)
    model(torch.randn(3, 3, 32, 32)).square().sum().backward()
    assert all(p.grad is not None and p.grad.any() for p in model.parameters())


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = SFNet(layers=(1, 1, 0, 1), input_size=32, width=0.25, embedding_size=16)
    model(torch.randn(3, 3, 32, 32)).square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": (1, 2, 4)}, "4 ints >= 0"),
        ({"layers": (1, -1, 4, 1)}, "4 ints >= 0"),
        ({"input_size": 8}, "at least 16"),
        ({"input_size": (112, 96)}, "square"),
        ({"width": 0.0}, "width"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match), torch.device("meta"):
        SFNet(**kwargs)


def test_presets_refuse_layers_and_images_of_another_size_are_an_error():
    with pytest.raises(TypeError, match="sfnet20"):
        build("sfnet20", layers=(1, 1, 1, 1))
    model = SFNet(layers=(0, 0, 0, 0), input_size=32, width=0.25)
    with pytest.raises(ValueError, match="input_size=32"):
        model(torch.zeros(1, 3, 48, 48))
    assert model.feature_map_size == 2
