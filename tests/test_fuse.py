"""faceforge.backbones.fuse: BN folded into the conv / Linear before it equals eval mode, for every backbone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from faceforge.backbones import BACKBONES, build
from faceforge.backbones.fuse import batchnorms, fold_into, foldable_pairs, fuse_bn

SIZE = 16


def randomise_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g, dtype=torch.float64) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g, dtype=torch.float64))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(n, generator=g, dtype=torch.float64))
                    m.bias.copy_(0.4 * torch.rand(n, generator=g, dtype=torch.float64) - 0.2)
    return model


def small(name: str, **extra) -> nn.Module:
    kwargs = {"embedding_size": 16, "input_size": SIZE, **extra}
    if name == "iresnet":
        kwargs["layers"] = (1, 2, 1, 1)
    if name.startswith(("r", "iresnet", "sfnet", "vit")):
        kwargs["width"] = 0.125
    torch.manual_seed(0)
    return randomise_batchnorms(build(name, **kwargs).double()).eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


CASES = [(name, {}) for name in BACKBONES.names()] + [("sfnet20", {"batch_norm": True}), ("sfnet64", {"batch_norm": True})]


@pytest.mark.parametrize(("name", "extra"), CASES, ids=[f"{n}{'-bn' if e else ''}" for n, e in CASES])
def test_fused_equals_eval_mode_for_every_backbone(name, extra, one_thread):
    model = small(name, **extra)
    x = torch.randn(3, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    before = batchnorms(model)
    with torch.no_grad():
        expected = model(x)
        fused = fuse_bn(model, inplace=True)  # in place: no deep copy of the 1.2K-layer net
        got = fused(x)
    # float64 throughout: the folded product differs from BN(conv(x)) by rounding only (~1e-15 relative, a few
    # 2^-53 per layer over at most ~100 layers); dropping an eps of 1e-5 against variances in [0.5, 2] changes
    # each folded channel by up to 1e-5 relative, which no bound above 1e-12 could see
    assert relative_error(expected, got) < 1e-12, name
    assert before == [] or len(batchnorms(fused)) < len(before)
    left = {n.rsplit(".", 1)[-1] for n in batchnorms(fused)}
    if name in ("iresnet",) or name.startswith("r"):
        assert left == {"bn1", "bn2"}  # the BN before each block's first conv, and the one before dropout-FC
    else:
        assert left == set(), name  # MobileFaceNet and SFNet: every BN follows a conv or the Linear
    assert fused.training is False


def test_fold_matches_the_bn_formula_by_hand():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=True).double()
    bn = randomise_batchnorms(nn.BatchNorm2d(4, eps=1e-3).double()).eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    y = conv(x)
    # BN in eval mode, written out: gamma (y - mean) / sqrt(var + eps) + beta, per channel
    shape = (1, -1, 1, 1)
    expected = (bn.weight.reshape(shape) * (y - bn.running_mean.reshape(shape))
                / torch.sqrt(bn.running_var.reshape(shape) + bn.eps) + bn.bias.reshape(shape))
    fold_into(conv, bn)
    torch.testing.assert_close(conv(x), expected, rtol=1e-12, atol=1e-12)


def test_linear_without_bias_gains_one():
    lin = nn.Linear(5, 3, bias=False).double()
    bn = randomise_batchnorms(nn.BatchNorm1d(3).double()).eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    expected = bn(lin(x))
    fold_into(lin, bn)
    assert lin.bias is not None
    torch.testing.assert_close(lin(x), expected, rtol=1e-12, atol=1e-12)


class SharedOutput(nn.Module):
    """conv -> bn, but the conv output is also added to the result: folding would change that branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y + self.bn2(self.conv2(x))


def test_a_conv_output_read_elsewhere_is_not_folded():
    model = randomise_batchnorms(SharedOutput().double()).eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert foldable_pairs(model, x) == [("conv2", "bn2")]
    fused = fuse_bn(model, x)
    assert batchnorms(fused) == ["bn"]
    torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)
    assert isinstance(model.bn2, nn.BatchNorm2d)  # not in place by default


def test_float32_r18_within_float32_rounding():
    torch.manual_seed(0)
    model = randomise_batchnorms(build("r18", embedding_size=32, input_size=32, width=0.25)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), fuse_bn(model)(x)
    # 18 layers, each adding ~1e-7 relative rounding (float32 eps 6e-8 x a few operations): < 1e-5
    assert relative_error(a.double(), b.double()) < 1e-5
