"""Test helpers for tests/test_train.py, importable as `_train_worker` with tests/ on sys.path.

* ``TinyNet``: a BatchNorm-free backbone (conv, PReLU, linear), so that a 2-rank DDP batch of B/2 per
  rank and an accumulated batch of 2 x B/2 give the same gradient as one batch of B (BatchNorm would
  normalise each half with its own statistics). Configs name it ``model.backbone: _train_worker:TinyNet``.
  ``dtype="float64"`` makes its parameters float64 (the images are cast on the way in).
* ``float64_head``: any registered head with float64 class weights, for runs compared with one another in
  float64 (``head.name: _train_worker:float64_head``, ``head.kwargs.inner``: the registered head, default arcface).
* ``dumping_attfc``: AttFC (float64) that writes its container after every training forward, per rank.
* ``NaNHead``: ArcFace whose loss turns NaN from its ``nan_at_call``-th training call on.
* A command line that trains in a subprocess, optionally killing itself (SIGKILL) after a given step or
  inside a checkpoint write, or spawning 2 gloo ranks:

    python tests/_train_worker.py CONFIG [key=value ...] [--resume] [--kill-at-step K]
        [--kill-in-save N] [--nprocs 2 --port P] [--kill-rank R] [--then CONFIG ...]

  (``--then CONFIG``, repeatable: after CONFIG, train each further config with ``--resume`` in the same
  processes and process group: a straight run, a cut one and its resumption in one launch.
  ``--kill-rank R --kill-at-step K``: under torchrun, rank R kills itself at step K once, in the first attempt
  that reaches it.)
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn

from faceforge.heads.base import ClassifierHead

sys.path.insert(0, str(Path(__file__).resolve().parent))


class TinyNet(nn.Module):
    """(B, 3, S, S) -> (B, D): conv 3x3 stride 2 (8 channels), PReLU, dropout, linear. No BatchNorm.

    ``dropout`` (default 0) draws from the global torch RNG, which a resumed run must restore.
    ``dtype`` (default "float32"): the parameters' dtype; the images are cast to it.
    """

    def __init__(
        self, embedding_size: int = 16, input_size: int = 32, channels: int = 8, dropout: float = 0.0,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.act = nn.PReLU(channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * ((input_size + 1) // 2) ** 2, embedding_size)
        self.to(getattr(torch, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.fc.weight.dtype)
        return self.fc(self.dropout(torch.flatten(self.act(self.conv(x)), 1)))


def float64_head(num_classes: int, embedding_size: int, inner: str = "arcface", **kwargs) -> nn.Module:
    """The registered head ``inner`` with float64 parameters and buffers (its logits then run in float64)."""
    from faceforge.heads import build

    return build(inner, num_classes=num_classes, embedding_size=embedding_size, **kwargs).double()


def dumping_attfc(num_classes: int, embedding_size: int, dump: str, **kwargs) -> nn.Module:
    """AttFC with float64 buffers that, after each training forward (its enqueue), writes its ``state_dict``
    (container, labels, pointer) to ``DUMP/rank<R>_call<N>.pt`` (N from 1): every rank's container, step by step."""
    import torch.distributed as dist

    from faceforge.heads import build

    head = build("attfc", num_classes=num_classes, embedding_size=embedding_size, **kwargs).double()
    calls = {"n": 0}

    def save(module: nn.Module, args: object, output: object) -> None:
        if module.training:
            calls["n"] += 1
            rank = dist.get_rank() if dist.is_initialized() else 0
            state = {k: v.clone() for k, v in module.state_dict().items()}
            torch.save(state, Path(dump) / f"rank{rank}_call{calls['n']}.pt")

    head.register_forward_hook(save)
    return head


class NaNHead(nn.Module, ClassifierHead):
    """ArcFace, except that training call number ``nan_at_call`` (1-based) and later return NaN."""

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.inner.weight

    def per_sample_loss(self, embeddings: torch.Tensor, labels: torch.Tensor, *, classifier_grad: bool = True):
        return self.inner.per_sample_loss(embeddings, labels, classifier_grad=classifier_grad)

    def __init__(self, num_classes: int, embedding_size: int, nan_at_call: int = 3, **kwargs) -> None:
        super().__init__()
        from faceforge.heads import build

        self.inner = build("arcface", num_classes=num_classes, embedding_size=embedding_size, **kwargs)
        self.nan_at_call = nan_at_call
        self.calls = 0

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = self.inner(embeddings, labels)
        return loss * float("nan") if self.calls >= self.nan_at_call else loss


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_inside_save(n: int) -> None:
    """SIGKILL on the n-th checkpoint write, after the temp file is complete but before os.replace."""
    import faceforge.core.fileio as checkpoint  # the atomic writer that checkpoints go through

    real_replace = os.replace
    count = {"calls": 0}

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith("last.pt"):
            count["calls"] += 1
            if count["calls"] == n:
                _kill_self()
        return real_replace(src, dst, *args, **kwargs)

    checkpoint.os = type(sys)("os_patched")
    checkpoint.os.__dict__.update(os.__dict__)
    checkpoint.os.replace = replace


def _run(args: argparse.Namespace) -> None:
    from faceforge.train.config import load_config
    from faceforge.train.engine import train

    torch.set_num_threads(1)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where a hung worker waits
    if args.kill_in_save:
        _kill_inside_save(args.kill_in_save)
    # --kill-rank R: only rank R dies, and only once: in the first attempt of an elastic (torchrun) run that
    # reaches the step (a marker file beside the config remembers it; an attempt may fail earlier, e.g. to connect)
    marker = Path(args.config).with_suffix(".killed")
    dies = args.kill_rank is None or (os.environ.get("RANK", "0") == str(args.kill_rank) and not marker.exists())

    def kill(step: int) -> None:
        if step == args.kill_at_step:
            marker.touch()
            _kill_self()

    on_step = kill if args.kill_at_step and dies else None
    result = train(load_config(args.config, args.overrides), resume=args.resume, on_step=on_step)
    print(f"final step {result.step}")
    for config in args.then:  # more runs in the same processes (and process group), each with --resume
        print(f"final step {train(load_config(config), resume=True).step}")


def _rank_main(rank: int, args: argparse.Namespace) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), WORLD_SIZE=str(args.nprocs),
        RANK=str(rank), LOCAL_RANK=str(rank),
    )
    from faceforge.train import distributed as fdist

    if not args.then:
        _run(args)
        fdist.end_process_after_group(0)  # as `faceforge train` under torchrun ends (no C++ exit-time teardown)
        return
    fdist.init_distributed()  # one group for every run: train() leaves a group it did not start
    finished = False
    try:
        _run(args)
        finished = True
    finally:
        fdist.cleanup(synchronise=finished)
    fdist.end_process_after_group(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-step", type=int, default=0)
    parser.add_argument("--kill-in-save", type=int, default=0)
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--nprocs", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--then", action="append", default=[], metavar="CONFIG")
    args = parser.parse_args(argv)
    if args.nprocs > 1:
        torch.multiprocessing.spawn(_rank_main, args=(args,), nprocs=args.nprocs)
    else:
        from faceforge.train import distributed as fdist

        _run(args)
        fdist.end_process_after_group(0)  # under torchrun: ends as `faceforge train` does


if __name__ == "__main__":
    main()
