"""A run's life outside its steps: stop signals, a resumed run's log, what changed since the checkpoint,
and the training records skipped as unreadable.

- :class:`StopSignals`: while active, SIGINT / SIGTERM set a flag instead of killing the process; the
  trainer checks it after each step, writes a checkpoint and raises :class:`TrainingInterrupted`. A second
  signal acts at once (the default handlers are back).
- :func:`drop_replayed_steps`: a resumed run replays the steps after its last checkpoint; their lines of
  the killed run leave ``train.log`` so that no step shows twice (TensorBoard: ``purge_step``).
- :func:`config_changes`: the dotted config keys whose values differ from the checkpoint's config.
- :func:`bad_records`: the entries of ``bad_records.txt`` (``data.skip_bad``).
"""

from __future__ import annotations

import re
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from faceforge.fileio import write_text

__all__ = [
    "BAD_RECORDS_NAME", "StopSignals", "TrainingInterrupted", "bad_records", "config_changes", "drop_replayed_steps",
]

BAD_RECORDS_NAME = "bad_records.txt"


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by SIGINT / SIGTERM after writing a checkpoint; the message says how to resume."""


class StopSignals:
    """``with StopSignals() as stop:`` ... ``if stop.requested: ...``. Only in the main thread (signal handlers
    can be installed nowhere else); elsewhere it never requests a stop. ``stop.name`` is the signal's name."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.name = signal.Signals(signum).name
        self._restore()  # a second Ctrl-C stops at once

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()


# "... step 12/100 epoch ...", "... eval step 12: ...", "... diagnostics step 12: ...", "... (step 12)"
_STEP_LINE = re.compile(r" (?:step (\d+)/\d+ epoch |eval step (\d+):|diagnostics step (\d+):|checkpoint: .* \(step (\d+)\)$)")


def drop_replayed_steps(log: Path, step: int) -> int:
    """Remove from ``log`` the lines of steps after ``step`` (written by a run killed after its last checkpoint,
    at ``step``, and about to be replayed). Other lines stay. Returns how many lines were removed."""
    if not log.is_file():
        return 0
    kept, dropped = [], 0
    for line in log.read_text().splitlines(keepends=True):
        m = _STEP_LINE.search(line.rstrip("\n"))
        if m and int(next(g for g in m.groups() if g)) > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        write_text(log, "".join(kept))
    return dropped


def config_changes(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two config dicts (``optim.lr``, ``data.batch_size``)."""
    changed: list[str] = []
    for key in [*current, *(k for k in saved if k not in current)]:
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def bad_records(path: Path) -> list[str]:
    """The distinct lines of a ``bad_records.txt`` (one per skipped record, the first time it was met)."""
    if not path.is_file():
        return []
    return list(dict.fromkeys(line for line in path.read_text().splitlines() if line.strip()))
