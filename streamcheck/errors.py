"""The one exception streamcheck raises for user errors, and the problems it carries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Problem", "StreamcheckError", "internal_error"]

LOCALITY = "streamcheck: cannot stream this module exactly; these layers break locality:"


@dataclass(frozen=True)
class Problem:
    """One refused layer: its module path ('' for the module as a whole), why, and the fix.

    >>> print(Problem("layer1.0.se", "pools over the whole image", "move it into the head"))
      - 'layer1.0.se': pools over the whole image. Fix: move it into the head.
    """

    path: str
    reason: str
    fix: str

    def __str__(self) -> str:
        where = f"'{self.path}': " if self.path else ""
        return f"  - {where}{self.reason}. Fix: {self.fix}."


class StreamcheckError(RuntimeError):
    """A module, input or tile that streamcheck cannot stream exactly.

    The message names the offending layer by its path in ``named_modules()`` and says how to fix
    it; ``problems`` holds the refused layers as data (path, reason, fix), empty when the error is
    not about layers (a bad tile, a bad image).
    """

    def __init__(self, message: str, *, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)

    @classmethod
    def of(cls, problems: Sequence[Problem]) -> StreamcheckError:
        """The error for refused layers: every problem at once, one line each."""
        return cls("\n".join([LOCALITY, *map(str, problems)]), problems=problems)


def internal_error(message: str) -> AssertionError:
    """An invariant of streamcheck itself failed: a bug in streamcheck, not in the caller's code."""
    return AssertionError(f"{message} -- this is a streamcheck bug, please report it")
