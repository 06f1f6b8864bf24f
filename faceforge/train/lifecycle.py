"""A run's life outside its steps: stop signals, a resumed run's log, what changed since the checkpoint,
and the training records skipped as unreadable.

- :class:`StopSignals`: while active, SIGINT / SIGTERM set a flag instead of killing the process; the
  trainer checks it after each step, writes a checkpoint and raises :class:`TrainingInterrupted`. A second
  signal acts at once (the default handlers are back).
- :func:`drop_replayed_steps`: a resumed run replays the steps after its last checkpoint; their lines of
  the killed run leave ``train.log`` so that no step shows twice (TensorBoard: ``purge_step``).
- :func:`config_changes`: the dotted config keys whose values differ from the checkpoint's config;
  :data:`RESUME_POLICY` and :func:`resume_policy`: which of them a resumed run applies and which it refuses.
- :func:`bad_records`: the entries of ``bad_records.txt`` (``data.skip_bad``).
"""

from __future__ import annotations

import fnmatch
import re
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Literal, NamedTuple

from faceforge.core.fileio import write_text

__all__ = [
    "APPLIED", "BAD_RECORDS_NAME", "REFUSED", "RESUME_POLICY", "ConfigChange", "ResumeRule", "StopSignals",
    "TrainingInterrupted", "bad_records", "config_changes", "config_diff", "drop_replayed_steps", "resume_policy",
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


MISSING: Any = type("Missing", (), {"__repr__": lambda self: "(not set)"})()  # a key one config dict lacks


class ConfigChange(NamedTuple):
    """One dotted key whose value differs: ``old`` (the checkpoint's) and ``new`` (this run's), MISSING if absent."""

    key: str
    old: Any
    new: Any


def config_diff(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[ConfigChange]:
    """The dotted keys whose values differ between two config dicts, with both values, in ``current``'s order."""
    changed: list[ConfigChange] = []
    for key in [*current, *(k for k in saved if k not in current)]:
        a, b = saved.get(key, MISSING), current.get(key, MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(ConfigChange(f"{prefix}{key}", a, b))
    return changed


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two config dicts (``optim.lr``, ``data.batch_size``)."""
    return [change.key for change in config_diff(saved, current)]


# --- what a resumed run does with a changed key ---------------------------------------------------------------

APPLIED: Literal["applied"] = "applied"
REFUSED: Literal["refused"] = "refused"


class ResumeRule(NamedTuple):
    """Keys matching ``pattern`` (a dotted key, a section, or an ``fnmatch`` pattern) are applied or refused."""

    pattern: str
    policy: Literal["applied", "refused"]
    why: str


# The first matching rule decides (specific keys before their section). ``docs/training.md`` shows this table.
# applied: the run is built from the new config and the optimiser's groups and the schedule take the new values
# from the resumed step (the lr of step k is the one a run started with the new config would use at step k).
# refused: the checkpoint's weights, optimiser state or data order would not mean the same thing.
RESUME_POLICY: tuple[ResumeRule, ...] = (
    ResumeRule("output", APPLIED, "the run folder is where the checkpoint is"),
    ResumeRule("seed", REFUSED, "it draws the data order, the flips and the synthetic identities"),
    ResumeRule("model.grad_checkpointing", APPLIED, "memory only: the same gradients"),
    ResumeRule("model.compile", APPLIED, "execution only: the same weights and checkpoint keys"),
    ResumeRule("model", REFUSED, "the backbone's weights are built from it; init_from acts at step 0 only"),
    ResumeRule("head.shard", APPLIED, "sharding is a strategy: the checkpoint holds W as one logical tensor"),
    ResumeRule("head", REFUSED, "the class weights and the loss are the head's"),
    ResumeRule("objective", REFUSED, "the objective's own state (teacher, learned terms) is its"),
    ResumeRule("data.batch_size", APPLIED, "from the resumed step (the data order of later epochs changes)"),
    ResumeRule("data.kwargs.eval_identities", REFUSED, "glyphs draw the test characters with the training ones"),
    ResumeRule("data.kwargs.eval_pairs", APPLIED, "evaluation only"),
    ResumeRule("data.eval_*", APPLIED, "evaluation only"),
    ResumeRule("data.num_workers", APPLIED, "loading only"),
    ResumeRule("data.kwargs.cache", APPLIED, "loading only"),
    ResumeRule("data.flip", APPLIED, "augmentation, drawn per step"),
    ResumeRule("data.mask_ratio", APPLIED, "augmentation, drawn per step"),
    ResumeRule("data.augment", APPLIED, "augmentation, drawn per (epoch, image)"),
    ResumeRule("data.skip_bad", APPLIED, "what an unreadable record does"),
    ResumeRule("data", REFUSED, "the training images and classes (the head's rows) and the sampler's state"),
    ResumeRule("optim.name", REFUSED, "the optimiser state is this optimiser's"),
    ResumeRule("optim.no_decay_bn_bias", REFUSED, "it changes the optimiser's parameter groups"),
    ResumeRule("optim", APPLIED, "written into the optimiser's groups at the resumed step"),
    ResumeRule("schedule", APPLIED, "the schedule is recomputed: step k gets the new config's lr of step k"),
    ResumeRule("train", APPLIED, "from the resumed step (train.steps / epochs recompute the schedule)"),
    ResumeRule("eval", APPLIED, "evaluation only (the test-time flip, the degraded pair sets)"),
)


def resume_policy(key: str) -> ResumeRule:
    """The rule of :data:`RESUME_POLICY` for a dotted config key (a key no rule names is refused)."""
    for rule in RESUME_POLICY:
        if key == rule.pattern or key.startswith(rule.pattern + ".") or fnmatch.fnmatchcase(key, rule.pattern):
            return rule
    return ResumeRule(key, REFUSED, "no resume rule names it")


def bad_records(path: Path) -> list[str]:
    """The distinct lines of a ``bad_records.txt`` (one per skipped record, the first time it was met)."""
    if not path.is_file():
        return []
    return list(dict.fromkeys(line for line in path.read_text().splitlines() if line.strip()))
