"""AttFC (faceforge/heads/attfc.py) against Eq. 8-10 and Alg. 1 written out plainly here (float64, small sizes):
the attention loader, the conflict mask, the FIFO container and its wrap-around, chunked == plain, int64 labels
beyond 2^24, and the container on 2 gloo ranks (identical on both, equal to one process with the double batch)."""

from __future__ import annotations

import datetime
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from faceforge import heads
from faceforge.heads.attfc import (
    AttFC,
    attention_weights,
    conflict_mask,
    container_capacity,
    enqueue,
    generated_centres,
)

C, D, B, K = 40, 6, 4, 3
S_SCALE, M = 8.0, 0.3


def plain_attention(f, Kf):
    """Eq. 8 by loops: alpha_bi = exp(cos_bi) / sum_j exp(cos_bj), cos from the plain dot product over norms."""
    alpha = torch.empty(Kf.shape[:2], dtype=torch.float64)
    for b in range(f.shape[0]):
        cos = [float(f[b] @ Kf[b, i] / (f[b].norm() * Kf[b, i].norm())) for i in range(Kf.shape[1])]
        e = [math.exp(c) for c in cos]
        for i in range(Kf.shape[1]):
            alpha[b, i] = e[i] / sum(e)
    return alpha


def plain_loss(f, labels, centres, container, container_labels, s=S_SCALE, m=M):
    """Eq. 10 with Alg. 1: per row, -log softmax of [s cos(theta+ + m), s cos(f, DCC_j) for unmasked j] at 0."""
    f = F.normalize(f, dim=1)
    rows = []
    for b in range(f.shape[0]):
        cos_pos = (f[b] * centres[b]).sum()
        logits = [s * torch.cos(torch.acos(cos_pos) + m)]
        logits += [s * (f[b] * container[j]).sum() for j in range(container.shape[0])
                   if int(container_labels[j]) != int(labels[b])]
        z = torch.stack(logits)
        rows.append(torch.logsumexp(z, 0) - z[0])
    return torch.stack(rows)


def make_head(container_size=12, batch_size=B, seed=0, **kwargs) -> AttFC:
    torch.manual_seed(seed)
    return AttFC(C, D, batch_size=batch_size, container_size=container_size, s=S_SCALE, m2=M, **kwargs).double()


def batch(seed, n=B, labels=None):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, D, dtype=torch.float64, generator=g)
    Kf = torch.randn(n, K, D, dtype=torch.float64, generator=g) * 3  # raw norms != 1: Eq. 9 sums the raw K
    y = torch.randint(0, C, (n,), generator=g) if labels is None else torch.as_tensor(labels)
    return f, y, Kf


# ------------------------------------------------------------------------------------------ Eq. 8 / 9


def test_attention_weights_and_generated_centres_match_the_plain_formula():
    f, _, Kf = batch(1)
    alpha = attention_weights(f, Kf)
    torch.testing.assert_close(alpha, plain_attention(f, Kf), rtol=1e-12, atol=1e-14)
    expected = torch.stack([sum(alpha[b, i] * Kf[b, i] for i in range(K)) for b in range(B)])
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(generated_centres(f, Kf), expected, rtol=1e-12, atol=1e-14)
    # the raw K is summed: normalising K first gives another centre (the test can tell the two apart)
    assert not torch.allclose(generated_centres(f, F.normalize(Kf, dim=2) * torch.rand(B, K, 1, dtype=torch.float64)), expected)
    # Table 4: constant weights 1/k and the single image
    mean = Kf.mean(1)
    torch.testing.assert_close(generated_centres(f, Kf, "constant"), mean / mean.norm(dim=1, keepdim=True))
    torch.testing.assert_close(generated_centres(f, Kf, "single"), Kf[:, 0] / Kf[:, 0].norm(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="weighting='nope'"):
        generated_centres(f, Kf, "nope")


# ------------------------------------------------------------------------------------------ the loss, the mask


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_chunked_loss_and_gradient_equal_the_plain_formula(chunk_size):
    head = make_head(chunk_size=chunk_size)
    head.container_labels.copy_(torch.arange(12) % 7)  # some labels of the batch below are in the container
    f, y, Kf = batch(2, labels=[3, 3, 5, 20])
    f.requires_grad_(True)
    loss = head.per_sample_loss(f, y, Kf)
    centres = generated_centres(F.normalize(f.detach(), dim=1), Kf)
    f_plain = f.detach().clone().requires_grad_(True)
    expected = plain_loss(f_plain, y, centres, head.container, head.container_labels)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    loss.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(f.grad, f_plain.grad, rtol=1e-10, atol=1e-12)
    # head.logits (the plain (B, 1 + S) formulation) gives the same loss as a cross-entropy at column 0
    z = head.logits(f.detach(), y, Kf)
    torch.testing.assert_close(F.cross_entropy(z, torch.zeros(B, dtype=torch.long), reduction="none"), expected.detach())


def test_conflict_mask_several_entries_and_a_same_label_pair_in_one_batch():
    head = make_head(chunk_size=5)
    head.container_labels.copy_(torch.tensor([9, 1, 9, 2, 9, 3, 4, 5, 9, 6, 7, 8]))  # label 9 four times
    f, y, Kf = batch(3, labels=[9, 9, 1, 30])  # a same-label pair within the batch
    mask = conflict_mask(y, head.container_labels)
    assert mask.sum(1).tolist() == [4, 4, 1, 0]
    z = head.logits(f, y, Kf)
    assert torch.isneginf(z[:2, 1:][mask[:2]]).all() and torch.isfinite(z[:, 0]).all()
    assert torch.isfinite(z[3]).all()  # no conflict: nothing masked (and no clamp: the values are s cos)
    loss = head.per_sample_loss(f, y, Kf)
    centres = generated_centres(F.normalize(f, dim=1), Kf)
    torch.testing.assert_close(loss, plain_loss(f, y, centres, head.container, head.container_labels), rtol=1e-12, atol=1e-12)
    # the two samples of label 9 do not see each other: this batch's centres are not in the container yet
    before = head.container.clone()
    head(f, y, Kf)
    assert torch.equal(head.container[4:], before[4:]) and head.container_labels[:4].tolist() == [9, 9, 1, 30]


def test_every_entry_masked_leaves_the_positive_alone():
    head = make_head(container_size=4, chunk_size=3)
    head.container_labels.fill_(7)
    f, y, Kf = batch(4, labels=[7, 7, 7, 7])
    f.requires_grad_(True)
    loss = head.per_sample_loss(f, y, Kf)
    torch.testing.assert_close(loss, torch.zeros(B, dtype=torch.float64))  # log(exp(t)) - t
    loss.sum().backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().max() < 1e-12


def test_tiny_losses_are_exact_in_float32():
    """Eq. 10 in float32 against log1p(sum_j exp(z_j - t)) in float64, at losses from about 1e-11 to 0.5.

    f = e_0, its generated centre at cosine 0.95 to f (t = s cos(theta+ + m) = 43.9 at s 64, m 0.5) and every
    container entry at cosine c to f, so loss = log1p(S exp(64 c - t)). Written as logaddexp(t, lse) - t in
    float32 the loss would lose its digits to the rounding of t (ulp(43.9) = 3.8e-6: 38 % of a 1e-5 loss). What
    float32 cannot avoid: each 64 c_j - t is off by a few ulps of 64, i.e. rtol = 2 * 64 * 10 * eps32 = 1.5e-4
    (as the margin heads', test_heads.py).
    """
    s, m, dim, size = 64.0, 0.5, 4, 4
    head = AttFC(C, dim, batch_size=1, container_size=size, s=s, m2=m).eval()
    head.container_labels.fill_(1)
    f = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    class_features = torch.tensor([[[0.95, math.sqrt(1 - 0.95**2), 0.0, 0.0]]])  # (1, k = 1, D)
    t = s * math.cos(math.acos(float(class_features[0, 0, 0].double())) + m)
    for c in torch.linspace(0.3, 0.66, 7):  # exp(64 c - t) from 1e-11 to 1e-1 per entry
        entry = torch.tensor([float(c), 0.0, math.sqrt(1 - float(c) ** 2), 0.0])
        head.container.copy_(entry.expand(size, dim))
        want = torch.log1p(size * torch.exp(s * entry.double()[0] - t)).reshape(1)
        got = head.per_sample_loss(f, torch.tensor([0]), class_features)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=2 * 64 * 10 * torch.finfo(torch.float32).eps, atol=0)


def test_labels_beyond_2_24_are_exact():
    big = 2**24 + 1  # float32(2^24 + 1) == float32(2^24): the official code's float labels would collide
    assert torch.tensor(float(big), dtype=torch.float32) == torch.tensor(float(2**24), dtype=torch.float32)
    head = AttFC(2**25, D, batch_size=B, container_size=8).double()
    head.container_labels.copy_(torch.tensor([2**24] * 8))
    f, _, Kf = batch(5)
    y = torch.tensor([big, 2**24, big, big])
    assert conflict_mask(y, head.container_labels).sum(1).tolist() == [0, 8, 0, 0]
    head(f, y, Kf)
    assert head.container_labels.dtype == torch.int64 and head.container_labels[:4].tolist() == y.tolist()


# ------------------------------------------------------------------------------------------ the container


def test_container_fifo_order_and_wrap_around():
    head = make_head(container_size=3 * B)
    assert head.container_labels.tolist() == [-1] * 12 and int(head.container_ptr) == 0
    torch.testing.assert_close(head.container.norm(dim=1), torch.ones(12, dtype=torch.float64))
    written = []
    for step in range(5):  # 5 batches into a container of 3: the last 3 remain, step 3 and 4 wrapped around
        f, _, Kf = batch(10 + step)
        y = torch.arange(B) + 100 * step
        head(f, y, Kf)
        written.append((y, generated_centres(F.normalize(f, dim=1), Kf)))
        assert int(head.container_ptr) == (step + 1) % 3 * B
    slots = {0: 3, 1: 4, 2: 2}  # container block -> the step whose centres it holds
    for block, step in slots.items():
        rows = slice(block * B, (block + 1) * B)
        assert head.container_labels[rows].tolist() == written[step][0].tolist()
        torch.testing.assert_close(head.container[rows], written[step][1], rtol=0, atol=0)
    # the plain function wraps within one call too
    cont, labs = torch.zeros(5, 2), torch.full((5,), -1)
    assert enqueue(cont, labs, 3, torch.ones(4, 2), torch.tensor([1, 2, 3, 4])) == 2
    assert labs.tolist() == [3, 4, -1, 1, 2]


def test_container_capacity_and_arguments():
    assert container_capacity(93431, 0.3, 384) == 27648  # the official code's MS1MV3 value (72 x 384)
    assert container_capacity(1000, 0.3, 7) == 294
    assert container_capacity(1000, 0.3, 8, container_size=96) == 96
    with pytest.raises(ValueError, match="container_size=100: expected a positive multiple of the global batch 8"):
        container_capacity(1000, 0.3, 8, container_size=100)
    with pytest.raises(ValueError, match="holds no full global batch"):
        container_capacity(10, 0.1, 8)
    with pytest.raises(ValueError, match="batch_size is required"):
        AttFC(10, 4)
    head = heads.build("attfc", num_classes=1000, embedding_size=D, batch_size=8, ratio=0.1)
    assert head.container.shape == (96, D) and not list(head.parameters())
    f, y, Kf = batch(6, n=4)
    with pytest.raises(ValueError, match="global batch is 4 but head batch_size is 8"):
        head(f.float(), y, Kf.float())


def test_state_dict_round_trip_with_a_partly_filled_container():
    head = make_head(container_size=3 * B)
    f, y, Kf = batch(7)
    head(f, y, Kf)
    state = head.state_dict()
    assert set(state) == {"container", "container_labels", "container_ptr"}
    other = make_head(container_size=3 * B, seed=1)
    other.load_state_dict(state)
    f2, y2, Kf2 = batch(8)
    torch.testing.assert_close(other(f2, y2, Kf2), head(f2, y2, Kf2), rtol=0, atol=0)
    assert torch.equal(other.container, head.container) and int(other.container_ptr) == 2 * B


# ------------------------------------------------------------------------------------------ 2 gloo ranks

WORLD, DDP_STEPS = 2, 5


def ddp_global_batch(step: int):
    """The global batch of step `step` (2B samples): rank r holds every second sample from r (rank_positions)."""
    return batch(100 + step, n=WORLD * B)


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        head = make_head(container_size=3 * WORLD * B, batch_size=WORLD * B)
        losses = []
        for step in range(DDP_STEPS):
            f, y, Kf = ddp_global_batch(step)
            losses.append(head(f[rank::WORLD], y[rank::WORLD], Kf[rank::WORLD]))
        torch.save({"state": head.state_dict(), "losses": torch.stack(losses)}, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # no rank destroys the group while another still uses it
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_hold_one_container_equal_to_one_process_with_the_double_batch(tmp_path, one_thread):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = make_head(container_size=3 * WORLD * B, batch_size=WORLD * B)
    per_sample = []
    for step in range(DDP_STEPS):
        f, y, Kf = ddp_global_batch(step)
        per_sample.append(single.per_sample_loss(f, y, Kf))
        single(f, y, Kf)
    for key, value in single.state_dict().items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        assert torch.equal(ranks[0]["state"][key], value), key  # float64 rows, copied: bit-identical
    for rank in range(WORLD):  # each rank's loss is the mean over its half of the global batch
        expected = torch.stack([p[rank::WORLD].mean() for p in per_sample])
        torch.testing.assert_close(ranks[rank]["losses"], expected, rtol=1e-12, atol=1e-12)
