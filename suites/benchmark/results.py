"""The results file: one JSON row per point, appended as each point finishes.

``<out>/results.jsonl`` is append-only. When a key appears more than once (a point re-run after an
error), the last row wins. A rerun skips the points whose last row is final (``ok``, ``oom``, or
``skipped`` for a reason that still holds); ``--fresh`` moves the old file aside first.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..environment import git_commit

RESULTS_NAME = "results.jsonl"
FINAL_STATUSES = ("ok", "oom")
REPO_ROOT = Path(__file__).resolve().parents[2]


def results_path(out: Path) -> Path:
    return out / RESULTS_NAME


def append_row(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row, sort_keys=False) + "\n")
        f.flush()


def read_rows(path: Path) -> list[dict[str, Any]]:
    """All rows of a results file, in file order (a torn last line from a killed run is ignored)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def latest_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last row per key, in the order the keys first appeared."""
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        latest[row["key"]] = row
    return list(latest.values())


def start_fresh(path: Path) -> Path | None:
    """Move an existing results file aside (``results.<time>.jsonl``); returns where it went."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    backup = path.with_name(f"{path.stem}.{stamp}{path.suffix}.bak")
    path.rename(backup)
    return backup


def code_version() -> str:
    """The commit the measured code comes from (``+dirty`` when the engine or suites differ)."""
    return git_commit("streamcheck", "suites")
