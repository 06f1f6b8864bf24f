"""The distillation objective: terms against the formula, a frozen teacher (checkpoint or ONNX), semi-supervised
batches, the teacher-embedding cache, and resume bit-identical with distillation, masks and the cache on."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import _train_worker
from faceforge.data.samplers import Batch, EpochSampler, SamplerContext
from faceforge.heads import CosFace
from faceforge.build import build_backbone
from faceforge.core.checkpoint import load_checkpoint, save_checkpoint
from faceforge.train.config import to_dict
from faceforge.train.distillation import Distillation
from faceforge.train.engine import train
from faceforge.train.teacher import load_teacher
from faceforge.train.teacher_cache import TeacherCache
from test_train import TRAINED, assert_same_state, make_config

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHER_MODEL = {"backbone": "r18", "embedding_size": 32, "kwargs": {"width": 0.125}}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny IResNet teacher (with BatchNorm), 32-D, as a `faceforge train` checkpoint (config + backbone)."""
    cfg = make_config(tmp_path_factory.mktemp("teacher") / "run", {"model": TEACHER_MODEL})
    torch.manual_seed(5)
    backbone = build_backbone(cfg)
    with torch.no_grad():  # BatchNorm statistics away from their initial 0 / 1
        for m in backbone.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    path = Path(cfg.output) / "last.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint(path, {"config": to_dict(cfg), "backbone": backbone.state_dict()})
    return path


@pytest.fixture(scope="module")
def unlabelled_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("unlabelled")
    rng = np.random.default_rng(0)
    for i in range(10):
        (folder / ("sub" if i % 2 else ".")).mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / ("sub" if i % 2 else ".") / f"{i}.png")
    return folder


def student_parts() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return _train_worker.TinyNet(16, 32), CosFace(8, 16, s=64.0, m=0.4)


def test_terms_match_the_formula_and_the_teacher_gets_no_gradient(teacher_run):
    backbone, head = student_parts()
    objective = Distillation(backbone, head, teacher=str(teacher_run), lam=9.0)
    assert "projection" in objective.learned  # 16-D student, 32-D teacher
    g = torch.Generator().manual_seed(1)
    images = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    labels = torch.tensor([0, 3, 5, 7, -1, -1])  # the last two are unlabelled
    batch = Batch(images=images, labels=labels, sample_ids=torch.arange(6), flipped=torch.zeros(6, dtype=torch.bool))
    terms = objective(batch)
    assert set(terms) == {"classification", "distillation"}

    with torch.no_grad():
        student = backbone(images)
        projected = objective.learned["projection"](student).double()
        teacher = load_teacher(teacher_run)(images).double()  # a fresh copy of the teacher
    expected_cls = head(student[:4], labels[:4])
    d = teacher / teacher.norm(dim=1, keepdim=True) - projected / projected.norm(dim=1, keepdim=True)
    expected_distill = 9.0 * (d * d).sum(1).mean()  # BigFace: lambda * (1/N) sum ||x̂_t - x̂_s||^2, all 6 images
    # float32 terms of size ~1-30 against float64 / float32 references: 1e-5 relative covers the rounding
    torch.testing.assert_close(terms["classification"], expected_cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["distillation"].double(), expected_distill, rtol=1e-5, atol=1e-6)

    sum(terms.values()).backward()
    assert objective.learned["projection"].weight.grad is not None
    assert all(p.grad is not None for p in backbone.parameters())
    assert all(not p.requires_grad and p.grad is None for p in objective.teacher.parameters())

    # training mode, steps: the teacher stays in eval mode and never changes (weights, BN statistics)
    objective.train()
    assert not objective.teacher.training
    before = {k: v.clone() for k, v in objective.teacher.state_dict().items()}
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters(), *objective.learned.parameters()], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        sum(objective(batch).values()).backward()
        optimizer.step()
    for name, value in objective.teacher.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_widths_and_options_are_checked(teacher_run):
    backbone, head = student_parts()
    with pytest.raises(ValueError, match="projection = false"):
        Distillation(backbone, head, teacher=str(teacher_run), projection=False)
    with pytest.raises(ValueError, match="teacher not found"):
        Distillation(backbone, head, teacher=str(teacher_run.parent / "missing.pt"))
    with pytest.raises(ValueError, match="lam"):
        Distillation(backbone, head, teacher=str(teacher_run), lam=-1.0)
    bf16 = load_teacher(teacher_run, dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16 and bf16(torch.zeros(2, 3, 32, 32)).dtype == torch.float32


def test_onnx_teacher(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((3 * 32 * 32, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"], ["embedding"])],
        "teacher", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 16])], [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "teacher.onnx"
    onnx.save(model, path)
    teacher = load_teacher(path)
    assert teacher.kind == "onnx" and teacher.embedding_size == 16
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    np.testing.assert_allclose(teacher(images).numpy(), images.reshape(3, -1).numpy() @ w, rtol=1e-4, atol=1e-4)
    backbone, head = student_parts()
    objective = Distillation(backbone, head, teacher=str(path))  # same width: no projection
    assert "projection" not in objective.learned
    batch = Batch(images=images, labels=torch.tensor([0, 1, 2]), sample_ids=torch.arange(3), flipped=torch.zeros(3, dtype=torch.bool))
    assert all(torch.isfinite(v) for v in objective(batch).values())


def test_cache_serves_unmasked_views_and_recomputes_masked_ones(teacher_run, tmp_path):
    backbone, head = student_parts()
    objective = Distillation(backbone, head, teacher=str(teacher_run), cache=str(tmp_path / "cache"))
    dataset = [(torch.zeros(3, 32, 32), 0)] * 10
    objective.bind(SamplerContext(dataset=dataset, batch_size=4, world_size=1, rank=0, seed=0, grad_accum=1, micro_per_epoch=2))
    calls = []
    real_forward = objective.teacher.forward
    objective.teacher.forward = lambda x: calls.append(len(x)) or real_forward(x)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    batch = Batch(images=images, labels=torch.tensor([0, 1, 2, 3]), sample_ids=torch.tensor([1, 2, 3, 4]),
                  flipped=torch.tensor([False, True, False, False]), extras={"masked": torch.tensor([False, False, False, True])})
    first = objective.teacher_embeddings(batch)
    second = objective.teacher_embeddings(batch)
    assert calls == [1, 3, 1]  # first: the masked image, then the 3 uncached; second: the masked image only
    assert torch.equal(first, second)
    # the same as one call on the whole batch, up to float32 rounding that depends on the batch's composition
    # (a few ulps per layer, ~1e-5 of the embeddings' scale after a dozen layers)
    full = real_forward(images)
    torch.testing.assert_close(first, full, rtol=1e-4, atol=1e-4 * full.abs().max().item())
    # another seed, another cache
    other = TeacherCache(tmp_path / "cache", {**objective.cache.key, "seed": 1, "rows": None}, rows=20, dim=32)
    assert other.base != objective.cache.base


def test_unlabelled_images_follow_each_labelled_batch(unlabelled_folder):
    from faceforge.data.unlabelled import UnlabelledFolder

    class AsTensors:
        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            image, label = self.ds[i]
            return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1, label

    unlabelled = AsTensors(UnlabelledFolder(unlabelled_folder))
    assert len(unlabelled) == 10  # images in sub-folders count too
    dataset = [(torch.full((3, 32, 32), float(i) / 100), i % 4) for i in range(16)]

    def batches(rank: int) -> list[Batch]:
        context = SamplerContext(dataset=dataset, batch_size=4, world_size=2, rank=rank, seed=3, grad_accum=1,
                                 micro_per_epoch=2, mask_ratio=0.5, unlabelled=unlabelled, unlabelled_per_batch=3)
        return [b for e in range(2) for b in EpochSampler(context).batches(e, 0)]

    rank0, again, rank1 = batches(0), batches(0), batches(1)
    for b, c in zip(rank0, again):
        assert torch.equal(b.images, c.images) and torch.equal(b.sample_ids, c.sample_ids)
    b = rank0[0]
    assert len(b) == 7 and (b.labels[:4] >= 0).all() and (b.labels[4:] == -1).all()
    assert (b.sample_ids[4:] >= 16).all() and b.extras["masked"].shape == (7,)
    # the two ranks share a global micro-batch's 6 unlabelled images without overlap (micro-batches 0 and 2 read
    # stream positions 0-5 and 12-17, inside one permutation of the 10 images; 6-11 would cross into the next)
    for m in (0, 2):
        ids0, ids1 = set(rank0[m].sample_ids[4:].tolist()), set(rank1[m].sample_ids[4:].tolist())
        assert len(ids0) == len(ids1) == 3 and not ids0 & ids1


def distill_config(output: Path, sections: dict):
    """make_config, with the ``objective`` section (BASE has none)."""
    objective = sections["objective"]
    cfg = make_config(output, {k: v for k, v in sections.items() if k != "objective"})
    cfg.objective.name, cfg.objective.kwargs = objective["name"], objective["kwargs"]
    return cfg


def test_resume_is_bit_identical_with_distillation_masks_and_cache(teacher_run, unlabelled_folder, tmp_path):
    sections = {
        "model": {"backbone": "_train_worker:TinyNet", "embedding_size": 16, "kwargs": {"dropout": 0.2}},
        "objective": {"name": "distillation", "kwargs": {"teacher": str(teacher_run), "cache": str(tmp_path / "cache")}},
        "data": {"mask_ratio": 0.5, "unlabelled": str(unlabelled_folder), "unlabelled_ratio": 0.25},
        "train": {"steps": 6, "checkpoint_every": 3},
    }
    straight = train(distill_config(tmp_path / "straight", sections))
    log = straight.log.read_text()
    assert "projection learned 16 -> 32" in log and " classification " in log and " distillation " in log

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "straight" / "step_0000003.pt", resumed_dir / "last.pt")
    resumed = train(distill_config(resumed_dir, sections), resume=True)
    assert resumed.step == 6
    torch.testing.assert_close(resumed.losses, straight.losses[3:], rtol=0, atol=0)
    a, e = load_checkpoint(resumed.checkpoint), load_checkpoint(straight.checkpoint)
    for key in (*TRAINED, "objective"):
        assert_same_state(a[key], e[key], key)
    assert set(e["objective"]) == {"learned.projection.weight"}  # the teacher's weights are not copied in


def test_unlabelled_needs_an_objective_that_reads_them(unlabelled_folder, tmp_path):
    cfg = make_config(tmp_path / "run", data={"unlabelled": str(unlabelled_folder)})
    with pytest.raises(ValueError, match="does not read unlabelled"):
        train(cfg)
