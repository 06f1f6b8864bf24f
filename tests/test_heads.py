"""Margin-softmax heads against ArcFace Eq. 4-6 written out plainly here (float64, small sizes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from faceforge import heads
from faceforge.heads import MarginSoftmax, Softmax, inter_class_loss, target_logit

C, D, B = 23, 8, 12

# (name, constructor kwargs, (s, m1, m2, m3)) -- the paper's settings and its combined margins CM1, CM2
MARGIN_SETTINGS = {
    "arcface": (dict(), (64.0, 1.0, 0.5, 0.0)),
    "cosface": (dict(), (64.0, 1.0, 0.0, 0.35)),
    "sphereface": (dict(), (64.0, 1.35, 0.0, 0.0)),
    "normface": (dict(), (64.0, 1.0, 0.0, 0.0)),
    "margin_softmax": (dict(s=30.0, m1=1.0, m2=0.3, m3=0.2), (30.0, 1.0, 0.3, 0.2)),
    "margin_softmax_cm2": (dict(s=30.0, m1=0.9, m2=0.4, m3=0.15), (30.0, 0.9, 0.4, 0.15)),
}


def make_head(name: str, dtype=torch.float64, **kwargs) -> torch.nn.Module:
    kw, _ = MARGIN_SETTINGS.get(name, (dict(), None))
    registered = "margin_softmax" if name.startswith("margin_softmax") else name
    torch.manual_seed(0)
    head = heads.build(registered, num_classes=C, embedding_size=D, **{**kw, **kwargs})
    return head.to(dtype)


def make_batch(head: torch.nn.Module, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random embeddings (not unit norm), a third of them almost opposite to their class centre so that
    m1 * theta + m2 goes past pi (the monotonic extension is exercised)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * 3.0
    w_y = head.weight.detach()[labels].double()
    far = torch.arange(B) % 3 == 0
    x[far] = -w_y[far] * 40.0 + 0.01 * torch.randn(int(far.sum()), D, generator=g, dtype=torch.float64)
    return x.to(head.weight.dtype).requires_grad_(True), labels


def plain_margin_loss(x, weight, labels, s, m1, m2, m3, detached=False, bias=None, normalize=True):
    """ArcFace Eq. 4 (or Eq. 1 when not normalising), the textbook way, with the piecewise psi."""
    if not normalize:
        logits = x @ weight.t() + bias
    else:
        cos = (x / x.norm(dim=1, keepdim=True)) @ (weight / weight.norm(dim=1, keepdim=True)).t()
        onehot = F.one_hot(labels, weight.shape[0]).bool()
        cos_y = cos[torch.arange(len(labels)), labels]
        theta = torch.acos(cos_y)
        phi = m1 * theta + m2
        k = torch.floor(phi.detach() / math.pi)
        psi = (-1.0) ** k * torch.cos(phi) - 2.0 * k - m3
        if detached:
            psi = cos_y + (psi - cos_y).detach()  # straight-through: d psi / d cos_y = 1
        logits = s * torch.where(onehot, psi.unsqueeze(1), cos)
    return -torch.log_softmax(logits, dim=1)[torch.arange(len(labels)), labels].mean()


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


# ---------------------------------------------------------------------------------------------- Eq. 4


@pytest.mark.parametrize("name", list(MARGIN_SETTINGS))
@pytest.mark.parametrize("margin_grad", ["exact", "detached"])
def test_loss_and_gradients_match_eq4(name, margin_grad):
    head = make_head(name, margin_grad=margin_grad, chunk_size=7)
    x, labels = make_batch(head)
    s, m1, m2, m3 = MARGIN_SETTINGS[name][1]
    if m1 != 1.0 or m2 != 0.0:  # the batch reaches past pi, where the piecewise psi takes over
        theta = torch.acos(F.cosine_similarity(x, head.weight[labels], dim=1))
        assert bool((m1 * theta + m2 > math.pi).any())
    loss = head(x, labels)
    expected = plain_margin_loss(x, head.weight, labels, s, m1, m2, m3, detached=margin_grad == "detached")
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads(loss, [x, head.weight]), grads(expected, [x, head.weight])):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_exact_and_detached_gradients_differ():
    """The two modes give the same loss but not the same gradient (so the tests above can tell them apart)."""
    exact, detached = make_head("arcface"), make_head("arcface", margin_grad="detached")
    detached.weight.data.copy_(exact.weight.data)
    x, labels = make_batch(exact)
    loss_e, loss_d = exact(x, labels), detached(x, labels)
    torch.testing.assert_close(loss_e, loss_d)
    assert (grads(loss_e, [x])[0] - grads(loss_d, [x])[0]).abs().max() > 1e-3


def test_softmax_matches_eq1_with_bias():
    head = make_head("softmax", chunk_size=5)
    x, labels = make_batch(head)
    loss = head(x, labels)
    expected = plain_margin_loss(x, head.weight, labels, 1, 1, 0, 0, bias=head.bias, normalize=False)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    params = [x, head.weight, head.bias]
    for got, want in zip(grads(loss, params), grads(expected, params)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert head.bias.shape == (C,) and head.weight.shape == (C, D)


@pytest.mark.equivalence
@pytest.mark.parametrize("chunk_size", [1, 4, 10, C, C + 5])
@pytest.mark.parametrize("name", ["arcface", "sphereface", "softmax"])
def test_chunked_equals_plain_logits_cross_entropy(name, chunk_size):
    head = make_head(name, chunk_size=chunk_size)
    x, labels = make_batch(head, seed=1)
    loss = head(x, labels)
    plain = F.cross_entropy(head.logits(x, labels), labels)
    torch.testing.assert_close(loss, plain, rtol=1e-12, atol=1e-12)
    params = list(head.parameters()) + [x]
    for got, want in zip(grads(loss, params), grads(plain, params)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_logits_shape_and_scale():
    head = make_head("cosface")
    x, labels = make_batch(head)
    logits = head.logits(x, labels)
    cos = F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).t()
    expected = 64.0 * (cos - 0.35 * F.one_hot(labels, C).double())
    torch.testing.assert_close(logits, expected)


def test_frozen_weight_still_gives_embedding_gradient():
    head = make_head("arcface", chunk_size=6)
    head.weight.requires_grad_(False)
    x, labels = make_batch(head)
    (got,) = grads(head(x, labels), [x])
    (want,) = grads(plain_margin_loss(x, head.weight, labels, 64.0, 1.0, 0.5, 0.0), [x])
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------------------------- guards


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["arcface", "cosface", "sphereface", "normface", "margin_softmax_cm2"])
@pytest.mark.parametrize("margin_grad", ["exact", "detached"])
def test_finite_at_theta_zero_and_pi(dtype, name, margin_grad):
    head = make_head(name, dtype=dtype, margin_grad=margin_grad)
    labels = torch.tensor([0, 1, 2, 3])
    w_y = head.weight.detach()[labels]
    x = torch.stack([w_y[0], -w_y[1], 2 * w_y[2], -5 * w_y[3]]).requires_grad_(True)  # theta = 0, pi, 0, pi
    loss = head(x, labels)
    g_x, g_w = grads(loss, [x, head.weight])
    assert torch.isfinite(loss) and torch.isfinite(g_x).all() and torch.isfinite(g_w).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_target_logit_finite_at_cos_plus_minus_one(dtype):
    cos = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=dtype, requires_grad=True)
    for m1, m2, m3 in [(1.0, 0.5, 0.0), (1.35, 0.0, 0.0), (1.0, 0.0, 0.35), (0.9, 0.4, 0.15)]:
        t = target_logit(cos, m1, m2, m3)
        (g,) = grads(t.sum(), [cos])
        assert torch.isfinite(t).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.35, 0.0, 0.0), (1.0, 0.3, 0.2), (0.9, 0.4, 0.15), (1.7, 0.2, 0.1)])
def test_target_logit_strictly_decreasing_on_0_pi(margins):
    theta = torch.linspace(0.0, math.pi, 4001, dtype=torch.float64)
    t = target_logit(torch.cos(theta), *margins)
    steps = t[1:] - t[:-1]
    assert bool((steps < 0).all())
    assert steps.abs().max() < 0.01  # continuous: no jump where m1 theta + m2 crosses pi


def test_target_logit_values_past_pi():
    # SphereFace m1 = 1.35 at theta = pi: phi = 4.2412 in [pi, 2 pi), k = 1, psi = -cos(phi) - 2
    value = target_logit(torch.tensor([-1.0], dtype=torch.float64), 1.35, 0.0, 0.0)
    assert value.item() == pytest.approx(-math.cos(1.35 * math.pi) - 2.0, abs=1e-6)
    # ArcFace at theta = 2.9: phi = 3.4 > pi, psi = -cos(3.4) - 2
    value = target_logit(torch.tensor([math.cos(2.9)], dtype=torch.float64), 1.0, 0.5, 0.0)
    assert value.item() == pytest.approx(-math.cos(3.4) - 2.0, abs=1e-9)
    # below pi it is the plain formula
    value = target_logit(torch.tensor([math.cos(1.0)], dtype=torch.float64), 0.9, 0.4, 0.15)
    assert value.item() == pytest.approx(math.cos(1.3) - 0.15, abs=1e-12)


# ---------------------------------------------------------------------------------------------- Eq. 5, 6


def plain_intra(x, weight, labels):
    cos_y = F.cosine_similarity(x, weight[labels], dim=1)
    return torch.acos(cos_y).sum() / (math.pi * len(labels))  # ArcFace Eq. 5 term


def plain_inter(weight, labels):
    w = weight / weight.norm(dim=1, keepdim=True)
    others = ~F.one_hot(labels, weight.shape[0]).bool()  # j != y_i
    angles = torch.acos(torch.where(others, w[labels] @ w.t(), 0.0))  # (cos = 1 on j = y_i has no finite gradient)
    n = weight.shape[0]
    return -angles[others].sum() / (math.pi * len(labels) * (n - 1))  # ArcFace Eq. 6 term


@pytest.mark.equivalence
@pytest.mark.parametrize("chunk_size", [1, 5, C])
def test_inter_class_loss_matches_eq6(chunk_size):
    weight = torch.randn(C, D, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 3, 22, 7])
    loss = inter_class_loss(weight, labels, chunk_size=chunk_size)
    expected = plain_inter(weight, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads(loss, [weight])[0], grads(expected, [weight])[0], rtol=1e-9, atol=1e-12)


def test_head_with_intra_and_inter_terms_matches_eq5_eq6():
    head = make_head("arcface", chunk_size=6, intra_loss_weight=0.7, inter_loss_weight=1.0)
    x, labels = make_batch(head, seed=2)
    x = x.detach().add_(0.3).requires_grad_(True)  # keep away from theta = pi, where acos' is huge
    loss = head(x, labels)
    w = head.weight
    expected = (
        plain_margin_loss(x, w, labels, 64.0, 1.0, 0.5, 0.0) + 0.7 * plain_intra(x, w, labels) + plain_inter(w, labels)
    )
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads(loss, [x, w]), grads(expected, [x, w])):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------------------------- memory, AMP


def test_autograd_holds_one_logit_buffer_and_no_copy_of_w():
    """What the graph saves beyond W itself and (B, D)-sized tensors: one (B, C) buffer and (C,) norms."""
    num_classes, batch = 300, 4
    head = MarginSoftmax(num_classes, D, chunk_size=64)
    x = torch.randn(batch, D, requires_grad=True)
    labels = torch.randint(0, num_classes, (batch,))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = head(x, labels)
    weight_ptr = head.weight.data_ptr()
    big = [t for t in saved if t.data_ptr() != weight_ptr and t.numel() > batch * D]
    assert sum(t.numel() for t in big) == batch * num_classes + num_classes
    loss.backward()
    assert head.weight.grad.shape == (num_classes, D)


def test_autocast_keeps_the_loss_in_float32():
    head = make_head("arcface", dtype=torch.float32, chunk_size=5)
    x, labels = make_batch(head)
    x_low = x.detach().to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x_low, labels)
    assert loss.dtype == torch.float32
    reference = head(x_low.detach().float(), labels)  # same rounded inputs, float32 throughout
    torch.testing.assert_close(loss, reference)
    loss.backward()
    assert x_low.grad.dtype == torch.bfloat16 and torch.isfinite(head.weight.grad).all()


# ---------------------------------------------------------------------------------------------- API, errors


def test_registry_builds_every_preset():
    expected = {"margin_softmax", "arcface", "cosface", "sphereface", "normface", "softmax"}
    assert expected <= set(heads.HEADS.names())
    for name in expected:
        head = heads.build(name, num_classes=5, embedding_size=4)
        assert head.weight.shape == (5, 4)
    arc = heads.build("ArcFace", num_classes=5, embedding_size=4)
    assert (arc.s, arc.m1, arc.m2, arc.m3) == (64.0, 1.0, 0.5, 0.0)
    sphere = heads.build("sphereface", num_classes=5, embedding_size=4)
    assert (sphere.m1, sphere.m2, sphere.m3) == (1.35, 0.0, 0.0)
    assert heads.build("cosface", num_classes=5, embedding_size=4).m3 == 0.35
    with pytest.raises(KeyError, match="arcface"):
        heads.build("arcfase", num_classes=5, embedding_size=4)


@pytest.mark.parametrize("bad_label", [C, C + 10, -1])
@pytest.mark.parametrize("name", ["arcface", "softmax"])
def test_label_out_of_range_is_a_clear_error(bad_label, name):
    head = make_head(name)
    x, labels = make_batch(head)
    labels[3] = bad_label
    with pytest.raises(ValueError, match=rf"label {bad_label} at position 3 .*num_classes={C}"):
        head(x, labels)


def test_bad_inputs_and_arguments_are_errors():
    head = make_head("arcface")
    x, labels = make_batch(head)
    with pytest.raises(ValueError, match=r"expected \(B, 8\)"):
        head(x[:, :5], labels)
    with pytest.raises(ValueError, match="labels of shape"):
        head(x, labels[:3])
    with pytest.raises(TypeError, match="integer"):
        head(x, labels.double())
    with pytest.raises(ValueError, match="s=0"):
        MarginSoftmax(C, D, s=0.0)
    with pytest.raises(ValueError, match="m1"):
        MarginSoftmax(C, D, m1=0.0)
    with pytest.raises(ValueError, match="m2=nan"):
        MarginSoftmax(C, D, m2=float("nan"))
    with pytest.raises(ValueError, match="margin_grad"):
        MarginSoftmax(C, D, margin_grad="stop")
    with pytest.raises(ValueError, match="chunk_size"):
        Softmax(C, D, chunk_size=0)


# ---------------------------------------------------------------------------------------------- reused buffers


def _plain_grads(head, batches):
    """Sum over batches of d(Eq. 4 loss)/dW, computed plainly with autograd."""
    weight = head.weight.detach().clone().requires_grad_(True)
    total = torch.zeros_like(weight)
    for x, labels in batches:
        (g,) = torch.autograd.grad(plain_margin_loss(x.detach(), weight, labels, 64.0, 1.0, 0.5, 0.0), [weight])
        total += g
    return total


def test_gradient_memory_is_reused_after_set_to_none():
    head = make_head("arcface", chunk_size=5)
    batches = [make_batch(head, seed=s) for s in (1, 2)]
    head(*batches[0]).backward()
    first_ptr = head.weight.grad.data_ptr()
    head.weight.grad = None  # what zero_grad(set_to_none=True) does
    head(*batches[1]).backward()
    assert head.weight.grad.data_ptr() == first_ptr  # the same memory, lent out again
    torch.testing.assert_close(head.weight.grad, _plain_grads(head, batches[1:]), rtol=1e-9, atol=1e-12)


@pytest.mark.equivalence
def test_accumulated_gradients_are_not_overwritten():
    """Without zeroing between backwards (gradient accumulation) the second gradient is added, not written over."""
    head = make_head("arcface", chunk_size=5)
    batches = [make_batch(head, seed=s) for s in (1, 2, 3)]
    for x, labels in batches:
        head(x, labels).backward()
    torch.testing.assert_close(head.weight.grad, _plain_grads(head, batches), rtol=1e-9, atol=1e-12)


def test_a_gradient_someone_holds_is_never_written_over():
    head = make_head("arcface", chunk_size=5)
    batches = [make_batch(head, seed=s) for s in (1, 2)]
    (kept,) = torch.autograd.grad(head(*batches[0]), [head.weight])
    expected = kept.clone()
    (second,) = torch.autograd.grad(head(*batches[1]), [head.weight])
    assert second.data_ptr() != kept.data_ptr()
    torch.testing.assert_close(kept, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, _plain_grads(head, batches[1:]), rtol=1e-9, atol=1e-12)


def test_two_forwards_before_one_backward_keep_their_own_logits():
    head = make_head("cosface", chunk_size=4)
    batches = [make_batch(head, seed=s) for s in (1, 2)]
    (head(*batches[0]) + head(*batches[1])).backward()
    weight = head.weight.detach().clone().requires_grad_(True)
    expected = sum(plain_margin_loss(x.detach(), weight, y, 64.0, 1.0, 0.0, 0.35) for x, y in batches)
    (want,) = torch.autograd.grad(expected, [weight])
    torch.testing.assert_close(head.weight.grad, want, rtol=1e-9, atol=1e-12)


def test_copied_head_does_not_share_kept_memory():
    import copy

    head = make_head("arcface", chunk_size=5)
    head(*make_batch(head)).backward()
    clone = copy.deepcopy(head)
    clone.weight.grad = None
    clone(*make_batch(clone, seed=4)).backward()
    assert clone.weight.grad.data_ptr() != head.weight.grad.data_ptr()


# ---------------------------------------------------------------------------------------------- tiny losses


def _eq4_per_sample_float64(x, weight, labels, s=64.0, m=0.5):
    """ArcFace Eq. 4 per sample in float64, as log(1 + sum_{j != y} exp(z_j - t)): no cancellation at tiny
    losses (the textbook -log_softmax is itself 0 below about 1e-16)."""
    cos = F.normalize(x.double(), dim=1) @ F.normalize(weight.double(), dim=1).t()
    rows = torch.arange(len(labels))
    target = s * torch.cos(torch.acos(cos[rows, labels]) + m)  # theta + m < pi for these rows
    others = (s * cos).index_put((rows, labels), torch.tensor(-math.inf, dtype=torch.float64))
    return torch.log1p(torch.exp(others - target.unsqueeze(1)).sum(1))


# float32 against float64 at losses 1e-5 .. 300: each z_j - t is off by about 2 s (D + 2) eps32 (derived below)
TINY_LOSS_RTOL = 2 * 64 * 10 * torch.finfo(torch.float32).eps


def tiny_to_large_loss_batch():
    """float32 inputs whose ArcFace losses cover 1e-5 .. 300: x = a W_0^ + sqrt(1 - a^2) u for a sweep of a,
    u a random unit vector orthogonal to W_0^, the other classes turned away from class 0 (16 classes, D = 8)."""
    num_classes, dim = 16, 8
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(num_classes, dim, generator=g)
    w0 = F.normalize(weight[0], dim=0)
    others = weight[1:] - (weight[1:] @ w0).unsqueeze(1) * w0
    weight[1:] = F.normalize(others, dim=1) - 0.3 * w0  # every other class at cos -0.29 from class 0
    u = torch.randn(400, dim, generator=g)
    u = F.normalize(u - (u @ w0).unsqueeze(1) * w0, dim=1)
    a = torch.linspace(0.999, -0.8, 400).unsqueeze(1)
    x = (a * w0 + (1 - a.square()).sqrt() * u).float()
    labels = torch.zeros(400, dtype=torch.long)
    want = _eq4_per_sample_float64(x, weight, labels)
    keep = (want > 1e-5) & (want < 300)
    return weight, x[keep], labels[keep], want[keep]


def test_per_sample_loss_is_exact_from_tiny_to_large_losses():
    """float32 loss within the float32 input rounding of the float64 one, at losses from 1e-4 to 100.

    The loss is log1p(sum_{j != y} exp(z_j - t)); written as lse - t in float32 it would lose its digits to the
    rounding of lse ~ s (ulp(64) = 7.6e-6, i.e. 8 % of a 1e-4 loss). What float32 inputs cannot avoid: each
    z_j - t is off by at most about 2 s (D + 2) eps32 (the D-term dot products of unit vectors, the
    normalisations), which changes a small loss by that factor relative and a large one by that much absolutely:
    rtol = 2 * 64 * 10 * 1.19e-7 = 1.5e-4.
    """
    weight, x, labels, want = tiny_to_large_loss_batch()
    assert want.min() < 1e-4 and want.max() > 100 and len(want) > 100  # the range the claim is about
    head = heads.ArcFace(16, 8, chunk_size=5)
    with torch.no_grad():
        head.weight.copy_(weight)
    xg = x.clone().requires_grad_(True)
    got = head.per_sample_loss(xg, labels)
    tol = TINY_LOSS_RTOL
    torch.testing.assert_close(got.detach().double(), want, rtol=tol, atol=0)
    # the gradient of the smallest loss, where d loss / d t = -sigmoid(lse_neg - t) replaces p_y - 1
    i = int(want.argmin())
    (g32,) = torch.autograd.grad(got[i], [xg])
    x64 = x.double().requires_grad_(True)
    (g64,) = torch.autograd.grad(_eq4_per_sample_float64(x64, weight, labels)[i], [x64])
    torch.testing.assert_close(g32.double(), g64, rtol=tol, atol=tol * float(g64.abs().max()))


# ---------------------------------------------------------------------------------------------- buffer policy


@pytest.mark.parametrize("policy", ["reuse", "release", "auto"])
def test_buffer_policies_give_the_same_numbers_and_hold_what_they_say(policy):
    from faceforge.heads.buffers import held_bytes

    head = make_head("arcface", chunk_size=5, buffers=policy)
    reference = make_head("arcface", chunk_size=5)
    batches = [make_batch(head, seed=s) for s in (1, 2)]
    for x, labels in batches:
        head(x, labels).backward()
        pointer = head.weight.grad.data_ptr()
        head.weight.grad = None
    kept = held_bytes(head.step_buffers)
    if policy == "release":
        assert kept == 0
    else:  # "auto" is "reuse" on CPU: the (B, C) buffer and grad W
        assert kept == (B * C + C * D) * 8
        head(*batches[0]).backward()
        assert head.weight.grad.data_ptr() == pointer
        head.weight.grad = None
    head(*batches[1]).backward()
    reference(*batches[1]).backward()
    torch.testing.assert_close(head.weight.grad, reference.weight.grad, rtol=0, atol=0)
    with pytest.raises(ValueError, match="buffers='keep'"):
        heads.ArcFace(C, D, buffers="keep")
