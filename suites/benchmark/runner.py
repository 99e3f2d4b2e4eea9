"""Run points, one fresh process each, appending a row to the results file as each finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import peer
from .grid import Point
from .results import (
    FINAL_STATUSES,
    REPO_ROOT,
    append_row,
    code_version,
    latest_rows,
    read_rows,
    results_path,
)

MEM_SHARE = 0.7  # of MemAvailable at the start of a point: the cap given to its process
POINT_TIMEOUT_S = 3600.0


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def skip_reason(point: Point) -> str | None:
    """Why ``point`` cannot run here (None if it can)."""
    if point.method == "lightstream":
        ok, why = peer.available()
        if not ok:
            return why
    if point.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return "CUDA is not available"
    return None


def predicted_oom(point: Point, rows: Sequence[dict[str, Any]]) -> str | None:
    """Why a conventional point will not fit, from the linear trend (in pixels) of the peak RSS
    delta of the conventional points measured so far; None if it may fit or nothing is known.

    Running such a point until it hits the address-space cap would hold most of a shared
    machine's memory for minutes (the 8192^2 conventional step reaches ~20 GB before failing).
    """
    if point.method != "conventional" or point.device.startswith("cuda"):
        return None
    measured = [
        (float(r["input_px"]) ** 2, float(r["rss_delta_bytes"]))
        for r in rows
        if r.get("method") == "conventional"
        and r.get("status") == "ok"
        and r.get("device") == point.device
        and r.get("dtype") == point.dtype
        and r.get("rss_delta_bytes")
    ]
    budget = point.mem_budget_bytes or (MEM_SHARE * (mem_available_bytes() or 0))
    if len(measured) < 2 or not budget:
        return None
    (x0, y0), (x1, y1) = sorted(measured)[-2:]
    slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 0.0
    predicted = y1 + slope * (float(point.input_px) ** 2 - x1)
    if predicted <= budget:
        return None
    return (
        f"not run: predicted peak {predicted / 2**30:.1f} GiB (linear in pixels through the two "
        f"largest measured conventional points) exceeds the memory budget {budget / 2**30:.1f} GiB"
    )


def is_done(row: dict[str, Any] | None, point: Point) -> bool:
    if row is None:
        return False
    if row["status"] in FINAL_STATUSES:
        return True
    return row["status"] == "skipped" and skip_reason(point) is not None


def run_point(point: Point, *, timeout_s: float = POINT_TIMEOUT_S) -> dict[str, Any]:
    """Run one point in a fresh process (``python -m suites.benchmark.point``); returns its row."""
    if point.mem_budget_bytes is None and not point.device.startswith("cuda"):
        available = mem_available_bytes()
        if available is not None:
            point = replace(point, mem_budget_bytes=int(MEM_SHARE * available))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with tempfile.TemporaryDirectory(prefix="streamcheck-bench-") as tmp:
        result = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "suites.benchmark.point"]
        cmd += ["--json", json.dumps(point.to_dict()), "--result", str(result)]
        base: dict[str, Any] = {**point.to_dict(), "key": point.key}
        try:
            proc = subprocess.run(
                cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            return {**base, "status": "error", "reason": f"timed out after {timeout_s:.0f} s"}
        if result.exists():
            row: dict[str, Any] = json.loads(result.read_text())
            if proc.returncode != 0 and "grad_ref" not in row:
                row["grad_ref"] = f"process died (exit {proc.returncode}) in the reference step"
            return row
        if proc.returncode == -signal.SIGKILL:
            why = "killed by SIGKILL (the kernel's OOM killer?) before writing a result"
            return {**base, "status": "oom", "reason": why}
        tail = proc.stderr[-1500:]
        return {**base, "status": "error", "reason": f"exit {proc.returncode}: {tail}"}


def run_points(
    points: Sequence[Point],
    out: Path,
    *,
    command: str,
    progress: bool = True,
    timeout_s: float = POINT_TIMEOUT_S,
    redo: Callable[[Point], bool] = lambda point: False,
) -> list[dict[str, Any]]:
    """Run the points not yet done in ``out``'s results file, and those ``redo`` names again
    (the last row of a key wins); returns the rows added."""
    from tqdm import tqdm

    path = results_path(out)
    previous = {r["key"]: r for r in latest_rows(read_rows(path))}
    todo = [p for p in points if redo(p) or not is_done(previous.get(p.key), p)]
    skipped_done = len(points) - len(todo)
    commit = code_version()
    added = []
    bar = tqdm(todo, desc="benchmark", unit="point", disable=not progress, file=sys.stderr)
    if skipped_done:
        bar.write(
            f"resuming: {skipped_done} of {len(points)} points already in {path}", file=sys.stderr
        )
    for point in bar:
        if point.grad_ref_dir is None:
            point = replace(point, grad_ref_dir=str(out / "gradref"))
        label = f"{point.method} {point.input_px}px tile {point.tile_px or '-'}"
        bar.set_postfix_str(label)
        started = time.time()
        why = skip_reason(point)
        oom = predicted_oom(point, read_rows(path)) if why is None else None
        if why is not None:
            row = {**point.to_dict(), "key": point.key, "status": "skipped", "reason": why}
        elif oom is not None:
            row = {**point.to_dict(), "key": point.key, "status": "oom", "reason": oom}
        else:
            row = run_point(point, timeout_s=timeout_s)
        row.update(
            git_commit=commit,
            command=command,
            started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            wall_s=round(time.time() - started, 2),
        )
        append_row(path, row)
        added.append(row)
        if row["status"] == "ok":
            msg = f"{label}: {row['time_s_median']:.2f} s, alloc peak {row['peak_alloc_bytes'] / 2**20:.0f} MiB"
        else:
            msg = f"{label}: {row['status']} ({(row.get('reason') or '').splitlines()[-1:]})"
        bar.write(msg, file=sys.stderr)
    return added
