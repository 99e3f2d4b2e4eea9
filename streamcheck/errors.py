"""The one exception streamcheck raises for user errors."""

from __future__ import annotations

__all__ = ["StreamcheckError", "internal_error"]


class StreamcheckError(RuntimeError):
    """A module, input or tile that streamcheck cannot stream exactly.

    The message names the offending layer by its path in ``named_modules()`` and says how to fix it.
    """


def internal_error(message: str) -> AssertionError:
    """An invariant of streamcheck itself failed: a bug in streamcheck, not in the caller's code."""
    return AssertionError(f"{message} -- this is a streamcheck bug, please report it")
