"""AdaFace (faceforge/heads/adaface.py) against a direct float64 transcription of Kim et al. 2022, Eq. 8, 10, 11:

    z = clip(h (|x| - mu) / (sigma + 1e-3), -1, 1),  t = s (cos(clip(theta - m z, 1e-3, pi - 1e-3)) - (m z + m)),
    loss_b = logsumexp_j(logits_bj) - t_b with the target column replaced by t_b, the others s cos(theta_bj);

its running norm statistics (EMA, before the loss), a gradient check, and the strategies of the margin hook
(tests/test_margin_hook.py's helpers, with the registered head in place of the out-of-tree one): one process,
class-sharded on 2 and 3 gloo ranks, Partial FC, BroadFace. Resume through the trainer is the contract test
(tests/test_contracts.py, parametrised over every registered head).

Tolerances: float64 throughout; head and formula differ only in the order of float64 sums (the chunked online
logsumexp) and the arccos guard (10 epsilons from +-1 in both): 1e-10 relative, as test_parallel.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import test_margin_hook as hook
from faceforge.heads import AdaFace, build
from test_contracts import numerical_gradient
from test_parallel import close

pytestmark = pytest.mark.usefixtures("one_thread")

C, D, B = 9, 6, 12


def formula(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, mu: float, sigma: float, s: float, m: float,
            h: float) -> torch.Tensor:
    """(B,) the AdaFace loss, plainly (module docstring)."""
    norms = x.detach().norm(dim=1).clamp(0.001, 100.0)
    z = (h * (norms - mu) / (sigma + 1e-3)).clamp(-1.0, 1.0)
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    guard = 10 * torch.finfo(torch.float64).eps
    theta = torch.acos(cos.gather(1, y[:, None]).squeeze(1).clamp(-1 + guard, 1 - guard))
    target = s * (torch.cos((theta - m * z).clamp(1e-3, math.pi - 1e-3)) - (m * z + m))
    logits = (s * cos).scatter(1, y[:, None], target[:, None])
    return torch.logsumexp(logits, 1) - target


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings of norms 0.5 .. 60 (z below, inside and above [-1, 1]), four rows with cos_y near +1 and -1."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    x = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    w_y = F.normalize(w[y[:4]], dim=1)
    x[:4] = F.normalize(torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)[:, None] * w_y
                        + torch.tensor([0.0, 1e-9, 0.0, 1e-5], dtype=torch.float64)[:, None]
                        * torch.randn(4, D, generator=g, dtype=torch.float64), dim=1)
    return x * torch.linspace(0.5, 60.0, B, dtype=torch.float64)[:, None], y, w


def test_defaults_are_the_papers() -> None:
    head = AdaFace(C, D)
    assert (head.scale, head.m, head.h, head.t_alpha) == (64.0, 0.4, 0.333, 0.01)
    assert (float(head.norm_mean), float(head.norm_std)) == (20.0, 100.0)
    assert build("adaface", num_classes=C, embedding_size=D).m == 0.4


@pytest.mark.parametrize("stats", [(20.0, 100.0), (25.0, 5.0)])
def test_loss_is_the_formula_including_cos_near_plus_minus_one(stats: tuple[float, float]) -> None:
    x, y, w = inputs()
    head = AdaFace(C, D, chunk_size=4).double().eval()  # eval: the statistics are read, not moved
    with torch.no_grad():
        head.weight.copy_(w)
        head.norm_mean.fill_(stats[0])
        head.norm_std.fill_(stats[1])
    cos_y = (F.normalize(x, dim=1) * F.normalize(w[y], dim=1)).sum(1)
    assert cos_y[:2].min() > 1 - 1e-12 and cos_y[2:4].max() < -1 + 1e-9  # the edges are exercised
    want = formula(x, y, w, *stats, 64.0, 0.4, 0.333)
    close(head.per_sample_loss(x, y), want, "per-sample loss")
    # the margin is not ArcFace's nor zero: z spans both ends (the test has teeth)
    z = head.standardised(x.norm(dim=1))
    assert z.min() < 0 < z.max()
    assert (build("arcface", num_classes=C, embedding_size=D).double().per_sample_loss(x, y) - want).abs().max() > 1e-3


def test_statistics_move_by_the_ema_before_the_loss() -> None:
    x, y, w = inputs(1)
    head = AdaFace(C, D, t_alpha=0.3).double()
    with torch.no_grad():
        head.weight.copy_(w)
    loss = head(x, y)
    norms = x.norm(dim=1).clamp(0.001, 100.0)
    mu, sigma = 0.7 * 20.0 + 0.3 * float(norms.mean()), 0.7 * 100.0 + 0.3 * float(norms.std())
    assert math.isclose(float(head.norm_mean), mu, rel_tol=1e-12)
    assert math.isclose(float(head.norm_std), sigma, rel_tol=1e-12)
    close(loss.detach(), formula(x, y, w, mu, sigma, 64.0, 0.4, 0.333).mean(), "loss after the update")
    head.eval()
    head(x, y)
    assert float(head.norm_mean) == mu  # eval reads without moving
    assert "norm_mean" in head.state_dict() and "norm_std" in head.state_dict()  # in the checkpoint


def test_gradient_check_float64() -> None:
    """Autograd's gradient in the embeddings' directions and W = central differences (test_contracts'
    ``numerical_gradient``; torch.autograd.gradcheck runs a backward twice on one graph, which the chunked kernel's
    in-place backward does not allow). The norm enters the margin detached (a stop-gradient central differences
    would see), so the embeddings are normalize(v) times fixed norms: that function of (v, W) has exactly autograd's
    gradient. Tolerance as test_contracts: rtol 1e-5, atol 1e-7 (O(eps^2) + O(1e-16 / eps) ~ 1e-9 error)."""
    x, y, w = inputs(2)
    norms = x.norm(dim=1, keepdim=True)
    head = AdaFace(C, D, s=8.0, chunk_size=4, buffers="release").double().eval()
    with torch.no_grad():
        head.norm_mean.fill_(30.0)
        head.norm_std.fill_(20.0)
    # rows 0-3 at cos_y = +-(1 - ~5e-5): near the edges, where central differences at eps = 1e-6 still resolve arccos
    x[:4] = x[:4] + 1e-2 * norms[:4] * torch.randn(4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def loss(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return functional_call(head, {"weight": weight}, (F.normalize(v, dim=1) * norms, y))

    leaves = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    analytical = torch.autograd.grad(loss(*leaves), leaves)
    for what, a, n in zip(["v", "W"], analytical, numerical_gradient(loss, [x.clone(), w.clone()])):
        torch.testing.assert_close(a, n, rtol=1e-5, atol=1e-7, msg=lambda m: f"d loss / d {what}: {m}")
    assert analytical[0].abs().max() > 1e-3


def test_out_of_range_kwargs_are_refused() -> None:
    for kwargs in ({"m": -0.4}, {"h": 0.0}, {"t_alpha": 2.0}, {"s": float("nan")}):
        with pytest.raises(ValueError):
            AdaFace(C, D, **kwargs)


# ------------------------------------------------------------------- the strategies (test_margin_hook's helpers)


def test_one_process_is_the_formula_over_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """test_margin_hook's one-process check (SGD with momentum, 3 steps, statistics), with AdaFace in place."""
    monkeypatch.setattr(hook, "NormMarginHead", AdaFace)
    monkeypatch.setattr(hook, "SPEC", "adaface")
    hook.test_the_out_of_tree_head_is_the_plain_formula_in_one_process()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    hook.SPEC = "adaface"  # the registered head in every strategy of the hook test
    hook.RUNS = {k: v for k, v in hook.RUNS.items() if k != "binary"}
    hook._worker(rank, world, port, out)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("adaface")
    hook.spawn(_worker, 3, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(3)]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_partial_fc_and_broadface_equal_one_process(ranks: list[dict], world: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hook, "SPEC", "adaface")
    monkeypatch.setattr(hook, "NormMarginHead", AdaFace)
    ref = hook.reference(world)
    hook.check_ranks(ranks, "sharded", world, ref)  # losses, embedding grads, W rows, norm statistics
    hook.test_partial_fc_norm_head_equals_the_formula_over_the_sampled_classes(ranks, world)
    hook.test_broadface_around_the_norm_head_sharded_equals_one_process(ranks, world)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cpu_keeps_the_loss_in_float32(dtype: torch.dtype) -> None:
    """Under CPU autocast the embeddings may arrive in half precision; logits and loss stay float32 and equal the
    float32 loss of the same half-precision embeddings (the kernel casts once: 1e-5 relative, float32 sums)."""
    x, y, w = inputs(3)
    head = AdaFace(C, D)
    with torch.no_grad():
        head.weight.copy_(w.float())
    x = x.to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        loss = head(x, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    head.eval()
    torch.testing.assert_close(head(x.float(), y), loss.detach(), rtol=1e-5, atol=0.0)


def test_sharded_form_keeps_the_statistics_in_its_state_dict_and_resumes_bit_identically() -> None:
    """The norm statistics are plain (replicated) buffers of the sharded head, under the unsharded keys, not row
    shards: a checkpoint carries them, and a head loaded from it continues exactly as the one that wrote it."""
    from faceforge.heads.parallel import ShardedHead

    def steps(head: ShardedHead, first: int, count: int) -> list[torch.Tensor]:
        optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
        losses = []
        for step in range(first, first + count):
            x, y, _ = inputs(10 + step)
            loss = head(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        return losses

    make = lambda: ShardedHead("adaface", C, D, seed=4, t_alpha=0.3).double()  # noqa: E731
    straight = make()
    want = steps(straight, 0, 4)
    first = make()
    steps(first, 0, 2)
    state = first.state_dict()
    assert {"weight", "norm_mean", "norm_std"} <= set(state) and set(first.row_shards()) == {"weight"}
    resumed = make()
    resumed.load_state_dict(state)
    got = steps(resumed, 2, 2)
    assert all(torch.equal(a, b) for a, b in zip(got, want[2:]))
    for key in ("norm_mean", "norm_std", "weight"):
        assert torch.equal(resumed.state_dict()[key], straight.state_dict()[key]), key
