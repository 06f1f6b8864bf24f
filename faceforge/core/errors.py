"""What the user's errors share: the command line's error type, and how a message quotes data it did not choose."""

from __future__ import annotations

import reprlib
from typing import Any


class UsageError(ValueError):
    """A command-line option that is missing or out of range (the message names the option)."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 40, 40, 40


def bounded_repr(value: Any) -> str:
    """The value's repr, bounded (depth 2, 4 items, 40 characters each, 120 in all): what an error message may
    quote of data it did not choose (a file's, a checkpoint config's: a shared nest's full repr is exponential)."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a repr that fails is still an error message to give
        text = "?"
    return text if len(text) <= 120 else text[:117] + "..."


def brief(value: Any) -> str:
    """``type: value``, the value's repr bounded (:func:`bounded_repr`)."""
    return f"{type(value).__name__}: {bounded_repr(value)}"
