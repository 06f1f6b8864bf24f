"""ViTs under torch.distributed (issue 30): DDP on 2 gloo ranks against one process, with and without token
masking, a class-sharded head, and the recipe's optimiser pieces with Partial FC (AdamW refused in one line; the
warm-up + decay schedule driving the lazily updated rows).

What "equal to one process" can mean for a ViT. Two things make a rank's forward depend on its share of the batch:

* the feature head's two BatchNorm1d normalise each rank's B/2 images by their own statistics (as in arcface_torch,
  which trains its ViTs with DDP and plain BatchNorm; SyncBatchNorm has no CPU kernel), and DDP broadcasts rank 0's
  running statistics before every forward;
* token masking (``random_token_order``) and stochastic depth draw from the global torch RNG by position in the
  rank's batch, and every rank is seeded with the run's seed: rank 0's j-th image and rank 1's j-th image get the
  same token order and the same dropped blocks, where one process with the whole batch gives image 2j + 1 the
  draw of row 2j + 1 (``test_token_draws_follow_the_position_in_the_ranks_batch_not_the_sample``). Per-sample draws
  would need the sample ids inside the backbone.

So the one-process reference here is :class:`TwoRanksViT`: the same ViT (same parameters and state-dict keys) whose
training forward runs the two ranks' shares (images ``0::2`` and ``1::2`` of the global micro-batch, the sampler's
``rank_positions``) one after the other, each from the same RNG state and the same BatchNorm running statistics,
keeping rank 0's afterwards, as DDP does. Everything else (sampler, gradient averaging, the head, the optimiser,
checkpoints) is the trainer's own, once in one process and once on 2 gloo ranks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from _runs import config_from_base
from faceforge.backbones.vit import VIT_PRESETS, VisionTransformer, random_token_order
from faceforge.core import shards
from faceforge.core.checkpoint import load_checkpoint
from faceforge.build import build_backbone
from faceforge.train.config import OptimConfig, ScheduleConfig, config_from_dict, to_yaml
from faceforge.train.engine import train
from faceforge.train.optim import LazyRowSGD, build_optimizer, build_scheduler, lr_at
from test_train import assert_same_state, free_port, run_worker

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4


class TwoRanksViT(VisionTransformer):
    """vit_t whose training forward computes what each of 2 DDP ranks computes on its half of the batch (module
    docstring): ``x[r::2]`` for r = 0, 1 from the same RNG state and BatchNorm buffers, rank 0's kept. Eval: as is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        slots = [(m._buffers, name) for m in self.modules() for name, b in m._buffers.items() if b is not None]
        start, rng = [table[name].clone() for table, name in slots], torch.get_rng_state()
        first = super().forward(x[0::2].contiguous())
        kept, rng_after = [table[name] for table, name in slots], torch.get_rng_state()
        # new tensors, not copies into the old ones: BatchNorm's backward reads the buffers its forward saw
        for (table, name), s in zip(slots, start):
            table[name] = s  # DDP broadcasts rank 0's buffers to rank 1 before the forward
        torch.set_rng_state(rng)  # rank 1 was seeded as rank 0
        second = super().forward(x[1::2].contiguous())
        for (table, name), k in zip(slots, kept):
            table[name] = k  # the checkpoint holds rank 0's
        torch.set_rng_state(rng_after)
        return torch.stack([first, second], dim=1).reshape(x.shape[0], -1)  # back in the batch's order


def two_ranks_vit_t(**kwargs: Any) -> TwoRanksViT:
    """``vit_t``'s shape (its width, depth and heads) as :class:`TwoRanksViT`; kwargs as ``vit_t``'s."""
    dim, depth, heads = VIT_PRESETS["vit_t"]
    return TwoRanksViT(dim=dim, depth=depth, num_heads=heads, **kwargs)


# vit_t at 1/16 width (C = 16, 12 blocks, 2 heads of 8) on 18 x 18 images: 2 x 2 patches of 9, 4 tokens
BASE: dict[str, Any] = {
    "seed": 0,
    "output": "unset",
    "model": {"backbone": "vit_t", "embedding_size": 16,
              "kwargs": {"width": 0.0625, "mask_ratio": 0.0, "drop_path": 0.0}},
    "head": {"name": "arcface", "kwargs": {"s": 16.0}},
    "data": {"num_identities": 8, "images_per_identity": 8, "image_size": 18, "batch_size": 16, "cache": True,
             "eval_pairs": 0},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    "schedule": {"name": "poly", "warmup_steps": 1},
    "train": {"steps": STEPS, "log_every": 1, "checkpoint_every": 0, "progress": False},
}
MASKED = {"mask_ratio": 0.25, "drop_path": 0.1}  # 3 of 4 tokens kept; the last block dropped for 10 % of images


def one_process_and_two_ranks(tmp_path: Path, vit: dict[str, Any], head: dict[str, Any],
                              two_ranks_head: dict[str, Any] | None = None) -> tuple[dict, dict]:
    """The checkpoints of the run in one process with batch 16 (:class:`TwoRanksViT`) and on 2 gloo ranks with
    batch 8 (``vit_t``, head ``two_ranks_head`` or ``head``)."""
    model = {**BASE["model"], "kwargs": {**BASE["model"]["kwargs"], **vit}}
    one = train(config_from_base(BASE, tmp_path / "one", head=head,
                                 model={**model, "backbone": f"{__name__}:two_ranks_vit_t"}))
    cfg = config_from_base(BASE, tmp_path / "two", model=model, head=two_ranks_head or head, data={"batch_size": 8})
    (tmp_path / "two.yaml").write_text(to_yaml(cfg))
    run_worker(str(tmp_path / "two.yaml"), "--nprocs", "2", "--port", str(free_port()), timeout=300)
    two = shards.resolve(load_checkpoint(tmp_path / "two" / "last.pt"), tmp_path / "two")  # a sharded W: its rows
    assert two["world_size"] == 2 and two["step"] == STEPS
    return load_checkpoint(one.checkpoint), two


def initial(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The backbone's state dict as the run that wrote ``checkpoint`` initialised it (seeded, then built)."""
    torch.manual_seed(checkpoint["config"]["seed"])
    return build_backbone(config_from_dict(checkpoint["config"], "<test>")).state_dict()


def assert_trained_alike(two: dict, one: dict) -> None:
    for key in ("backbone", "head", "optimizer"):
        assert_same_state(two[key], one[key], key, rel=REL, floor=FLOOR)
    # teeth: 4 steps moved the weights by far more than the tolerance
    moved = (one["backbone"]["feature.0.weight"] - initial(one)["feature.0.weight"]).abs().max()
    assert moved > 100 * REL * max(FLOOR, one["backbone"]["feature.0.weight"].abs().max())


# Tolerance. Each rank computes its half as TwoRanksViT computes it (same shapes, one thread), but the two runs still
# round differently in the last bits (the head's W gradient sums 16 rows at once in one process, 8 + 8 then averaged
# on 2 ranks; a sharded head's log-sum-exp and sums run over ranks): ~2e-7 of the weights after step 1 (measured).
# lr 0.1 and momentum 0.9 amplify that over 4 steps to at most 7.6e-6 of max(|w|, 1) (measured, unsharded with and
# without masking, sharded with masking). REL = 1e-4 keeps an order of magnitude; floor 1: a tensor whose entries are
# all far below 1 (a bias or running mean whose true gradient is 0, so rounding noise) is compared at the weights'
# scale. A gradient off by a factor 2 (a missed all-reduce average) moves the weights by far more (asserted).
REL, FLOOR = 1e-4, 1.0
ARCFACE = {"name": "arcface", "kwargs": {"s": 16.0}}


@pytest.mark.equivalence
@pytest.mark.parametrize("vit", [{}, MASKED], ids=["no_masking", "masking_and_drop_path"])
def test_vit_under_ddp_on_two_ranks_equals_one_process(vit: dict, tmp_path: Path) -> None:
    """Without masking, ``mask_token`` is read by no forward: a trained parameter without a gradient stopped DDP at
    step 2 ("Expected to have finished reduction in the prior iteration"); it is frozen now."""
    one, two = one_process_and_two_ranks(tmp_path, vit, ARCFACE)
    assert_trained_alike(two, one)
    moved = not torch.equal(two["backbone"]["mask_token"], initial(one)["mask_token"])
    assert moved == bool(vit)  # trained with masking, frozen (as initialised) without


@pytest.mark.equivalence
def test_vit_with_a_class_sharded_head_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """head.shard: W split 4 + 4 rows over the ranks (its checkpoint one logical tensor), masking on; the reference
    is the unsharded head in one process, from the same rows (seeded by (seed, row)). Building the unsharded head
    drew C x D normals from the global RNG before its rows were reseeded, the sharded one fewer: the ranks' token
    masks and dropped blocks came from another point of the stream (losses apart from step 1). The head is now
    built under a forked RNG (faceforge.build.build_head)."""
    one, two = one_process_and_two_ranks(tmp_path, MASKED, ARCFACE, {**ARCFACE, "shard": True})
    assert two["head"]["weight"].shape == one["head"]["weight"].shape == (8, 16)
    assert_trained_alike(two, one)


def test_token_draws_follow_the_position_in_the_ranks_batch_not_the_sample() -> None:
    """Why equality with masking needs TwoRanksViT: ranks seeded alike draw row j for their j-th image, so rank 1's
    images (global positions 1, 3, 5, ...) do not get the rows one process gives them."""
    torch.manual_seed(0)
    whole = random_token_order(8, 144)
    torch.manual_seed(0)
    half = random_token_order(4, 144)  # either rank's draw
    assert torch.equal(half, whole[:4])  # rank 0's j-th image: row j, as in one process for global image 2j ...
    assert not torch.equal(half, whole[0::2]) and not torch.equal(half, whole[1::2])  # ... but not its own row


# ------------------------------------------------------------------------------ Partial FC with the recipe


def test_partial_fc_with_adamw_is_one_line_before_any_work(tmp_path: Path, capsys) -> None:
    """AdamW does not compose with Partial FC's row-sparse gradients: torch's AdamW refuses sparse gradients, and a
    lazy catch-up of skipped rows has no closed form for Adam's moments (the rows an unsampled step would move by
    m / (sqrt(v) + eps)). ``faceforge train`` says so in one line, exit 2, before building anything."""
    from faceforge.cli import main

    data = yaml.safe_load(yaml.safe_dump(BASE))
    data.update(output=str(tmp_path / "run"), optim={"name": "adamw", "lr": 1e-3},
                head={"name": "arcface", "shard": True, "sample_rate": 0.5})
    (tmp_path / "pfc.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", str(tmp_path / "pfc.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "head.sample_rate = 0.5 needs optim.name = 'sgd'" in err[0], err
    assert not (tmp_path / "run").exists()


def test_lazy_rows_follow_the_warmup_and_decay_schedule() -> None:
    """Partial FC's head optimiser (LazyRowSGD) under warm-up + cosine: every group's lr is lr_at(t) at step t, and
    a row skipped for several steps catches up with each skipped step's own lr, so the sparse run equals dense SGD
    (zero gradient for unsampled rows) in float64. Catch-up matrices are float64 products of a few 2 x 2 factors:
    1e-12 relative leaves orders of margin; a catch-up at one constant lr is off by > 1e-3 here (asserted)."""
    torch.manual_seed(0)
    rows, d, steps = 10, 3, 9
    start = torch.randn(rows, d, dtype=torch.float64)
    sampled = [torch.randperm(rows)[:3] for _ in range(steps)]  # 3 of 10 rows per step, as Partial FC at 0.3
    grads = [torch.randn(3, d, dtype=torch.float64) for _ in range(steps)]
    schedule = ScheduleConfig(name="cosine", warmup_steps=3, min_lr=0.01)
    config = OptimConfig(name="sgd", lr=0.5, head_lr=0.8, momentum=0.9, weight_decay=0.05)

    def run(sparse: bool, schedule: ScheduleConfig = schedule) -> tuple[torch.Tensor, LazyRowSGD]:
        w = nn.Parameter(start.clone())
        head = nn.Module()
        head.weight = w
        backbone = nn.Linear(2, 2).double()
        optimizer = build_optimizer(config, backbone, head)
        scheduler = build_scheduler(schedule, optimizer, total_steps=steps)
        for t in range(steps):
            for group in optimizer.param_groups:
                base = 0.8 if group["name"] == "head" else 0.5
                assert group["lr"] == pytest.approx(lr_at(schedule, t, base, steps, 3), rel=1e-12), (t, group["name"])
            dense = torch.zeros(rows, d, dtype=torch.float64).index_add_(0, sampled[t], grads[t])
            w.grad = dense.to_sparse(1) if sparse else dense
            for p in backbone.parameters():
                p.grad = torch.zeros_like(p)
            optimizer.step()
            scheduler.step()
        assert isinstance(optimizer, LazyRowSGD)
        optimizer.catch_up(w, torch.arange(rows))
        return w.detach(), optimizer

    dense, _ = run(sparse=False)
    lazy, optimizer = run(sparse=True)
    assert len(optimizer.state[optimizer.param_groups[-1]["params"][0]]["lr_history"]) == steps
    torch.testing.assert_close(lazy, dense, rtol=1e-12, atol=1e-12 * dense.abs().max().item())
    # teeth: rows skipped across steps of different lr (warm-up, then the decay) are caught up, several at once
    gaps = [t for t in range(1, steps - 1) for r in range(rows)
            if r not in sampled[t].tolist() and r not in sampled[t + 1].tolist()]
    assert len(gaps) > 10 and math.isfinite(float(lazy.sum()))
