"""benchmarks/gpu_check.py (`make gpu-check`): its CPU smoke run writes every step to JSON and markdown; its grid
order; its peer heads against the textbook formula; and the load guard of benchmarks/timing.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import timing  # noqa: E402


def test_quick_cpu_run_writes_every_step_to_json_and_markdown(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--device", "cpu", "--quick",
                           "--budget", "600", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["sizes"] == "quick"
    results = data["results"]
    for step in gpu_check.STEPS:
        mine = [r for r in results if r["step"] == step]
        assert any(r["name"] == "done" for r in mine), (step, [r for r in mine if r["name"] == "failed"])
        assert len(mine) >= 2, step  # at least one measurement besides "done"
    assert not [r for r in results if r.get("status") == "error"], [r for r in results if r.get("status") == "error"]
    assert all("under_load" in r for r in results if r["step"] == "throughput" and r["name"] not in ("grid", "done"))
    cells = [r for r in results if r["step"] == "throughput" and r.get("status") == "ok"]
    assert cells and cells[0]["head"] == "faceforge"  # the most important cell ran first
    assert {r["head"] for r in cells} == set(gpu_check.HEADS)  # every head took a full training step
    assert any("faceforge_over_this" in r for r in cells)  # the ratio against a peer of the same run
    markdown = (out / "results.md").read_text()
    for step in gpu_check.STEPS:
        assert f"**{step}** done" in markdown


def test_grid_puts_r50_bf16_b512_1m_with_every_peer_first() -> None:
    cells = gpu_check.grid(gpu_check.FULL)
    first = cells[:4]
    assert {(c.backbone, c.dtype, c.batch, c.classes) for c in first} == {("r50", "bf16", 512, 1_000_000)}
    assert [c.head for c in first] == ["faceforge", "textbook", "pfc0.1", "pfc1.0"]
    deviations = [c.deviations(gpu_check.FULL) for c in cells]
    assert deviations == sorted(deviations)
    assert not any(c.head == "fused" and (c.classes != 10_000_000 or c.dtype == "fp16") for c in cells)


def _textbook_float64(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ArcFace (s 64, m 0.5) written out: s cos(theta_y + m) at the target, s cos elsewhere, mean cross-entropy."""
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()
    theta = torch.acos(cos[torch.arange(len(y)), y])
    logits = 64.0 * cos
    logits[torch.arange(len(y)), y] = 64.0 * torch.cos(theta + 0.5)
    return F.cross_entropy(logits, y)


def test_peer_heads_compute_arcface() -> None:
    """The textbook head and the PFC-style head at rate 1.0 give the ArcFace loss; at rate 0.25 the loss is over
    the positives and sampled negatives only, so it is below the full one (fewer terms in the logsumexp)."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.tensor([0, 3, 3, 7, 19, 12])
    textbook = gpu_check.TextbookHead(20, 8).double()
    expected = _textbook_float64(x, textbook.weight.detach(), y)
    # float64; the peer clamps acos's input at 1 - 1e-7, which moves nothing here (|cos| < 0.9)
    torch.testing.assert_close(textbook(x, y), expected, rtol=1e-12, atol=1e-12)
    full = gpu_check.PartialFCStyleHead(20, 8, 1.0).double()
    full.weight.data.copy_(textbook.weight.data)
    torch.testing.assert_close(full(x, y), expected, rtol=1e-12, atol=1e-12)
    sampled = gpu_check.PartialFCStyleHead(20, 8, 0.25).double()
    sampled.weight.data.copy_(textbook.weight.data)
    loss = sampled(x, y)
    assert loss < expected
    loss.backward()
    touched = sampled.weight.grad.abs().sum(1) > 0
    assert touched[y].all() and int(touched.sum()) == 5  # the 5 positives; num_sample 5 leaves no negative


def test_load_watch_marks_a_result_taken_above_the_core_count(monkeypatch: pytest.MonkeyPatch) -> None:
    loads = iter([0.5, 3.5])
    monkeypatch.setattr(timing, "load_average", lambda: next(loads))
    with timing.LoadWatch(cores_available=2) as load:
        pass
    assert load.record() == {"load_before": 0.5, "load_after": 3.5, "cores": 2, "under_load": True}
    assert "UNDER LOAD" in load.note()
    with pytest.raises(timing.UnderLoadError, match="RESULTS"):
        timing.refuse_under_load(load, "RESULTS")
    loads = iter([0.5, 1.5])
    with timing.LoadWatch(cores_available=2) as quiet:
        pass
    assert not quiet.under_load and quiet.note() == ""
    timing.refuse_under_load(quiet, "RESULTS")


def test_each_result_is_on_disk_as_soon_as_it_is_recorded(tmp_path: Path) -> None:
    """A run cut off after any result keeps it: results.json is rewritten whole (atomically) and results.md
    appended at every add."""
    rec = gpu_check.Recorder(tmp_path, {"device": "cpu"})
    with timing.LoadWatch() as load:
        pass
    rec.add("throughput", "cell 1", load, images_per_s=12.5)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["results"][0]["images_per_s"] == 12.5 and "under_load" in data["results"][0]
    rec.add("head", "cell 2", status="OOM")
    assert [r["name"] for r in json.loads((tmp_path / "results.json").read_text())["results"]] == ["cell 1", "cell 2"]
    assert (tmp_path / "results.md").read_text().count("\n- **") == 2
