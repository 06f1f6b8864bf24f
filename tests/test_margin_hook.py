"""A margin is one public hook: a head written out of tree (tests/_norm_head.py, AdaFace's norm-dependent margin,
no edit of faceforge) trains under every execution strategy.

- one process (the chunked full FC): its loss, gradients and running norm statistics equal a plain float64
  formula written here (the full (B, C) logits, the target column replaced by the norm-dependent target);
- class-sharded on 2 and 3 gloo ranks: losses, embedding gradients, W and the norm statistics after 3 SGD steps
  (momentum, weight decay) equal that formula in one process on the whole batch;
- Partial FC (``head.sample_rate`` < 1) on 2 and 3 ranks: equal to the formula over the classes the ranks sampled;
- BroadFace's queue, class-sharded on 2 and 3 ranks, equal to one-process BroadFace around the same head.

Float64 throughout; only the order of float64 sums differs (the distributed logsumexp, the all-reduced embedding
gradient): agreement to 1e-10 relative, as test_parallel.py (float64 epsilon 2.2e-16 times a few hundred terms
leaves six orders of magnitude of margin); a wrong margin, norm statistic or shard is off by > 1e-3.
"""

from __future__ import annotations

import datetime
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.func import functional_call

from _norm_head import EPS, NormMarginHead, NormSphereFace2
from faceforge.heads import BroadFace, SphereFace2
from faceforge.heads.parallel import ShardedHead, all_gather_rows, build_sharded
from test_parallel import D, batch, batch_size, close, sgd_steps, spawn  # STEPS 3 and lr 0.5 there as here

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = "_norm_head:NormMarginHead"
KWARGS = {"s": 8.0, "m": 0.4, "h": 0.5, "t_alpha": 0.3}  # a fast momentum: the statistics move within 3 steps
C, STEPS, LR = 7, 3, 0.5
C_PFC, RATE = 30, 0.6  # Partial FC: 10 + 10 + 10 or 15 + 15 rows, ~60 % of each rank's rows per step
BROADFACE = {"queue_size": 10, "row_chunk": 4}


# ------------------------------------------------------------------------------------------ the plain formula


def formula_loss(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, mu: float, sigma: float,
                 classes: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) AdaFace-form margin softmax, plainly: z_b = clip(h (|x_b| - mu) / (sigma + eps), -1, 1), the target
    logit s (cos(clip(theta + (-m z), eps, pi - eps)) - (m z + m)), the others s cos theta; ``classes`` keeps only
    those columns (Partial FC). Written from the paper, independently of the head."""
    s, m, h = KWARGS["s"], KWARGS["m"], KWARGS["h"]
    norms = x.detach().norm(dim=1)
    z = (h * (norms.clamp(0.001, 100.0) - mu) / (sigma + EPS)).clamp(-1.0, 1.0)
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    cos_y = cos.gather(1, y[:, None]).squeeze(1)
    theta = torch.acos(cos_y.clamp(-1 + 1e-7, 1 - 1e-7))
    target = s * (torch.cos((theta - m * z).clamp(EPS, math.pi - EPS)) - (m * z + m))
    logits = (s * cos).scatter(1, y[:, None], target[:, None])
    if classes is not None:
        keep = torch.zeros(w.shape[0], dtype=torch.bool)
        keep[classes] = True
        logits = logits.masked_fill(~keep, -math.inf)
    return torch.logsumexp(logits, 1) - target


def observed(mu: float, sigma: float, x: torch.Tensor) -> tuple[float, float]:
    """The running statistics after a training batch: (1 - a) mu + a mean(|x|), likewise the unbiased std."""
    a = KWARGS["t_alpha"]
    norms = x.detach().norm(dim=1).clamp(0.001, 100.0)
    n = norms.numel()
    mean = float(norms.sum()) / n
    std = math.sqrt(float(((norms - mean) ** 2).sum()) / (n - 1))
    return (1 - a) * mu + a * mean, (1 - a) * sigma + a * std


def initial_weight(num_classes: int) -> torch.Tensor:
    """The rows every strategy starts from: a one-process sharded head's (rows from (seed, row))."""
    return ShardedHead(SPEC, num_classes, D, seed=3, **KWARGS).double().weight.detach().clone()


def partial_fc_reference_of(head: torch.nn.Module, world: int, sampled: list[torch.Tensor]) -> dict:
    """One-process ``head`` (C_PFC classes, float64) on the classes the ranks sampled (W restricted to them each
    step), plain SGD from :func:`initial_weight`: per step loss and embedding grads, and the final W."""
    w = initial_weight(C_PFC).requires_grad_(True)
    optimizer = torch.optim.SGD([w], lr=LR)
    losses, grads = [], []
    for step in range(STEPS):
        parts = [batch(r, step, C_PFC) for r in range(world)]
        x = torch.cat([p[0] for p in parts]).requires_grad_(True)
        y = torch.cat([p[1] for p in parts])
        loss = functional_call(head, {"weight": w[sampled[step]]}, (x, torch.searchsorted(sampled[step], y)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        grads.append(list(x.grad.split([batch_size(r, step) for r in range(world)])))
    return {"losses": torch.stack(losses), "grads": grads, "weight": w.detach()}


def reference(world: int, num_classes: int = C, sampled: list[torch.Tensor] | None = None,
              momentum: bool = True) -> dict:
    """The formula in one process on the ranks' batches (rank order), SGD on W; per step loss and embedding grads."""
    w = initial_weight(num_classes).requires_grad_(True)
    optimizer = torch.optim.SGD([w], lr=LR, **({"momentum": 0.9, "weight_decay": 5e-3} if momentum else {}))
    mu, sigma = 20.0, 100.0
    losses, grads = [], []
    for step in range(STEPS):
        parts = [batch(r, step, num_classes) for r in range(world)]
        x = torch.cat([p[0] for p in parts]).requires_grad_(True)
        y = torch.cat([p[1] for p in parts])
        mu, sigma = observed(mu, sigma, x)  # once per forward, before the loss (AdaFace's official order)
        loss = formula_loss(x, y, w, mu, sigma, None if sampled is None else sampled[step]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        grads.append(list(x.grad.split([batch_size(r, step) for r in range(world)])))
    return {"losses": torch.stack(losses), "grads": grads, "weight": w.detach(), "stats": (mu, sigma)}


# ------------------------------------------------------------------------------------------ one process


def test_the_out_of_tree_head_is_the_plain_formula_in_one_process() -> None:
    head = NormMarginHead(C, D, **KWARGS).double()
    with torch.no_grad():
        head.weight.copy_(initial_weight(C))
    optimizer = torch.optim.SGD(head.parameters(), lr=LR, momentum=0.9, weight_decay=5e-3)
    world = 3
    ref = reference(world)
    for step in range(STEPS):
        parts = [batch(r, step) for r in range(world)]
        x = torch.cat([p[0] for p in parts]).requires_grad_(True)
        loss = head(x, torch.cat([p[1] for p in parts]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        close(loss.detach(), ref["losses"][step], f"loss, step {step}")
        close(x.grad, torch.cat(ref["grads"][step]), f"embedding grad, step {step}")
    close(head.weight.detach(), ref["weight"], "W after the steps")
    close(torch.stack([head.norm_mean, head.norm_std]), torch.tensor(ref["stats"], dtype=torch.float64), "norm stats")
    assert (ref["weight"] - initial_weight(C)).abs().max() > 1e-3  # the comparison has teeth
    # eval mode reads the statistics without moving them
    head.eval()
    before = head.norm_mean.clone()
    head(*batch(0, 0))
    assert torch.equal(head.norm_mean, before)


# ------------------------------------------------------------------------------------------ on 2 and 3 ranks


def run_sharded(world: int, rank: int, group) -> dict:
    head = ShardedHead(SPEC, C, D, seed=3, group=group, **KWARGS).double()
    losses, grads = sgd_steps(head, rank, STEPS)
    inner = head.head
    return {"losses": losses, "grads": grads, "weight": head.weight.detach(), "rows": head.rows,
            "stats": torch.stack([inner.norm_mean, inner.norm_std])}


def run_partial_fc(world: int, rank: int, group) -> dict:
    """Partial FC with plain SGD (a sparse gradient: the unsampled rows stay as they are, as dense SGD leaves them
    with a zero gradient); the global classes sampled at each step, gathered from every rank."""
    head = ShardedHead(SPEC, C_PFC, D, seed=3, group=group, sample_rate=RATE, **KWARGS).double()
    optimizer = torch.optim.SGD(head.parameters(), lr=LR)
    losses, grads, sampled = [], [], []
    for step in range(STEPS):
        x, y = batch(rank, step, C_PFC)
        local = head.local_labels(all_gather_rows(y, group))
        sampled.append(all_gather_rows(head.sampled_rows(local) + head.rows[0], group))  # what this forward draws
        x.requires_grad_(True)
        loss = head(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        head.after_optimizer_step(step + 1)
        losses.append(loss.detach())
        grads.append(x.grad)
    return {"losses": torch.stack(losses), "grads": grads, "weight": head.weight.detach(), "rows": head.rows,
            "sampled": sampled}


def make_broadface(group=None) -> torch.nn.Module:
    return build_sharded("broadface", C, D, seed=3, group=group, head=SPEC, head_kwargs=KWARGS, **BROADFACE).double()


def run_broadface(world: int, rank: int, group) -> dict:
    head = make_broadface(group)
    losses, grads = sgd_steps(head, rank, STEPS + 2)  # 5 x 11 or 5 x 8 rows through a queue of 10: it wraps
    inner = head.head.head
    return {"losses": losses, "grads": grads, "weight": head.weight.detach(), "rows": head.head.rows,
            "stats": torch.stack([inner.norm_mean, inner.norm_std])}


BINARY = "_norm_head:NormSphereFace2"
BINARY_KWARGS = {"r": 6.0, "m": 0.2, "t": 2.0, "lamb": 0.7, "chunk_size": 3}


def run_binary(world: int, rank: int, group) -> dict:
    """SphereFace2's family with its own margin hook, class-sharded (its shared bias replicated)."""
    head = ShardedHead(BINARY, C, D, seed=3, group=group, **BINARY_KWARGS).double()
    losses, grads = sgd_steps(head, rank, STEPS)
    return {"losses": losses, "grads": grads, "weight": head.weight.detach(), "rows": head.rows,
            "stats": head.head.bias.detach()}


RUNS = {"sharded": run_sharded, "partial_fc": run_partial_fc, "broadface": run_broadface, "binary": run_binary}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """3 gloo ranks: every strategy on all 3, then on the 2-rank group of ranks 0 and 1."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        pair = dist.new_group([0, 1])
        results = {(kind, world): run(world, rank, None) for kind, run in RUNS.items()}
        if rank < 2:
            results.update({(kind, 2): run(2, rank, pair) for kind, run in RUNS.items()})
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("margin_hook")
    spawn(_worker, 3, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(3)]


def check_ranks(results: list[dict], kind: str, world: int, ref: dict, steps: int = STEPS) -> None:
    for rank, result in enumerate(results[:world]):
        got = result[(kind, world)]
        c0, c1 = got["rows"]
        close(got["losses"], ref["losses"][:steps], f"{kind}: losses on rank {rank} of {world}")
        for step in range(steps):
            # the gather hands back world_size x the rank's share, since the trainer averages over ranks
            close(got["grads"][step] / world, ref["grads"][step][rank], f"{kind}: embedding grad, step {step}")
        close(got["weight"], ref["weight"][c0:c1], f"{kind}: W rows after the steps, rank {rank} of {world}")
        if "stats" in ref:
            close(got["stats"], torch.as_tensor(ref["stats"], dtype=torch.float64), f"{kind}: norm statistics")


@pytest.mark.parametrize("world", [2, 3])
def test_class_sharded_norm_head_equals_one_process(ranks: list[dict], world: int) -> None:
    ref = reference(world)
    check_ranks(ranks, "sharded", world, ref)
    assert (ref["weight"] - initial_weight(C)).abs().max() > 1e-3


@pytest.mark.parametrize("world", [2, 3])
def test_partial_fc_norm_head_equals_the_formula_over_the_sampled_classes(ranks: list[dict], world: int) -> None:
    sampled = ranks[0][("partial_fc", world)]["sampled"]
    for rank in range(1, world):  # every rank drew (and gathered) the same classes
        for a, b in zip(sampled, ranks[rank][("partial_fc", world)]["sampled"]):
            assert torch.equal(a, b)
    assert any(s.numel() < C_PFC for s in sampled)  # sampling happened: some classes were left out
    ref = reference(world, C_PFC, sampled, momentum=False)
    ref.pop("stats")
    check_ranks(ranks, "partial_fc", world, ref)
    full = reference(world, C_PFC, None, momentum=False)
    assert (full["losses"] - ref["losses"]).abs().max() > 1e-3  # the sampled loss is not the full one


def broadface_reference(world: int) -> dict:
    """One-process BroadFace around the same out-of-tree head, on the ranks' batches (the sampler's order when the
    batches are equal, as the sharded queue keeps them; rank order otherwise)."""
    inner = NormMarginHead(C, D, **KWARGS).double()
    losses, grads = broadface_one_process(inner, world)
    return {"losses": losses, "grads": grads, "weight": inner.weight.detach(),
            "stats": torch.stack([inner.norm_mean, inner.norm_std])}


def broadface_one_process(inner: torch.nn.Module, world: int) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """STEPS + 2 SGD steps of one-process BroadFace around ``inner`` (its W set to ``initial_weight``) on all the
    ranks' batches, in the sampler's order when the batches are equal (as the sharded queue keeps them), rank order
    otherwise: the losses and, per step, each rank's embedding grads."""
    with torch.no_grad():
        inner.weight.copy_(initial_weight(C))
    head = BroadFace(inner, **BROADFACE)
    optimizer = torch.optim.SGD(head.parameters(), lr=LR, momentum=0.9, weight_decay=5e-3)
    losses, grads = [], []
    for step in range(STEPS + 2):
        parts = [batch(r, step) for r in range(world)]
        sizes = [p[0].shape[0] for p in parts]
        equal = len(set(sizes)) == 1
        join = (lambda ts: torch.stack(ts, 1).flatten(0, 1)) if equal else torch.cat
        x = join([p[0] for p in parts]).requires_grad_(True)
        loss = head(x, join([p[1] for p in parts]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        grads.append([x.grad[r::world] for r in range(world)] if equal else list(x.grad.split(sizes)))
    return torch.stack(losses), grads


@pytest.mark.parametrize("world", [2, 3])
def test_broadface_around_the_norm_head_sharded_equals_one_process(ranks: list[dict], world: int) -> None:
    ref = broadface_reference(world)
    check_ranks(ranks, "broadface", world, ref, steps=STEPS + 2)
    assert (ref["weight"] - initial_weight(C)).abs().max() > 1e-3
    assert torch.isfinite(ref["losses"]).all()


# ------------------------------------------------------------------------------------------ the binary family


def binary_formula(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) loss_weight x SphereFace2 Eq. 6 with the norm-dependent positive of _norm_head.NormSphereFace2, plainly:
    (lamb / r) softplus(-(r (g(cos_y) - m (1 + z)) + b)) + ((1 - lamb) / r) sum_{j != y} softplus(r (g(cos_j) + m) + b),
    g(c) = 2 ((c + 1) / 2)^t - 1, z = clip((|x| - 1) / 4, -1, 1); loss_weight 10 (the default)."""
    r, m, t, lamb = (BINARY_KWARGS[k] for k in ("r", "m", "t", "lamb"))
    z = ((x.detach().norm(dim=1) - 1.0) / 4.0).clamp(-1.0, 1.0)
    g = 2.0 * ((F.normalize(x, dim=1) @ F.normalize(w, dim=1).T + 1.0) / 2.0) ** t - 1.0
    own = F.one_hot(y, w.shape[0]).bool()
    positive = (lamb / r) * F.softplus(-(r * (g[own] - m * (1.0 + z)) + b))
    negative = ((1.0 - lamb) / r) * F.softplus(r * (g + m) + b).masked_fill(own, 0.0).sum(1)
    return 10.0 * (positive + negative)


def binary_reference(world: int) -> dict:
    """The formula in one process on the ranks' batches; W and the bias b trained by SGD."""
    initial = ShardedHead(BINARY, C, D, seed=3, **BINARY_KWARGS).double()
    w = initial.weight.detach().clone().requires_grad_(True)
    b = initial.head.bias.detach().clone().requires_grad_(True)
    optimizer = torch.optim.SGD([w, b], lr=LR, momentum=0.9, weight_decay=5e-3)
    losses, grads = [], []
    for step in range(STEPS):
        parts = [batch(r, step) for r in range(world)]
        x = torch.cat([p[0] for p in parts]).requires_grad_(True)
        loss = binary_formula(x, torch.cat([p[1] for p in parts]), w, b).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        grads.append(list(x.grad.split([batch_size(r, step) for r in range(world)])))
    return {"losses": torch.stack(losses), "grads": grads, "weight": w.detach(), "stats": b.detach()}


def test_the_binary_family_hook_is_its_formula_in_one_process() -> None:
    head = NormSphereFace2(C, D, **BINARY_KWARGS).double()
    x, y = batch(0, 0)
    want = binary_formula(x, y, head.weight.detach(), head.bias.detach())
    close(head.per_sample_loss(x, y), want, "per-sample loss")
    plain = SphereFace2(C, D, **BINARY_KWARGS).double()
    plain.load_state_dict(head.state_dict())
    assert (plain.per_sample_loss(x, y) - want).abs().max() > 1e-3  # the hook is what changed the loss


@pytest.mark.parametrize("world", [2, 3])
def test_class_sharded_binary_family_with_its_own_hook_equals_one_process(ranks: list[dict], world: int) -> None:
    ref = binary_reference(world)
    check_ranks(ranks, "binary", world, ref)
    assert (ref["weight"] - ShardedHead(BINARY, C, D, seed=3, **BINARY_KWARGS).double().weight).abs().max() > 1e-3
