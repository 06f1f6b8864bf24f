"""ElasticFace (faceforge/heads/elasticface.py) against a direct float64 transcription of Boutros et al. 2022:

    m_b = m + sigma z_b,  z_b ~ N(0, 1) keyed by (seed, step, sample)                          Eq. 5
    Arc: t_b = s cos(theta_y + m_b) (continued past pi as ArcFace here),  Cos: t_b = s (cos theta_y - m_b)   Eq. 6, 7
    loss_b = logsumexp_j(logits_bj) - t_b, the target column t_b, the others s cos(theta_bj);
    "+": the batch's margins sorted, the largest to the row with the smallest cos theta_y;

the draw's statistics and determinism, a gradient check, and the strategies: one process, class-sharded on 2 and
3 gloo ranks (the margins per sample id identical to one process's), Partial FC, BroadFace (its queue blocks drawn
by their ids), CPU autocast, and training and resuming through the trainer (the step key survives).

Tolerances: float64; head and formula differ only in the order of float64 sums (the chunked online logsumexp, the
distributed one): 1e-10 relative, as test_parallel.py. A margin drawn for the wrong sample or step is off by
s x sigma x |z' - z| x sin(theta) ~ 0.1 at s = 8, sigma = 0.1, far beyond that.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import test_margin_hook as hook
import test_parallel as par
from _runs import make_config, resumed_equals_straight
from faceforge.heads import BroadFace, ElasticFace, build
from faceforge.heads.elasticface import assign_by_target_cosine, elastic_margins, margin_keys, normal_variates
from faceforge.heads.parallel import ShardedHead, build_sharded
from faceforge.train.engine import train
from test_contracts import numerical_gradient
from test_parallel import close

pytestmark = pytest.mark.usefixtures("one_thread")

C, D, B = 9, 6, 12
NAMES = ["elasticface_arc", "elasticface_cos", "elasticface_arc_plus", "elasticface_cos_plus"]
KIND = {"elasticface_arc": "arc", "elasticface_cos": "cos", "elasticface_arc_plus": "arc",
        "elasticface_cos_plus": "cos"}


# ------------------------------------------------------------------------------------------ the plain formula


def drawn(seed: int, step: int, keys: torch.Tensor, m: float, sigma: float, cos_y: torch.Tensor | None) -> torch.Tensor:
    """(B,) the margins, written out: m + sigma z per key (Eq. 5); with cos_y ("+"), the k-th largest margin to the
    row with the k-th smallest target cosine (a Python sort, independent of the head's)."""
    margins = m + sigma * normal_variates(seed, step, keys)
    if cos_y is None:
        return margins
    out = torch.empty_like(margins)
    by_cos = sorted(range(len(keys)), key=lambda i: (float(cos_y[i]), i))
    for row, value in zip(by_cos, sorted(margins.tolist(), reverse=True)):
        out[row] = value
    return out


def formula(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, margins: torch.Tensor, s: float,
            kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, C) logits, (B,) loss) of ElasticFace with the margins given, plainly (module docstring)."""
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    cos_y = cos.gather(1, y[:, None]).squeeze(1)
    if kind == "arc":
        guard = 10 * torch.finfo(torch.float64).eps
        phi = torch.acos(cos_y.clamp(-1 + guard, 1 - guard)) + margins
        k = torch.floor(phi.detach() / math.pi)  # past pi: (-1)^k cos(phi) - 2k, faceforge's monotonic continuation
        target = s * ((1 - 2 * (k % 2)) * torch.cos(phi) - 2 * k)
    else:
        target = s * (cos_y - margins)
    logits = (s * cos).scatter(1, y[:, None], target[:, None])
    return logits, torch.logsumexp(logits, 1) - target


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, W, view ids): four rows with cos_y within 1e-9 of +1 and -1 (the arc target past pi there), every
    two target cosines at least 1e-13 apart (so "+" orders them the same in the head and here, whatever the
    rounding of each computation, ~1e-16)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    x = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    w_y = F.normalize(w[y[:4]], dim=1)
    x[:4] = F.normalize(torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)[:, None] * w_y
                        + torch.tensor([0.0, 1e-6, 0.0, 1e-5], dtype=torch.float64)[:, None]
                        * torch.randn(4, D, generator=g, dtype=torch.float64), dim=1)
    ids = torch.randperm(1000, generator=g)[:B]
    return x * 3.0, y, w, ids


def target_cosines(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (F.normalize(x, dim=1) * F.normalize(w[y], dim=1)).sum(1)


# ------------------------------------------------------------------------------------------ defaults and formula


def test_defaults_are_the_papers() -> None:
    want = {"elasticface_arc": ("arc", 0.5, 0.05, False), "elasticface_cos": ("cos", 0.35, 0.05, False),
            "elasticface_arc_plus": ("arc", 0.5, 0.0175, True), "elasticface_cos_plus": ("cos", 0.35, 0.025, True)}
    for name, (kind, m, sigma, plus) in want.items():
        head = build(name, num_classes=C, embedding_size=D)
        assert (head.scale, head.kind, head.m, head.sigma, head.plus) == (64.0, kind, m, sigma, plus), name
        assert head.needs_target_cosines == plus and head.margin_grad == "exact"
    assert (ElasticFace(C, D).kind, ElasticFace(C, D).m, ElasticFace(C, D).sigma) == ("arc", 0.5, 0.05)


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_loss_are_the_formula_including_cos_near_plus_minus_one(name: str) -> None:
    x, y, w, ids = inputs()
    head = build(name, num_classes=C, embedding_size=D, s=64.0, sigma=0.1, chunk_size=4, margin_seed=7).double()
    with torch.no_grad():
        head.weight.copy_(w)
    head.after_optimizer_step(5)
    cos_y = target_cosines(x, y, w)
    assert cos_y[:2].min() > 1 - 1e-12 and cos_y[2:4].max() < -1 + 1e-9  # the edges are exercised
    margins = drawn(7, 5, ids, head.m, 0.1, cos_y if head.plus else None)
    want_logits, want = formula(x, y, w, margins, 64.0, KIND[name])
    close(head.logits(x, y, ids), want_logits, "logits")
    close(head.class_loss(x, y, sample_ids=ids), want, "per-sample loss")
    head.observe_sample_ids(ids)  # as the trainer's on_batch does
    close(head(x, y), want.mean(), "the training forward")
    # without ids a row is keyed by its position, -(p + 1), at the same step: per_sample_loss and forward agree
    by_position = drawn(7, 5, -1 - torch.arange(B), head.m, 0.1, cos_y if head.plus else None)
    close(head.per_sample_loss(x, y), formula(x, y, w, by_position, 64.0, KIND[name])[1], "keyed by position")
    close(head(x, y), head.per_sample_loss(x, y).mean(), "forward without ids")
    # the test has teeth: the fixed-margin loss and another step's draw are far from it
    fixed = formula(x, y, w, torch.full((B,), head.m, dtype=torch.float64), 64.0, KIND[name])[1]
    assert (fixed - want).abs().max() > 1e-1
    head.after_optimizer_step(6)
    assert (head.class_loss(x, y, sample_ids=ids) - want).abs().max() > 1e-1


def test_gradient_check_float64() -> None:
    """Autograd's gradient in x and W = central differences (test_contracts' ``numerical_gradient``; rtol 1e-5,
    atol 1e-7, as there: O(eps^2) + O(1e-16 / eps) ~ 1e-9 error). The margins are constants of a step and of the
    target cosines' order ("+"): no two target cosines here are within 1e-5, and a step of 1e-6 in one coordinate
    of x or W moves a cosine by at most 1e-6 / min(|x_b|, |W_j|) < 1e-6 (norms > 1 here), so it keeps the order."""
    x, y, w, ids = inputs(2)
    x[:4] = x[:4] + 3e-2 * torch.randn(4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    cos_y = target_cosines(x, y, w).sort().values
    assert (cos_y[1:] - cos_y[:-1]).min() > 1e-5 and x.norm(dim=1).min() > 1 and w.norm(dim=1).min() > 1
    for name in NAMES:
        head = build(name, num_classes=C, embedding_size=D, s=8.0, sigma=0.1, chunk_size=4,
                     buffers="release").double().eval()

        def loss(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # W in the head's place (Partial FC's seam)
            return head.class_loss(v, y, rows={"weight": weight}, sample_ids=ids).mean()

        leaves = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
        analytical = torch.autograd.grad(loss(*leaves), leaves)
        for what, a, n in zip(["x", "W"], analytical, numerical_gradient(loss, [x.clone(), w.clone()])):
            torch.testing.assert_close(a, n, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: d loss / d {what}: {m}")
        assert analytical[0].abs().max() > 1e-3


def test_out_of_range_kwargs_are_refused() -> None:
    for name, kwargs in (("elasticface_arc", {"m": -0.5}), ("elasticface_cos", {"m": 2.0}),
                         ("elasticface_arc", {"sigma": -0.1}), ("elasticface_arc", {"margin_seed": 0.5}),
                         ("elasticface_cos_plus", {"margin_grad": "nope"})):
        with pytest.raises(ValueError):
            build(name, num_classes=C, embedding_size=D, **kwargs)
    with pytest.raises(ValueError, match="kind"):
        ElasticFace(C, D, kind="sphere")


# ------------------------------------------------------------------------------------------ the draw


N_DRAWS = 40_000


def test_the_draw_is_normal_with_the_papers_mean_and_std() -> None:
    """z over N = 40,000 keys (ids, and row positions -(p + 1)) at (seed, step) (0, 0) and (3, 11).

    Bounds, each 5 standard errors of a true N(0, 1) sample (a two-sided miss has probability 5.7e-7; the draw is a
    fixed function, so the test is deterministic): mean |z_bar| < 5 / sqrt(N) = 0.025 (the mean of N iid N(0, 1)
    is N(0, 1/N)); std |s - 1| < 5 / sqrt(2N) = 0.018 (var(s^2) = 2 / (N - 1), so sd(s) ~ 1 / sqrt(2N));
    P(|z| < 1) = 0.6827 within 5 sqrt(p (1 - p) / N) = 0.0116 (binomial); E z^4 = 3 within 5 sqrt(96 / N) = 0.245
    (var z^4 = E z^8 - 9 = 96); the correlation of two steps' draws of the same keys |r| < 5 / sqrt(N) (r of
    independent samples is ~ N(0, 1/N)). Then the margins m + sigma z: mean within 5 sigma / sqrt(N), std within
    5 sigma / sqrt(2N) of the paper's m = 0.5, sigma = 0.05."""
    n = N_DRAWS
    large = torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(1))
    for keys in (torch.arange(n), -1 - torch.arange(n), large):
        for seed, step in ((0, 0), (3, 11)):
            z = normal_variates(seed, step, keys)
            assert z.dtype == torch.float64 and z.shape == (n,) and torch.isfinite(z).all()
            assert abs(float(z.mean())) < 5 / math.sqrt(n)
            assert abs(float(z.std()) - 1) < 5 / math.sqrt(2 * n)
            p = 0.682689492
            assert abs(float((z.abs() < 1).double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)
            assert abs(float((z**4).mean()) - 3) < 5 * math.sqrt(96 / n)
            other = normal_variates(seed, step + 1, keys)
            assert abs(float(torch.corrcoef(torch.stack([z, other]))[0, 1])) < 5 / math.sqrt(n)
    margins = elastic_margins(0, 0, torch.arange(n), 0.5, 0.05)
    assert abs(float(margins.mean()) - 0.5) < 5 * 0.05 / math.sqrt(n)
    assert abs(float(margins.std()) - 0.05) < 5 * 0.05 / math.sqrt(2 * n)


def test_the_draw_is_keyed_by_seed_step_and_sample_only() -> None:
    keys = torch.tensor([5, 17, 2**40, 0, -3])
    first = elastic_margins(1, 9, keys, 0.5, 0.05)
    assert torch.equal(first, elastic_margins(1, 9, keys, 0.5, 0.05))  # the same key, the same margin
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.equal(elastic_margins(1, 9, keys[perm], 0.5, 0.05), first[perm])  # per key, not per position
    assert torch.equal(elastic_margins(1, 9, keys[1:3], 0.5, 0.05), first[1:3])  # a shard's rows: the same values
    for seed, step in ((1, 10), (2, 9)):
        assert (elastic_margins(seed, step, keys, 0.5, 0.05) != first).all()  # another step or seed: all differ
    ids = torch.tensor([4, -1, 7, -1])
    assert margin_keys(ids, 4, torch.device("cpu")).tolist() == [4, -2, 7, -4]  # unknown: -(position + 1)
    assert margin_keys(None, 3, torch.device("cpu")).tolist() == [-1, -2, -3]


def test_plus_gives_the_largest_margin_to_the_smallest_target_cosine() -> None:
    cos_y = torch.tensor([0.1, 0.9, 0.5], dtype=torch.float64)
    margins = torch.tensor([0.45, 0.55, 0.5], dtype=torch.float64)
    assert assign_by_target_cosine(margins, cos_y).tolist() == [0.55, 0.45, 0.5]
    # the official code's last line, margin_sorted[argsort(-cos)], reads [0.5, 0.55, 0.45] here: the largest margin
    # to the CLOSEST sample, against the sort directions it sets up and the paper's text (module docstring)
    official = margins.sort().values[torch.argsort(cos_y, descending=True)]
    assert official.tolist() == [0.5, 0.55, 0.45]
    g = torch.Generator().manual_seed(3)
    cos_y, margins = torch.rand(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    out = assign_by_target_cosine(margins, cos_y)
    assert torch.equal(out.sort().values, margins.sort().values)  # the same margins, handed out again
    order = torch.argsort(cos_y)
    assert (out[order][1:] <= out[order][:-1]).all()  # non-increasing as cos theta_y grows
    head = build("elasticface_arc_plus", num_classes=C, embedding_size=D)
    ids = torch.arange(50)
    plain = build("elasticface_arc", num_classes=C, embedding_size=D, sigma=head.sigma)
    assert torch.equal(head.margins(ids, 50, cos_y).sort().values, plain.margins(ids, 50).sort().values)
    with pytest.raises(ValueError, match="target cosines"):
        head.margins(ids, 50)


def test_the_step_key_moves_with_the_optimiser_and_is_in_the_state_dict() -> None:
    head = build("elasticface_cos", num_classes=C, embedding_size=D)
    ids = torch.arange(8)
    before = head.margins(ids, 8)
    head.after_optimizer_step(3)
    assert int(head.margin_step) == 3 and (head.margins(ids, 8) != before).all()
    other = build("elasticface_cos", num_classes=C, embedding_size=D)
    other.load_state_dict(head.state_dict())
    assert torch.equal(other.margins(ids, 8), head.margins(ids, 8))
    # BroadFace passes the step on to the head it wraps (before, only the sharded form did)
    wrapped = BroadFace(build("elasticface_cos", num_classes=C, embedding_size=D), queue_size=4)
    wrapped.after_optimizer_step(4)
    assert int(wrapped.head.margin_step) == 4 and "head.margin_step" in wrapped.state_dict()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cpu_keeps_the_loss_in_float32(dtype: torch.dtype) -> None:
    """Under CPU autocast the embeddings may arrive in half precision; logits and loss stay float32 and equal the
    float32 loss of the same half-precision embeddings (the kernel casts once: 1e-5 relative, float32 sums)."""
    x, y, w, ids = inputs(3)
    for name in ("elasticface_arc_plus", "elasticface_cos"):
        head = build(name, num_classes=C, embedding_size=D)
        with torch.no_grad():
            head.weight.copy_(w.float())
        xh = x.to(dtype).requires_grad_(True)
        head.observe_sample_ids(ids)
        with torch.autocast("cpu", dtype=dtype):
            loss = head(xh, y)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert xh.grad.dtype == dtype and torch.isfinite(xh.grad).all()
        torch.testing.assert_close(head.class_loss(xh.detach().float(), y, sample_ids=ids).mean(), loss.detach(),
                                   rtol=1e-5, atol=0.0)


# ------------------------------------------------------------------- the strategies (test_parallel's and
# test_margin_hook's helpers: their batches, sgd_steps, spawn, check_ranks, run_partial_fc)

KW = {"s": 8.0, "sigma": 0.1}  # a wide draw at a soft scale: a wrong margin moves the loss by ~0.1
PLUS = "elasticface_arc_plus"


def view_ids(rank: int, step: int) -> torch.Tensor:
    """Rank ``rank``'s view ids at ``step`` (distinct within a step, shared between steps as epochs share them)."""
    return 10 * rank + step + torch.arange(par.batch_size(rank, step))


def joined(parts: list[torch.Tensor], interleaved: bool) -> torch.Tensor:
    """The ranks' rows as one process holds them: rank order, or the epoch sampler's order (``interleave``)."""
    return torch.stack(parts, 1).flatten(0, 1) if interleaved else torch.cat(parts)


def interleaved(step: int, world: int) -> bool:
    """BroadFace's queue keeps the sampler's order when the ranks' batches are equal (test_margin_hook's)."""
    return len({par.batch_size(r, step) for r in range(world)}) == 1


class Named(nn.Module):
    """``head`` as the trainer drives it: before each forward, ``after_optimizer_step(steps done)`` and the batch's
    view ids (``on_batch``), ``ids_of(step)``; every ``prepare`` of the margin head inside is recorded as
    (ids, margins) in ``draws`` (the margins each strategy actually used)."""

    def __init__(self, head: nn.Module, ids_of, margin_head: ElasticFace) -> None:
        super().__init__()
        self.head, self.ids_of, self.steps, self.draws = head, ids_of, 0, []
        prepare = margin_head.prepare

        def recorded(context):
            context = prepare(context)
            self.draws.append((context.sample_ids, context.extras["margin"]))
            return context

        margin_head.prepare = recorded

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.head.after_optimizer_step(self.steps)
        self.head.observe_sample_ids(self.ids_of(self.steps))
        self.steps += 1
        return self.head(x, y)


def run_named(name: str, world: int, rank: int, group) -> dict:
    """par.STEPS SGD steps of the class-sharded head with view ids and the step key; the margins it drew."""
    head = ShardedHead(name, C, par.D, seed=3, group=group, **KW).double()
    named = Named(head, lambda step: view_ids(rank, step), head.head)
    losses, grads = par.sgd_steps(named, rank)
    return {"losses": losses, "grads": grads, "weight": head.weight.detach(), "rows": head.rows,
            "draws": named.draws}


def run_broadface(world: int, rank: int, group) -> dict:
    """BroadFace around the class-sharded "+" head, with view ids: 5 steps of 11 or 8 rows through a queue of 10."""
    head = build_sharded("broadface", C, par.D, seed=3, group=group, head=PLUS, head_kwargs=KW,
                         **hook.BROADFACE).double()
    named = Named(head, lambda step: view_ids(rank, step), head.head.head)
    losses, grads = par.sgd_steps(named, rank, hook.STEPS + 2)
    return {"losses": losses, "grads": grads, "weight": head.weight.detach(), "rows": head.head.rows,
            "draws": named.draws}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from functools import partial

    hook.SPEC, hook.KWARGS = PLUS, KW  # run_partial_fc: the "+" head, keyed by row position (no ids)
    hook.RUNS = {**{name: partial(run_named, name) for name in NAMES}, "partial_fc": hook.run_partial_fc,
                 "broadface": run_broadface}
    hook._worker(rank, world, port, out)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("elasticface")
    par.spawn(_worker, 3, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(3)]


def initial_weight(num_classes: int) -> torch.Tensor:
    """The rows every run starts from: a one-process sharded head's (rows from (seed, row))."""
    return ShardedHead("elasticface_arc", num_classes, par.D, seed=3).double().weight.detach().clone()


def one_process(head: nn.Module, margin_head: ElasticFace, world: int, steps: int, order: bool,
                monkeypatch: pytest.MonkeyPatch) -> dict:
    """par.sgd_steps on ONE process holding every rank's batch and view ids (rank order, or the sampler's order
    where ``order`` and the batches are equal): the losses, each rank's embedding grads, the margins drawn."""
    batch = par.batch
    parts = lambda step: [batch(r, step) for r in range(world)]  # noqa: E731
    monkeypatch.setattr(par, "batch", lambda rank, step: tuple(
        joined([p[i] for p in parts(step)], order and interleaved(step, world)) for i in (0, 1)))
    named = Named(head, lambda step: joined([view_ids(r, step) for r in range(world)],
                                            order and interleaved(step, world)), margin_head)
    losses, grads = par.sgd_steps(named, 0, steps)
    monkeypatch.setattr(par, "batch", batch)
    split = [[g[r::world] for r in range(world)] if order and interleaved(step, world) else
             list(g.split([par.batch_size(r, step) for r in range(world)])) for step, g in enumerate(grads)]
    return {"losses": losses, "grads": split, "draws": named.draws}


def by_id(draws: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[int, float]:
    return {int(i): float(m) for ids, margins in draws for i, m in zip(ids, margins)}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_class_sharded_equals_one_process_with_the_same_margin_per_sample(
        ranks: list[dict], world: int, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    head = build(name, num_classes=C, embedding_size=par.D, **KW).double()
    with torch.no_grad():
        head.weight.copy_(initial_weight(C))
    ref = one_process(head, head, world, par.STEPS, False, monkeypatch)
    ref["weight"] = head.weight.detach()
    hook.check_ranks(ranks, name, world, ref)
    # the margins themselves: per step, every rank drew for every sample id what one process drew
    for step in range(par.STEPS):
        want = by_id(ref["draws"][2 * step: 2 * step + 2])  # observe_batch's prepare, then class_loss's
        assert len(want) == sum(par.batch_size(r, step) for r in range(world))
        for rank in range(world):
            assert by_id(ranks[rank][(name, world)]["draws"][2 * step: 2 * step + 2]) == want, (name, step, rank)
    assert len(set(by_id(ref["draws"][:2]).values())) == len(by_id(ref["draws"][:2]))  # the margins differ
    assert (ref["weight"] - initial_weight(C)).abs().max() > 1e-3  # the comparison has teeth


@pytest.mark.parametrize("world", [2, 3])
def test_partial_fc_equals_one_process_over_the_sampled_classes(ranks: list[dict], world: int) -> None:
    """hook.run_partial_fc (plain SGD, no ids: each row keyed by its position in the gathered batch, the step key
    passed on by ShardedHead.after_optimizer_step) against one process on the classes the ranks sampled."""
    sampled = ranks[0][("partial_fc", world)]["sampled"]
    assert any(s.numel() < hook.C_PFC for s in sampled)  # sampling happened
    head = build(PLUS, num_classes=hook.C_PFC, embedding_size=par.D, **KW).double()
    w = initial_weight(hook.C_PFC).requires_grad_(True)
    optimizer = torch.optim.SGD([w], lr=hook.LR)
    losses, grads = [], []
    for step in range(hook.STEPS):
        parts = [par.batch(r, step, hook.C_PFC) for r in range(world)]
        x = torch.cat([p[0] for p in parts]).requires_grad_(True)
        y = torch.searchsorted(sampled[step], torch.cat([p[1] for p in parts]))
        loss = functional_call(head, {"weight": w[sampled[step]]}, (x, y))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        head.after_optimizer_step(step + 1)
        losses.append(loss.detach())
        grads.append(list(x.grad.split([par.batch_size(r, step) for r in range(world)])))
    hook.check_ranks(ranks, "partial_fc", world, {"losses": torch.stack(losses), "grads": grads, "weight": w.detach()})


@pytest.mark.parametrize("world", [2, 3])
def test_broadface_sharded_equals_one_process_its_queue_drawn_by_its_ids(
        ranks: list[dict], world: int, monkeypatch: pytest.MonkeyPatch) -> None:
    inner = build(PLUS, num_classes=C, embedding_size=par.D, **KW).double()
    with torch.no_grad():
        inner.weight.copy_(initial_weight(C))
    broadface = BroadFace(inner, **hook.BROADFACE)
    ref = one_process(broadface, inner, world, hook.STEPS + 2, True, monkeypatch)
    ref["weight"] = inner.weight.detach()
    hook.check_ranks(ranks, "broadface", world, ref, steps=hook.STEPS + 2)
    for rank in range(world):  # every block (encoder, batch, queue blocks) drew the same margins in the same order
        for (ids, margins), (want_ids, want) in zip(ranks[rank][("broadface", world)]["draws"], ref["draws"]):
            assert torch.equal(ids, want_ids) and torch.equal(margins, want)
    # the queue blocks reached the head with their rows' ids (from earlier steps), not as unknown rows
    queued = [ids for ids, _ in ref["draws"] if ids is not None and ids.numel() <= hook.BROADFACE["row_chunk"]]
    assert queued and all((ids >= 0).all() for ids in queued)
    assert (ref["weight"] - initial_weight(C)).abs().max() > 1e-3


# ------------------------------------------------------------------- through the trainer


def test_trains_through_faceforge_train_with_view_ids_and_the_step_key(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`faceforge train` (one process): every draw is keyed by the batch's view ids (the trainer's on_batch), the
    step key counts the optimiser steps, and the run's seed is the draw's seed (a run fact)."""
    from faceforge.build import build_head
    from faceforge.cli.main import main
    from faceforge.core.checkpoint import load_checkpoint
    from faceforge.train.config import to_yaml

    seen: list[torch.Tensor | None] = []
    prepare = ElasticFace.prepare
    monkeypatch.setattr(ElasticFace, "prepare", lambda self, context: (seen.append(context.sample_ids),
                                                                        prepare(self, context))[1])
    config = make_config(tmp_path / "run", head={"name": PLUS, "kwargs": {"s": 16.0}}, train={"steps": 3})
    config.seed = 5
    assert build_head(config, 8).margin_seed == 5
    path = tmp_path / "run.yaml"
    path.write_text(to_yaml(config))
    assert main(["train", str(path)]) == 0
    assert seen and all(ids is not None and (ids >= 0).all() for ids in seen)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert int(state["head"]["margin_step"]) == 3 and state["step"] == 3


def test_resumes_bit_identically_and_the_step_key_is_what_makes_it(tmp_path: Path) -> None:
    """A run resumed half-way equals the straight run bit for bit (``_runs.resumed_equals_straight``); the same
    resume with the checkpoint's step key set back to 0 draws other margins and leaves the straight run's losses."""
    from faceforge.core.checkpoint import load_checkpoint

    sections = {"head": {"name": "elasticface_cos_plus", "kwargs": {"s": 16.0}}, "model": {"kwargs": {"dropout": 0.0}}}
    state = resumed_equals_straight(tmp_path, steps=4, **sections)
    assert int(state["head"]["margin_step"]) == 4
    half = load_checkpoint(tmp_path / "straight" / "step_0000002.pt")
    assert int(half["head"]["margin_step"]) == 2
    half["head"]["margin_step"] = torch.zeros((), dtype=torch.long)
    (tmp_path / "reset").mkdir()
    torch.save(half, tmp_path / "reset" / "last.pt")
    sections["train"] = {"steps": 4, "checkpoint_every": 2}
    reset = train(make_config(tmp_path / "reset", **sections), resume=True)
    straight = train(make_config(tmp_path / "again", **sections))
    assert reset.losses != straight.losses[2:]
