"""The user-error type of the command line: an option that is missing or out of range."""

from __future__ import annotations


class UsageError(ValueError):
    """A command-line option that is missing or out of range (the message names the option)."""
