"""Resident memory of this process, for the benchmarks' memory columns (Linux /proc), and the fresh
child process each measurement runs in."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Callable, Sequence


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB: ``VmRSS`` (now) or ``VmHWM`` (peak since start or reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: write 5 to clear_refs); a no-op where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_growth_bytes(step: Callable[[], object]) -> float:
    """How far one call of ``step()`` raises this process's peak RSS above its RSS before the call, in bytes.
    Run it in a fresh process (see :func:`child_json`), after a warm-up, so that nothing else counts."""
    before = status_kib("VmRSS")
    reset_peak_rss()
    step()
    return (status_kib("VmHWM") - before) * 1024.0


def child_json(argv: Sequence[str]) -> dict:
    """Run ``python argv...`` in a fresh process and read back the JSON object on its last stdout line."""
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def held_kib() -> int:
    """``VmRSS`` after returning freed heap memory to the kernel (glibc ``malloc_trim(0)``), in KiB: what this
    process still holds, not what its allocator keeps cached. Plain ``VmRSS`` where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return status_kib("VmRSS")
