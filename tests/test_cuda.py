"""GPUs: the device keys of faceforge.train.device on any machine, and the CUDA tests (``@pytest.mark.cuda``,
skipped without a GPU; CI runs none of them; ``make gpu-check`` runs them first: ``pytest -m cuda``).

CUDA tests: the margin heads, SphereFace2, BroadFace and AttFC on CUDA equal the CPU float64 reference at
float32 tolerance; a training step under bf16 autocast and fp16 + GradScaler is finite and near float32; an fp16
overflow makes GradScaler skip the step and training goes on; ``head.shard = true`` over NCCL at world size 1;
a checkpoint written on CUDA resumes on the CPU and the reverse; ``faceforge train`` runs the demo config on
``train.device = cuda``; channels_last and model.compile give the loss of the eager NCHW model.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

from _runs import make_config
from faceforge.heads import build as build_head
from faceforge.train.config import ConfigError
from faceforge.train.device import check_device, prepare_backbone
from faceforge.train.engine import train

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
cuda = [pytest.mark.cuda, needs_cuda]


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "faceforge.cli", *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# Any machine: the keys


def test_cuda_asked_without_cuda_is_one_line_exit_2_before_any_work(tmp_path: Path) -> None:
    """CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on every machine."""
    out = tmp_path / "run"
    done = _cli("train", str(REPO / "faceforge/configs/demo.yaml"), f"output={out}", "train.device=cuda",
                env={"CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("faceforge train:") and "train.device" in lines[0], done.stderr
    assert not out.exists()  # nothing was written: refused before any work


def test_check_device_names_the_key() -> None:
    check_device("cpu", cuda_available=False)
    check_device("auto", cuda_available=False)
    check_device("cuda", cuda_available=True)
    with pytest.raises(ConfigError, match=r"train\.device = 'cuda': no CUDA device"):
        check_device("cuda", cuda_available=False)
    with pytest.raises(ConfigError, match="train.device"):
        make_config(Path("x"), train={"device": "gpu"})  # not one of auto / cpu / cuda


def _tiny_losses(tmp_path: Path, name: str, model: dict[str, Any] | None = None, **train_keys: Any) -> list[float]:
    """The losses of 3 steps of the tiny run (tests/_runs.py) with these train keys (and model keys)."""
    sections: dict[str, dict[str, Any]] = {"train": {"steps": 3, "checkpoint_every": 0, **train_keys}}
    if model:
        sections["model"] = model
    return train(make_config(tmp_path / name, **sections)).losses


# channels_last runs other convolution kernels, which sum the 27 products of each 3x3x3 output in another
# order: ~27 * 2^-24 = 1.6e-6 relative per activation in float32; after 3 SGD steps (lr 0.1, loss ~ 2.8)
# differences stay far below 1e-4 relative, the bound used (a wrong layout would change the loss at 1e-1).
CL_RTOL = 1e-4


def test_channels_last_gives_the_same_losses_on_cpu(tmp_path: Path) -> None:
    plain = _tiny_losses(tmp_path, "plain", device="cpu")
    nhwc = _tiny_losses(tmp_path, "nhwc", device="cpu", channels_last=True)
    assert nhwc == pytest.approx(plain, rel=CL_RTOL)


def test_prepare_backbone_keeps_parameter_names_and_puts_inputs_in_nhwc() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    seen: list[bool] = []
    net[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    names = [n for n, _ in net.named_parameters()]
    prepare_backbone(net, channels_last=True)
    net(torch.randn(2, 3, 8, 8))
    assert seen == [True] and net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert [n for n, _ in net.named_parameters()] == names


# compiled code draws dropout masks from its own generator (inductor's Philox), not eager's: compare without
NO_DROPOUT: dict[str, Any] = {"kwargs": {"dropout": 0.0}}


@pytest.mark.slow  # inductor compiles C++ on the CPU: tens of seconds to minutes on a loaded 2-core machine
def test_model_compile_gives_the_eager_losses_on_cpu(tmp_path: Path) -> None:
    eager = _tiny_losses(tmp_path, "eager", device="cpu", model=NO_DROPOUT)
    compiled = _tiny_losses(tmp_path, "compiled", device="cpu", model={**NO_DROPOUT, "compile": True})
    assert compiled == pytest.approx(eager, rel=CL_RTOL)  # fused kernels: float32 reassociation only


# ----------------------------------------------------------------------------------------------
# CUDA: heads against the CPU float64 reference

C, D, B, K = 50, 16, 12, 3

HEADS: dict[str, Callable[[], torch.nn.Module]] = {
    "arcface": lambda: build_head("arcface", num_classes=C, embedding_size=D, s=16.0, chunk_size=16),
    "cosface": lambda: build_head("cosface", num_classes=C, embedding_size=D, s=16.0, chunk_size=16),
    "sphereface": lambda: build_head("sphereface", num_classes=C, embedding_size=D, s=16.0),
    "sphereface2": lambda: build_head("sphereface2", num_classes=C, embedding_size=D),
    "subcenter_arcface": lambda: build_head("subcenter_arcface", num_classes=C, embedding_size=D, s=16.0,
                                            chunk_size=16),
    "broadface": lambda: build_head("broadface", num_classes=C, embedding_size=D, queue_size=24, head="arcface",
                                    head_kwargs={"s": 16.0}),
    "attfc": lambda: build_head("attfc", num_classes=C, embedding_size=D, batch_size=B, container_size=24, s=16.0),
}


def _head_inputs(name: str, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    extra = (torch.randn(B, K, D, generator=g, dtype=torch.float64),) if name == "attfc" else ()
    return tuple(t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in (x, y, *extra))


# float32 against float64: cosines of D = 16 terms carry ~D * 2^-24 = 1e-6 relative error, scaled logits
# s * cos (s <= 64: SphereFace2's r 30, here s 16) ~6e-5 absolute; the loss (a logsumexp minus a logit) and
# its gradients inherit that: 1e-4 absolute plus 1e-4 relative covers it with margin.
F32_TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_on_cuda_equals_cpu_float64_reference(name: str) -> None:
    torch.manual_seed(0)
    reference = HEADS[name]().double()
    gpu = HEADS[name]()
    gpu.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in reference.state_dict().items()})
    gpu = gpu.cuda()
    results = []
    for head, dtype, device in ((reference, torch.float64, "cpu"), (gpu, torch.float32, "cuda")):
        x, y, *extra = _head_inputs(name, dtype, device)
        x.requires_grad_(True)
        loss = head(x, y, *extra)
        loss.backward()
        grads = {n: p.grad.cpu().double() for n, p in head.named_parameters() if p.grad is not None}
        results.append((loss.detach().cpu().double(), x.grad.cpu().double(), grads))
    (l64, gx64, g64), (l32, gx32, g32) = results
    torch.testing.assert_close(l32, l64, **F32_TOL)
    torch.testing.assert_close(gx32, gx64, **F32_TOL)
    assert g32.keys() == g64.keys()
    for n in g64:
        torch.testing.assert_close(g32[n], g64[n], **F32_TOL, msg=lambda m: f"grad of {n}: {m}")


# ----------------------------------------------------------------------------------------------
# CUDA: mixed precision


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(8 * 16 * 16, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


def _one_step(dtype: torch.dtype | None, init_scale: float = 128.0) -> tuple[float, torch.Tensor, float]:
    """(loss, the SGD step's change of every parameter (flattened), scaler scale after the step) of a conv net +
    ArcFace on CUDA from seed 0. A scale of 128 keeps this fp16 backward finite (gradients ~ 20 x 128 << 65504)."""
    torch.manual_seed(0)
    net, head = _Net().cuda(), build_head("arcface", num_classes=C, embedding_size=D, s=16.0).cuda()
    params = [*net.parameters(), *head.parameters()]
    before = torch.cat([p.detach().flatten().float().cpu() for p in params])
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=init_scale, enabled=dtype == torch.float16)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(B, 3, 32, 32, generator=g).cuda(), torch.randint(0, C, (B,), generator=g).cuda()
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = head(net(x).float(), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    after = torch.cat([p.detach().flatten().float().cpu() for p in params])
    return float(loss.detach()), after - before, scaler.get_scale() if scaler.is_enabled() else 1.0


# bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per value), fp16 11 (2^-12 = 2.4e-4). The
# convolution's and the linear layer's inputs and weights are rounded once each (products accumulate in float32),
# so the embeddings and, through the same layers backwards, the gradients carry a few roundings: ~4 x 2^-9 = 8e-3
# (bf16) and ~4 x 2^-12 = 1e-3 (fp16) relative. Bounds with a margin of ~4: the loss within 3e-2 / 5e-3 relative
# (simulated with CPU autocast: 3e-4 / 3e-5), and the step's change of the parameters (-lr x grad) within
# 3e-2 / 5e-3 of its norm (simulated with CPU autocast: 6.5e-3 / 1.3e-3).
AMP_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_precision_step_is_finite_and_near_float32(dtype: torch.dtype) -> None:
    loss32, step32, _ = _one_step(None)
    loss, step, scale = _one_step(dtype)
    tol = AMP_TOL[dtype]
    assert scale == (128.0 if dtype == torch.float16 else 1.0)  # the fp16 step was applied, not skipped
    assert torch.isfinite(torch.tensor(loss)) and torch.isfinite(step).all()
    assert loss == pytest.approx(loss32, rel=tol)
    assert float((step - step32).norm() / step32.norm()) < tol


@pytest.mark.cuda
@needs_cuda
def test_fp16_overflow_skips_the_step_and_training_goes_on() -> None:
    """A scale of 2^60 overflows the fp16 backward: GradScaler finds inf, skips the update (the parameters stay
    those of the start) and halves its scale; with a scale that fits, the next steps update and stay finite."""
    torch.manual_seed(0)
    net, head = _Net().cuda(), build_head("arcface", num_classes=C, embedding_size=D, s=16.0).cuda()
    params = [*net.parameters(), *head.parameters()]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**60, growth_interval=1000)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(B, 3, 32, 32, generator=g).cuda(), torch.randint(0, C, (B,), generator=g).cuda()
    scales, changed = [], []
    for _ in range(60):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = head(net(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        changed.append(any(not torch.equal(p, b) for p, b in zip(params, before)))
    assert not changed[0] and scales[0] == 2.0**59  # skipped, scale halved
    assert changed[-1] and all(torch.isfinite(p).all() for p in params)  # later steps applied
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------
# CUDA: the trainer


@pytest.mark.cuda
@needs_cuda
def test_checkpoint_written_on_cuda_resumes_on_cpu_and_the_reverse(tmp_path: Path) -> None:
    for first, second in (("cuda", "cpu"), ("cpu", "cuda")):
        out = tmp_path / f"{first}_{second}"
        done = train(make_config(out, train={"steps": 2, "checkpoint_every": 2, "device": first}))
        assert done.step == 2
        resumed = train(make_config(out, train={"steps": 4, "checkpoint_every": 2, "device": second}), resume=True)
        assert resumed.step == 4 and all(map(torch.isfinite, torch.tensor(resumed.losses)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_losses(tmp_path: Path, backend: str, device: str) -> list[float]:
    """3 steps of the tiny run with head.shard = true in a process group of one rank on ``backend``."""
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", world_size=1, rank=0)
    try:
        cfg = make_config(tmp_path / backend, model=NO_DROPOUT, head={"name": "arcface", "kwargs": {"s": 16.0}, "shard": True},
                          train={"steps": 3, "device": device, "amp": False, "checkpoint_every": 0})
        return train(cfg).losses
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.cuda
@needs_cuda
def test_sharded_head_over_nccl_at_world_size_1_equals_gloo_on_cpu(tmp_path: Path) -> None:
    """The same sharded run on NCCL + CUDA and on gloo + CPU. Step 1's loss reads the same initial weights on both
    devices: float32 kernels differ only in summation order (~1e-6 relative), so 1e-4. Later steps follow
    updates whose first gradient norm is ~200 before clipping, amplifying that by ~100: 1e-2."""
    gloo = _sharded_losses(tmp_path, "gloo", "cpu")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        nccl = _sharded_losses(tmp_path, "nccl", "cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert all(map(math.isfinite, nccl))
    assert nccl[0] == pytest.approx(gloo[0], rel=1e-4)
    assert nccl == pytest.approx(gloo, rel=1e-2)


@pytest.mark.cuda
@needs_cuda
def test_faceforge_train_runs_the_demo_config_on_cuda_for_20_steps(tmp_path: Path) -> None:
    """The demo config, with fewer identities rendered (the demo's 16,000 images take longer than the test)."""
    out = tmp_path / "demo"
    done = _cli("train", str(REPO / "faceforge/configs/demo.yaml"), f"output={out}", "train.device=cuda",
                "train.steps=20", "train.log_every=5", "train.checkpoint_every=20", "train.eval_every=0",
                "data.num_identities=200", "data.eval_pairs=0", "train.progress=false")
    assert done.returncode == 0, done.stderr[-2000:]
    log = (out / "train.log").read_text()
    assert "device cuda" in log and "step 20/20" in log, log[-2000:]


@pytest.mark.cuda
@needs_cuda
def test_channels_last_gives_the_same_losses_on_cuda(tmp_path: Path) -> None:
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # float32 convolutions, so that only the summation order differs
    try:
        plain = _tiny_losses(tmp_path, "plain", device="cuda", amp=False)
        nhwc = _tiny_losses(tmp_path, "nhwc", device="cuda", amp=False, channels_last=True)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert nhwc == pytest.approx(plain, rel=CL_RTOL)


@pytest.mark.cuda
@needs_cuda
def test_model_compile_gives_the_eager_losses_on_cuda(tmp_path: Path) -> None:
    eager = _tiny_losses(tmp_path, "eager", device="cuda", amp=False, model=NO_DROPOUT)
    compiled = _tiny_losses(tmp_path, "compiled", device="cuda", amp=False, model={**NO_DROPOUT, "compile": True})
    assert compiled == pytest.approx(eager, rel=CL_RTOL)
