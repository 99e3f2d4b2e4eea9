"""Markdown for every suite's SUMMARY.md and the report's index: tables, numbers, figures."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

MiB = 2**20


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def get(mapping: Any, *keys: str, default: Any = None) -> Any:
    """``mapping[k1][k2]...`` or ``default`` when any level is missing."""
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return default
        mapping = mapping[key]
    return mapping


def table(headers: str | Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A Markdown table; ``headers`` a list or one string as the table reads (``"a | b"``);
    ``align`` has one letter per column (l or r), default left then right.

    >>> print(table("case | time (s)", [["a", 1.5]]))
    | case | time (s) |
    | --- | ---: |
    | a | 1.5 |
    """
    headers = headers.split(" | ") if isinstance(headers, str) else headers
    rows = [[str(cell) for cell in row] for row in rows]
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |"]
    lines.append("| " + " | ".join(sep) + " |")
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def err(x: Any) -> str:
    """A relative error: 3 significant digits, scientific."""
    return f"{x:.2e}" if finite(x) else "n/a"


def mib(b: Any) -> str:
    return f"{b / MiB:.1f}" if finite(b) else "n/a"


def code(text: Any) -> str:
    return f"`{text}`" if text else "(not recorded)"


def figure(path: Path, out_dir: Path, number: str, caption: str, command: str | None) -> str:
    """Markdown for a figure: the image, then a caption with the producing command (Rule P3)."""
    rel = Path(relpath(path, out_dir)).as_posix()
    made_by = (
        f"Produced by {code(command)}."
        if command
        else "The command that produced it is not in the result files."
    )
    return f"![{number}]({rel})\n\n*{number}. {caption} {made_by}*"


def relpath(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


def commit(sha: Any) -> str:
    """A git commit as recorded, shortened to 12 hex digits (``+dirty`` kept)."""
    if not sha:
        return "(not recorded)"
    head, plus, rest = str(sha).partition("+")
    return f"`{head[:12]}{plus}{rest}`"
