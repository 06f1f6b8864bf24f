"""A run's log: ``train.log``, the terminal, TensorBoard and the progress bar, as rank 0 writes them.

:class:`RunLog` opens the run folder's ``config.yaml``, ``train.log`` (a resumed run first drops the killed run's
lines of the steps it replays, and TensorBoard its events of them: ``purge_step``) and ``tensorboard/``; it
writes the step lines, evaluations, diagnostics, checkpoints and skipped records. Log lines go to ``train.log``,
and to stderr too unless a progress bar owns the terminal; then the lines a user must see (resume notes, the
tables of intermediate evaluations) are printed above the bar. On other ranks every method is a no-op.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from faceforge.core.config import Config, to_yaml
from faceforge.train.lifecycle import BAD_RECORDS_NAME, bad_records, drop_replayed_steps

__all__ = ["LOG_NAME", "RunLog"]

LOG_NAME = "train.log"

logger = logging.getLogger("faceforge.train")


class RunLog:
    """Rank 0's record of one run (``main``); :meth:`open` before the first step, :meth:`close` after the last."""

    def __init__(self, cfg: Config, main: bool, total_steps: int, steps_per_epoch: int) -> None:
        self.cfg = cfg
        self.main = main
        self.output = Path(cfg.output)
        self.path = self.output / LOG_NAME
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.writer: Any = _NullWriter()
        self.bar: Any = None
        self._handlers: list[logging.Handler] = []
        self._bad_logged = 0

    # --- opening and closing ---

    def open(self, step: int, resumed_from: Path | None, notes: list[str], lines: list[str]) -> None:
        """Rank 0: ``config.yaml``, the ``train.log`` handler (and stderr's without a progress bar), the resume line
        and ``notes`` (warnings, on the terminal too), the ``lines`` that describe the run, a SummaryWriter; every
        rank: the progress bar (shown on rank 0 on a terminal with ``train.progress``)."""
        from tqdm import tqdm

        terminal = self.cfg.train.progress and sys.stderr.isatty()
        self.bar = tqdm(total=self.total_steps, initial=step, disable=not (self.main and terminal), desc="train",
                        unit="step", dynamic_ncols=True)
        if not self.main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / "config.yaml").write_text(to_yaml(self.cfg))
        # the killed run's lines of the steps this run replays go (before the log is appended to)
        replayed = drop_replayed_steps(self.path, step) if resumed_from is not None else 0
        self._handlers = [logging.FileHandler(self.path)]
        if not terminal:
            self._handlers.append(logging.StreamHandler(sys.stderr))
        for handler in self._handlers:
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        if resumed_from is not None:
            logger.info("resumed from %s at step %d%s", resumed_from, step,
                        f" (the killed run's {replayed} log lines of later steps, replayed now, removed)"
                        if replayed else "")
        for note in notes:
            logger.warning("%s", note)
            self._on_terminal(f"faceforge train: {note}")
        for line in lines:
            logger.info("%s", line)
        # a resumed run replays the steps after its checkpoint: TensorBoard drops the killed run's events of them
        purge = step + 1 if resumed_from is not None else None
        self.writer = SummaryWriter(log_dir=str(self.output / "tensorboard"), purge_step=purge)

    def _on_terminal(self, text: str) -> None:
        """``text`` on stderr above the progress bar, when log lines do not reach the terminal (train.log only)."""
        if self.main and len(self._handlers) == 1:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        for handler in self._handlers:
            logger.removeHandler(handler)
            handler.close()
        self._handlers = []

    # --- the lines of a run ---

    def step(self, step: int, window: list[tuple[float, dict[str, float]]], grad_norm: float, lr: float,
             ips: float) -> None:
        """Every log_every steps: mean loss since the last line (and of each loss term, when there are several),
        the lr this step used, grad norm, images/s; ``window`` (loss, terms) of the steps since is emptied."""
        self.bar.update(1)
        if step % self.cfg.train.log_every and step != self.total_steps:
            return
        loss = sum(total for total, _ in window) / len(window)
        names = list(window[-1][1]) if len(window[-1][1]) > 1 else []
        terms = {name: sum(t.get(name, 0.0) for _, t in window) / len(window) for name in names}
        window.clear()
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
        if not self.main:
            return
        logger.info(
            "step %d/%d epoch %d loss %.5f%s lr %.4e grad_norm %.4f images/s %.1f",
            step, self.total_steps, (step - 1) // self.steps_per_epoch, loss,
            "".join(f" {name} {value:.5f}" for name, value in terms.items()), lr, grad_norm, ips,
        )
        self.writer.add_scalar("train/loss", loss, step)
        for name, value in terms.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/grad_norm", grad_norm, step)
        self.writer.add_scalar("train/images_per_second", ips, step)

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        """An evaluation's numbers: one line, TensorBoard, and a table on stderr during training (the final one is
        the run's result: its caller shows it)."""
        if not self.main:
            return
        logger.info("eval step %d: %s", step, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        for k, v in metrics.items():
            self.writer.add_scalar(f"eval/{k}", v, step)
        if step != self.total_steps:
            from tqdm import tqdm

            from faceforge.eval.report import metrics_table

            tqdm.write(f"eval step {step}:\n{metrics_table(metrics)}", file=sys.stderr)

    def diagnostics(self, step: int, values: dict[str, float]) -> None:
        if not self.main:
            return
        logger.info("diagnostics step %d: %s", step, " ".join(f"{k} {v:.5g}" for k, v in values.items()) or "none")
        for k, v in values.items():
            self.writer.add_scalar(f"diagnostics/{k}", v, step)

    def checkpoint(self, path: Path, step: int) -> None:
        if self.main:
            logger.info("checkpoint: %s (step %d)", path, step)

    def skipped_records(self) -> None:
        """With data.skip_bad: a line when more unreadable training records were skipped (bad_records.txt)."""
        if not (self.cfg.data.skip_bad and self.main):
            return
        count = len(bad_records(self.output / BAD_RECORDS_NAME))
        if count != self._bad_logged:
            self._bad_logged = count
            logger.warning("skipped %d unreadable training records so far (data.skip_bad), listed in %s",
                           count, self.output / BAD_RECORDS_NAME)

    def done(self, step: int, images_seen: int, train_time: float) -> float:
        """The last line; returns the global images per second of the steps this process ran (0 when none)."""
        ips = images_seen / train_time if train_time > 0 else 0.0
        if images_seen:
            logger.info("done: step %d, %.1f images/s", step, ips)
        else:
            logger.info("done: step %d (no step left to train; resumed at the end)", step)
        return ips


class _NullWriter:
    """SummaryWriter stand-in on ranks other than 0 (and before the log is open)."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass
