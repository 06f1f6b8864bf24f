"""faceforge.heads.fused_sgd: the exact margin softmax whose backward applies SGD to W chunk by chunk equals the
textbook head (F.linear on normalised rows, the margin, cross_entropy) + torch.optim.SGD, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from faceforge.heads import ArcFace, apply_margin
from faceforge.heads.fused_sgd import FusedSGDSoftmax, SGDHyper, margin_target

C, D, B = 37, 8, 12
S, M = 16.0, 0.5


def textbook_loss(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ArcFace as written in the paper: s * cos(theta_y + m) in the target column, s * cos elsewhere, mean CE."""
    cos = F.linear(F.normalize(x, dim=1), F.normalize(w, dim=1))
    return F.cross_entropy(S * apply_margin(cos, labels, 1.0, M, 0.0), labels)


@pytest.mark.parametrize("hyper", [
    dict(momentum=0.9, weight_decay=5e-4),
    dict(momentum=0.9, weight_decay=0.0, nesterov=True),
    dict(momentum=0.0, weight_decay=1e-3),
    dict(momentum=0.5, weight_decay=0.0, dampening=0.3),
])
@pytest.mark.parametrize("chunk", [5, 64])  # chunks crossing labels, and one chunk holding every class
def test_weights_momentum_and_embedding_grads_equal_textbook_head_with_sgd(hyper: dict, chunk: int) -> None:
    torch.manual_seed(0)
    head = FusedSGDSoftmax(C, D, margin_target(S, m2=M), scale=S, lr=0.5, chunk_size=chunk, dtype=torch.float64,
                           **hyper)
    w = torch.nn.Parameter(head.weight.clone())
    opt = torch.optim.SGD([w], lr=0.5, **hyper)
    for step in range(4):
        x = torch.randn(B, D, dtype=torch.float64)
        labels = torch.randint(0, C, (B,))
        labels[:3] = torch.tensor([0, C - 1, chunk % C])  # first, last, and a chunk's first class
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        loss = head(xa, labels)
        loss.backward()
        expected = textbook_loss(xb, w, labels)
        opt.zero_grad()
        expected.backward()
        opt.step()
        # float64 throughout: only summation order differs (chunked logsumexp); 1e-10 is ~1e5 ulps of slack
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(head.weight, w.detach(), rtol=1e-9, atol=1e-12, msg=f"W after step {step + 1}")
        if hyper["momentum"]:
            torch.testing.assert_close(head.momentum_buffer, opt.state[w]["momentum_buffer"], rtol=1e-9, atol=1e-12)
    assert int(head.steps) == 4


def test_margin_target_is_the_arcface_heads_loss() -> None:
    """margin_target(s, m2) with the module equals faceforge's own ArcFace head's loss (float64)."""
    torch.manual_seed(1)
    arc = ArcFace(C, D, s=S, m=M).double()
    head = FusedSGDSoftmax(C, D, margin_target(S, m2=M), scale=S, lr=0.0, dtype=torch.float64, chunk_size=7)
    head.weight.copy_(arc.weight.detach())
    x, labels = torch.randn(B, D, dtype=torch.float64), torch.randint(0, C, (B,))
    torch.testing.assert_close(head(x, labels), arc(x, labels), rtol=1e-10, atol=1e-12)


def test_bf16_gemm_copy_tracks_the_float32_master() -> None:
    """gemm_dtype=bf16: the loss is within bf16 rounding of the float32 head's (bf16 keeps 8 bits: cosines
    off by ~2^-8 relative, logits s*cos by ~s*2^-8 = 0.06 at s 16, so the loss within 0.1), W stays
    float32 and the bf16 copy equals W rounded after the update."""
    torch.manual_seed(2)
    exact = FusedSGDSoftmax(C, D, margin_target(S, m2=M), scale=S, lr=0.1, chunk_size=8)
    low = FusedSGDSoftmax(C, D, margin_target(S, m2=M), scale=S, lr=0.1, chunk_size=8, gemm_dtype=torch.bfloat16)
    low.weight.copy_(exact.weight)
    low.weight_lowp.copy_(exact.weight)
    x, labels = torch.randn(B, D, requires_grad=True), torch.randint(0, C, (B,))
    a, b = exact(x, labels), low(x, labels)
    assert abs(float(a.detach()) - float(b.detach())) < 0.1
    b.backward()
    assert low.weight.dtype == torch.float32 and torch.isfinite(low.weight).all()
    assert torch.equal(low.weight_lowp, low.weight.to(torch.bfloat16))


def test_bad_hyper_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="lr"):
        SGDHyper(lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        SGDHyper(lr=0.1, momentum=0.0, nesterov=True)
