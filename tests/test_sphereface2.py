"""SphereFace2 against Eq. 5 and 6 of the paper written out plainly here (float64, small sizes)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from faceforge import heads
from faceforge.heads import SphereFace2, balanced_bias

C, D, B = 23, 8, 12
LAMB, R, T = 0.7, 30.0, 3.0
MARGINS = {"C": 0.4, "A": 0.5, "M": 1.7}  # the paper's main loss and its appendix variants


# ---------------------------------------------------------------------------------------------- the plain formula


def g(z, t=T):
    return 2.0 * ((z + 1.0) / 2.0) ** t - 1.0  # SphereFace2 Eq. 5


def plain_similarities(cos, labels, m, t, margin_type, detached):
    """(positive psi (B,), negatives (B, C)) as the paper and its appendix define them."""
    cos_y = cos[torch.arange(len(labels)), labels]
    theta = torch.acos(cos_y)
    if margin_type == "C":
        pos, neg = g(cos_y, t) - m, g(cos, t) + m
    elif margin_type == "A":
        pos, neg = g(torch.cos(torch.clamp(theta + m, max=math.pi)), t), g(cos, t)
    else:
        pos, neg = g(torch.cos(torch.clamp(m * theta, max=math.pi)), t), g(cos, t)
    if detached:  # OpenSphere: the value of g and the margin, the gradient of r cos
        pos = cos_y + (pos - cos_y).detach()
        neg = cos + (neg - cos).detach()
    return pos, neg


def plain_eq6(x, weight, bias, labels, lamb=LAMB, r=R, m=0.4, t=T, margin_type="C", detached=False):
    """Per-sample Eq. 6: (lamb/r) log(1 + exp(-(r psi_y + b))) + ((1-lamb)/r) sum_{i != y} log(1 + exp(r n_i + b))."""
    cos = (x / x.norm(dim=1, keepdim=True)) @ (weight / weight.norm(dim=1, keepdim=True)).t()
    pos, neg = plain_similarities(cos, labels, m, t, margin_type, detached)
    others = ~F.one_hot(labels, weight.shape[0]).bool()
    positive = lamb / r * torch.log(1.0 + torch.exp(-(r * pos + bias)))
    negative = (1.0 - lamb) / r * torch.where(others, torch.log(1.0 + torch.exp(r * neg + bias)), 0.0).sum(1)
    return positive + negative


def make_head(margin_type="C", dtype=torch.float64, **kwargs) -> SphereFace2:
    torch.manual_seed(0)
    # loss_weight 1 unless given: the plain Eq. 6 references below carry no weight (the default is 10)
    kwargs = {"lamb": LAMB, "r": R, "m": MARGINS[margin_type], "t": T, "margin_type": margin_type, "loss_weight": 1.0,
              **kwargs}
    head = heads.build("sphereface2", num_classes=C, embedding_size=D, **kwargs).to(dtype)
    with torch.no_grad():
        head.weight.mul_(torch.rand(C, 1, dtype=dtype) + 0.5)  # rows of different norms
    return head


def make_batch(head, seed=0):
    """Random embeddings (not unit norm); a third close to their class centre, a third far from it (theta_y
    near pi: "A" and "M" reach their clamp at pi), labels repeated."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (B,), generator=gen)
    labels[1] = labels[0]
    x = torch.randn(B, D, generator=gen, dtype=torch.float64) * 3.0
    w_y = head.weight.detach()[labels].double()
    near, far = torch.arange(B) % 3 == 1, torch.arange(B) % 3 == 0
    x[near] = w_y[near] * 50.0 + 0.2 * torch.randn(int(near.sum()), D, generator=gen, dtype=torch.float64)
    x[far] = -w_y[far] * 50.0 + 0.2 * torch.randn(int(far.sum()), D, generator=gen, dtype=torch.float64)
    return x.to(head.weight.dtype).requires_grad_(True), labels


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def assert_loss_and_grads(loss, expected, tensors):
    """Loss to 1e-11; gradients to 1e-9 relative, or 1e-10 of the largest entry (the projection of grad W
    onto the sphere's tangent cancels most of it near cos = +-1)."""
    torch.testing.assert_close(loss, expected, rtol=1e-11, atol=1e-12)
    for got, want in zip(grads(loss, tensors), grads(expected, tensors)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10 * want.abs().max().item())


# ---------------------------------------------------------------------------------------------- Eq. 6


@pytest.mark.parametrize("margin_type", list(MARGINS))
@pytest.mark.parametrize("margin_grad", ["exact", "detached"])
def test_loss_and_gradients_match_eq6(margin_type, margin_grad):
    head = make_head(margin_type, margin_grad=margin_grad, chunk_size=7, loss_weight=2.5)
    x, labels = make_batch(head)
    m = MARGINS[margin_type]
    if margin_type != "C":  # the batch reaches the clamp at pi
        theta = torch.acos(F.cosine_similarity(x, head.weight[labels], dim=1))
        assert bool(((theta + m if margin_type == "A" else m * theta) > math.pi).any())
    loss = head(x, labels)
    expected = 2.5 * plain_eq6(
        x, head.weight, head.bias, labels, m=m, margin_type=margin_type, detached=margin_grad == "detached"
    ).mean()
    assert_loss_and_grads(loss, expected, [x, head.weight, head.bias])


@pytest.mark.parametrize("margin_type", list(MARGINS))
def test_weighted_per_sample_losses_match_eq6(margin_type):
    """A gradient that differs per sample (not a batch mean) takes the other path through grad W."""
    head = make_head(margin_type, chunk_size=5)
    x, labels = make_batch(head, seed=3)
    weights = torch.linspace(0.1, 2.0, B, dtype=torch.float64)
    per_sample = head.per_sample_loss(x, labels)
    expected = plain_eq6(x, head.weight, head.bias, labels, m=MARGINS[margin_type], margin_type=margin_type)
    torch.testing.assert_close(per_sample, expected, rtol=1e-11, atol=1e-12)
    assert_loss_and_grads((per_sample * weights).sum(), (expected * weights).sum(), [x, head.weight, head.bias])


def test_exact_and_detached_gradients_differ():
    exact, detached = make_head("C"), make_head("C", margin_grad="detached")
    x, labels = make_batch(exact)
    loss_e, loss_d = exact(x, labels), detached(x, labels)
    torch.testing.assert_close(loss_e, loss_d)
    for got_e, got_d in zip(grads(loss_e, [x, exact.weight]), grads(loss_d, [x, detached.weight])):
        assert (got_e - got_d).abs().max() > 1e-3


def test_loss_weight_lambda_and_t_enter_as_in_eq6():
    head = make_head("C", lamb=0.9, t=1.0, r=20.0, m=0.25, loss_weight=0.5, bias_init=-1.5)
    x, labels = make_batch(head, seed=5)
    assert head.bias.item() == -1.5
    expected = 0.5 * plain_eq6(x, head.weight, head.bias, labels, lamb=0.9, r=20.0, m=0.25, t=1.0).mean()
    assert_loss_and_grads(head(x, labels), expected, [x, head.weight, head.bias])


@pytest.mark.equivalence
@pytest.mark.parametrize("chunk_size", [1, 4, 10, C, C + 5])
@pytest.mark.parametrize("margin_type", ["C", "M"])
def test_chunked_equals_plain_logits(chunk_size, margin_type):
    head = make_head(margin_type, chunk_size=chunk_size)
    x, labels = make_batch(head, seed=1)
    z = head.logits(x, labels)
    target = F.one_hot(labels, C).bool()
    softplus = lambda v: torch.log1p(torch.exp(v))  # noqa: E731 (float64, |v| < 700 here)
    plain = (LAMB / R * softplus(-z[target]) + (1 - LAMB) / R * torch.where(target, 0.0, softplus(z)).sum(1)).mean()
    assert_loss_and_grads(head(x, labels), plain, [x, head.weight, head.bias])


def test_logits_are_r_times_the_adjusted_cosine_plus_b():
    head = make_head("C")
    x, labels = make_batch(head)
    cos = F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).t()
    sign = 1.0 - 2.0 * F.one_hot(labels, C).double()  # -m on the label column, +m elsewhere
    torch.testing.assert_close(head.logits(x, labels), R * (g(cos) + 0.4 * sign) + head.bias)


# ---------------------------------------------------------------------------------------------- bias, threshold


@pytest.mark.parametrize(
    ("num_classes", "lamb", "r", "m", "margin_type", "expected"),
    [
        (8631, 0.7, 40.0, 0.4, "C", 5.78),  # VGGFace2, the paper's configs
        (85742, 0.8, 64.0, 0.5, "C", 6.03),  # MS1M, OpenSphere's IResNet-100 config
        (8631, 0.7, 40.0, 0.5, "A", 21.78),  # the appendix variants
        (8631, 0.7, 40.0, 1.7, "M", 21.78),
    ],
)
def test_balanced_bias_values(num_classes, lamb, r, m, margin_type, expected):
    assert balanced_bias(num_classes, lamb, r, m, 3.0, margin_type) == pytest.approx(expected, abs=0.005)


@pytest.mark.parametrize(
    ("num_classes", "lamb", "r", "m", "t", "margin_type"),
    [(8631, 0.7, 40.0, 0.4, 3.0, "C"), (10, 0.9, 20.0, 0.2, 1.0, "C"), (2, 0.7, 30.0, 0.5, 3.0, "A"),
     (100, 0.5, 64.0, 0.5, 2.0, "M"), (100, 0.6, 30.0, 1.7, 5.0, "M")],
)
def test_balanced_bias_zeroes_the_gradient_on_b_at_cos_zero(num_classes, lamb, r, m, t, margin_type):
    """Eq. 6 with every cos theta = 0: d L / d b vanishes at b0 (the two gradients balance)."""
    zero = torch.zeros(1, dtype=torch.float64)
    half_pi = torch.full((1,), math.pi / 2, dtype=torch.float64)
    pos = {"C": g(zero, t) - m, "A": g(torch.cos(torch.clamp(half_pi + m, max=math.pi)), t),
           "M": g(torch.cos(torch.clamp(m * half_pi, max=math.pi)), t)}[margin_type]
    neg = g(zero, t) + (m if margin_type == "C" else 0.0)
    b = torch.tensor(balanced_bias(num_classes, lamb, r, m, t, margin_type), dtype=torch.float64, requires_grad=True)
    loss = lamb / r * torch.log1p(torch.exp(-(r * pos + b))) + (1 - lamb) / r * (num_classes - 1) * torch.log1p(
        torch.exp(r * neg + b)
    )
    (grad_b,) = grads(loss.sum(), [b])
    assert abs(grad_b.item()) < 1e-12


def test_head_starts_at_the_balanced_bias():
    head = SphereFace2(8631, 4, r=40.0)
    assert head.bias.shape == (1,) and head.bias.item() == pytest.approx(5.78, abs=0.005)
    assert SphereFace2(10, 4, bias_init=0).bias.item() == 0.0


@pytest.mark.parametrize(("b", "r", "t"), [(5.78, 40.0, 3.0), (-3.0, 30.0, 2.0), (0.0, 64.0, 1.0)])
def test_verification_threshold_is_where_r_g_plus_b_is_zero(b, r, t):
    head = SphereFace2(5, 4, r=r, t=t, bias_init=b)
    threshold = head.verification_threshold()
    assert -1.0 <= threshold <= 1.0
    assert r * g(threshold, t) + head.bias.item() == pytest.approx(0.0, abs=1e-9)  # b as stored (float32)


def test_verification_threshold_is_clamped_to_the_cosine_range():
    assert SphereFace2(5, 4, r=10.0, bias_init=50.0).verification_threshold() == -1.0
    assert SphereFace2(5, 4, r=10.0, bias_init=-50.0).verification_threshold() == 1.0


# ---------------------------------------------------------------------------------------------- guards


@pytest.mark.parametrize("margin_type", list(MARGINS))
@pytest.mark.parametrize("margin_grad", ["exact", "detached"])
def test_no_overflow_at_r64_with_cos_plus_minus_one(margin_type, margin_grad):
    head = make_head(margin_type, dtype=torch.float32, r=64.0, margin_grad=margin_grad, chunk_size=6)
    w = head.weight.detach()
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    # cos_y = 1 and -1; the others with cos = +1 (W_0 = W_6 direction) or -1 to another class centre
    with torch.no_grad():
        head.weight[6] = head.weight[0] * 2.0
        head.weight[7] = -head.weight[2]
    x = torch.stack([w[0], -w[1], 3 * w[2], w[3], -w[4], w[5]]).requires_grad_(True)
    loss = head(x, labels)
    g_x, g_w, g_b = grads(loss, [x, head.weight, head.bias])
    assert torch.isfinite(loss) and all(torch.isfinite(t).all() for t in (g_x, g_w, g_b))
    x64, w64, b64 = x.detach().double(), head.weight.detach().double(), head.bias.detach().double()
    m = MARGINS[margin_type]
    cos = F.normalize(x64, dim=1) @ F.normalize(w64, dim=1).t()
    pos, neg = plain_similarities(cos.clamp(-1, 1), labels, m, T, margin_type, False)
    z_neg = torch.where(F.one_hot(labels, C).bool(), -math.inf, 64.0 * neg + b64)
    expected = (LAMB / 64 * F.softplus(-(64.0 * pos + b64)) + (1 - LAMB) / 64 * F.softplus(z_neg).sum(1)).mean()
    assert expected > 1.0  # the large logits are there
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


def test_autocast_keeps_the_loss_in_float32():
    head = make_head("C", dtype=torch.float32, chunk_size=5)
    x, labels = make_batch(head)
    x_low = x.detach().to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x_low, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, head(x_low.detach().float(), labels))
    loss.backward()
    assert x_low.grad.dtype == torch.bfloat16 and torch.isfinite(head.weight.grad).all()


def test_weight_stored_in_bfloat16_computes_in_float32():
    head = make_head("C", dtype=torch.bfloat16, chunk_size=5)
    reference = make_head("C", dtype=torch.float32, chunk_size=5)
    reference.load_state_dict({k: v.float() for k, v in head.state_dict().items()})
    x, labels = make_batch(reference)
    loss = head(x, labels)
    assert loss.dtype == torch.float32
    expected = reference(x, labels)
    torch.testing.assert_close(loss, expected)
    (got,), (want,) = grads(loss, [head.weight]), grads(expected, [reference.weight])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_autograd_holds_one_buffer_and_no_copy_of_w():
    """Beyond W and (B, D)-sized tensors the graph saves one (B, C) buffer and (C,) vectors."""
    num_classes, batch = 300, 4
    head = SphereFace2(num_classes, D, chunk_size=64)
    x = torch.randn(batch, D, requires_grad=True)
    labels = torch.randint(0, num_classes, (batch,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = head(x, labels)
    big = [t for t in saved if t.data_ptr() != head.weight.data_ptr() and t.numel() > batch * D]
    assert sum(t.numel() for t in big) == batch * num_classes + 2 * num_classes
    loss.backward()
    assert head.weight.grad.shape == (num_classes, D)


# ---------------------------------------------------------------------------------------------- per_sample_loss


def test_per_sample_loss_without_classifier_grad():
    head = make_head("C", chunk_size=5, loss_weight=3.0)
    x, labels = make_batch(head, seed=2)
    full = head.per_sample_loss(x, labels)
    frozen = head.per_sample_loss(x, labels, classifier_grad=False)
    torch.testing.assert_close(frozen, full, rtol=0, atol=0)
    assert full.shape == (B,) and frozen.grad_fn is not None
    weights = torch.rand(B, dtype=torch.float64)
    (g_full,) = grads((full * weights).sum(), [x])
    g_x, g_w, g_b = torch.autograd.grad((frozen * weights).sum(), [x, head.weight, head.bias], allow_unused=True)
    assert g_w is None and g_b is None
    torch.testing.assert_close(g_x, g_full, rtol=1e-12, atol=1e-14)
    (head.per_sample_loss(x, labels, classifier_grad=False) * weights).sum().backward()
    assert head.weight.grad is None and head.bias.grad is None
    torch.testing.assert_close(head(x, labels), full.mean())


@pytest.mark.equivalence
def test_gradient_memory_is_reused_and_accumulation_adds():
    head = make_head("A", chunk_size=5)
    batches = [make_batch(head, seed=s) for s in (1, 2)]
    head(*batches[0]).backward()
    first = head.weight.grad.data_ptr()
    head.weight.grad = head.bias.grad = None  # zero_grad(set_to_none=True): the next backward reuses the memory
    head(*batches[1]).backward()
    assert head.weight.grad.data_ptr() == first
    head(*batches[0]).backward()  # accumulation: added to the gradient held, never written over it
    weight = head.weight.detach().clone().requires_grad_(True)
    bias = head.bias.detach().clone().requires_grad_(True)
    expected = sum(plain_eq6(x.detach(), weight, bias, y, m=0.5, margin_type="A").mean() for x, y in batches)
    want_w, want_b = grads(expected, [weight, bias])
    torch.testing.assert_close(head.weight.grad, want_w, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(head.bias.grad, want_b, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------- API, errors


def test_registry_builds_it_with_the_paper_defaults():
    head = heads.build("SphereFace2", num_classes=5, embedding_size=4)
    assert isinstance(head, SphereFace2) and head.weight.shape == (5, 4)
    assert (head.lamb, head.r, head.m, head.t, head.loss_weight) == (0.7, 30.0, 0.4, 3.0, 10.0)  # lw 10: OpenSphere paper configs
    assert (head.margin_type, head.margin_grad) == ("C", "exact")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lamb": 1.5}, ValueError, "lamb=1.5"),
        ({"r": 0.0}, ValueError, "r=0.0"),
        ({"t": 0.5}, ValueError, "t=0.5"),
        ({"m": -0.1}, ValueError, "m=-0.1"),
        ({"m": 0.0, "margin_type": "M"}, ValueError, "m=0.0"),
        ({"loss_weight": float("nan")}, ValueError, "loss_weight=nan"),
        ({"margin_type": "B"}, ValueError, "margin_type='B'"),
        ({"margin_grad": "stop"}, ValueError, "margin_grad='stop'"),
        ({"bias_init": "zero"}, ValueError, "bias_init='zero'"),
        ({"lamb": 1.0}, ValueError, "0 < lamb < 1"),
        ({"chunk_size": 0}, ValueError, "chunk_size=0"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        SphereFace2(C, D, **kwargs)


def test_balanced_bias_needs_two_classes():
    with pytest.raises(ValueError, match="num_classes >= 2"):
        SphereFace2(1, D)
    assert SphereFace2(1, D, bias_init=0.0).bias.item() == 0.0


@pytest.mark.parametrize("bad_label", [C, -1])
def test_bad_inputs_are_clear_errors(bad_label):
    head = make_head("C")
    x, labels = make_batch(head)
    with pytest.raises(ValueError, match=r"expected \(B, 8\)"):
        head(x[:, :5], labels)
    with pytest.raises(ValueError, match="labels of shape"):
        head.per_sample_loss(x, labels[:3])
    with pytest.raises(TypeError, match="integer"):
        head(x, labels.double())
    labels[3] = bad_label
    with pytest.raises(ValueError, match=rf"label {bad_label} at position 3 .*num_classes={C}"):
        head(x, labels)


# ---------------------------------------------------------------------------------------------- training


def test_tiny_training_run_learns_and_saves_the_threshold(tmp_path: Path, one_thread) -> None:
    from faceforge.core.checkpoint import load_checkpoint
    from faceforge.train.config import config_from_dict
    from faceforge.train.engine import train

    cfg = config_from_dict(
        {
            "output": str(tmp_path / "run"),
            "model": {"backbone": "_train_worker:TinyNet", "embedding_size": 16},
            "head": {"name": "sphereface2", "kwargs": {"r": 16.0, "m": 0.2, "loss_weight": 10.0}},
            "data": {"num_identities": 8, "images_per_identity": 8, "image_size": 32, "batch_size": 16,
                     "cache": True, "eval_pairs": 0},
            "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
            "schedule": {"name": "constant"},
            "train": {"steps": 40, "clip_grad_norm": 5.0, "log_every": 1, "progress": False},
        },
        "<test>",
    )
    result = train(cfg)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.7 * first, result.losses
    state = load_checkpoint(result.checkpoint)
    head = SphereFace2(8, 16, r=16.0, m=0.2)
    head.load_state_dict(state["head"])
    assert state["verification_threshold"] == pytest.approx(head.verification_threshold(), abs=1e-12)
    assert head.bias.item() != pytest.approx(balanced_bias(8, 0.7, 16.0, 0.2, 3.0))  # b was trained


# ---------------------------------------------------------------------------------------------- recipes

REPO = Path(__file__).resolve().parents[1]
RECIPES = {  # config file: (backbone, lamb, r, m, loss_weight, milestones, steps)
    "vggface2_sfnet20_sphereface2.yaml": ("sfnet20", 0.7, 40.0, 0.4, 10.0, [40000, 60000, 70000], 70000),
    "vggface2_sfnet64_sphereface2.yaml": ("sfnet64", 0.7, 40.0, 0.4, 10.0, [40000, 60000, 70000], 70000),
    "ms1m_r100_sphereface2.yaml": ("r100", 0.8, 64.0, 0.5, 50.0, [80000, 140000, 200000], 240000),
}


def test_every_sphereface2_config_is_listed_here():
    shipped = {p.name for p in (REPO / "configs").glob("*sphereface2*.yaml")}
    assert shipped == {*RECIPES, "synthetic_sphereface2_demo.yaml"}


@pytest.mark.parametrize("name", list(RECIPES))
def test_paper_recipes_load_and_build(name):
    from faceforge.backbones import build as build_backbone
    from faceforge.train.config import load_config

    cfg = load_config(REPO / "configs" / name)
    backbone, lamb, r, m, loss_weight, milestones, steps = RECIPES[name]
    assert cfg.model.backbone == backbone and cfg.head.name == "sphereface2"
    kw = cfg.head.kwargs
    assert (kw["lamb"], kw["r"], kw["m"], kw["t"], kw["loss_weight"]) == (lamb, r, m, 3.0, loss_weight)
    assert cfg.data.name == "recordio" and cfg.data.batch_size * 4 == 512 and cfg.data.image_size == 112
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
    assert (cfg.schedule.name, cfg.schedule.milestones, cfg.train.steps) == ("step", milestones, steps)
    head = heads.build(cfg.head.name, num_classes=10, embedding_size=cfg.model.embedding_size, **kw)
    assert isinstance(head, SphereFace2)
    with torch.device("meta"):
        build_backbone(backbone, embedding_size=cfg.model.embedding_size, input_size=112, **cfg.model.kwargs)


def test_demo_config_loads():
    from faceforge.train.config import load_config

    cfg = load_config(REPO / "configs" / "synthetic_sphereface2_demo.yaml")
    assert cfg.head.name == "sphereface2" and cfg.data.name == "synthetic"
