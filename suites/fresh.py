"""The one fresh-process runner: a measurement in a process of its own, its result as JSON.

Rules (fresh processes):

FP1. Whatever measures memory or time runs in a fresh ``python -m <module>`` at the repository
     root, with the repository first on ``PYTHONPATH``: a peak RSS or a timing then owes nothing
     to what the parent imported or allocated (NOTE [ Memory meters ] Rule 3 in ``meters.py``).
FP2. The parent passes the point as ``--json PAYLOAD`` and a file as ``--result``; the child
     writes its result there (atomically), and may write it early (``partial``), so that a child
     killed later still leaves what it measured. The parent reads the file, whatever the exit.
FP3. ``row`` makes one point a results row (``suites/rows.py`` Rule J1): the child's
     ``environment`` becomes the row's, the row is ``ok`` only when the child exited 0 with one,
     and an error keeps the end of the child's stderr as its ``reason``.

Example (the child side is :func:`child`; ``suites/meters.py`` is such a child):

>>> done = run("suites.meters", {"setup": "", "code": "x = bytearray(2**20)"})
>>> done.returncode, done.result["delta_bytes"] >= 0
(0, True)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Done:
    """A finished child: its result (None if it wrote none), exit status (None: timed out), stderr."""

    result: dict[str, Any] | None
    returncode: int | None
    stderr: str


def run(
    module: str,
    payload: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
) -> Done:
    """Rule FP1-FP2: ``python -m module --json PAYLOAD --result FILE`` in a fresh process."""
    environ = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    with tempfile.TemporaryDirectory(prefix="streamcheck-fresh-") as tmp:
        path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, "--json", json.dumps(payload), "--result", str(path)]
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, env=environ, capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired as exc:
            stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
            return Done(_read(path), None, stderr)
        return Done(_read(path), proc.returncode, proc.stderr)


def row(
    module: str,
    payload: Mapping[str, Any],
    *,
    key: str,
    command: str,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Rule FP3: ``run(module, payload)`` as a results row."""
    start = time.time()
    done = run(module, payload, env=env)
    metrics = dict(done.result or {})
    environment = metrics.pop("environment", None)
    status = "ok" if done.returncode == 0 and environment else "error"
    out = {"key": key, "status": status, "params": dict(payload), "environment": environment}
    out |= {"metrics": metrics, "reason": None if status == "ok" else done.stderr[-800:]}
    return out | {"run": {"command": command, "start": start, "wall_s": time.time() - start}}


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


Measure = Callable[[dict[str, Any], Callable[[dict[str, Any]], None]], dict[str, Any]]


def child(measure: Measure, argv: list[str] | None = None) -> int:
    """The child's side of Rule FP2: ``measure(payload, partial)`` returns the result to write;
    ``partial(result)`` writes one early."""
    parser = argparse.ArgumentParser(description="one measurement in a fresh process")
    parser.add_argument("--json", required=True, help="the point, as JSON")
    parser.add_argument("--result", required=True, help="where to write the result (JSON)")
    args = parser.parse_args(argv)

    def write(result: dict[str, Any]) -> None:
        tmp = f"{args.result}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, args.result)

    write(measure(json.loads(args.json), write))
    return 0
