"""Fixtures shared by the test modules."""

from __future__ import annotations

from typing import Iterator

import os

import pytest
import torch

# The test runs' own backbones (``_train_worker:TinyNet``...) are named in checkpoints that tests then evaluate
# or distil from: they are the user's own code here (docs/inference.md, "What is safe to load from a stranger").
os.environ["FACEFORGE_TRUSTED_MODULES"] = "_train_worker,_extending"


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run the module on one torch thread (as the subprocess workers do), so reductions happen in one order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
