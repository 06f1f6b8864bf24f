"""Step-to-step reuse of a head's two big tensors: the (B, C) logit buffer and the (C, D) gradient of W.

A million-class head allocates both afresh every step. On CPU the C library hands blocks that large
back to the kernel when they are freed, and the kernel zeroes every page again on first touch: on our
2-core machine that zeroing cost 40 to 100 % of the step's three matrix products (benchmarks/RESULTS.md).
A :class:`ReusableBuffer` keeps the tensor between steps and lends it out again, as a CUDA caching
allocator would, but only when nothing else holds it:

- the gradient of W is returned to autograd as a view of the kept tensor, so ``weight.grad`` *is* that
  memory. Once the optimiser has stepped and ``zero_grad(set_to_none=True)`` dropped it, the next
  backward writes into the same pages. While ``weight.grad`` (or any other tensor) still uses it, as in
  gradient accumulation or when a caller keeps the gradient, a fresh tensor is allocated instead, so
  nothing anyone holds is ever overwritten;
- the logit buffer is saved for backward; a second forward before the first backward gets its own.

The cost is that the head keeps ``|W| + B x C`` floats allocated between steps (the peak of a step is
unchanged). ``release()`` drops them.

The policy is the head's ``buffers=`` argument (heads/base.py, ``BUFFER_POLICIES``):

- ``"reuse"``: as above;
- ``"release"``: every step allocates afresh and nothing is kept: between steps the head holds only what
  autograd gave the caller (``weight.grad``, 1.0 |W|). On CPU that costs the zeroing of fresh pages every
  step (benchmarks/RESULTS.md §14 measures it); on a GPU the caching allocator reuses freed blocks anyway;
- ``"auto"`` (the heads' default): ``"reuse"`` on CPU, ``"release"`` on other devices.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from faceforge.heads.base import check_buffer_policy, resolve_buffer_policy

__all__ = ["ReusableBuffer", "held_bytes", "make_step_buffers"]


def _storage_users(tensor: Tensor) -> int | None:
    """How many tensors and storage handles share ``tensor``'s memory (None where PyTorch cannot tell)."""
    try:
        return int(torch._C._storage_Use_Count(tensor.untyped_storage()._cdata))
    except (AttributeError, RuntimeError, TypeError):
        return None


class ReusableBuffer:
    """One tensor kept across steps; :meth:`get` lends it out as a fresh view when no one else uses it."""

    def __init__(self, policy: str = "reuse") -> None:
        self.policy = check_buffer_policy(policy)
        self._kept: Tensor | None = None

    def get(self, shape: Sequence[int], like: Tensor) -> Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device.

        Under "reuse" it is the kept memory when that fits and is free, else a new allocation (which is kept
        from then on); under "release" always a new allocation, not kept.
        """
        if resolve_buffer_policy(self.policy, like.device) == "release":
            self._kept = None
            return like.new_empty(tuple(shape))
        kept = self._kept
        if kept is None or kept.shape != tuple(shape) or kept.dtype != like.dtype or kept.device != like.device \
                or self._in_use(kept):
            kept = like.new_empty(tuple(shape))
            self._kept = kept
        return kept.view(kept.shape)  # a new tensor object: autograd may adopt it as .grad

    @staticmethod
    def _in_use(kept: Tensor) -> bool:
        users = _storage_users(kept)
        # `kept` itself and the temporary storage handle made to count are the only users of a free buffer
        return users is None or users > 2

    def release(self) -> None:
        """Drop the kept tensor (its memory is freed once no one else holds it)."""
        self._kept = None

    def held_bytes(self) -> int:
        """Bytes of the kept tensor (0 when none is kept)."""
        kept = self._kept
        return 0 if kept is None else kept.numel() * kept.element_size()

    def __deepcopy__(self, memo: dict[int, Any]) -> "ReusableBuffer":
        return ReusableBuffer(self.policy)  # a copied head starts with no kept memory

    def __getstate__(self) -> dict[str, Any]:
        return {"policy": self.policy, "_kept": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.policy = state.get("policy", "reuse")
        self._kept = None

    def __copy__(self) -> "ReusableBuffer":
        return ReusableBuffer(self.policy)


def make_step_buffers(policy: str) -> tuple[ReusableBuffer, ReusableBuffer]:
    """A head's (B, C) buffer and (C, D) gradient of W, both under `policy` ("auto", "reuse" or "release")."""
    return ReusableBuffer(policy), ReusableBuffer(policy)


def held_bytes(buffers: Sequence[ReusableBuffer]) -> int:
    """Bytes a head keeps between steps in its buffers (memory lent to weight.grad counts while kept)."""
    return sum(b.held_bytes() for b in buffers)
