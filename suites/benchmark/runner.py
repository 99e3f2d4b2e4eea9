"""Run points, one fresh process each, appending a row to the results file as each finishes."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import fresh
from ..environment import environment
from ..rows import FINAL_STATUSES, append_row, read_rows, results_path
from . import analysis, peer, workload
from .grid import Point, point_key
from .point import new_row

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


def memory_budget_bytes(point: Point) -> float | None:
    """What a point may use: its cap on CPU, the GPU's total memory on CUDA."""
    if point.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        return float(torch.cuda.get_device_properties(point.device).total_memory)
    if point.mem_budget_bytes is not None:
        return float(point.mem_budget_bytes)
    available = mem_available_bytes()
    return None if available is None else MEM_SHARE * available


def skip_reason(point: Point) -> str | None:
    """Why ``point`` cannot run here (None if it can)."""
    if workload.case(point.name).kind == "lightstream":
        ok, why = peer.available()
        if not ok:
            return why
    if point.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return "CUDA is not available"
    return None


def is_done(row: dict[str, Any] | None, point: Point) -> bool:
    """Whether ``row``, the latest of ``point``'s key (its resolved settings: workload Rule KS1),
    measured it already."""
    if row is None:
        return False
    if row["status"] in FINAL_STATUSES:
        return True
    return row["status"] == "skipped" and skip_reason(point) is not None


def run_point(point: Point, *, timeout_s: float = POINT_TIMEOUT_S) -> dict[str, Any]:
    """Run one point in a fresh process (``suites/fresh.py``, child ``point.py``); returns its row."""
    if point.mem_budget_bytes is None and not point.device.startswith("cuda"):
        available = mem_available_bytes()
        if available is not None:
            point = replace(point, mem_budget_bytes=int(MEM_SHARE * available))
    env = workload.case(point.name).environment_variables()
    done = fresh.run("suites.benchmark.point", point.to_dict(), env=env, timeout_s=timeout_s)
    base = new_row(point)
    if done.returncode is None and done.result is None:
        return {**base, "status": "error", "reason": f"timed out after {timeout_s:.0f} s"}
    if done.result is not None:
        row = done.result
        if done.returncode != 0 and "grad_ref" not in row["metrics"]:
            why = f"process died (exit {done.returncode}) in the reference step"
            row["metrics"]["grad_ref"] = why
        return row
    if done.returncode == -signal.SIGKILL:
        why = "killed by SIGKILL (the kernel's OOM killer?) before writing a result"
        return {**base, "status": "oom", "reason": why}
    return {**base, "status": "error", "reason": f"exit {done.returncode}: {done.stderr[-1500:]}"}


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
    previous = {point_key(analysis.settings_key(r), r["params"]): r for r in read_rows(path)}
    todo = [p for p in points if redo(p) or not is_done(previous.get(p.key), p)]
    skipped_done = len(points) - len(todo)
    added = []
    bar = tqdm(todo, desc="benchmark", unit="point", disable=not progress, file=sys.stderr)
    if skipped_done:
        bar.write(
            f"resuming: {skipped_done} of {len(points)} points already in {path}", file=sys.stderr
        )
    for point in bar:
        if point.grad_ref_dir is None:
            point = replace(point, grad_ref_dir=str(out / "gradref"))
        label = f"{point.name} {point.input_px}px tile {point.tile_px or '-'}"
        bar.set_postfix_str(label)
        started = time.time()
        why = skip_reason(point)
        oom = None
        if why is None:
            oom = analysis.predicted_oom(
                point, analysis.frame(read_rows(path)), budget_bytes=memory_budget_bytes(point)
            )
        if why is not None or oom is not None:
            row = new_row(point) | {"status": "skipped" if why else "oom", "reason": why or oom}
            row["environment"] = environment(point.device)
        else:
            row = run_point(point, timeout_s=timeout_s)
        row["run"] = {
            "command": command,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "wall_s": round(time.time() - started, 2),
        }
        append_row(path, row)
        added.append(row)
        m = row["metrics"]
        if row["status"] == "ok":
            msg = f"{label}: {m['time_s_median']:.2f} s, alloc peak {m['peak_alloc_bytes'] / 2**20:.0f} MiB"
        else:
            msg = f"{label}: {row['status']} ({(row.get('reason') or '').splitlines()[-1:]})"
        bar.write(msg, file=sys.stderr)
    return added
