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


@pytest.fixture(autouse=True, scope="session")
def _own_faceforge_cache_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """faceforge signs the caches it writes with a key in $XDG_CACHE_HOME/faceforge (faceforge.core.fileio): the tests
    make theirs in a temporary folder, never in the user's home."""
    import os

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old
