"""MagFace (faceforge/heads/magface.py) against a direct float64 transcription of Meng et al. 2021, Eq. 5:

    a = clamp(|x|, 10, 110),  m(a) = 0.35 / 100 (a - 10) + 0.45,  g(a) = a / 110^2 + 1 / a,
    L_b = logsumexp_j(logits_bj) - t_b + 35 g(a_b),  t_b = s cos(theta_y + m(a_b)),  the others s cos(theta_bj),

with autograd through a (not detached, as the paper and its code): the head's loss AND its gradients in the
embeddings and W equal the formula's, on inputs with norms below, inside and above [l_a, u_a] and cos theta near
+-1; central differences of the head; class-sharded on 2 and 3 gloo ranks, Partial FC and BroadFace equal to one
process (tests/test_parallel.py's and tests/test_margin_hook.py's helpers).

Tolerances: float64; head and formula differ in the order of float64 sums only: 1e-10 relative (test_parallel.py).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import test_margin_hook as hook
import test_parallel as par
from faceforge.heads import MagFace, build
from test_contracts import numerical_gradient
from test_parallel import close

pytestmark = pytest.mark.usefixtures("one_thread")

C, D, B = 9, 6, 12
SMALL = {"s": 8.0, "l_a": 0.5, "u_a": 3.0, "lambda_g": 2.0}  # magnitudes of random unit-variance embeddings


def formula(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, s: float = 64.0, l_a: float = 10.0,
            u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8, lambda_g: float = 35.0) -> torch.Tensor:
    """(B,) the MagFace loss, plainly (module docstring); a keeps its gradient."""
    a = x.norm(dim=1).clamp(l_a, u_a)
    m = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    guard = 10 * torch.finfo(torch.float64).eps
    theta = torch.acos(cos.gather(1, y[:, None]).squeeze(1).clamp(-1 + guard, 1 - guard))
    phi = theta + m
    k = torch.floor(phi.detach() / math.pi)  # past pi: (-1)^k cos(phi) - 2k, faceforge's monotonic continuation
    target = s * ((1 - 2 * (k % 2)) * torch.cos(phi) - 2 * k)
    logits = (s * cos).scatter(1, y[:, None], target[:, None])
    return torch.logsumexp(logits, 1) - target + lambda_g * (a / u_a**2 + 1 / a)


def inputs(seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norms from 5 to 130 (times ``scale``), rows 0 and 1 at cos_y = 1 - ~5e-5, row 2 at cos_y ~ -0.99."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    x = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    noise = 1e-2 * torch.randn(3, D, generator=g, dtype=torch.float64)
    x[:3] = F.normalize(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)[:, None] * F.normalize(w[y[:3]], dim=1)
                        + noise, dim=1)
    x[2] = F.normalize(x[2] + 0.1 * F.normalize(torch.randn(D, generator=g, dtype=torch.float64), dim=0), dim=0)
    return x * scale * torch.linspace(5.0, 130.0, B, dtype=torch.float64)[:, None], y, w


def test_defaults_are_the_papers() -> None:
    head = build("magface", num_classes=C, embedding_size=D)
    assert (head.scale, head.l_a, head.u_a, head.l_m, head.u_m, head.lambda_g) == (64.0, 10.0, 110.0, 0.45, 0.8, 35.0)
    a = torch.tensor([5.0, 10.0, 60.0, 110.0, 200.0])
    torch.testing.assert_close(head.margin(head.magnitude(a)), torch.tensor([0.45, 0.45, 0.625, 0.8, 0.8]))


def test_loss_and_gradients_are_the_formula_with_the_magnitude_gradient() -> None:
    x, y, w = inputs()
    head = MagFace(C, D, chunk_size=4).double()
    with torch.no_grad():
        head.weight.copy_(w)
    cos_y = (F.normalize(x, dim=1) * F.normalize(w[y], dim=1)).sum(1)
    assert cos_y[:2].min() > 1 - 1e-3 and cos_y[2] < -0.98  # near the edges (row 2 past pi: the continuation)
    xs = x.clone().requires_grad_(True)
    loss = head(xs, y)
    loss.backward()
    xf, wf = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    want = formula(xf, y, wf).mean()
    want.backward()
    close(loss.detach(), want.detach(), "loss")
    close(xs.grad, xf.grad, "d loss / d x (through the margin and g(a))")
    close(head.weight.grad, wf.grad, "d loss / d W")
    # the magnitude's gradient is there: the radial part of d loss / d x is not 0 inside [l_a, u_a] ...
    radial = (xs.grad * F.normalize(x, dim=1)).sum(1)
    inside = (x.norm(dim=1) > 10) & (x.norm(dim=1) < 110)
    assert radial[inside].abs().min() > 1e-6 and radial[~inside].abs().max() < 1e-12  # ... and 0 outside (clamp)
    per_sample = head.per_sample_loss(x, y)
    close(per_sample, formula(x, y, w).detach(), "per-sample loss")


def test_central_differences() -> None:
    """Nothing is detached in MagFace's loss, so the head's autograd gradient equals central differences
    (rtol 1e-5, atol 1e-7, as test_contracts: O(eps^2) + O(1e-16 / eps) ~ 1e-9)."""
    x, y, w = inputs(1, scale=0.03)  # norms 0.15 .. 3.9 against l_a = 0.5, u_a = 3
    head = MagFace(C, D, chunk_size=4, buffers="release", **SMALL).double()
    leaves = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]

    def loss(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return functional_call(head, {"weight": weight}, (v, y))

    analytical = torch.autograd.grad(loss(*leaves), leaves)
    for what, a, n in zip(["x", "W"], analytical, numerical_gradient(loss, [x.clone(), w.clone()])):
        torch.testing.assert_close(a, n, rtol=1e-5, atol=1e-7, msg=lambda m: f"d loss / d {what}: {m}")


def test_out_of_range_kwargs_are_refused() -> None:
    for kwargs in ({"l_a": 0.0}, {"u_a": 5.0}, {"lambda_g": -1.0}, {"u_m": 3.0}):
        with pytest.raises(ValueError):
            MagFace(C, D, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cpu_keeps_the_loss_in_float32(dtype: torch.dtype) -> None:
    x, y, w = inputs(3)
    head = MagFace(C, D)
    with torch.no_grad():
        head.weight.copy_(w.float())
    x = x.to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        loss = head(x, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.detach(), head(x.detach().float(), y).detach(), rtol=1e-5, atol=0.0)


# ------------------------------------------------------------------------ the strategies (the existing helpers)

SPEC = {"s": 8.0, "l_a": 0.5, "u_a": 3.0, "lambda_g": 2.0}  # test_parallel's batches: norms ~ 0.5 .. 4


def _run_sharded(world: int, rank: int, group) -> dict:
    result = par.run_sharded("magface", world, rank, group)
    return {**result, "weight": result.pop("state")["weight"]}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    par.SPECS = {"magface": SPEC}
    hook.SPEC, hook.KWARGS = "magface", SPEC
    # run_broadface also returns the norm statistics of test_margin_hook's head; MagFace keeps none (not compared)
    MagFace.norm_mean = MagFace.norm_std = torch.zeros((), dtype=torch.float64)
    hook.RUNS = {"partial_fc": hook.run_partial_fc, "broadface": hook.run_broadface,
                 "sharded": _run_sharded}
    hook._worker(rank, world, port, out)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("magface")
    hook.spawn(_worker, 3, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(3)]


def partial_fc_reference(world: int, sampled: list[torch.Tensor]) -> dict:
    """One-process MagFace on the classes the ranks sampled (W restricted to them each step), plain SGD."""
    return hook.partial_fc_reference_of(MagFace(hook.C_PFC, par.D, **SPEC).double(), world, sampled)


def broadface_reference(world: int) -> dict:
    """One-process BroadFace around MagFace on the ranks' batches in the sampler's order (test_margin_hook's)."""
    inner = MagFace(hook.C, par.D, **SPEC).double()
    losses, grads = hook.broadface_one_process(inner, world)
    return {"losses": losses, "grads": grads, "weight": inner.weight.detach()}


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_partial_fc_and_broadface_equal_one_process(ranks: list[dict], world: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(par, "SPECS", {"magface": SPEC})
    monkeypatch.setattr(hook, "SPEC", "magface")
    monkeypatch.setattr(hook, "KWARGS", SPEC)
    ref = par.run_reference("magface", world)
    ref["weight"] = ref.pop("state")["weight"]
    hook.check_ranks(ranks, "sharded", world, ref)
    sampled = ranks[0][("partial_fc", world)]["sampled"]
    assert any(s.numel() < hook.C_PFC for s in sampled)
    hook.check_ranks(ranks, "partial_fc", world, partial_fc_reference(world, sampled))
    ref = broadface_reference(world)
    hook.check_ranks(ranks, "broadface", world, ref, steps=hook.STEPS + 2)
    assert (ref["weight"] - hook.initial_weight(hook.C)).abs().max() > 1e-3
