"""BroadFace (faceforge/heads/broadface.py) against its Eq. 7-9 written out plainly here (float64, small sizes),
the heads' per_sample_loss against ArcFace Eq. 1/4, and the training-loop hooks: resume with a partly filled
queue, the Fig. 5a diagnostics, model.init_from, and per-rank / gathered queues on 2 gloo ranks."""

from __future__ import annotations

import datetime
import gc
import math
import os
import shutil
import socket
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from faceforge import heads
from faceforge.heads import ArcFace, BroadFace, MarginSoftmax, Softmax
from faceforge.heads.broadface import compensate
from faceforge.core.checkpoint import load_checkpoint, save_checkpoint
from _runs import config_from_base
from faceforge.train.engine import FaceModel, train, wrap_ddp

C, D, B = 11, 6, 5
S, M = 8.0, 0.3  # ArcFace scale and margin (radians) of the wrapped head


# ---------------------------------------------------------------------------------------------- plain formulas


def plain_rows(x, weight, labels, s=S, m1=1.0, m2=M, m3=0.0, bias=None, normalize=True):
    """Per-row loss of ArcFace Eq. 4 (combined margin, SphereFace's piecewise psi past pi) or Eq. 1 (plain softmax)."""
    rows = torch.arange(len(labels))
    if normalize:
        cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()
        theta = torch.acos(cos[rows, labels])
        phi = m1 * theta + m2
        k = torch.floor(phi.detach() / math.pi)
        psi = (-1.0) ** k * torch.cos(phi) - 2.0 * k - m3
        logits = s * torch.where(F.one_hot(labels, weight.shape[0]).bool(), psi.unsqueeze(1), cos)
    else:
        logits = x @ weight.t() + bias
    return -torch.log_softmax(logits, dim=1)[rows, labels]


def plain_compensation(e_past, w_past, w_now):
    """BroadFace Eq. 7, row by row."""
    return e_past + (e_past.norm(dim=1, keepdim=True) / w_past.norm(dim=1, keepdim=True)) * (w_now - w_past)


def make_broadface(queue_size=12, seed=0, chunk_size=4, **kwargs) -> BroadFace:
    torch.manual_seed(seed)
    inner = ArcFace(C, D, s=S, m=M, chunk_size=chunk_size).double()
    inner.weight.data = torch.randn(C, D, dtype=torch.float64)  # rows of norm ~2.4, so W visibly moves under SGD
    return BroadFace(inner, queue_size, **kwargs)


def make_batch(weight, seed):
    """Raw embeddings (norm ~3) near their class centres (theta + m stays below pi), and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (B,), generator=g)
    centres = F.normalize(weight.detach()[labels], dim=1)
    x = 3.0 * centres + 1.5 * torch.randn(B, D, generator=g, dtype=torch.float64)
    return x.requires_grad_(True), labels


# ---------------------------------------------------------------------------------------------- the heads' rows


@pytest.mark.parametrize(
    "margins", [(64.0, 1.0, 0.5, 0.0), (64.0, 1.0, 0.0, 0.35), (64.0, 1.35, 0.0, 0.0), (30.0, 0.9, 0.4, 0.15)]
)
def test_margin_per_sample_loss_matches_eq4_rows(margins):
    s, m1, m2, m3 = margins
    torch.manual_seed(1)
    head = MarginSoftmax(C, D, s=s, m1=m1, m2=m2, m3=m3, chunk_size=4, intra_loss_weight=0.3).double()
    x, labels = make_batch(head.weight, seed=2)
    x.data[0] = -x.data[0]  # one row far from its centre: m1 theta + m2 goes past pi
    theta_y = torch.acos(F.cosine_similarity(x, head.weight[labels], dim=1))
    expected = plain_rows(x, head.weight, labels, s, m1, m2, m3) + 0.3 * theta_y / math.pi  # + Eq. 5 summand

    rows = head.per_sample_loss(x, labels)
    assert rows.shape == (B,)
    torch.testing.assert_close(rows, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(head(x, labels), expected.mean(), rtol=1e-10, atol=1e-10)
    weights = torch.linspace(0.5, 2.0, B, dtype=torch.float64)  # not just the sum: each row's own gradient
    for got, want in zip(
        torch.autograd.grad((rows * weights).sum(), [x, head.weight]),
        torch.autograd.grad((expected * weights).sum(), [x, head.weight]),
    ):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)

    held = head.per_sample_loss(x, labels, classifier_grad=False)
    torch.testing.assert_close(held, expected.detach(), rtol=1e-10, atol=1e-10)
    got_x, got_w = torch.autograd.grad(held.sum(), [x, head.weight], allow_unused=True)
    assert got_w is None  # no gradient reaches the class weights
    fixed = head.weight.detach()
    intra = 0.3 * torch.acos(F.cosine_similarity(x, fixed[labels])) / math.pi
    want_x = torch.autograd.grad((plain_rows(x, fixed, labels, s, m1, m2, m3) + intra).sum(), [x])[0]
    torch.testing.assert_close(got_x, want_x, rtol=1e-8, atol=1e-10)
    assert not head.per_sample_loss(x.detach(), labels, classifier_grad=False).requires_grad


def test_softmax_per_sample_loss_matches_eq1_rows():
    torch.manual_seed(3)
    head = Softmax(C, D, chunk_size=3).double()
    x, labels = make_batch(head.weight, seed=4)
    expected = plain_rows(x, head.weight, labels, bias=head.bias, normalize=False)
    rows = head.per_sample_loss(x, labels)
    torch.testing.assert_close(rows, expected, rtol=1e-12, atol=1e-12)
    params = [x, head.weight, head.bias]
    for got, want in zip(torch.autograd.grad(rows.sum(), params), torch.autograd.grad(expected.sum(), params)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    held = head.per_sample_loss(x, labels, classifier_grad=False)
    got = torch.autograd.grad(held.sum(), params, allow_unused=True)
    assert got[1] is None and got[2] is None
    want_x = torch.autograd.grad(
        plain_rows(x, head.weight.detach(), labels, bias=head.bias.detach(), normalize=False).sum(), [x]
    )[0]
    torch.testing.assert_close(got[0], want_x, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- Eq. 7


def test_compensation_eq7_values():
    e_past = torch.tensor([[3.0, 4.0], [3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
    w_past = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    w_now = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    # |e-| = 5: 5 / 1 * ([0, 1] - [1, 0]) and 5 / 2 * ([0, 1] - [2, 0]); an unchanged W leaves e- as it was
    expected = torch.tensor([[-2.0, 9.0], [-2.0, 6.5], [1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(compensate(e_past, w_past, w_now), expected, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------- Eq. 8, 9


@pytest.mark.parametrize("compensated", [True, False])
def test_gradient_routing_over_steps_while_w_moves(compensated):
    """d/dx = gradient of the batch loss with W fixed (Eq. 8); d/dW = gradient of the loss on batch + (compensated)
    queue with the embeddings fixed (Eq. 9); five SGD steps, so W moves and the queue (12 rows) overflows."""
    broadface = make_broadface(queue_size=12, row_chunk=5, compensate=compensated)
    optimizer = torch.optim.SGD(broadface.parameters(), lr=0.05)
    history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (e-, y, W-_y) of each past batch
    initial = broadface.weight.detach().clone()
    shift = 0.0  # the largest |e* - e-| seen
    for step in range(5):
        x, labels = make_batch(broadface.weight, seed=10 + step)
        weight = broadface.weight.detach().clone()

        e_past = torch.cat([e for e, _, _ in history] or [torch.empty(0, D, dtype=torch.float64)])[-12:]
        y_past = torch.cat([y for _, y, _ in history] or [torch.empty(0, dtype=torch.long)])[-12:]
        w_past = torch.cat([w for _, _, w in history] or [torch.empty(0, D, dtype=torch.float64)])[-12:]
        e_star = plain_compensation(e_past, w_past, weight[y_past]) if compensated else e_past
        shift = max([shift, *(e_star - e_past).abs().flatten().tolist()])
        x_plain = x.detach().clone().requires_grad_(True)
        w_plain = weight.clone().requires_grad_(True)
        encoder = plain_rows(x_plain, weight, labels).mean()  # Eq. 8, W fixed
        classifier = plain_rows(torch.cat([x.detach(), e_star]), w_plain, torch.cat([labels, y_past])).mean()  # Eq. 9
        (want_x,) = torch.autograd.grad(encoder, [x_plain])
        (want_w,) = torch.autograd.grad(classifier, [w_plain])

        loss = broadface(x, labels)
        loss.backward()
        torch.testing.assert_close(loss, encoder + classifier, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(x.grad, want_x, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(broadface.weight.grad, want_w, rtol=1e-8, atol=1e-10)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append((x.detach(), labels, weight[labels]))
    assert int(broadface.queue_count) == 12 and 5 * B > 12  # the queue overflowed
    assert (broadface.weight - initial).abs().max() > 0.05  # W moved, so the stored W- rows are stale
    assert shift > 0.05 if compensated else shift == 0.0  # and Eq. 7 moved the queued embeddings


def test_empty_queue_gives_the_heads_gradients_split_in_two():
    """queue_size 0: the encoder gets d(loss)/dx, the classifier d(loss)/dW, of the plain batch loss."""
    broadface = make_broadface(queue_size=0)
    x, labels = make_batch(broadface.weight, seed=5)
    loss = broadface(x, labels)
    loss.backward()
    x_plain = x.detach().clone().requires_grad_(True)
    w_plain = broadface.weight.detach().clone().requires_grad_(True)
    plain = plain_rows(x_plain, w_plain, labels).mean()
    want_x, want_w = torch.autograd.grad(plain, [x_plain, w_plain])
    torch.testing.assert_close(loss, 2 * plain, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, want_x, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(broadface.weight.grad, want_w, rtol=1e-8, atol=1e-10)
    assert int(broadface.queue_count) == 0


@pytest.mark.equivalence
def test_chunked_equals_plain():
    """row_chunk 3 < rows and class chunk 4 < C give the same losses and gradients as one block of each."""
    chunked = make_broadface(queue_size=20, row_chunk=3, chunk_size=4)
    whole = make_broadface(queue_size=20, row_chunk=1000, chunk_size=C)
    whole.load_state_dict(chunked.state_dict())
    optimizers = [torch.optim.SGD(h.parameters(), lr=0.05, momentum=0.9) for h in (chunked, whole)]
    for step in range(4):
        x, labels = make_batch(chunked.weight, seed=20 + step)
        x2 = x.detach().clone().requires_grad_(True)
        loss_chunked, loss_whole = chunked(x, labels), whole(x2, labels)
        loss_chunked.backward()
        loss_whole.backward()
        torch.testing.assert_close(loss_chunked, loss_whole, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(chunked.weight.grad, whole.weight.grad, rtol=1e-10, atol=1e-12)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert int(chunked.queue_count) == 4 * B  # the last steps ran 1 + ceil(15 / 3) blocks


def _context_tensors(root: torch.autograd.graph.Node) -> list[torch.Tensor]:
    """Every tensor held as an attribute (or in a list / tuple attribute) by a node of the graph below ``root``:
    what custom autograd Functions keep on ``ctx`` outside ``save_for_backward``."""
    seen, stack, found = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for value in getattr(node, "__dict__", {}).values():
            found += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, torch.Tensor)]
        stack += [fn for fn, _ in node.next_functions]
    return found


def test_no_row_block_outlives_the_forward():
    """The graph keeps the encoder's (B, C) logits only: the classifier's row blocks are freed in the forward."""
    num_classes, queue = 40, 200
    torch.manual_seed(0)
    broadface = BroadFace(ArcFace(num_classes, D, chunk_size=16), queue, row_chunk=32)
    broadface.enqueue(torch.randn(queue, D), torch.randint(0, num_classes, (queue,)), torch.randn(queue, D))
    x = torch.randn(B, D, requires_grad=True)
    labels = torch.randint(0, num_classes, (B,))
    saved = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = broadface(x, labels)
    gc.collect()
    alive = [t for t in (r() for r in saved) if t is not None and t.data_ptr() != broadface.weight.data_ptr()]
    assert len(saved) > len(alive)  # the blocks did save tensors, and they are gone
    big = [t for t in alive if t.numel() > B * D]
    assert sum(t.numel() for t in big) == B * num_classes + num_classes  # the encoder's logits and W norms
    # tensors a custom autograd Function keeps as attributes of its context (``ctx.x = t``) pass no saved-tensors
    # hook: the graph's nodes hold them. Only the gradients handed over (one per parameter / input) may be there.
    handed_over = {tuple(p.shape) for p in (x, *broadface.parameters())}
    kept = _context_tensors(loss.grad_fn)
    assert kept and {tuple(t.shape) for t in kept} <= handed_over, [tuple(t.shape) for t in kept]
    loss.backward()
    assert broadface.weight.grad.shape == (num_classes, D) and x.grad.shape == (B, D)


# ---------------------------------------------------------------------------------------------- the queue


def test_fifo_overflow_keeps_the_newest_in_order():
    broadface = BroadFace(ArcFace(C, 2), queue_size=5)

    def rows(values):
        v = torch.tensor(values, dtype=torch.float32)
        return torch.stack([v, -v], dim=1), torch.tensor(values), torch.stack([v, 2 * v], dim=1)

    broadface.enqueue(*rows([0, 1]), torch.tensor([100, 101]))
    broadface.enqueue(*rows([2, 3]))
    assert broadface.queued().labels.tolist() == [0, 1, 2, 3]
    assert broadface.queued().sample_ids.tolist() == [100, 101, -1, -1]
    broadface.enqueue(*rows([4, 5]))  # 6 rows into 5: the oldest (0) goes
    entries = broadface.queued()
    assert entries.labels.tolist() == [1, 2, 3, 4, 5]
    torch.testing.assert_close(entries.embeddings[:, 1], -entries.labels.float())
    torch.testing.assert_close(entries.class_weights[:, 1], 2 * entries.labels.float())
    assert (int(broadface.queue_count), int(broadface.queue_pointer)) == (5, 1)
    broadface.enqueue(*rows([6, 7, 8, 9, 10, 11, 12]))  # more rows than the queue: the last 5 stay
    assert broadface.queued().labels.tolist() == [8, 9, 10, 11, 12]
    assert int(broadface.queue_count) == 5


def test_forward_enqueues_raw_embeddings_and_the_rows_of_w_it_used():
    broadface = make_broadface(queue_size=8)
    x, labels = make_batch(broadface.weight, seed=6)
    weight_before = broadface.weight.detach().clone()
    broadface.observe_sample_ids(torch.arange(B) * 7)
    broadface(x, labels).backward()
    with torch.no_grad():
        broadface.weight.sub_(0.5 * broadface.weight.grad)  # the stored rows are the ones of the forward
    entries = broadface.queued()
    torch.testing.assert_close(entries.embeddings, x.detach(), rtol=0, atol=0)
    torch.testing.assert_close(entries.class_weights, weight_before[labels], rtol=0, atol=0)
    assert entries.labels.tolist() == labels.tolist() and entries.sample_ids.tolist() == (torch.arange(B) * 7).tolist()
    broadface.eval()  # an eval-mode forward uses the queue but adds nothing to it
    broadface(x, labels)
    assert int(broadface.queue_count) == B


def test_queue_stays_float32_under_autocast():
    torch.manual_seed(0)
    broadface = BroadFace(ArcFace(C, D), queue_size=8)
    x = torch.randn(B, D).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, C, (B,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = broadface(x, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert broadface.queue_embeddings.dtype == broadface.queue_weights.dtype == torch.float32
    torch.testing.assert_close(broadface.queued().embeddings, x.detach().float(), rtol=0, atol=0)


def test_state_dict_round_trip_with_a_partly_filled_queue(tmp_path):
    """Saved after 2 of 5 steps (10 of 12 rows), loaded with weights_only into a fresh head: the same next losses."""
    first = make_broadface(queue_size=12)
    optimizer = torch.optim.SGD(first.parameters(), lr=0.05, momentum=0.9)

    def step(head, optim, seed):
        x, labels = make_batch(head.weight, seed)
        head.observe_sample_ids(torch.arange(B) + seed)
        loss = head(x, labels)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return float(loss.detach())

    for seed in (30, 31):
        step(first, optimizer, seed)
    assert int(first.queue_count) == 10
    torch.save({"head": first.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    second = make_broadface(queue_size=12, seed=99)
    second.load_state_dict(state["head"])
    second_optimizer = torch.optim.SGD(second.parameters(), lr=0.05, momentum=0.9)
    second_optimizer.load_state_dict(state["optimizer"])
    for seed in (32, 33, 34):
        assert step(second, second_optimizer, seed) == step(first, optimizer, seed)
    for a, b in zip(first.queued(), second.queued()):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="queue_embeddings"):
        make_broadface(queue_size=16).load_state_dict(first.state_dict())  # another queue size


# ---------------------------------------------------------------------------------------------- Fig. 5a


def test_diagnostics_values_by_hand():
    broadface = BroadFace(ArcFace(3, 2), queue_size=4, diagnostic_samples=2)
    with torch.no_grad():
        broadface.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]))
    e_past = torch.tensor([[1.0, 0.0], [2.0, 0.0], [5.0, 5.0]])
    w_past = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])  # class 0's row has turned by 90 degrees since
    broadface.enqueue(e_past, torch.tensor([0, 1, 2]), w_past, torch.tensor([10, -1, 12]))
    now = {10: [0.0, 2.0], 12: [1.0, 0.0]}
    asked = []

    def embed(ids):
        asked.append(ids.tolist())
        return torch.tensor([now[i] for i in ids.tolist()])

    values = broadface.diagnostics(embed)
    assert asked == [[10, 12]]  # rows with a known sample id, oldest first
    # row 10: cos(e-, now) = 0; e* = [1, 0] + 1 * ([0, 1] - [1, 0]) = [0, 1], cos 1. row 12: W unchanged, cos 45 deg.
    error_12 = 1 - math.cos(math.pi / 4)
    assert values["cos_error"] == pytest.approx((1.0 + error_12) / 2, abs=1e-6)
    assert values["cos_error_compensated"] == pytest.approx((0.0 + error_12) / 2, abs=1e-6)
    assert values["samples"] == 2

    broadface.enqueue(torch.ones(3, 2), torch.tensor([1, 1, 1]), torch.ones(3, 2), torch.tensor([13, 14, 15]))
    asked.clear()
    now.update({13: [1.0, 1.0], 14: [1.0, 1.0], 15: [1.0, 1.0]})
    broadface.diagnostics(embed)
    assert asked == [[12, 15]]  # 4 known rows (12, 13, 14, 15), 2 samples: evenly spaced, oldest and newest
    assert BroadFace(ArcFace(3, 2), queue_size=4).diagnostics(embed) == {}


# ---------------------------------------------------------------------------------------------- registry, errors


def test_registry_builds_the_inner_head_by_name():
    broadface = heads.build(
        "broadface", num_classes=C, embedding_size=D, queue_size=64, head="cosface", head_kwargs={"s": 16.0},
        compensate=False, row_chunk=7,
    )
    assert isinstance(broadface, BroadFace) and isinstance(broadface.head, heads.CosFace)
    assert broadface.head.s == 16.0 and broadface.weight is broadface.head.weight
    assert (broadface.queue_size, broadface.compensate, broadface.row_chunk) == (64, False, 7)
    assert [n for n, _ in broadface.named_parameters()] == ["head.weight"]


def test_bad_arguments_are_errors():
    with pytest.raises(TypeError, match="per_sample_loss"):
        BroadFace(nn.Linear(D, C), queue_size=8)
    with pytest.raises(ValueError, match="inter_loss_weight=0.5"):
        BroadFace(ArcFace(C, D, inter_loss_weight=0.5), queue_size=8)
    with pytest.raises(ValueError, match="queue_size=-1"):
        BroadFace(ArcFace(C, D), queue_size=-1)
    with pytest.raises(ValueError, match="row_chunk"):
        BroadFace(ArcFace(C, D), queue_size=8, row_chunk=0)
    broadface = BroadFace(ArcFace(C, D), queue_size=8)
    with pytest.raises(ValueError, match=rf"label {C} at position 1 .*num_classes={C}"):
        broadface(torch.randn(3, D), torch.tensor([0, C, 1]))
    with pytest.raises(ValueError, match=r"sample ids of shape \(2,\); expected \(3,\)"):
        broadface.observe_sample_ids(torch.tensor([1, 2]))
        broadface(torch.randn(3, D), torch.tensor([0, 1, 2]))


def test_wraps_sphereface2():
    """Any head with per_sample_loss: the routing holds for SphereFace2 (its own rows as the reference)."""
    torch.manual_seed(0)
    sphereface2 = heads.build("sphereface2", num_classes=C, embedding_size=D).double()
    broadface = BroadFace(sphereface2, queue_size=8)
    x0, y0 = make_batch(broadface.weight, seed=40)
    w0 = broadface.weight.detach().clone()
    broadface(x0, y0)  # fills the queue
    x, labels = make_batch(broadface.weight, seed=41)
    with torch.no_grad():
        broadface.weight.add_(0.3 * torch.randn(C, D, dtype=torch.float64))  # W moves after the enqueue
    broadface(x, labels).backward()
    params = list(sphereface2.parameters())
    got_params = [p.grad for p in params]
    e_star = plain_compensation(x0.detach(), w0[y0], broadface.weight.detach()[y0])
    classifier = sphereface2.per_sample_loss(torch.cat([x.detach(), e_star]), torch.cat([labels, y0])).mean()
    for got, want in zip(got_params, torch.autograd.grad(classifier, params)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (want_x,) = torch.autograd.grad(sphereface2.per_sample_loss(x, labels, classifier_grad=False).mean(), [x])
    torch.testing.assert_close(x.grad, want_x, rtol=1e-10, atol=1e-12)


def test_configs_hold_the_papers_recipe():
    """configs/ms1mv2_r100_broadface.yaml is Sec. 4.1's recipe; both configs build a BroadFace head."""
    from faceforge.train.config import load_config
    from faceforge.train.engine import build_head
    from faceforge.train.optim import lr_at

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs/ms1mv2_r100_broadface.yaml")
    model, data = cfg.model, cfg.data
    assert (model.backbone, model.embedding_size, data.name, data.batch_size) == ("r100", 512, "recordio", 128)
    assert cfg.model.init_from and cfg.head.kwargs["queue_size"] == 8192 and cfg.head.kwargs["compensate"]
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.weight_decay, cfg.train.steps) == ("sgd", 0.9, 5e-4, 80_000)
    steps = (0, 49_999, 50_000, 69_999, 70_000, 79_999)
    lrs = [lr_at(cfg.schedule, t, cfg.optim.lr, cfg.train.steps, 0) for t in steps]
    assert lrs == pytest.approx([5e-3, 5e-3, 5e-4, 5e-4, 5e-5, 5e-5])
    head = build_head(cfg, num_classes=10)
    assert isinstance(head, BroadFace) and isinstance(head.head, ArcFace) and (head.head.s, head.head.m2) == (64.0, 0.5)
    demo = build_head(load_config(repo / "configs/synthetic_broadface_demo.yaml"), num_classes=10)
    assert isinstance(demo, BroadFace) and demo.queue_size == 2048


# ---------------------------------------------------------------------------------------------- the training loop

BASE: dict[str, Any] = {
    "seed": 0,
    "output": "unset",
    "model": {"backbone": "_train_worker:TinyNet", "embedding_size": 16, "kwargs": {"dropout": 0.2}},
    "head": {"name": "broadface", "kwargs": {"queue_size": 40, "head_kwargs": {"s": 16.0}}},
    "data": {
        "num_identities": 8, "images_per_identity": 8, "image_size": 32, "batch_size": 16,
        "cache": True, "eval_pairs": 0,
    },
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    "schedule": {"name": "poly", "warmup_steps": 2},
    "train": {"steps": 6, "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 10, "progress": False},
}


def make_config(output: Path, **sections: dict[str, Any]):
    return config_from_base(BASE, output, **sections)


@pytest.fixture(scope="module")
def broadface_run(tmp_path_factory, one_thread):
    """6 steps of TinyNet + BroadFace(ArcFace), queue 40 (batch 16), diagnostics every step, checkpoints every 2."""
    cfg = make_config(tmp_path_factory.mktemp("broadface") / "run", train={"diagnostics_every": 1})
    return cfg, train(cfg)


@pytest.mark.equivalence
def test_resume_with_a_partly_filled_queue_continues_exactly(broadface_run, tmp_path):
    """From the step-2 checkpoint (32 of 40 rows queued) a resumed run gives the uninterrupted run's losses, bit for
    bit; it runs without diagnostics, so the reference's diagnostics did not disturb training either."""
    _, ref = broadface_run
    saved = load_checkpoint(ref.output / "step_0000002.pt")
    assert int(saved["head"]["queue_count"]) == 32 and saved["head"]["queue_embeddings"].shape == (40, 16)
    assert bool((saved["head"]["queue_sample_ids"][:32] >= 0).all())
    output = tmp_path / "resumed"
    output.mkdir()
    shutil.copy(ref.output / "step_0000002.pt", output / "last.pt")
    resumed = train(make_config(output), resume=True)
    assert resumed.losses == ref.losses[2:]
    final, expected = load_checkpoint(output / "last.pt"), load_checkpoint(ref.checkpoint)
    for key, value in expected["head"].items():
        assert torch.equal(final["head"][key], value), key


def test_diagnostics_are_logged(broadface_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, ref = broadface_run
    lines = [line for line in ref.log.read_text().splitlines() if "diagnostics step" in line]
    assert len(lines) == 6 and "cos_error " in lines[0] and "cos_error_compensated " in lines[0]
    accumulator = EventAccumulator(str(next((ref.output / "tensorboard").glob("events.out.tfevents.*"))))
    accumulator.Reload()
    errors = accumulator.Scalars("diagnostics/cos_error")
    assert [e.step for e in errors] == list(range(1, 7)) and all(0 <= e.value <= 2 for e in errors)
    assert [e.value for e in accumulator.Scalars("diagnostics/samples")][:3] == [16, 32, 40]


def test_init_from_round_trip(tmp_path, one_thread):
    """ArcFace run -> BroadFace run with model.init_from (lr 0: the weights it starts from are the ones it ends with)
    -> and back; --resume wins over init_from; mismatched checkpoints are clear errors."""
    arcface = {"name": "arcface", "kwargs": {"s": 16.0}}
    plain = train(make_config(tmp_path / "arcface", head=arcface, train={"steps": 2}))
    source = load_checkpoint(plain.checkpoint)
    frozen = {"lr": 0.0, "weight_decay": 0.0}
    cfg = make_config(
        tmp_path / "broadface", model={"init_from": str(plain.checkpoint)}, optim=frozen, train={"steps": 2}
    )
    result = train(cfg)
    state = load_checkpoint(result.checkpoint)
    for key, value in source["backbone"].items():
        assert torch.equal(state["backbone"][key], value), key
    assert torch.equal(state["head"]["head.weight"], source["head"]["weight"])
    assert int(state["head"]["queue_count"]) == 32  # the queue starts empty, not from the source
    assert "initialised from" in result.log.read_text()

    back = train(make_config(
        tmp_path / "back", head=arcface, optim=frozen,
        model={"init_from": str(result.checkpoint)}, train={"steps": 1},
    ))
    assert torch.equal(load_checkpoint(back.checkpoint)["head"]["weight"], source["head"]["weight"])

    plain.checkpoint.rename(tmp_path / "moved.pt")  # the run's init_from is gone: a resume does not read it
    same = make_config(tmp_path / "broadface", model={"init_from": str(plain.checkpoint)}, optim=frozen,
                       train={"steps": 3})
    assert train(same, resume=True).step == 3  # resumed from its own last.pt: init_from is not read
    missing = make_config(tmp_path / "broadface", model={"init_from": str(tmp_path / "nowhere.pt")}, train={"steps": 3})
    with pytest.raises(ValueError, match=r"model\.init_from: .*was trained with .*arcface/last\.pt"):
        train(missing, resume=True)  # another init_from on resume acts on nothing: refused (docs/training.md)
    with pytest.raises(ValueError, match=r"model\.init_from: .*nowhere\.pt"):  # checked before the first step
        train(make_config(tmp_path / "fresh", model={"init_from": str(tmp_path / "nowhere.pt")}))

    wrong = tmp_path / "wrong_classes.pt"
    save_checkpoint(wrong, {**source, "head": {"weight": torch.zeros(5, 16)}})
    with pytest.raises(ValueError, match=r"(?s)wrong_classes.pt: the head .*num_classes 8.*size mismatch for weight"):
        train(make_config(tmp_path / "wrong", model={"init_from": str(wrong)}))
    other = tmp_path / "other_backbone.pt"
    save_checkpoint(other, {**source, "backbone": {"fc.weight": torch.zeros(3, 3)}})
    with pytest.raises(ValueError, match=r"other_backbone.pt: the backbone does not fit"):
        train(make_config(tmp_path / "other", model={"init_from": str(other)}))


def test_diagnostics_need_a_head_that_has_them(tmp_path):
    cfg = make_config(tmp_path / "arcface", head={"name": "arcface", "kwargs": {}}, train={"diagnostics_every": 5})
    with pytest.raises(ValueError, match="train.diagnostics_every = 5: head 'arcface' .*has no diagnostics"):
        train(cfg)


# ---------------------------------------------------------------------------------------------- 2 gloo ranks

WORLD, DDP_QUEUE, DDP_STEPS = 2, 5 * B, 3


def ddp_batch(rank: int, step: int) -> int:
    """Rows of rank `rank` at step `step`: B, except B - 2 on rank 1 at step 1 (the gather pads unequal batches)."""
    return B - 2 if (rank, step) == (1, 1) else B


def _ddp_worker(rank: int, port: int, out: str) -> None:
    """Rank `rank` of 2: three steps of DDP(Linear + BroadFace(ArcFace)) as the engine wraps it, per-rank queues
    then a gathered one; rank r's image i of step t has sample id 1000 r + 100 t + i (ddp_batch rows)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        result = {}
        for gather in (False, True):
            torch.manual_seed(0)
            head = BroadFace(ArcFace(C, D, s=S), DDP_QUEUE, gather=gather)
            model = wrap_ddp(FaceModel(nn.Linear(4, D), head), torch.device("cpu"))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            for step in range(DDP_STEPS):
                g = torch.Generator().manual_seed(100 * step + rank)
                n = ddp_batch(rank, step)
                images, labels = torch.randn(n, 4, generator=g), torch.randint(0, C, (n,), generator=g)
                head.observe_sample_ids(1000 * rank + 100 * step + torch.arange(n))
                model(images, labels).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            result[gather] = head.queued()._asdict()
        torch.save(result, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # no rank destroys the group while another still uses it
    finally:
        dist.destroy_process_group()


@pytest.mark.equivalence
def test_ddp_queues_per_rank_and_gathered(tmp_path, one_thread):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: a forked rank inherits the parent's OpenMP thread pool and can deadlock in it
    torch.multiprocessing.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    queues = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    def ids(rank, steps):
        return [1000 * rank + 100 * t + i for t in steps for i in range(ddp_batch(rank, t))]

    for rank in range(WORLD):  # default: each rank queues its own rows only (DDP did not broadcast rank 0's)
        assert queues[rank][False]["sample_ids"].tolist() == ids(rank, range(DDP_STEPS))
    gathered = [ids(r, [t]) for t in range(DDP_STEPS) for r in range(WORLD)]  # per step, rank 0's then rank 1's
    expected = sum(gathered, [])[-DDP_QUEUE:]
    for key in ("embeddings", "labels", "class_weights", "sample_ids"):
        assert torch.equal(queues[0][True][key], queues[1][True][key]), key
    assert queues[0][True]["sample_ids"].tolist() == expected
    labels = {}  # sample id -> label, drawn as the workers drew them
    for rank in range(WORLD):
        for step in range(DDP_STEPS):
            g = torch.Generator().manual_seed(100 * step + rank)
            n = ddp_batch(rank, step)
            torch.randn(n, 4, generator=g)
            labels.update(zip(ids(rank, [step]), torch.randint(0, C, (n,), generator=g).tolist()))
    assert queues[0][True]["labels"].tolist() == [labels[i] for i in expected]
    assert queues[1][False]["labels"].tolist() == [labels[i] for i in ids(1, range(DDP_STEPS))]
