"""AttFC in the trainer: the class-image sampler (same identity, with replacement, own flips, deterministic in
(seed, epoch), the same draws for 2 ranks x B/2, 2 micro-batches x B/2 and 1 x B; recordio, folder and
synthetic sets), the momentum class encoder (Eq. 12 on parameters only, before each encoding), a killed-and-
resumed run bit-identical with a partly filled container and the class encoder, and `faceforge eval --encoder`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from faceforge.build import load_backbone
from faceforge.data import recordio
from faceforge.data.samplers import CLASS_IMAGES, SAMPLERS, SamplerContext, identity_blocks
from faceforge.heads import AttFC
from faceforge.core.checkpoint import load_checkpoint
from _runs import config_from_base
from faceforge.train.config import config_from_dict
from faceforge.train.data import build_dataset, dataset_labels
from faceforge.train.engine import train
from faceforge.train.momentum import MomentumEncoder
from faceforge.train.objectives import AttFCObjective

pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(torch.utils.data.Dataset):
    """``ds[i] -> (image (3, 4, 4) filled with i, label)``: every image says which item it is (and a flip of
    it shows: column 0 holds i, the others i + 0.5)."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = int(self.labels.max()) + 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = torch.full((3, 4, 4), float(i) + 0.5)
        image[..., 0] = float(i)
        return image, int(self.labels[i])


def sampler(dataset, batch_size=4, world_size=1, rank=0, grad_accum=1, k=3, seed=0, flip=True):
    micro = len(dataset) // (batch_size * world_size * grad_accum) * grad_accum
    context = SamplerContext(dataset=dataset, batch_size=batch_size, world_size=world_size, rank=rank, seed=seed,
                             grad_accum=grad_accum, micro_per_epoch=micro, flip=flip)
    return SAMPLERS.build("attfc", context=context, k=k)


def decode(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(item index, flipped) of Tiny images (..., 3, 4, 4)."""
    first, last = images[..., 0, 0, 0], images[..., 0, 0, -1]
    return torch.minimum(first, last).long(), first > last


LABELS = [0] * 5 + [1] * 3 + [2] + [3] * 7  # identity 2 has one image


def test_class_images_are_the_same_identity_with_replacement_and_their_own_flips():
    ds = Tiny(LABELS)
    seen_flips, seen_self, multiplicity = set(), 0, 0
    for epoch in range(3):
        for batch in sampler(ds).batches(epoch, 0):
            items, flipped = decode(batch.extras[CLASS_IMAGES])  # (B, k)
            assert batch.extras[CLASS_IMAGES].shape == (4, 3, 3, 4, 4)
            query, _ = decode(batch.images)
            assert torch.equal(query, batch.sample_ids)
            assert (ds.labels[items.numpy()] == batch.labels.numpy()[:, None]).all()  # the same identity
            seen_flips.update(flipped.flatten().tolist())
            seen_self += int((items == query[:, None]).sum())
            multiplicity += sum(len(set(row)) < len(row) for row in items.tolist())
            for q, row in zip(query.tolist(), items.tolist()):
                if LABELS[q] == 2:
                    assert row == [q, q, q]  # one image: it is repeated
    assert seen_flips == {True, False} and seen_self > 0 and multiplicity > 0  # own flips; with replacement


def test_class_images_are_deterministic_and_equal_for_ranks_and_accumulation():
    ds = Tiny(list(range(8)) * 4)  # 32 images, 8 identities of 4

    def flat(s, epoch=1):
        return [(b.sample_ids, b.extras[CLASS_IMAGES]) for b in s.batches(epoch, 0)]

    one = flat(sampler(ds, batch_size=8))
    again = flat(sampler(ds, batch_size=8))
    other_epoch = flat(sampler(ds, batch_size=8), epoch=2)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(one, again))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(one, other_epoch))
    ranks = [flat(sampler(ds, batch_size=4, world_size=2, rank=r)) for r in range(2)]
    accum = flat(sampler(ds, batch_size=4, grad_accum=2))
    for step, (ids, images) in enumerate(one):
        for r in range(2):  # rank r holds every second sample of the global batch
            assert torch.equal(ranks[r][step][0], ids[r::2]) and torch.equal(ranks[r][step][1], images[r::2])
        for a in range(2):  # micro-batch a holds the a-th half of the step's images (rank_positions)
            assert torch.equal(accum[2 * step + a][0], ids[4 * a : 4 * a + 4])
            assert torch.equal(accum[2 * step + a][1], images[4 * a : 4 * a + 4])
    # a resumed epoch (start at micro-batch 2) draws what the uninterrupted one drew
    resumed = [b.extras[CLASS_IMAGES] for b in sampler(ds, batch_size=8).batches(1, 2)]
    assert all(torch.equal(a, b[1]) for a, b in zip(resumed, one[2:]))


def test_identity_blocks():
    order, first, count = identity_blocks(np.array([2, 0, 2, 1, 0, 2]))
    assert order.tolist() == [1, 4, 3, 0, 2, 5]
    assert [order[first[i] : first[i] + count[i]].tolist() for i in range(6)][:2] == [[0, 2, 5], [1, 4]]


def test_sampler_on_recordio_and_folder_training_sets(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(12)]
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    recordio.write(str(tmp_path / "train"), list(zip(images, labels)))
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels)):
        (tmp_path / "folder" / f"id{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "folder" / f"id{label}" / f"{i:02d}.png")
    for name, path in (("recordio", tmp_path / "train"), ("folder", tmp_path / "folder")):
        cfg = config_from_dict({"output": str(tmp_path / f"out_{name}"), "model": {"backbone": "r18"},
                                "head": {"name": "attfc"}, "data": {"name": name, "path": str(path), "image_size": 8}})
        ds = build_dataset(cfg)
        assert dataset_labels(ds).tolist() == labels  # what the trainer hands the sampler as context.labels
        table = {tuple(ds[i][0].flatten().tolist()): ds[i][1] for i in range(len(ds))}
        for batch in sampler(ds, k=2, flip=False).batches(0, 0):
            extras = batch.extras[CLASS_IMAGES]
            for b in range(len(batch)):
                for j in range(2):
                    assert table[tuple(extras[b, j].flatten().tolist())] == int(batch.labels[b]), name


# ---------------------------------------------------------------------------------------------- the class encoder


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x.flatten(1)))


def test_momentum_update_on_parameters_only_before_each_encoding():
    torch.manual_seed(0)
    backbone = BNNet()
    gamma = 0.9
    objective = AttFCObjective(backbone, AttFC(20, 5, batch_size=4, container_size=8, s=8.0), momentum=gamma)
    encoder = objective.owned["momentum"]
    class_images = torch.randn(4, 2, 3, 2, 2)
    objective.class_features(class_images)  # the first update copies the backbone (parameters and buffers)
    assert torch.equal(encoder.encoder.fc.weight, backbone.fc.weight)
    with torch.no_grad():  # the backbone moves (as an optimiser step would); its BN statistics too
        for p in backbone.parameters():
            p.add_(torch.randn_like(p))
        backbone.bn.running_mean.fill_(3.0)
    before = {k: v.clone() for k, v in encoder.encoder.state_dict().items()}
    K = objective.class_features(class_images)
    for name, p in encoder.encoder.named_parameters():  # Eq. 12
        expected = gamma * before[name] + (1 - gamma) * dict(backbone.named_parameters())[name]
        torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7)
        assert not p.requires_grad
    # buffers are the copy's own: its BN statistics moved with its own batch, not towards the backbone's 3.0
    x = class_images.flatten(0, 1).flatten(1)
    batch_mean = (x @ encoder.encoder.fc.weight.t() + encoder.encoder.fc.bias).mean(0)
    torch.testing.assert_close(encoder.encoder.bn.running_mean, 0.9 * before["bn.running_mean"] + 0.1 * batch_mean)
    # K came from the updated encoder, in train mode (batch statistics), without a graph
    reference = nn.functional.batch_norm(
        x @ encoder.encoder.fc.weight.t() + encoder.encoder.fc.bias, None, None,
        encoder.encoder.bn.weight, encoder.encoder.bn.bias, training=True)
    torch.testing.assert_close(K, reference.view(4, 2, 5), rtol=1e-5, atol=1e-6)
    assert not K.requires_grad
    with pytest.raises(ValueError, match="momentum=1.5"):
        MomentumEncoder(backbone, 1.5)


# ---------------------------------------------------------------------------------------------- the trainer

STEPS = 6

BASE: dict[str, Any] = {
    "seed": 0,
    "model": {"backbone": "_train_worker:TinyNet", "embedding_size": 16, "kwargs": {"dropout": 0.2}},
    "head": {"name": "attfc", "kwargs": {"batch_size": 8, "container_size": 32, "s": 16.0}},
    "objective": {"name": "attfc", "kwargs": {"momentum": 0.9}},
    "data": {"num_identities": 8, "images_per_identity": 8, "image_size": 32, "batch_size": 8, "cache": True,
             "eval_pairs": 0, "sampler": "attfc", "sampler_kwargs": {"k": 2}},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    "schedule": {"name": "constant", "warmup_steps": 0},
    "train": {"steps": STEPS, "clip_grad_norm": 5.0, "log_every": 1, "checkpoint_every": 3, "keep_checkpoints": 10,
              "progress": False},
}


def make_config(output: Path, **sections: dict[str, Any]):
    return config_from_base(BASE, output, **sections)


def test_resume_with_a_partly_filled_container_and_the_class_encoder_is_bit_identical(tmp_path):
    straight = train(make_config(tmp_path / "straight"))
    partial = load_checkpoint(tmp_path / "straight" / "step_0000003.pt")
    labels = partial["head"]["container_labels"]
    assert (labels == -1).sum() == 8 and int(partial["head"]["container_ptr"]) == 24  # 3 of 4 batches written
    assert set(partial["objective"]) >= {"momentum.started", "momentum.encoder.fc.weight"}
    # the class encoder is not the backbone (Eq. 12 lags it) and it is not trained by the optimiser
    assert not torch.equal(partial["objective"]["momentum.encoder.fc.weight"], partial["backbone"]["fc.weight"])
    cut = train(make_config(tmp_path / "cut", train={"steps": 3}))
    assert cut.losses == straight.losses[:3]
    resumed = train(make_config(tmp_path / "cut"), resume=True)
    assert resumed.losses == straight.losses[3:]
    # train.log names the container's size and fill when a run starts: empty, then 24 of 32 after 3 steps
    log = (tmp_path / "cut" / "train.log").read_text()
    assert "container_size=32 (" in log and "slots=(0, 32) filled 0," in log and "slots=(0, 32) filled 24," in log
    a, b = load_checkpoint(resumed.checkpoint), load_checkpoint(straight.checkpoint)
    for key in ("backbone", "head", "objective"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    # faceforge eval's two encoders: the trained backbone and the momentum copy
    query, _ = load_backbone(straight.checkpoint)
    momentum, _ = load_backbone(straight.checkpoint, encoder="momentum")
    assert torch.equal(query.fc.weight, b["backbone"]["fc.weight"])
    assert torch.equal(momentum.fc.weight, b["objective"]["momentum.encoder.fc.weight"])


def test_attfc_objective_needs_the_attfc_sampler_and_eval_a_momentum_encoder(tmp_path):
    with pytest.raises(ValueError, match=r"objective attfc: the batch has no extras\['class_images'\]"):
        train(make_config(tmp_path / "epoch", data={"sampler": "epoch", "sampler_kwargs": {}}, train={"steps": 1}))
    plain = train(make_config(tmp_path / "plain", head={"name": "arcface", "kwargs": {"s": 16.0}},
                              objective={"name": "classification", "kwargs": {}}, train={"steps": 1}))
    with pytest.raises(ValueError, match="no encoder 'momentum.encoder'"):
        load_backbone(plain.checkpoint, encoder="momentum")


# ---------------------------------------------------------------------------------------------- 2 gloo ranks

from test_train import TRAINED, assert_same_state, free_port, run_worker  # noqa: E402

from faceforge.train.config import to_yaml  # noqa: E402
from faceforge.data.samplers import rank_positions  # noqa: E402

GLOBAL = 8  # 2 ranks x 4 or 1 process x 8; the container (32) holds 4 global batches


def ddp_config(tmp_path: Path, name: str, world: int, output: str | None = None, steps: int = STEPS,
               dump_name: str | None = None) -> tuple[Path, Path]:
    """(config file, dump folder) of a float64 AttFC run (TinyNet without dropout: one draw per rank would differ)
    whose head writes its container after every forward on every rank; ``output`` and ``dump_name`` default
    ``name``."""
    dump = tmp_path / f"{dump_name or name}_dump"
    dump.mkdir(exist_ok=True)
    cfg = make_config(
        tmp_path / (output or name), model={"kwargs": {"dropout": 0.0, "dtype": "float64"}},
        head={"name": "_train_worker:dumping_attfc",
              "kwargs": {"batch_size": GLOBAL, "container_size": 32, "s": 16.0, "dump": str(dump)}},
        data={"batch_size": GLOBAL // world}, train={"steps": steps},
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(to_yaml(cfg))
    return path, dump


def dumps(folder: Path, rank: int) -> list[dict]:
    return [torch.load(folder / f"rank{rank}_call{n}.pt", weights_only=True) for n in range(1, STEPS + 1)]


def test_two_gloo_ranks_through_the_trainer_hold_one_container_and_resume_bit_identical(tmp_path):
    """2 ranks x 4 through `train` (DDP, the attfc sampler and objective, the momentum encoder): after every step
    both ranks hold the same container, bit for bit, and it is one process's with the batch of 8, row for row
    (rank r's sample b lands at row 2 b + r, where the sampler took it from: global positions 0, 2, 4, 6 on rank
    0, 1, 3, 5, 7 on rank 1; the gather interleaves them back). The 2-rank run cut after step 3 and resumed gives
    the same bits (the three 2-rank runs in one launch). Float64: the runs differ only in the order of float64
    sums (the DDP average of two halves); 1e-10 relative leaves orders of magnitude over the rounding, and a
    centre in the wrong row or from the wrong image is off by O(1)."""
    two_config, two_dump = ddp_config(tmp_path, "two", 2)
    cut_config, _ = ddp_config(tmp_path, "cut", 2, output="resumed", steps=3)  # as if killed after step 3
    resumed_config, _ = ddp_config(tmp_path, "resumed", 2, dump_name="cut")  # --resume refuses another head.kwargs
    run_worker(str(two_config), "--nprocs", "2", "--port", str(free_port()), "--then", str(cut_config),
               "--then", str(resumed_config))
    one_config, one_dump = ddp_config(tmp_path, "one", 1)
    from faceforge.train.config import load_config

    train(load_config(str(one_config)))
    rank0, rank1, one = dumps(two_dump, 0), dumps(two_dump, 1), dumps(one_dump, 0)
    assert [list(rank_positions(0, GLOBAL // 2, 2, r)) for r in range(2)] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    for step, (a, b, c) in enumerate(zip(rank0, rank1, one), 1):
        for key in ("container", "container_labels", "container_ptr"):
            assert torch.equal(a[key], b[key]), f"step {step}: {key} differs between the ranks"
        assert int(a["container_ptr"]) == int(c["container_ptr"]) == step * GLOBAL % 32
        torch.testing.assert_close(a["container"], c["container"], rtol=1e-10, atol=1e-10, msg=f"step {step}")
        assert torch.equal(a["container_labels"], c["container_labels"]), f"step {step}"
    assert (rank0[3]["container_labels"] >= 0).all()  # full after 4 steps; then the oldest batch is overwritten
    assert not torch.allclose(rank0[4]["container"], rank0[0]["container"])
    final2, final1 = load_checkpoint(tmp_path / "two" / "last.pt"), load_checkpoint(tmp_path / "one" / "last.pt")
    for key in ("backbone", "objective"):
        assert_same_state(final2[key], final1[key], key, rel=1e-10)

    resumed = tmp_path / "resumed"
    assert "resumed from" in (resumed / "train.log").read_text()
    a = load_checkpoint(resumed / "last.pt")
    for key in (*TRAINED, "objective", "sampler"):
        assert_same_state(a[key], final2[key], key)


@pytest.mark.parametrize("kwargs, line", [
    ({"batch_size": 16}, "faceforge train: head.kwargs.batch_size: 16, but one forward of this run enqueues a global "
                         "batch of 8 (data.batch_size x world size); expected 8"),
    ({"container_size": 36}, "faceforge train: head.kwargs.container_size: container_size=36: expected a positive "
                             "multiple of the global batch 8"),
    ({"container_size": None, "ratio": 0.5}, "faceforge train: head.kwargs.ratio: ratio 0.5 x 8 classes = 4 holds "
                                             "no full global batch of 8"),
])
def test_a_wrong_attfc_batch_or_container_is_refused_before_any_work(tmp_path, capsys, kwargs, line):
    """Preflight (the head factory's check_training, heads.base.TrainingCheck): one line, exit 2, no run files."""
    from faceforge.cli import main

    cfg = make_config(tmp_path / "run", head={"name": "attfc", "kwargs": {**BASE["head"]["kwargs"], **kwargs}})
    path = tmp_path / "run.yaml"
    path.write_text(to_yaml(cfg))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line), err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
