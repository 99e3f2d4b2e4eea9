"""The results file every suite writes: one JSON row per measured point, appended as it finishes.

Rules (results file):

J1. ``<out>/results.jsonl`` is append-only. A row is ``{key, status, params, environment,
    metrics, run}`` (``ROW_KEYS``; the benchmark's rows add ``name`` and ``reason``): what
    identifies the point, ``ok``/``oom``/``error``/``skipped``, what was asked, the environment
    record (``suites/environment.py``), what was measured, and how the row was made (command,
    start, wall time). A row without these keys is an error naming the file and line, never read
    by guessing; the zoo's committed rows predate the schema and are read by their own ``name``.
J2. When a key appears more than once (a point re-run), the last row wins (``latest_rows``). A
    rerun skips the points whose last row is final; ``--fresh`` moves the old file aside first. A
    torn last line (a killed run) is ignored; a line that is not JSON anywhere else is an error.

>>> rows = [{"key": "a", "v": 1}, {"key": "b", "v": 2}, {"key": "a", "v": 3}]
>>> [r["v"] for r in latest_rows(rows)]  # Rule J2: the last row of a key, in first-seen order
[3, 2]
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS_NAME = "results.jsonl"
FINAL_STATUSES = ("ok", "oom")
ROW_KEYS = ("key", "status", "params", "environment", "metrics", "run")


def results_path(out: Path) -> Path:
    return out / RESULTS_NAME


def append_row(path: Path, row: dict[str, Any], *, required: Sequence[str] = ROW_KEYS) -> None:
    """Rule J1: check the row's shape, then append it (flushed: a killed run keeps it)."""
    check_row(row, where=str(path), required=required)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row, sort_keys=False) + "\n")
        f.flush()


def check_row(row: dict[str, Any], *, where: str, required: Sequence[str] = ROW_KEYS) -> None:
    """Rule J1: the row has the keys of its schema."""
    missing = [k for k in required if k not in row]
    if missing:
        raise ValueError(
            f"{where}: a results row without {', '.join(missing)} (key {row.get('key')!r}): not "
            "a row of this suite's schema (suites/rows.py Rule J1)"
        )


def read_rows(path: Path, *, required: Sequence[str] = ROW_KEYS) -> list[dict[str, Any]]:
    """All rows of a results file, in file order (Rule J2: a torn line is ignored)."""
    if not path.exists():
        return []
    rows = []
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == lines[-1][0]:
                continue  # torn by a killed run
            raise ValueError(f"{path}:{number}: not JSON; only a last line may be torn") from error
        check_row(row, where=f"{path}:{number}", required=required)
        rows.append(row)
    return rows


def latest_rows(
    rows: Iterable[dict[str, Any]], *, key: Callable[[dict[str, Any]], Any] = lambda r: r["key"]
) -> list[dict[str, Any]]:
    """Rule J2: the last row per key, in the order the keys first appeared."""
    latest: dict[Any, dict[str, Any]] = {}
    for row in rows:
        latest[key(row)] = row
    return list(latest.values())


def last_run(path: Path) -> list[dict[str, Any]]:
    """The rows of the file's last command: what a summary of one run reads."""
    rows = read_rows(path)
    return [r for r in rows if r["run"]["command"] == rows[-1]["run"]["command"]] if rows else []


def flat(row: dict[str, Any]) -> dict[str, Any]:
    """One row as one flat record: its top-level fields but the nested ones, the params and
    metrics as columns, the environment's keys as ``env_<key>`` and the run's as ``run_<key>``."""
    nested = ("params", "metrics", "environment", "run")
    out: dict[str, Any] = {k: v for k, v in row.items() if k not in nested}
    out |= row["params"]
    out |= row["metrics"]
    out |= {f"env_{k}": v for k, v in (row.get("environment") or {}).items()}
    out |= {f"run_{k}": v for k, v in (row.get("run") or {}).items()}
    return out


def start_fresh(path: Path) -> Path | None:
    """Move an existing results file aside (``results.<time>.jsonl.bak``); returns where it went."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    backup = path.with_name(f"{path.stem}.{stamp}{path.suffix}.bak")
    path.rename(backup)
    return backup
