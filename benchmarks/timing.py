"""Wall-clock timing for the benchmarks: one call of a function, timed, its result kept."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def timed(f: Callable[[], T]) -> tuple[float, T]:
    """``(wall seconds, f())`` of one call."""
    t0 = time.perf_counter()
    out = f()
    return time.perf_counter() - t0, out
