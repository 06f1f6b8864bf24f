"""Sub-center ArcFace (faceforge/heads/subcenter.py) against a direct float64 transcription of Deng et al. 2020:

    cos_bj = max_k <x_b / |x_b|, W_jk / |W_jk|>                    (Sec. 3, the sub-class-wise max pooling)
    t_b = s psi(theta_b),  psi = cos(theta + m) continued monotonically past pi (faceforge's ArcFace, docs/heads.md)
    loss_b = logsumexp_j(logits_bj) - t_b,  the target column t_b, the others s cos_bj;

its gradient (central differences), the kernel's compact argmax, and the strategies of the margin hook through the
existing helpers (tests/test_parallel.py, tests/test_margin_hook.py): class-sharded on 2 and 3 gloo ranks, Partial
FC (and its lazy sparse SGD), BroadFace (sharded against one process, and the queued W-_y = the sample's nearest
sub-centre), CPU autocast, training and bit-identical resume through the trainer (also sharded with Partial FC).

Tolerances: float64 throughout; head and formula differ only in the order of float64 sums (the chunked online
logsumexp, the matrix products): 1e-10 relative, as test_parallel.py.
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
from _runs import make_config
from faceforge.heads import BroadFace, SubCenterArcFace, build
from faceforge.heads.parallel import ShardedHead
from faceforge.train.engine import train
from test_contracts import numerical_gradient
from test_parallel import close

pytestmark = pytest.mark.usefixtures("one_thread")

C, K, D, B = 9, 3, 6, 12


def formula(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, s: float = 64.0, m: float = 0.5
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, C) logits, (B,) loss) of Sub-center ArcFace, plainly (module docstring). w: (C, K, D)."""
    cos = (F.normalize(x, dim=1)[:, None, None, :] * F.normalize(w, dim=2)[None]).sum(3).amax(2)  # (B, C)
    guard = 10 * torch.finfo(torch.float64).eps
    phi = torch.acos(cos.gather(1, y[:, None]).squeeze(1).clamp(-1 + guard, 1 - guard)) + m
    k = torch.floor(phi.detach() / math.pi)  # past pi: (-1)^k cos(phi) - 2k
    target = s * ((1 - 2 * (k % 2)) * torch.cos(phi) - 2 * k)
    logits = (s * cos).scatter(1, y[:, None], target[:, None])
    return logits, torch.logsumexp(logits, 1) - target


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (x, y, W (C, K, D)); rows 0, 1 on a sub-centre of their class (cos_y = 1, and 1 - ~1e-9), rows 2, 3
    opposite a class whose three sub-centres are within 1e-3 of one direction (cos_y near -1: every sub-centre far)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, K, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    y[2:4] = torch.tensor([C - 1, C - 2])
    y[:2] = y[:2] % (C - 2)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    for row in (2, 3):
        u = F.normalize(torch.randn(D, generator=g, dtype=torch.float64), dim=0)
        w[y[row]] = u + 1e-3 * torch.randn(K, D, generator=g, dtype=torch.float64)
        x[row] = -u + 1e-5 * torch.randn(D, generator=g, dtype=torch.float64)
    x[0] = 3.0 * w[y[0], 1]
    x[1] = w[y[1], 2] + 1e-9 * torch.randn(D, generator=g, dtype=torch.float64)
    return x, y, w


def test_defaults_are_the_papers() -> None:
    head = build("subcenter_arcface", num_classes=C, embedding_size=D)
    assert (head.subcentres, head.s, head.m2, head.m1, head.m3) == (3, 64.0, 0.5, 1.0, 0.0)
    assert head.weight.shape == (C, 3, D)
    for bad in ({"k": 0}, {"k": 2.5}, {"k": 300}, {"inter_loss_weight": 0.1}):
        with pytest.raises(ValueError):
            SubCenterArcFace(C, D, **bad)


def test_logits_and_loss_are_the_formula_including_cos_near_plus_minus_one() -> None:
    x, y, w = inputs()
    head = SubCenterArcFace(C, D, chunk_size=4).double()  # 3 chunks: 4 + 4 + 1 classes
    with torch.no_grad():
        head.weight.copy_(w)
    cos_y = (F.normalize(x, dim=1)[:, None, :] * F.normalize(w[y], dim=2)).sum(2).amax(1)
    assert cos_y[:2].min() > 1 - 1e-12 and cos_y[2:4].max() < -1 + 1e-5  # the edges are exercised
    want_logits, want = formula(x, y, w)
    close(head.logits(x, y), want_logits, "logits")
    close(head.per_sample_loss(x, y), want, "per-sample loss")
    close(head(x, y), want.mean(), "loss")
    # the pooling has teeth: ArcFace on any one sub-centre is another loss
    arc = build("arcface", num_classes=C, embedding_size=D).double()
    for k in range(K):
        with torch.no_grad():
            arc.weight.copy_(w[:, k])
        assert (arc.per_sample_loss(x, y) - want).abs().max() > 1e-3


def test_gradient_is_the_formulas_and_central_differences() -> None:
    """Autograd through the kernel = autograd through the plain formula (1e-10 relative), and = central differences
    (test_contracts' ``numerical_gradient``, rtol 1e-5 / atol 1e-7: O(eps^2) + O(1e-16 / eps) ~ 1e-9 error).
    Not torch.autograd.gradcheck: it runs a backward twice on one graph, and the kernel's backward consumes its
    logit buffer in place (as test_adaface.py). Inputs away from ties: the max over sub-centres is unique with a
    gap far above eps = 1e-6 (checked), so the function is smooth where it is differenced."""
    x, y, w = inputs(1)
    g = torch.Generator().manual_seed(5)
    x[:4] = x[:4] + 1e-2 * torch.randn(4, D, dtype=torch.float64, generator=g)  # cos_y ~ 1 - 5e-5 and ~ -0.99
    w[C - 2 :] = w[C - 2 :] + 0.1 * torch.randn(2, K, D, dtype=torch.float64, generator=g)  # sub-centres apart
    cos = (F.normalize(x, dim=1)[:, None, None, :] * F.normalize(w, dim=2)[None]).sum(3)
    top2 = cos.topk(2, dim=2).values
    # no ties within the differencing step: a step of eps = 1e-6 in one coordinate moves a cosine by at most
    # 2 eps / (the smaller norm) < 2e-5 for norms > 0.1, so a gap above that keeps every maximiser where it is
    assert min(x.norm(dim=1).min(), w.norm(dim=2).min()) > 0.1 and (top2[..., 0] - top2[..., 1]).min() > 2e-5
    head = SubCenterArcFace(C, D, s=8.0, chunk_size=4, buffers="release").double()

    def loss(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return functional_call(head, {"weight": weight}, (v, y))

    leaves = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    analytical = torch.autograd.grad(loss(*leaves), leaves)
    plain = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    expected = torch.autograd.grad(formula(*plain[:1], y, plain[1], s=8.0)[1].mean(), plain)
    for what, a, e, n in zip(["x", "W"], analytical, expected, numerical_gradient(loss, [x.clone(), w.clone()])):
        close(a, e, f"d loss / d {what} against the formula")
        torch.testing.assert_close(a, n, rtol=1e-5, atol=1e-7, msg=lambda m: f"d loss / d {what}: {m}")
    # one sample's loss reaches only the sub-centre of each class that maximises its cosine: the others get exactly 0
    with torch.no_grad():
        head.weight.copy_(w)
    (grad_w,) = torch.autograd.grad(head.per_sample_loss(x[:1], y[:1]).sum(), head.weight)
    reached = grad_w.abs().sum(2) > 0  # (C, K)
    assert torch.equal(reached, F.one_hot(cos[0].argmax(1), K).bool())


def test_the_kernel_keeps_the_argmax_as_uint8_not_int64() -> None:
    """What the loss saves for its backward: a (B C,) uint8 argmax, no (B, C)-sized int64 (memory: 1 byte a logit)."""
    x, y, w = inputs(2)
    head = SubCenterArcFace(C, D).double()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        head(x.requires_grad_(True), y)
    big = [t for t in saved if t.numel() >= B * C and not t.is_floating_point()]
    assert [(t.dtype, t.numel()) for t in big] == [(torch.uint8, B * C)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cpu_keeps_the_loss_in_float32(dtype: torch.dtype) -> None:
    """Half-precision embeddings under CPU autocast: the loss is float32 and equals the float32 loss of the same
    half-precision embeddings (the kernel casts once: 1e-5 relative, float32 sums)."""
    x, y, w = inputs(3)
    head = SubCenterArcFace(C, D)
    with torch.no_grad():
        head.weight.copy_(w.float())
    x = x.to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        loss = head(x, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()
    torch.testing.assert_close(loss.detach(), head(x.detach().float(), y).detach(), rtol=1e-5, atol=0.0)


def test_broadface_queues_the_samples_nearest_subcentre_and_compensates_with_it() -> None:
    """BroadFace Eq. 7 with sub-centres: the stored W-_y of a sample is the sub-centre of its class nearest its
    embedding (its max), and the compensation uses that sub-centre's current row."""
    x, y, w = inputs(4)
    w[C - 2 :] = torch.randn(2, K, D, dtype=torch.float64, generator=torch.Generator().manual_seed(6))  # apart
    inner = SubCenterArcFace(C, D, s=8.0).double()
    with torch.no_grad():
        inner.weight.copy_(w)
    head = BroadFace(inner, queue_size=2 * B)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    head(x, y).backward()
    nearest = (F.normalize(x, dim=1)[:, None, :] * F.normalize(w[y], dim=2)).sum(2).argmax(1)
    queued = head.queued()
    assert torch.equal(queued.class_weights, w[y, nearest])
    optimizer.step()  # W moves a little: each stored row's nearest current sub-centre is still its own
    now = inner.weight.detach()[y, nearest]
    _, current = head.past_and_current_rows(head.fifo_order())
    assert torch.equal(current, now) and (now - w[y, nearest]).abs().max() > 1e-6


# ------------------------------------------------------------------------ the strategies (the existing helpers)

SPEC = {"s": 8.0, "k": 3}


def _run_sharded(world: int, rank: int, group) -> dict:
    result = par.run_sharded("subcenter_arcface", world, rank, group)
    return {**result, "weight": result.pop("state")["weight"]}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    par.SPECS = {"subcenter_arcface": SPEC}
    hook.SPEC, hook.KWARGS = "subcenter_arcface", SPEC
    # run_broadface also returns the norm statistics of test_margin_hook's head; this head keeps none (not compared)
    SubCenterArcFace.norm_mean = SubCenterArcFace.norm_std = torch.zeros((), dtype=torch.float64)
    hook.RUNS = {"partial_fc": hook.run_partial_fc, "broadface": hook.run_broadface, "sharded": _run_sharded}
    hook._worker(rank, world, port, out)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("subcenter")
    hook.spawn(_worker, 3, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(3)]


def partial_fc_reference(world: int, sampled: list[torch.Tensor]) -> dict:
    """One-process Sub-center ArcFace on the classes the ranks sampled (W restricted to them each step), plain SGD."""
    return hook.partial_fc_reference_of(SubCenterArcFace(hook.C_PFC, par.D, **SPEC).double(), world, sampled)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_partial_fc_and_broadface_equal_one_process(ranks: list[dict], world: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(par, "SPECS", {"subcenter_arcface": SPEC})
    monkeypatch.setattr(hook, "SPEC", "subcenter_arcface")
    monkeypatch.setattr(hook, "KWARGS", SPEC)
    ref = par.run_reference("subcenter_arcface", world)
    ref["weight"] = ref.pop("state")["weight"]
    assert ref["weight"].shape == (par.C, 3, par.D)
    hook.check_ranks(ranks, "sharded", world, ref)  # a rank's rows hold whole classes: (c1 - c0, K, D)
    sampled = ranks[0][("partial_fc", world)]["sampled"]
    assert any(s.numel() < hook.C_PFC for s in sampled)
    hook.check_ranks(ranks, "partial_fc", world, partial_fc_reference(world, sampled))
    inner = SubCenterArcFace(hook.C, par.D, **SPEC).double()
    losses, grads = hook.broadface_one_process(inner, world)
    ref = {"losses": losses, "grads": grads, "weight": inner.weight.detach()}
    hook.check_ranks(ranks, "broadface", world, ref, steps=hook.STEPS + 2)
    assert (ref["weight"] - hook.initial_weight(hook.C)).abs().max() > 1e-3


def test_one_process_sharded_head_is_the_plain_head_over_steps() -> None:
    """The one-process reference of the test above (test_parallel's run_reference) against the formula: 3 SGD steps
    with momentum of the plain formula in W from the same initial rows give the head's losses."""
    head = ShardedHead("subcenter_arcface", par.C, par.D, seed=3, **SPEC).double()
    w = head.weight.detach().clone().requires_grad_(True)
    optimizer, reference = par.sgd(head.parameters()), par.sgd([w])
    for step in range(par.STEPS):
        x, y = par.batch(0, step)
        loss = head(x, y)
        want = formula(x, y, w, s=SPEC["s"])[1].mean()
        close(loss.detach(), want.detach(), f"loss, step {step}")
        for opt, value in ((optimizer, loss), (reference, want)):
            value.backward()
            opt.step()
            opt.zero_grad()
    close(head.weight.detach(), w.detach(), "W after the steps")


def test_partial_fc_lazy_sparse_sgd_equals_dense_sgd() -> None:
    """Partial FC's sparse rows are whole classes ((n, K, D) values of a hybrid sparse gradient): LazyRowSGD equals
    torch's dense SGD on the same sampled loss (test_parallel's check, 1e-12 relative)."""
    par.test_sparse_lazy_momentum_equals_dense_sgd("subcenter_arcface")


# ------------------------------------------------------------------------ through the trainer

TRAIN = {"head": {"name": "subcenter_arcface", "kwargs": {"s": 32.0, "m": 0.2}}, "model": {"kwargs": {"dropout": 0.0}}}


# a TinyNet that learns the synthetic identities within a second (tests/test_subcenter_clean.py trains it too)
LEARNS = {**TRAIN, "model": {"kwargs": {"dropout": 0.0}, "embedding_size": 32},
          "data": {"num_identities": 10, "images_per_identity": 20, "batch_size": 32}}


def test_trains_through_faceforge_train(tmp_path: Path) -> None:
    """`faceforge train`'s engine, one process, on the synthetic set (10 identities of 20 images): the mean loss of
    the last 10 of 60 steps is well below that of the first 10 (measured: 18.3 -> 8.8), and the checkpoint's head
    is (C, K, D)."""
    result = train(make_config(tmp_path / "run", train={"steps": 60, "checkpoint_every": 60}, **LEARNS))
    losses = [float(v) for v in result.losses]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < 0.75 * sum(losses[:10])
    from faceforge.core.checkpoint import load_checkpoint

    assert load_checkpoint(result.checkpoint)["head"]["weight"].shape == (10, 3, 32)


@pytest.mark.equivalence
def test_sharded_partial_fc_run_resumes_bit_identically(tmp_path: Path) -> None:
    """head.shard with Partial FC (sample_rate 0.5), one process: resumed half-way from the straight run's checkpoint
    (and its row-shard files), the losses and the final backbone, head and optimiser equal the straight run's bit for
    bit (the (C, K, D) rows, their lazy optimiser state; test_parallel's comparison of resolved checkpoints). The
    unsharded resume is the contract test (tests/test_contracts.py, every registered head)."""
    sections = {"head": {**TRAIN["head"], "shard": True, "sample_rate": 0.5}, "model": TRAIN["model"],
                "data": {"num_identities": 16, "images_per_identity": 4, "batch_size": 8},
                "train": {"steps": 4, "checkpoint_every": 2}}
    straight = train(make_config(tmp_path / "straight", **sections))
    (tmp_path / "resumed").mkdir()
    shutil.copy(straight.output / "step_0000002.pt", tmp_path / "resumed" / "last.pt")
    shutil.copytree(straight.output / "shards", tmp_path / "resumed" / "shards")  # the row shards it names
    resumed = train(make_config(tmp_path / "resumed", **sections), resume=True)
    assert resumed.losses == straight.losses[2:]
    a, e = par.resolved(resumed.checkpoint), par.resolved(straight.checkpoint)
    for key in ("backbone", "head", "optimizer"):
        par._assert_equal(a[key], e[key], key)
    assert e["head"]["weight"].shape == (16, 3, 16)
