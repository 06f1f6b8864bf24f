"""CurricularFace (faceforge/heads/curricularface.py) against a direct float64 transcription of Huang et al. 2020:

    T_b = cos(theta_b + m) (continued past pi as ArcFace here: (-1)^k cos(phi) - 2k, k = floor(phi / pi)),
    N_bj = cos_bj (t + cos_bj) where cos_bj > T_b (hard), cos_bj elsewhere,   t <- a mean_b cos_b,y_b + (1 - a) t,
    loss_b = logsumexp_j(logits_bj) - s T_b, the target column s T_b, the others s N_bj (T_b a mask: detached),

written on the plain (B, C) cosine matrix; its t (EMA before the loss); central differences of the kernel with the
transform; the strategies of the margin hook (tests/test_margin_hook.py's and tests/test_parallel.py's helpers):
class-sharded on 2 and 3 gloo ranks, Partial FC, BroadFace (one process against the formula, sharded against one
process), the seam's all-reduced target cosines; CPU autocast; resume (state dict and ``faceforge train``).

Tolerances: float64 throughout; head and formula differ only in the order of float64 sums (the chunked online
logsumexp, the distributed one): 1e-10 relative, as test_parallel.py. A cosine within ~1e-12 of its row's threshold
would flip its mask between two summation orders; the random inputs here have none (checked by the margin below).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import test_margin_hook as hook
import test_parallel as par
from _runs import assert_same, make_config
from faceforge.core.checkpoint import load_checkpoint
from faceforge.heads import BroadFace, CurricularFace, MarginHead, build
from faceforge.heads.parallel import ShardedHead
from faceforge.train.engine import train
from test_contracts import numerical_gradient
from test_parallel import close

pytestmark = pytest.mark.usefixtures("one_thread")

C, D, B = 9, 6, 12
KW = {"s": 8.0, "m": 0.5, "alpha": 0.3}  # a fast EMA: t moves within the 3 steps of the strategies' runs
GUARD = 10 * torch.finfo(torch.float64).eps


def positive(cos_y: torch.Tensor, m: float) -> torch.Tensor:
    """T = cos(theta + m), continued monotonically past pi, unscaled (B,)."""
    phi = torch.acos(cos_y.clamp(-1 + GUARD, 1 - GUARD)) + m
    k = torch.floor(phi.detach() / math.pi)
    return (1 - 2 * (k % 2)) * torch.cos(phi) - 2 * k


def formula(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, t: float, s: float = 64.0, m: float = 0.5,
            classes: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) the CurricularFace loss, plainly (module docstring); ``classes`` keeps only those columns (Partial FC)."""
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    target = positive(cos.gather(1, y[:, None]).squeeze(1), m)
    hard = cos > target.detach()[:, None]
    logits = s * torch.where(hard, cos * (t + cos), cos)
    logits = logits.scatter(1, y[:, None], s * target[:, None])
    if classes is not None:
        keep = torch.zeros(w.shape[0], dtype=torch.bool)
        keep[classes] = True
        logits = logits.masked_fill(~keep, -math.inf)
    return torch.logsumexp(logits, 1) - s * target


def batch_mean_cosine(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    """r = mean_b cos theta_{b y_b}, the batch statistic of t."""
    return float((F.normalize(x.detach(), dim=1) * F.normalize(w.detach()[y], dim=1)).sum(1).clamp(-1, 1).mean())


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows 0, 1 at cos_y ~ +1, rows 2, 3 at cos_y ~ -1 (row 3 past pi - m: every negative hard), the rest random
    (hard and easy negatives both)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    x = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    w_y = F.normalize(w[y[:4]], dim=1)
    x[:4] = F.normalize(torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)[:, None] * w_y
                        + torch.tensor([0.0, 1e-9, 0.0, 1e-5], dtype=torch.float64)[:, None]
                        * torch.randn(4, D, generator=g, dtype=torch.float64), dim=1)
    return x * torch.linspace(0.5, 3.0, B, dtype=torch.float64)[:, None], y, w


def masks(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, m: float = 0.5) -> tuple[torch.Tensor, float]:
    """(hard (B, C) among the negatives, the smallest |cos - T| of any negative): the test's own check of its inputs."""
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    target = positive(cos.gather(1, y[:, None]).squeeze(1), m)
    negative = ~F.one_hot(y, w.shape[0]).bool()
    return (cos > target[:, None]) & negative, float((cos - target[:, None]).abs()[negative].min())


def head_with(w: torch.Tensor, t: float = 0.0, **kwargs) -> CurricularFace:
    head = CurricularFace(w.shape[0], w.shape[1], chunk_size=4, **kwargs).double()  # 3 chunks of 4, 4, 1 classes
    with torch.no_grad():
        head.weight.copy_(w)
        head.t.fill_(t)
    return head


# ------------------------------------------------------------------------------------------ the formula


def test_defaults_are_the_papers() -> None:
    head = build("curricularface", num_classes=C, embedding_size=D)
    assert (head.scale, head.m, head.alpha, float(head.t)) == (64.0, 0.5, 0.01, 0.0)
    with pytest.raises(ValueError):
        CurricularFace(C, D, alpha=0.0)
    with pytest.raises(ValueError):
        CurricularFace(C, D, m=-0.5)


@pytest.mark.parametrize("t", [0.0, 0.37, -0.2])
def test_loss_is_the_formula_including_cos_near_plus_minus_one(t: float) -> None:
    x, y, w = inputs()
    hard, gap = masks(x, y, w)
    assert 0 < int(hard.sum()) < int((~F.one_hot(y, C).bool()).sum()) and gap > 1e-6  # hard and easy, no tie
    assert bool(hard[3].sum() == C - 1)  # the row past pi - m: its T < -1, every negative hard
    cos_y = (F.normalize(x, dim=1) * F.normalize(w[y], dim=1)).sum(1)
    assert cos_y[:2].min() > 1 - 1e-12 and cos_y[2:4].max() < -1 + 1e-9
    head = head_with(w, t).eval()  # eval: t is read, not moved
    want = formula(x, y, w, t)
    close(head.per_sample_loss(x, y), want, "per-sample loss")
    close(head(x, y), want.mean(), "loss")
    # the teeth: ArcFace (no transform) is not this loss, nor is another t
    arcface = build("arcface", num_classes=C, embedding_size=D).double()
    arcface.load_state_dict({"weight": w})
    assert (arcface.per_sample_loss(x, y) - want).abs().max() > 1e-3
    assert (formula(x, y, w, t + 0.1) - want).abs().max() > 1e-3


def test_gradients_are_the_formulas_and_central_differences() -> None:
    """Autograd of the head = autograd of the formula (t a constant, the threshold a mask: d N / d cos = t + 2 cos
    where hard), in x and W; and = central differences (test_contracts' ``numerical_gradient``, rtol 1e-5 / atol
    1e-7: O(eps^2) + O(1e-16 / eps) ~ 1e-9 at eps = 1e-6; no cosine lies within 1e-6 of its threshold, so no mask
    flips). The general hook's default derivative (autograd of ``nontarget_logits`` on the block) gives the same."""
    x, y, w = inputs(2)
    # rows 0-3 at cos_y = +-(1 - ~5e-5): near the edges, where central differences at eps = 1e-6 still resolve arccos
    x[:4] = x[:4] + 1e-2 * torch.randn(4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    hard, gap = masks(x, y, w)
    assert int(hard.sum()) > 3 and gap > 1e-4
    head = head_with(w, 0.4, s=8.0, buffers="release").eval()

    def loss(v: torch.Tensor, weight: torch.Tensor, module: torch.nn.Module = head) -> torch.Tensor:
        return functional_call(module, {"weight": weight}, (v, y))

    leaves = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    analytical = torch.autograd.grad(loss(*leaves), leaves)
    plain = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    want = torch.autograd.grad(formula(*plain[:1], y, plain[1], 0.4, s=8.0).mean(), plain)
    for what, a, b in zip(["x", "W"], analytical, want):
        close(a, b, f"d loss / d {what} against the formula's autograd")
    for what, a, n in zip(["x", "W"], analytical, numerical_gradient(loss, [x.clone(), w.clone()])):
        torch.testing.assert_close(a, n, rtol=1e-5, atol=1e-7, msg=lambda m: f"d loss / d {what}: {m}")
    assert analytical[0].abs().max() > 1e-3

    class AutogradDerivative(CurricularFace):
        nontarget_grad = MarginHead.nontarget_grad  # the hook's default: autograd of nontarget_logits

    general = AutogradDerivative(C, D, s=8.0, chunk_size=4, buffers="release").double().eval()
    general.load_state_dict(head.state_dict())
    again = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    for what, a, b in zip(["x", "W"], torch.autograd.grad(loss(*again, module=general), again), analytical):
        close(a, b, f"d loss / d {what}, the default derivative")


def test_t_moves_by_the_ema_of_the_mean_target_cosine_before_the_loss() -> None:
    x, y, w = inputs(1)
    x2, y2, _ = inputs(7)
    head = head_with(w, alpha=0.3)
    first = head(x, y)
    t1 = 0.3 * batch_mean_cosine(x, y, w)
    assert math.isclose(float(head.t), t1, rel_tol=1e-12)
    close(first.detach(), formula(x, y, w, t1).mean(), "first loss, with t after its batch's update")
    second = head(x2, y2)
    t2 = 0.7 * t1 + 0.3 * batch_mean_cosine(x2, y2, w)
    assert math.isclose(float(head.t), t2, rel_tol=1e-12)
    close(second.detach(), formula(x2, y2, w, t2).mean(), "second loss")
    kept = head.t.clone()
    head.per_sample_loss(x, y)  # a loss without a training forward (BroadFace's blocks) does not move t
    head.eval()
    head(x, y)
    assert torch.equal(head.t, kept)  # eval reads without moving
    assert "t" in head.state_dict()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cpu_keeps_the_loss_in_float32(dtype: torch.dtype) -> None:
    """Half-precision embeddings under CPU autocast: loss float32, finite, equal to the float32 loss of the same
    embeddings (the kernel casts once: 1e-5 relative, float32 sums), t float32 and moved once."""
    x, y, w = inputs(3)
    head = CurricularFace(C, D)
    with torch.no_grad():
        head.weight.copy_(w.float())
    x = x.to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        loss = head(x, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and head.t.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()
    head.eval()
    torch.testing.assert_close(head(x.detach().float(), y), loss.detach(), rtol=1e-5, atol=0.0)


# ------------------------------------------------------------------------------------------ BroadFace, one process


def test_broadface_queue_blocks_use_their_own_thresholds_and_the_batchs_t() -> None:
    """Three training forwards of BroadFace(CurricularFace) without an optimiser step (W fixed: e* = e-, Eq. 7):
    the third loss is Eq. 8 (the batch) + Eq. 9 (batch and queue rows, each row's threshold from its own target
    cosine, against the current W), all with the t of three batch updates; queue rows never move t."""
    _, _, w = inputs(0)
    batches = [inputs(seed)[:2] for seed in (11, 12, 13)]
    inner = head_with(w, alpha=0.3)
    head = BroadFace(inner, queue_size=64, row_chunk=5)
    t = 0.0
    for x, y in batches:
        loss = head(x, y)
        t = 0.7 * t + 0.3 * batch_mean_cosine(x, y, w)
    assert math.isclose(float(inner.t), t, rel_tol=1e-12)
    x3, y3 = batches[2]
    every_x, every_y = torch.cat([x3, batches[0][0], batches[1][0]]), torch.cat([y3, batches[0][1], batches[1][1]])
    want = formula(x3, y3, w, t).mean() + formula(every_x, every_y, w, t).mean()
    close(loss.detach(), want, "Eq. 8 + Eq. 9")


# ------------------------------------------------------------------------------------------ on 2 and 3 ranks


def initial_weight(num_classes: int) -> torch.Tensor:
    return ShardedHead("curricularface", num_classes, par.D, seed=3, **KW).double().weight.detach().clone()


def reference(world: int, num_classes: int = hook.C, sampled: list[torch.Tensor] | None = None,
              momentum: bool = True) -> dict:
    """The formula in one process on the ranks' batches (rank order), t moved before each loss, SGD on W."""
    w = initial_weight(num_classes).requires_grad_(True)
    optimizer = torch.optim.SGD([w], lr=hook.LR, **({"momentum": 0.9, "weight_decay": 5e-3} if momentum else {}))
    t = 0.0
    losses, grads = [], []
    for step in range(hook.STEPS):
        parts = [par.batch(r, step, num_classes) for r in range(world)]
        x = torch.cat([p[0] for p in parts]).requires_grad_(True)
        y = torch.cat([p[1] for p in parts])
        t = (1 - KW["alpha"]) * t + KW["alpha"] * batch_mean_cosine(x, y, w)
        classes = None if sampled is None else sampled[step]
        loss = formula(x, y, w, t, KW["s"], KW["m"], classes).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        grads.append(list(x.grad.split([par.batch_size(r, step) for r in range(world)])))
    return {"losses": torch.stack(losses), "grads": grads, "weight": w.detach(),
            "stats": torch.tensor(t, dtype=torch.float64)}


def test_one_process_is_the_formula_over_steps() -> None:
    head = CurricularFace(hook.C, par.D, chunk_size=3, **KW).double()
    with torch.no_grad():
        head.weight.copy_(initial_weight(hook.C))
    losses, grads = [], []
    optimizer = par.sgd(head.parameters())
    for step in range(hook.STEPS):
        parts = [par.batch(r, step) for r in range(3)]
        x = torch.cat([p[0] for p in parts]).requires_grad_(True)
        loss = head(x, torch.cat([p[1] for p in parts]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        grads.append(x.grad)
    ref = reference(3)
    close(torch.stack(losses), ref["losses"], "losses")
    for step in range(hook.STEPS):
        close(grads[step], torch.cat(ref["grads"][step]), f"embedding grad, step {step}")
    close(head.weight.detach(), ref["weight"], "W after the steps")
    close(head.t, ref["stats"], "t")
    assert abs(float(ref["stats"])) > 1e-2 and (ref["weight"] - initial_weight(hook.C)).abs().max() > 1e-3


def run_sharded(world: int, rank: int, group) -> dict:
    head = ShardedHead("curricularface", hook.C, par.D, seed=3, group=group, chunk_size=2, **KW).double()
    losses, grads = par.sgd_steps(head, rank)
    return {"losses": losses, "grads": grads, "weight": head.weight.detach(), "rows": head.rows,
            "stats": head.head.t.detach().clone(), "keys": sorted(head.state_dict()),
            "shards": sorted(head.row_shards())}


def run_broadface(world: int, rank: int, group) -> dict:
    head = hook.make_broadface(group)
    losses, grads = par.sgd_steps(head, rank, hook.STEPS + 2)  # 5 x 11 or 5 x 8 rows through a queue of 10: it wraps
    return {"losses": losses, "grads": grads, "weight": head.weight.detach(), "rows": head.head.rows,
            "stats": head.head.head.t.detach().clone()}


def run_seam(world: int, rank: int, group) -> dict:
    """The margin context's target cosines (and thresholds) of the global batch, from this rank's shard of W."""
    head = ShardedHead("curricularface", hook.C, par.D, seed=3, group=group, **KW).double()
    x, y = head.gather(*par.batch(rank, 1))
    context = head.head.context_of(x, y, local_labels=head.local_labels(y), reduce=head.reduce)
    return {"cosines": context.target_cosines, "threshold": context.extras["threshold"]}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    hook.SPEC, hook.KWARGS = "curricularface", KW
    hook.RUNS = {"sharded": run_sharded, "partial_fc": hook.run_partial_fc, "broadface": run_broadface,
                 "seam": run_seam}
    hook._worker(rank, world, port, out)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("curricularface")
    hook.spawn(_worker, 3, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(3)]


@pytest.mark.parametrize("world", [2, 3])
def test_the_seams_target_cosines_on_every_rank_are_the_one_process_values(ranks: list[dict], world: int) -> None:
    parts = [par.batch(r, 1) for r in range(world)]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    w = initial_weight(hook.C)
    want = (F.normalize(x, dim=1) * F.normalize(w[y], dim=1)).sum(1)
    for rank in range(world):
        got = ranks[rank][("seam", world)]
        close(got["cosines"], want, f"target cosines on rank {rank} of {world}")
        close(got["threshold"], positive(want, KW["m"]), f"thresholds on rank {rank} of {world}")


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_partial_fc_and_broadface_equal_one_process(ranks: list[dict], world: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hook, "SPEC", "curricularface")
    monkeypatch.setattr(hook, "KWARGS", KW)
    ref = reference(world)
    hook.check_ranks(ranks, "sharded", world, ref)  # losses, embedding grads, W rows, t on every rank
    assert ranks[0][("sharded", world)]["shards"] == ["weight"] and "t" in ranks[0][("sharded", world)]["keys"]
    sampled = ranks[0][("partial_fc", world)]["sampled"]
    assert any(s.numel() < hook.C_PFC for s in sampled)
    pfc = reference(world, hook.C_PFC, sampled, momentum=False)
    pfc.pop("stats")
    hook.check_ranks(ranks, "partial_fc", world, pfc)
    inner = CurricularFace(hook.C, par.D, **KW).double()
    losses, grads = hook.broadface_one_process(inner, world)
    broadface = {"losses": losses, "grads": grads, "weight": inner.weight.detach(), "stats": inner.t.detach()}
    hook.check_ranks(ranks, "broadface", world, broadface, steps=hook.STEPS + 2)


def test_partial_fc_with_lazy_momentum_equals_dense_sgd() -> None:
    """test_parallel's lazy-momentum check with CurricularFace: t reads the positives' rows, which the sharded head
    catches up before its batch statistic (else t would see rows dense SGD has moved on)."""
    par.test_sparse_lazy_momentum_equals_dense_sgd("curricularface")


# ------------------------------------------------------------------------------------------ resume, the trainer


def test_sharded_form_keeps_t_replicated_and_resumes_bit_identically() -> None:
    """t is a plain (replicated) buffer of the sharded head under the unsharded key, not a row shard: a head loaded
    from its state dict continues exactly as the one that wrote it."""

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

    make = lambda: ShardedHead("curricularface", C, D, seed=4, alpha=0.3).double()  # noqa: E731
    straight = make()
    want = steps(straight, 0, 4)
    first = make()
    steps(first, 0, 2)
    state = first.state_dict()
    assert {"weight", "t"} <= set(state) and set(first.row_shards()) == {"weight"} and float(state["t"]) != 0.0
    resumed = make()
    resumed.load_state_dict(state)
    got = steps(resumed, 2, 2)
    assert all(torch.equal(a, b) for a, b in zip(got, want[2:]))
    for key in ("t", "weight"):
        assert torch.equal(resumed.state_dict()[key], straight.state_dict()[key]), key


@pytest.mark.equivalence
def test_faceforge_train_runs_it_and_a_sharded_run_resumes_bit_identically(tmp_path: Path) -> None:
    """``faceforge train`` with ``head.name: curricularface`` (one process; the unsharded resume is test_contracts'
    for every registered head); then ``head.shard: true``: 4 steps straight against 2, then resumed to 4, bit for
    bit (t in the checkpoint's head as a plain tensor, beside the row-sharded W)."""
    from faceforge.cli import main
    from faceforge.train.config import to_yaml

    head = {"name": "curricularface", "kwargs": {}}
    config = tmp_path / "run.yaml"
    config.write_text(to_yaml(make_config(tmp_path / "run", head=head, train={"steps": 2})))
    assert main(["train", str(config)]) == 0
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert saved["head"]["t"].shape == () and float(saved["head"]["t"]) != 0.0

    sharded = {"head": {**head, "shard": True}, "train": {"steps": 4, "checkpoint_every": 2}}
    straight = train(make_config(tmp_path / "straight", **sharded))
    (tmp_path / "resumed" / "shards").mkdir(parents=True)  # the step-2 checkpoint and its row shards, as written
    shutil.copy(straight.output / "step_0000002.pt", tmp_path / "resumed" / "last.pt")
    shutil.copytree(straight.output / "shards" / "step_0000002", tmp_path / "resumed" / "shards" / "step_0000002")
    resumed = train(make_config(tmp_path / "resumed", **sharded), resume=True)
    assert resumed.losses == straight.losses[2:]
    got, want = par.resolved(resumed.checkpoint), par.resolved(straight.checkpoint)
    for key in ("backbone", "head", "optimizer"):
        assert_same(got[key], want[key], key)
    assert want["head"]["t"].shape == () and float(want["head"]["t"]) != 0.0
