"""The results file: one JSON row per point, appended as each point finishes.

Rules (results file):

J1. ``<out>/results.jsonl`` is append-only; a row is ``{name, key, status, reason, params,
    environment, metrics, run}``: the case's name, the point's key, ``ok``/``oom``/``error``/
    ``skipped`` and why, the point's parameters (``grid.Point``), the environment record
    (``suites/environment.py``), what was measured, and how the row was made (command, start,
    wall time). A row of an older shape is an error naming the migration (``migrate.py``), never
    read by guessing.
J2. When a key appears more than once (a point re-run), the last row wins. A rerun skips the points
    whose last row is final (``ok``, ``oom``, or ``skipped`` for a reason that still holds);
    ``--fresh`` moves the old file aside first. A torn last line (a killed run) is ignored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RESULTS_NAME = "results.jsonl"
FINAL_STATUSES = ("ok", "oom")
REPO_ROOT = Path(__file__).resolve().parents[2]
ROW_KEYS = ("name", "key", "status", "reason", "params", "environment", "metrics")


def results_path(out: Path) -> Path:
    return out / RESULTS_NAME


def append_row(path: Path, row: dict[str, Any]) -> None:
    check_row(row, where=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row, sort_keys=False) + "\n")
        f.flush()


def check_row(row: dict[str, Any], *, where: str) -> None:
    """Rule J1: the row has the current shape."""
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(
            f"{where}: a results row without {', '.join(missing)} (key {row.get('key')!r}): an "
            "older row shape; convert the file with `python -m suites.benchmark.migrate FILE`"
        )


def read_rows(path: Path) -> list[dict[str, Any]]:
    """All rows of a results file, in file order (Rule J2: a torn line is ignored)."""
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        check_row(row, where=f"{path}:{number}")
        rows.append(row)
    return rows


def latest_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last row per key, in the order the keys first appeared."""
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        latest[row["key"]] = row
    return list(latest.values())


def flat(row: dict[str, Any]) -> dict[str, Any]:
    """One row as one flat record: name, key, status, reason, the params and metrics as columns,
    the environment's keys as ``env_<key>`` and the run's as ``run_<key>``."""
    out: dict[str, Any] = {k: row[k] for k in ("name", "key", "status", "reason")}
    out |= row["params"]
    out |= row["metrics"]
    out |= {f"env_{k}": v for k, v in (row.get("environment") or {}).items()}
    out |= {f"run_{k}": v for k, v in (row.get("run") or {}).items()}
    return out


def start_fresh(path: Path) -> Path | None:
    """Move an existing results file aside (``results.<time>.jsonl``); returns where it went."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    backup = path.with_name(f"{path.stem}.{stamp}{path.suffix}.bak")
    path.rename(backup)
    return backup
