"""`make gpu-check`: the whole GPU proof in one command, under 8 minutes on one H100/H200 from a fresh checkout.

    PYTHONPATH=. python3 benchmarks/gpu_check.py                      # the GPU machine's own python, no install
    python benchmarks/gpu_check.py --device cpu --quick              # every step at tiny sizes (the smoke test)
    PYTHONPATH=. python3 benchmarks/gpu_check.py --steps head,export # only some steps (a rerun)
    PYTHONUNBUFFERED=1 make gpu-check GPU_CHECK_ARGS="--out $OUT"     # on a lent GPU machine: results come back

Steps, in this order, each timed; every result is appended to runs/gpu_check/results.json (rewritten whole,
atomically, after each result) and runs/gpu_check/results.md (one line per result, appended), so that a run
cut off at any point keeps what it measured:

  1. pytest     ``pytest -m cuda``: tests/test_cuda.py (skipped without a GPU).
  2. throughput images/s of a full training step (backbone forward + backward, head, SGD) and peak memory,
                one GPU, synthetic tensors already on the device; the grid ordered by importance (r50, bf16,
                batch 512, 1M classes first; each deviation from that later), and at each size the same step
                with faceforge's head, the textbook head (F.linear on normalised features, margin,
                cross_entropy), a Partial-FC-style sampled head (insightface PartialFC_V2's algorithm, written
                here) at rate 0.1 and 1.0, and at 10M classes faceforge's fused-SGD head; the ratio
                faceforge / peer in the same run; a peer out of memory is recorded as OOM.
  3. head       the head alone at 1M and 10M classes, D 512, B 512, bf16 and fp32: time as a multiple of
                the three GEMMs (X W^T, G W, G^T X, measured here in 1M-class chunks) and peak memory as a
                multiple of |W|; faceforge's head and the fused-SGD head (docs/heads.md, "One GPU, 10M classes").
  4. data       RecordIO JPEG decode + flip through the trainer's own sampler and DataLoader with N workers,
                against step 2's r50 images/s: is the loader the bottleneck?
  5. export     an r100: eager vs BN-folded eager vs torch.compile on the device at batch 1 and 64; the ONNX
                export timed in ONNX Runtime (the CPU build: the CPU deployment figure).

A global budget (``--budget``, default 420 s) stops the grid early enough for steps 3 to 5 to run; a step that
fails is recorded with its error and the next step runs. Each result carries the host's load average before and
after (benchmarks/timing.py); one taken at a load above the core count is marked TAKEN UNDER LOAD.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from timing import LoadWatch  # noqa: E402  benchmarks/timing.py

from faceforge.backbones import build as build_backbone  # noqa: E402
from faceforge.core.fileio import atomic_open  # noqa: E402
from faceforge.heads import ArcFace  # noqa: E402
from faceforge.heads.fused_sgd import FusedSGDSoftmax, margin_target  # noqa: E402
from faceforge.train.device import configure_backends, prepare_backbone  # noqa: E402

S, M = 64.0, 0.5  # ArcFace
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
HEADS = ("faceforge", "textbook", "pfc0.1", "pfc1.0", "fused")
STEPS = ("pytest", "throughput", "head", "data", "export")


@dataclass(frozen=True)
class Sizes:
    """Every size of a run. The first value of each grid axis is the important one (module doc)."""

    backbones: tuple[str, ...] = ("r50", "r100")
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int = 112
    dtypes: tuple[str, ...] = ("bf16", "fp16", "fp32")
    batches: tuple[int, ...] = (512, 128)
    classes: tuple[int, ...] = (1_000_000, 10_000_000, 100_000)
    embedding: int = 512
    warmup: int = 2
    steps: int = 5
    cell_guess_s: float = 20.0  # expected seconds of a grid cell before one was measured
    head_classes: tuple[int, ...] = (1_000_000, 10_000_000)
    head_dtypes: tuple[str, ...] = ("bf16", "fp32")
    head_batch: int = 512
    head_repeats: int = 3
    gemm_chunk: int = 1_000_000
    data_images: int = 2048
    data_workers: tuple[int, ...] = (0, 4, 8, 15)
    data_batch: int = 128
    export_model: str = "r100"
    export_batches: tuple[int, ...] = (1, 64)
    export_repeats: int = 5
    pytest_timeout_s: float = 180.0
    reserve_s: float = 200.0  # kept from the grid for steps 3 to 5 (5 compiles an r100 twice: ~1 to 2 min)


FULL = Sizes()
QUICK = Sizes(  # one cell per head, float32 only: bf16 convolutions are emulated (slow) on most CPUs
    backbones=("r18",), backbone_kwargs={"width": 0.0625}, image_size=32, dtypes=("fp32",),
    batches=(4,), classes=(2000,), embedding=32, warmup=1, steps=1, cell_guess_s=1.0,
    head_classes=(2000, 20000), head_dtypes=("fp32",), head_batch=16, head_repeats=1, gemm_chunk=8192, data_images=48,
    data_workers=(0, 1), data_batch=16, export_model="r18", export_batches=(1, 4), export_repeats=1,
    pytest_timeout_s=60.0, reserve_s=20.0,
)


# ----------------------------------------------------------------------------------------------
# Recording


class Recorder:
    """results.json (``{"meta": .., "results": [..]}``, rewritten atomically after each result) and results.md
    (one line appended per result) under ``out``."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.json_path, self.md_path = out / "results.json", out / "results.md"
        self.data: dict[str, Any] = {"meta": meta, "results": []}
        self._write_json()
        lines = ["# gpu_check", "", *(f"- {k}: {v}" for k, v in meta.items()), ""]
        with atomic_open(self.md_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _write_json(self) -> None:
        with atomic_open(self.json_path, "w") as f:
            json.dump(self.data, f, indent=1, default=str)

    def add(self, step: str, name: str, load: LoadWatch | None = None, **fields: Any) -> dict[str, Any]:
        record = {"step": step, "name": name, **fields, **(load.record() if load is not None else {})}
        self.data["results"].append(record)
        self._write_json()
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in fields.items() if k not in ("error_trace",))
        mark = f" **{load.note()}**" if load is not None and load.under_load else ""
        with open(self.md_path, "a") as f:
            f.write(f"- **{step}** {name}: {shown}{mark}\n")
        print(f"[{step}] {name}: {shown}{mark}", flush=True)
        return record

    def find(self, step: str, **match: Any) -> dict[str, Any] | None:
        for r in self.data["results"]:
            if r["step"] == step and all(r.get(k) == v for k, v in match.items()):
                return r
        return None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def environment(device: torch.device) -> dict[str, Any]:
    """What ran it: the GPU, driver, torch, CUDA and cuDNN versions, python, cores."""
    meta: dict[str, Any] = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "device": str(device),
                            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "cudnn": torch.backends.cudnn.version(), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            meta["driver"] = smi.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            meta["driver"] = None
    return meta


# ----------------------------------------------------------------------------------------------
# Device helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """torch.cuda.max_memory_allocated since the last reset_peak; None on the CPU (not measured here)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def seconds_per_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Mean wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls, the device synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


OOM_ERRORS = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t)


def is_oom(e: BaseException) -> bool:
    """A CUDA out-of-memory error (by type where torch has one, else by its message)."""
    return isinstance(e, OOM_ERRORS) or "out of memory" in str(e).lower()


def gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


# ----------------------------------------------------------------------------------------------
# The peer heads, written here from their algorithms


def arcface_logits(cos: Tensor, labels: Tensor, s: float = S, m: float = M) -> Tensor:
    """s cos(theta_y + m) in each row's target column, s cos elsewhere (arcface_torch's way: acos, add, cos)."""
    cos = cos.to(torch.promote_types(cos.dtype, torch.float32)).clamp(-1.0, 1.0)  # half -> float32, as insightface
    index = labels.unsqueeze(1)
    theta = torch.acos(cos.gather(1, index).clamp(-1 + 1e-7, 1 - 1e-7))
    return s * cos.scatter(1, index, torch.cos(theta + m))


class TextbookHead(nn.Module):
    """ArcFace as usually written: F.linear(normalize(x), normalize(W)) (the whole (B, C) logits, under the
    caller's autocast), the margin, F.cross_entropy."""

    def __init__(self, num_classes: int, embedding: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding).normal_(std=0.01))

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        cos = F.linear(F.normalize(x), F.normalize(self.weight))
        return F.cross_entropy(arcface_logits(cos, labels), labels)


class PartialFCStyleHead(nn.Module):
    """Partial FC on one GPU (the algorithm of insightface's PartialFC_V2, written from its description): keep
    the positive classes of the batch and fill up to ``rate * C`` rows with uniformly drawn negatives, remap the
    labels into that subset, gather those rows of the full W (autograd scatters their gradient into a dense
    (C, D) gradient, and SGD keeps dense momentum), then ArcFace on the subset. rate 1.0 = every class."""

    def __init__(self, num_classes: int, embedding: int, rate: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding).normal_(std=0.01))
        self.num_sample = max(1, int(rate * num_classes))

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        weight = self.weight
        if self.num_sample < weight.shape[0]:
            with torch.no_grad():
                positive = torch.unique(labels, sorted=True)
                score = torch.rand(weight.shape[0], device=weight.device)
                score[positive] = 2.0
                index = torch.topk(score, k=max(self.num_sample, len(positive)))[1].sort()[0]
                labels = torch.searchsorted(index, labels)
            weight = weight[index]
        cos = F.linear(F.normalize(x), F.normalize(weight))
        return F.cross_entropy(arcface_logits(cos, labels), labels)


def make_head(kind: str, num_classes: int, embedding: int, device: torch.device, lr: float,
              gemm_dtype: torch.dtype | None = None) -> nn.Module:
    """One of HEADS, built on ``device`` (W initialised there: 5G values at 10M classes would take half a minute
    on the CPU); ``gemm_dtype``: the fused head's GEMMs from a copy of W in that dtype."""
    with torch.device(device):
        if kind == "faceforge":
            return ArcFace(num_classes, embedding, s=S, m=M)
        if kind == "textbook":
            return TextbookHead(num_classes, embedding)
        if kind.startswith("pfc"):
            return PartialFCStyleHead(num_classes, embedding, float(kind[3:]))
        if kind == "fused":
            return FusedSGDSoftmax(num_classes, embedding, margin_target(S, m2=M), scale=S, lr=lr, momentum=0.9,
                                   weight_decay=5e-4, device=device, gemm_dtype=gemm_dtype)
    raise ValueError(f"head {kind!r}: expected one of {HEADS}")


# ----------------------------------------------------------------------------------------------
# Step 1: pytest -m cuda


def step_pytest(rec: Recorder, sizes: Sizes, device: torch.device, budget: "Budget") -> None:
    """``pytest -m cuda -v`` into ``pytest.log`` beside the results, so that a run stopped at its timeout still
    tells which tests passed and failed."""
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    timeout = min(sizes.pytest_timeout_s, max(5.0, budget.left()))
    log = rec.json_path.with_name("pytest.log")
    with LoadWatch() as load, open(log, "w") as out:
        t0 = time.perf_counter()
        try:
            code: int | str = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                             timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = f"timeout after {timeout:.0f} s"
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    outcomes = {word: [line.split(" ")[0].split("::")[-1] for line in lines if "::" in line and f" {word}" in line]
                for word in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    rec.add("pytest", "pytest -m cuda", load, exit_code=code, summary=lines[-1] if lines else "",
            passed=len(outcomes["PASSED"]), skipped=len(outcomes["SKIPPED"]),
            failed=outcomes["FAILED"] + outcomes["ERROR"], log=log.name, seconds=round(time.perf_counter() - t0, 1))


# ----------------------------------------------------------------------------------------------
# Step 2: throughput


@dataclass(frozen=True)
class Cell:
    backbone: str
    dtype: str
    batch: int
    classes: int
    head: str

    def deviations(self, sizes: Sizes) -> int:
        firsts = (sizes.backbones[0], sizes.dtypes[0], sizes.batches[0], sizes.classes[0])
        return sum(a != b for a, b in zip((self.backbone, self.dtype, self.batch, self.classes), firsts))

    def key(self, sizes: Sizes) -> tuple:
        return (self.deviations(sizes), sizes.backbones.index(self.backbone), sizes.dtypes.index(self.dtype),
                sizes.batches.index(self.batch), sizes.classes.index(self.classes), HEADS.index(self.head))


def grid(sizes: Sizes) -> list[Cell]:
    """Every cell, most important first (fewest deviations from r50 / bf16 / B 512 / 1M, then axis order). The
    fused head is tried at the largest class count only, and not under fp16 (its in-backward update cannot undo
    a GradScaler's scale)."""
    cells = [Cell(b, d, n, c, h) for b in sizes.backbones for d in sizes.dtypes for n in sizes.batches
             for c in sizes.classes for h in HEADS
             if h != "fused" or (c == max(sizes.classes) and d != "fp16")]
    return sorted(cells, key=lambda cell: cell.key(sizes))


class Budget:
    """Seconds left of the run's budget."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def synthetic_batch(batch: int, classes: int, size: int, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    return images, torch.randint(0, classes, (batch,), generator=g).to(device)


def training_step(backbone: nn.Module, head: nn.Module, dtype: torch.dtype | None, device: torch.device,
                  images: Tensor, labels: Tensor, lr: float = 0.1) -> Callable[[], None]:
    """One full step as a closure: backbone under autocast (``dtype``; fp16 with a GradScaler), the head, SGD on
    the backbone and the head's parameters (the fused head updates its W in its own backward)."""
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            embeddings = backbone(images)
            loss = head(embeddings.float(), labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def run_cell(cell: Cell, sizes: Sizes, device: torch.device, backbones: dict[str, nn.Module]) -> dict[str, Any]:
    """images/s and peak memory of one cell, or {"status": "OOM"}."""
    head = None
    try:
        reset_peak(device)
        backbone = backbones[cell.backbone]
        images, labels = synthetic_batch(cell.batch, cell.classes, sizes.image_size, device)
        head = make_head(cell.head, cell.classes, sizes.embedding, device, lr=0.1, gemm_dtype=DTYPES[cell.dtype])
        step = training_step(backbone, head, DTYPES[cell.dtype], device, images, labels)
        seconds = seconds_per_call(step, device, sizes.warmup, sizes.steps)
        return {"status": "ok", "images_per_s": round(cell.batch / seconds, 1), "step_s": round(seconds, 4),
                "peak_gib": gib(peak_bytes(device))}
    except Exception as e:
        if not is_oom(e):
            raise
        return {"status": "OOM", "peak_gib": gib(peak_bytes(device))}
    finally:
        del head
        reset_peak(device)


def step_throughput(rec: Recorder, sizes: Sizes, device: torch.device, budget: Budget) -> None:
    backbones: dict[str, nn.Module] = {}
    cell_s, skipped = sizes.cell_guess_s, 0
    for cell in grid(sizes):
        if budget.left() - sizes.reserve_s < cell_s:
            skipped += 1
            continue
        if cell.backbone not in backbones:
            torch.manual_seed(0)
            model = build_backbone(cell.backbone, embedding_size=sizes.embedding, input_size=sizes.image_size,
                                   **sizes.backbone_kwargs)
            backbones[cell.backbone] = prepare_backbone(model.to(device), channels_last=device.type == "cuda")
        t0 = time.perf_counter()
        with LoadWatch() as load:
            try:
                result = run_cell(cell, sizes, device, backbones)
            except Exception as e:  # a failing cell is recorded; the grid goes on
                result = {"status": "error", "error": f"{type(e).__name__}: {e}"[:300]}
        cell_s = max(cell_s if result["status"] != "ok" else 0.0, time.perf_counter() - t0)
        mine = rec.find("throughput", backbone=cell.backbone, dtype=cell.dtype, batch=cell.batch,
                        classes=cell.classes, head="faceforge", status="ok")
        if cell.head != "faceforge" and mine is not None and result.get("status") == "ok":
            result["faceforge_over_this"] = round(mine["images_per_s"] / result["images_per_s"], 3)
        rec.add("throughput", f"{cell.backbone} {cell.dtype} B{cell.batch} C{cell.classes} {cell.head}", load,
                backbone=cell.backbone, dtype=cell.dtype, batch=cell.batch, classes=cell.classes, head=cell.head,
                **result, seconds=round(time.perf_counter() - t0, 1))
    rec.add("throughput", "grid", cells=len(grid(sizes)), skipped_for_budget=skipped,
            channels_last=device.type == "cuda", cudnn_benchmark=torch.backends.cudnn.benchmark)


# ----------------------------------------------------------------------------------------------
# Step 3: the head alone


def gemm_seconds(classes: int, sizes: Sizes, dtype: torch.dtype, device: torch.device) -> float:
    """Seconds of the three GEMMs of a head step, X W^T (B, C), G W (B, D), G^T X (C, D), timed on one chunk of
    ``gemm_chunk`` classes and scaled to ``classes`` (same FLOPs and bytes per class; bounded memory)."""
    chunk = min(classes, sizes.gemm_chunk)
    b, d = sizes.head_batch, sizes.embedding
    x = torch.randn(b, d, device=device, dtype=dtype)
    w = torch.randn(chunk, d, device=device, dtype=dtype)
    g = torch.randn(b, chunk, device=device, dtype=dtype)

    def three() -> None:
        x @ w.t()
        g @ w
        g.t() @ x

    seconds = seconds_per_call(three, device, 1, sizes.head_repeats)
    del x, w, g
    return seconds * classes / chunk


def head_call(kind: str, classes: int, dtype_name: str, sizes: Sizes, device: torch.device) -> tuple[Callable[[], None], int]:
    """(one forward + backward of the head, |W| in bytes as it is stored). faceforge's head keeps W in the
    dtype (bf16: half the bytes; its logits run in float32); the fused head keeps float32 W + momentum and a bf16
    copy for its GEMMs in bf16."""
    dtype = DTYPES[dtype_name] or torch.float32
    if kind == "faceforge":
        head = make_head("faceforge", classes, sizes.embedding, device, lr=0.1).to(dtype=dtype)
    else:
        head = make_head("fused", classes, sizes.embedding, device, lr=0.1,
                         gemm_dtype=None if dtype == torch.float32 else dtype)
    x = torch.randn(sizes.head_batch, sizes.embedding, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, classes, (sizes.head_batch,), device=device)

    def call() -> None:
        if kind == "faceforge":
            head.weight.grad = None  # each call writes a fresh gradient, as after the optimiser's zero_grad
        head(x, labels).backward()

    return call, head.weight.numel() * head.weight.element_size()


def step_head(rec: Recorder, sizes: Sizes, device: torch.device, budget: Budget) -> None:
    for classes in sizes.head_classes:
        for dtype_name in sizes.head_dtypes:
            if budget.left() < 2 * sizes.cell_guess_s:
                rec.add("head", f"C{classes} {dtype_name}", status="skipped: budget")
                continue
            gemm_dtype = DTYPES[dtype_name] or torch.float32
            with LoadWatch() as load:
                try:
                    gemms = gemm_seconds(classes, sizes, gemm_dtype, device)
                    status = {"gemm_s": round(gemms, 5)}
                except Exception as e:
                    gemms, status = math.nan, {"gemm_error": f"{type(e).__name__}: {e}"[:200]}
            rec.add("head", f"GEMMs C{classes} {dtype_name}", load, classes=classes, dtype=dtype_name, **status)
            for kind in ("faceforge", "fused"):
                with LoadWatch() as load:
                    result = _measure_head(kind, classes, dtype_name, sizes, device, gemms)
                rec.add("head", f"{kind} C{classes} {dtype_name}", load, classes=classes, dtype=dtype_name, head=kind,
                        **result)


def _measure_head(kind: str, classes: int, dtype_name: str, sizes: Sizes, device: torch.device,
                  gemms: float) -> dict[str, Any]:
    call = None
    try:
        reset_peak(device)
        call, w_bytes = head_call(kind, classes, dtype_name, sizes, device)
        seconds = seconds_per_call(call, device, 1, sizes.head_repeats)
        peak = peak_bytes(device)
        return {"status": "ok", "head_s": round(seconds, 5), "x_gemms": round(seconds / gemms, 3),
                "w_gib": gib(w_bytes), "peak_gib": gib(peak), "peak_over_w": None if peak is None else round(peak / w_bytes, 2)}
    except Exception as e:
        if is_oom(e):
            return {"status": "OOM", "peak_gib": gib(peak_bytes(device))}
        return {"status": "error", "error": f"{type(e).__name__}: {e}"[:300]}
    finally:
        del call
        reset_peak(device)


# ----------------------------------------------------------------------------------------------
# Step 4: the data path


def step_data(rec: Recorder, sizes: Sizes, device: torch.device, budget: Budget) -> None:
    from faceforge.data.recordio import encode_image, write
    from faceforge.data.samplers import SAMPLERS, SamplerContext
    from faceforge.data.synthetic import render_images
    from faceforge.train.config import config_from_dict
    from faceforge.train.data import build_dataset

    import numpy as np

    n = sizes.data_images
    ids = np.arange(n) // 16
    with tempfile.TemporaryDirectory() as folder:
        prefix = Path(folder) / "train"
        t0 = time.perf_counter()
        images = render_images(ids, np.arange(n) % 16, image_size=112)
        write(prefix, [(encode_image(im, "jpeg", 95), int(i)) for im, i in zip(images, ids)])
        del images
        rec.add("data", "write RecordIO", images=n, seconds=round(time.perf_counter() - t0, 1))
        cfg = config_from_dict({"output": folder, "model": {"backbone": "r50"}, "head": {"name": "arcface"},
                                "data": {"name": "recordio", "path": str(prefix), "image_size": 112,
                                         "batch_size": sizes.data_batch, "eval_pairs": 0}}, "<gpu_check>")
        dataset = build_dataset(cfg)
        step = rec.find("throughput", backbone=sizes.backbones[0], dtype=sizes.dtypes[0], batch=sizes.batches[0],
                        classes=sizes.classes[0], head="faceforge", status="ok")
        step_rate = step["images_per_s"] if step else None
        for workers in sizes.data_workers:
            if budget.left() < 5:
                rec.add("data", f"workers {workers}", status="skipped: budget")
                continue
            with LoadWatch() as load:
                rate, first_s = _loader_rate(dataset, sizes, workers, device, SAMPLERS, SamplerContext)
            fields: dict[str, Any] = {"workers": workers, "images_per_s": round(rate, 1), "first_batch_s": round(first_s, 2)}
            if step_rate:
                fields |= {"step_images_per_s": step_rate, "loader_is_bottleneck": rate < step_rate,
                           "loader_over_step": round(rate / step_rate, 3)}
            rec.add("data", f"decode+flip, {workers} workers", load, **fields)


def _loader_rate(dataset: Any, sizes: Sizes, workers: int, device: torch.device, samplers: Any,
                 context_cls: Any) -> tuple[float, float]:
    """(images/s after the first batch, seconds to the first batch) of one epoch through the trainer's epoch
    sampler (decode in the workers, flip in the main process), each batch copied to ``device`` (pinned,
    non_blocking on CUDA)."""
    micro = len(dataset) // sizes.data_batch
    context = context_cls(dataset=dataset, batch_size=sizes.data_batch, world_size=1, rank=0, seed=0, grad_accum=1,
                          micro_per_epoch=micro, flip=True, num_workers=workers, pin_memory=device.type == "cuda")
    sampler = samplers.build("epoch", context=context)
    t0 = time.perf_counter()
    first, count = None, 0
    for batch in sampler.batches(0, 0):
        batch.to(device, non_blocking=True)
        if first is None:
            first = time.perf_counter()
        else:
            count += len(batch.labels)
    sync(device)
    end = time.perf_counter()
    first = first if first is not None else end
    return count / max(end - first, 1e-9), first - t0


# ----------------------------------------------------------------------------------------------
# Step 5: export and inference


def step_export(rec: Recorder, sizes: Sizes, device: torch.device, budget: Budget) -> None:
    from bench_export import with_batch_statistics  # benchmarks/bench_export.py: BN statistics of real faces

    from faceforge.backbones.fuse import fuse_bn
    from faceforge.deploy.export import export_backbone, real_faces
    from faceforge.deploy.inference import OnnxBackend
    from faceforge.deploy.modelfile import ModelInfo

    torch.manual_seed(0)
    info = ModelInfo(backbone=sizes.export_model, embedding_size=512, backbone_kwargs=dict(sizes.backbone_kwargs))
    model = with_batch_statistics(build_backbone(sizes.export_model, **sizes.backbone_kwargs), real_faces(112))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        with LoadWatch() as load:
            t0 = time.perf_counter()
            report = export_backbone(model, info, path)
        rec.add("export", f"ONNX export {sizes.export_model}", load, seconds=round(time.perf_counter() - t0, 1),
                bn_folded=report.bn_folded, parity_min_cosine=round(report.parity_min_cosine, 6), size_mib=round(path.stat().st_size / 2**20, 1))
        variants = _inference_variants(model, fuse_bn, device, compile_ok=device.type == "cuda")
        session = OnnxBackend(path)
        for batch in sizes.export_batches:
            x = torch.randn(batch, 3, 112, 112)
            xd = x.to(device)
            for name, fn in variants.items():
                if fn is None:
                    rec.add("export", f"{name} B{batch}", status="skipped: torch.compile is timed on the GPU only "
                            "(inductor's C++ compile of an r100 takes minutes on this CPU)")
                    continue
                if budget.left() < 3:
                    rec.add("export", f"{name} B{batch}", status="skipped: budget")
                    continue
                with LoadWatch() as load:
                    result = _time_inference(lambda fn=fn: fn(xd), device, sizes)
                rec.add("export", f"{name} B{batch} on {device.type}", load, batch=batch, **result)
            with LoadWatch() as load:
                result = _time_inference(lambda: session(x.numpy()), torch.device("cpu"), sizes)
            rec.add("export", f"onnxruntime-cpu B{batch}", load, batch=batch, **result)


def _inference_variants(model: nn.Module, fuse_bn: Callable, device: torch.device,
                        compile_ok: bool) -> dict[str, Callable[[Tensor], Any] | None]:
    eager = model.to(device).eval()
    folded = fuse_bn(eager).eval()
    compiled = torch.compile(folded) if compile_ok else None

    def run(m: nn.Module) -> Callable[[Tensor], Any]:
        def call(x: Tensor) -> Any:
            with torch.no_grad():
                return m(x)
        return call

    return {"eager": run(eager), "bn-folded": run(folded), "compiled": run(compiled) if compiled is not None else None}


def _time_inference(fn: Callable[[], Any], device: torch.device, sizes: Sizes) -> dict[str, Any]:
    try:
        t0 = time.perf_counter()
        fn()  # the first call (torch.compile compiles here)
        sync(device)
        first = time.perf_counter() - t0
        seconds = seconds_per_call(fn, device, 1, sizes.export_repeats)
        return {"status": "ok", "ms": round(seconds * 1e3, 3), "first_call_s": round(first, 2)}
    except Exception as e:
        return {"status": "error", "error": f"{type(e).__name__}: {e}"[:300]}


# ----------------------------------------------------------------------------------------------
# Main


STEP_FUNCTIONS: dict[str, Callable[[Recorder, Sizes, torch.device, Budget], None]] = {
    "pytest": step_pytest, "throughput": step_throughput, "head": step_head, "data": step_data, "export": step_export,
}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"gpu_check: --device cuda: no CUDA device here (torch {torch.__version__}); "
                         "expected --device cpu or auto")
    return torch.device(name)


def run(steps: Iterator[str] | list[str], sizes: Sizes, device: torch.device, out: Path, budget_s: float) -> Path:
    """Run ``steps`` in order, each guarded, and return the results.json path."""
    budget = Budget(budget_s)
    configure_backends(device.type == "cuda")
    rec = Recorder(out, {**environment(device), "sizes": "quick" if sizes == QUICK else "full", "budget_s": budget_s})
    for name in steps:
        t0 = time.perf_counter()
        try:
            STEP_FUNCTIONS[name](rec, sizes, device, budget)
            rec.add(name, "done", seconds=round(time.perf_counter() - t0, 1), budget_left_s=round(budget.left(), 1))
        except Exception as e:  # a step's failure is a result; the next step runs
            rec.add(name, "failed", error=f"{type(e).__name__}: {e}"[:500], seconds=round(time.perf_counter() - t0, 1),
                    error_trace=traceback.format_exc()[-2000:])
    return rec.json_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every step (not for RESULTS.md)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole check (default 420; quick 120)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_check"))
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEP_FUNCTIONS]
    if unknown:
        p.error(f"--steps: unknown {unknown}; expected a subset of {','.join(STEPS)}")
    sizes = QUICK if args.quick else FULL
    budget = args.budget if args.budget is not None else (120.0 if args.quick else 420.0)
    device = pick_device(args.device)
    if device.type == "cpu" and args.quick:
        torch.set_num_threads(1)  # tiny ops on a shared CPU: OpenMP threads spin against other processes (10x slower)
    path = run(steps, sizes, device, Path(args.out), budget)
    print(f"results: {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
