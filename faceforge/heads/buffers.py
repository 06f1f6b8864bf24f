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
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["ReusableBuffer"]


def _storage_users(tensor: Tensor) -> int | None:
    """How many tensors and storage handles share ``tensor``'s memory (None where PyTorch cannot tell)."""
    try:
        return int(torch._C._storage_Use_Count(tensor.untyped_storage()._cdata))
    except (AttributeError, RuntimeError, TypeError):
        return None


class ReusableBuffer:
    """One tensor kept across steps; :meth:`get` lends it out as a fresh view when no one else uses it."""

    def __init__(self) -> None:
        self._kept: Tensor | None = None

    def get(self, shape: Sequence[int], like: Tensor) -> Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device.

        It is the kept memory when that fits and is free, else a new allocation (which is kept from then on).
        """
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

    def __deepcopy__(self, memo: dict[int, Any]) -> "ReusableBuffer":
        return ReusableBuffer()  # a copied head starts with no kept memory

    def __getstate__(self) -> dict[str, Any]:
        return {"_kept": None}

    def __copy__(self) -> "ReusableBuffer":
        return ReusableBuffer()
