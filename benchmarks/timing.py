"""Wall-clock timing for the benchmarks: one call of a function, timed, its result kept; and the machine's load
around a measurement, so that no figure taken on a busy machine is recorded as if it were quiet.

    with LoadWatch() as load:        # reads the 1-minute load average before and after
        ...measure...
    load.record()                    # {"load_before": .., "load_after": .., "cores": .., "under_load": ..}
    load.note()                      # "" when quiet, else the plain warning to print beside the figures

A result is "under load" when the load average before or after exceeds the cores this process may use: other
processes then shared the cores, and times (and ratios whose two sides suffered unequally) are not the
machine's. `run_all.py` and `gpu_check.py` mark such results; `refuse_under_load` stops a writer that must not
write them.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def timed(f: Callable[[], T]) -> tuple[float, T]:
    """``(wall seconds, f())`` of one call."""
    t0 = time.perf_counter()
    out = f()
    return time.perf_counter() - t0, out


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask; os.cpu_count() where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average (runnable + uninterruptible processes, Linux /proc/loadavg); nan where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


class LoadWatch:
    """The load average before and after a block (see the module doc); ``cores`` defaults to :func:`cores`."""

    def __init__(self, cores_available: int | None = None) -> None:
        self.cores = cores_available if cores_available is not None else cores()
        self.before = self.after = float("nan")

    def __enter__(self) -> "LoadWatch":
        self.before = load_average()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.after = load_average()

    @property
    def under_load(self) -> bool:
        """True when the load before or after exceeded the core count (an unknown load counts as quiet)."""
        return any(v > self.cores for v in (self.before, self.after))

    def record(self) -> dict[str, Any]:
        return {"load_before": round(self.before, 2), "load_after": round(self.after, 2), "cores": self.cores,
                "under_load": self.under_load}

    def note(self) -> str:
        """"" when quiet; else one line saying plainly that the figures were taken under load."""
        if not self.under_load:
            return ""
        return (f"TAKEN UNDER LOAD: load average {self.before:.2f} before, {self.after:.2f} after, on {self.cores} "
                f"cores; do not record these figures as the machine's")


class UnderLoadError(RuntimeError):
    """A result was taken at a load above the core count and the writer was told not to write such results."""


def refuse_under_load(load: LoadWatch, what: str) -> None:
    """Raise UnderLoadError naming ``what`` when ``load`` was above the core count."""
    if load.under_load:
        raise UnderLoadError(f"{what}: not written, {load.note()}")
