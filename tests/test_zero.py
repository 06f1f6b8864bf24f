"""ZeRO and gradient compression under DDP with 2 gloo ranks; resume with ZeRO, masks and distillation on.

The runs are those of tests/test_train.py (TinyNet, 64 synthetic 32x32 images), 6 steps of 2 ranks x 8
images with half of the images masked (``data.mask_ratio``), trained with the distillation objective (CosFace-
style head + lambda x the angular term against a frozen 16-D IResNet teacher with BatchNorm). The head's
weight decay is 0, so that its momentum after the first step is its all-reduced gradient itself. The lr warms up
for 2 steps and halves at step 4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from faceforge.build import build_backbone
from faceforge.core.checkpoint import load_checkpoint, save_checkpoint
from faceforge.train.config import to_dict, to_yaml
from test_train import PLAIN, TRAINED, assert_same_state, free_port, make_config, run_worker

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = {"train": {"steps": 6, "checkpoint_every": 3, "clip_grad_norm": 0.0}, "data": {"batch_size": 8, "mask_ratio": 0.5},
       "optim": {"head_weight_decay": 0.0},
       # warm-up then multi-step: the lr of a step does not depend on train.steps, so a run of 3 steps is the
       # first half of a run of 6 (the cut run resumed below)
       "schedule": {"name": "step", "warmup_steps": 2, "milestones": [4], "gamma": 0.5}}
TEACHER_MODEL = {"backbone": "r18", "embedding_size": 16, "kwargs": {"width": 0.125}}


def make_teacher(folder: Path) -> Path:
    """A tiny IResNet (BatchNorm statistics moved off 0 / 1), 16-D like the student: no projection."""
    cfg = make_config(folder / "teacher", {"model": TEACHER_MODEL})
    torch.manual_seed(5)
    backbone = build_backbone(cfg)
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    path = folder / "teacher" / "last.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint(path, {"config": to_dict(cfg), "backbone": backbone.state_dict()})
    return path


def write_run_config(tmp_path: Path, name: str, train: dict, output: str | None = None) -> Path:
    """The config file ``<name>.yaml`` of a run (output folder ``output``, default ``name``)."""
    cfg = make_config(tmp_path / (output or name), PLAIN, RUN, {"train": train})
    cfg.objective.name, cfg.objective.kwargs = "distillation", {"teacher": str(tmp_path / "teacher" / "last.pt")}
    path = tmp_path / f"{name}.yaml"
    path.write_text(to_yaml(cfg))
    return path


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every 2-rank run in one launch (one process group): plain DDP, ZeRO, fp16 compression, and a ZeRO run cut
    after step 3 ("zero_resumed", as if killed there) then resumed to step 6."""
    tmp = tmp_path_factory.mktemp("zero")
    make_teacher(tmp)
    configs = [
        write_run_config(tmp, "plain", {"checkpoint_every": 1}),  # step 1: the fp16 run's same-step reference
        write_run_config(tmp, "zero", {"zero": True}),
        write_run_config(tmp, "fp16", {"ddp_comm_hook": "fp16", "checkpoint_every": 1}),
        write_run_config(tmp, "zero_cut", {"zero": True, "steps": 3}, output="zero_resumed"),
        write_run_config(tmp, "zero_resumed", {"zero": True}),
    ]
    then = [arg for config in configs[1:] for arg in ("--then", str(config))]
    run_worker(str(configs[0]), "--nprocs", "2", "--port", str(free_port()), *then)
    return {name: tmp / name for name in ("plain", "zero", "fp16", "zero_resumed")} | {"tmp": tmp}


def test_zero_equals_plain_ddp(ddp_runs):
    plain, zero = load_checkpoint(ddp_runs["plain"] / "last.pt"), load_checkpoint(ddp_runs["zero"] / "last.pt")
    assert zero["step"] == 6 and zero["world_size"] == 2
    # Each rank updates its shard with the same all-reduced gradient and the same optimiser code, then
    # broadcasts it: the weights and the (consolidated) optimiser state are those of plain DDP, bit for bit.
    for key in ("backbone", "head", "optimizer"):
        assert_same_state(zero[key], plain[key], key)
    start = load_checkpoint(ddp_runs["plain"] / "step_0000003.pt")["backbone"]["fc.weight"]
    assert (plain["backbone"]["fc.weight"] - start).abs().max() > 1e-3  # training moved the weights


def test_zero_resume_with_masks_and_distillation_is_bit_identical(ddp_runs):
    resumed = ddp_runs["zero_resumed"]
    assert "resumed from" in (resumed / "train.log").read_text()
    a, e = load_checkpoint(resumed / "last.pt"), load_checkpoint(ddp_runs["zero"] / "last.pt")
    for key in TRAINED:
        assert_same_state(a[key], e[key], key)
    # all three were on: ZeRO (2 ranks), masks (half the images) and the distillation term beside the head's
    assert a["config"]["train"]["zero"] and a["world_size"] == 2 and a["config"]["data"]["mask_ratio"] == 0.5
    log = (ddp_runs["zero"] / "train.log").read_text()
    assert "distillation: " in log and " classification " in log and " distillation " in log


def momentum_buffers(run: Path, step: int) -> dict[int, torch.Tensor]:
    """The SGD momentum buffers of the checkpoint of ``run`` at ``step``, by parameter index."""
    state = load_checkpoint(run / f"step_{step:07d}.pt")["optimizer"]["state"]
    return {i: s["momentum_buffer"] for i, s in state.items()}


def fp16_rounding_bound(reference: torch.Tensor) -> float:
    """How far an fp16-compressed all-reduced mean may be from the exact (float64) mean, elementwise: each rank's
    gradient cast to float16 (relative 2^-11 of |g_r| / 2), the sum rounded again (2^-11 of |sum|), 3 roundings in
    all of values of at most about the largest |mean| (2 x if the ranks' gradients partly cancel): 4 x 2^-11 x
    max |reference|, plus float16's subnormal spacing 2^-24 for the smallest values. A gradient taken from one rank
    only, or summed and not averaged, is off by about |g| itself: two orders of magnitude more."""
    return 4 * 2.0 ** -11 * float(reference.abs().max()) + 2.0 ** -24


def test_fp16_gradient_compression_stays_close(ddp_runs):
    """The backbone's momentum after step 1 (buf = grad + weight decay x w, w the same initial weights in both
    runs): the fp16 run's is the plain run's to float16 rounding of the gradient, and not equal to it."""
    compressed, plain = momentum_buffers(ddp_runs["fp16"], 1), momentum_buffers(ddp_runs["plain"], 1)
    assert compressed.keys() == plain.keys()
    head = load_checkpoint(ddp_runs["plain"] / "step_0000001.pt")["head"]["weight"].shape
    backbone = [i for i in plain if plain[i].shape != head]  # the head's buffer: the next test
    assert len(backbone) == len(plain) - 1
    rounded = 0
    for i in backbone:
        c, p = compressed[i].double(), plain[i].double()
        assert (c - p).abs().max() <= fp16_rounding_bound(p), f"parameter {i}: |fp16 - plain| too large"
        rounded += not torch.equal(c, p)
    assert rounded == len(backbone)  # DDP's hook ran: every backbone gradient was rounded to float16
    w_plain = load_checkpoint(ddp_runs["plain"] / "last.pt")["backbone"]["fc.weight"]
    w_fp16 = load_checkpoint(ddp_runs["fp16"] / "last.pt")["backbone"]["fc.weight"]
    # 6 steps later: float16 keeps 11 significant bits (relative rounding 2^-11 ~ 5e-4 per gradient); over 6
    # steps of lr 0.1 the weights drift by far less than 1e-2 of their scale.
    torch.testing.assert_close(w_fp16, w_plain, rtol=1e-2, atol=1e-2 * w_plain.abs().max().item())


def test_fp16_compression_rounds_the_heads_gradients_too(ddp_runs):
    """The head's weights are outside DDP (the trainer all-reduces their gradients itself): with
    train.ddp_comm_hook fp16 they go through the same cast as the backbone's. After step 1 the head's momentum
    buffer is its averaged gradient (torch's SGD: buf = grad at the first step; head weight decay 0), computed
    from the same initial weights and batches in both runs: the fp16 run's is a float16 value (unchanged by a
    round trip through float16) within float16 rounding of the plain run's float64 mean, which is not one."""
    def head_momentum(run: Path) -> torch.Tensor:
        head = load_checkpoint(run / "step_0000001.pt")["head"]["weight"]
        buffers = [b for b in momentum_buffers(run, 1).values() if b.shape == head.shape]
        assert len(buffers) == 1 and buffers[0].dtype == torch.float64
        return buffers[0]

    compressed, plain = head_momentum(ddp_runs["fp16"]), head_momentum(ddp_runs["plain"])
    assert compressed.abs().max() > 0
    assert torch.equal(compressed.half().double(), compressed)
    assert not torch.equal(plain.half().double(), plain)
    assert (compressed - plain).abs().max() <= fp16_rounding_bound(plain)


