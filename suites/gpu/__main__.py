"""python -m suites.gpu: run the GPU run's steps (Rules GR1-GR6 in ``suites/gpu/__init__.py``)."""

from __future__ import annotations

import argparse
import ast
import gc
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..fresh import REPO, child, run
from ..rows import FINAL_STATUSES, append_row, latest_rows, read_rows
from .points import STEPS, Point, Step, equality, grad_error, measure

ROWS_NAME = "gpu_run.jsonl"
RESUME = REPO / "reports" / "benchmark" / "cuda" / ROWS_NAME
BUDGET_S = 450.0
KILL_GRACE_S = 20.0  # Rule GR1: a step's process is killed this long after its deadline
DRY_STEP_S = 300.0


def gpu_tests(tests: Path = REPO / "tests") -> list[str]:
    """The node ids of the tests that need CUDA: marked ``gpu`` or skipped without CUDA."""
    found = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
                continue
            marks = [ast.unparse(d) for d in node.decorator_list]
            if any(
                m.endswith("mark.gpu") or "skipif(not torch.cuda.is_available()" in m for m in marks
            ):
                found.append(f"{path.relative_to(REPO)}::{node.name}")
    return found


def device_record(device: str) -> dict[str, Any]:
    """Rule GR3: what the environment record does not say about the device."""
    import torch

    record: dict[str, Any] = {"cuda": torch.version.cuda, "tf32": False}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        record |= {"gpu_memory_bytes": props.total_memory, "cudnn": torch.backends.cudnn.version()}
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            record["driver"] = subprocess.run(
                query, capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            record["driver"] = None
    return record


def make_row(
    key: str,
    status: str,
    params: dict[str, Any],
    metrics: dict[str, Any],
    *,
    context: dict[str, Any],
    started: float,
    reason: str | None = None,
    environment: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A row of Rule GR2's file (``suites/rows.py`` Rule J1, plus ``reason``)."""
    run = {"command": context["command"], "start": started, "wall_s": time.time() - started}
    return {
        "key": key,
        "status": status,
        "reason": reason,
        "params": params | {"dry_run": context["dry_run"]},
        "environment": environment,
        "metrics": metrics,
        "run": run,
    }


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def run_step(payload: dict[str, Any], _partial: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """One step's points in this (fresh) process, a row appended as each ends (Rules GR2-GR6)."""
    import torch

    from streamcheck.testing.checker import tf32_disabled

    from ..environment import environment

    step, context = STEPS[payload["step"]], payload["context"]
    dry = context["dry_run"]
    device = torch.device("cpu" if dry else "cuda")
    path, deadline, done = Path(context["rows"]), payload["deadline"], set(context["done"])
    env = environment(device.type) | device_record(device.type)
    env["commit"] = context["commit"] or env["git_commit"]
    failed: dict[tuple[str, ...], str] = {}  # series -> why its larger sizes are skipped
    last: dict[tuple[str, ...], tuple[int, float]] = {}  # series -> (size, seconds)
    references: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}  # conventional gradients
    counts = {"ok": 0, "other": 0}
    for point in step.points(dry_run=dry):
        if point.key in done:
            continue
        started = time.time()
        params = asdict(point)
        reason = failed.get(point.series) or _too_slow(point, last.get(point.series), deadline)
        if reason is not None:
            append_row(
                path,
                make_row(
                    point.key,
                    "skipped",
                    params,
                    {},
                    context=context,
                    started=started,
                    reason=reason,
                    environment=env,
                ),
            )
            continue
        metrics: dict[str, Any] = {}
        status, why = "ok", None
        try:
            with tf32_disabled(device):
                if step.name == "equality":
                    metrics = equality(point, device)
                else:
                    # a dry run times one step (Rule GR5: the code, not the timing)
                    metrics = measure(point, device, max_timing_s=0 if dry else 20)
        except Exception as exc:  # noqa: BLE001 -- every failure becomes a row
            status = "oom" if _is_oom(exc) else "error"
            why = (
                f"{type(exc).__name__}: {str(exc)[:300]}"
                if status == "oom"
                else (traceback.format_exc()[-1500:])
            )
            failed[point.series] = (
                f"{point.size}² ran out of memory" if status == "oom" else (f"{point.size}² failed")
            )
        grads = metrics.pop("_grads", None)
        same = (point.network, str(point.size), point.dtype, point.image)
        if grads is not None and point.kind == "conventional":
            references[same] = grads
        elif grads is not None and same in references:
            metrics["grad_rel_error"] = grad_error(grads, references[same])
        last[point.series] = (point.size, time.time() - started)
        append_row(
            path,
            make_row(
                point.key,
                status,
                params,
                metrics,
                context=context,
                started=started,
                reason=why,
                environment=env,
            ),
        )
        counts["ok" if status == "ok" else "other"] += 1
        print(f"  {point.key}: {status} ({time.time() - started:.1f} s)", file=sys.stderr)
        del grads, metrics
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return counts


def _too_slow(point: Point, previous: tuple[int, float] | None, deadline: float) -> str | None:
    """Rule GR4: the previous size's seconds scaled by the pixels, against the time left."""
    if previous is None:
        return None
    size, seconds = previous
    expected = seconds * (point.size / size) ** 2
    left = deadline - time.time()
    if expected <= left:
        return None
    return f"would take ~{expected:.0f} s ({size}² took {seconds:.1f} s); {left:.0f} s left"


def run_tests(step: Step, allowed_s: float, context: dict[str, Any]) -> None:
    """The tests step: pytest on ``gpu_tests()``, one row with the counts (Rule GR5 on CPU)."""
    started = time.time()
    nodes = gpu_tests()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        # Files and names, not node ids: a module skipped at import (test_sources.py without
        # zarr, which the lent machines lack) is then a skip, not a usage error.
        files = sorted({n.split("::")[0] for n in nodes})
        names = " or ".join(n.split("::")[1] for n in nodes)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-k", names]
        cmd += ["--continue-on-collection-errors", f"--junitxml={xml}"]
        env_vars = {"HYPOTHESIS_PROFILE": "ci"}
        try:
            done = subprocess.run(
                cmd,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=allowed_s,
                env={**os.environ, **env_vars},
            )
            output, returncode = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as exc:
            output, returncode = str(exc.stdout or "")[-2000:], None
        counts = _junit_counts(xml) if xml.exists() else {}
    failed = counts.get("failures", 0) + counts.get("errors", 0)
    ran = counts.get("tests", 0)
    # pytest's exit status 0: every test collected passed or skipped (4: a usage error)
    status = "ok" if returncode == 0 and ran > 0 and failed == 0 else "error"
    if returncode is None:
        status = "timeout"
    print(output[-3000:], flush=True)
    params = {"step": "tests", "nodes": nodes}
    append_row(
        Path(context["rows"]),
        make_row(
            "tests",
            status,
            params,
            counts,
            context=context,
            started=started,
            reason=None if status == "ok" else output[-1500:],
            environment=_parent_environment(context),
        ),
    )


def _junit_counts(xml: Path) -> dict[str, Any]:
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None, f"no testsuite in {xml}"
    counts: dict[str, Any] = {
        k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")
    }
    counts["failed"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def _parent_environment(context: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ..environment import environment

    device = "cpu" if context["dry_run"] or not torch.cuda.is_available() else "cuda"
    env = environment(device) | device_record(device)
    env["commit"] = context["commit"] or env["git_commit"]
    return env


def final_keys(*paths: Path) -> list[str]:
    """Rule GR2: the keys whose last row is final."""
    rows = [row for path in paths if path.exists() for row in read_rows(path)]
    return [r["key"] for r in latest_rows(rows) if r["status"] in FINAL_STATUSES]


def summary(path: Path, command: str) -> str:
    """One line per row of this command: status, time, memory against the plan's estimate."""
    lines = []
    for r in latest_rows(read_rows(path)):
        if r["run"]["command"] != command:
            continue
        m = r["metrics"]
        parts = [f"{r['key']}: {r['status']}"]
        if "time_s_median" in m:
            parts.append(f"{m['time_s_median']:.3f} s/step")
        if "peak_alloc_bytes" in m:
            parts.append(f"peak {m['peak_alloc_bytes'] / 2**30:.2f} GiB")
        if "peak_bytes_estimate" in m:
            parts.append(f"plan {m['peak_bytes_estimate'] / 2**30:.2f} GiB")
        for name in ("max_rel_error", "grad_rel_error"):
            if name in m:
                parts.append(f"{name} {m[name]:.1e}")
        if "tests" in m:
            parts.append(f"{m['passed']} passed, {m['skipped']} skipped, {len(m['failed'])} failed")
        if r["reason"]:
            parts.append(r["reason"].strip().splitlines()[-1][:160])
        lines.append(", ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m suites.gpu", description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (Rule GR5)")
    parser.add_argument("--out", type=Path, help="folder of gpu_run.jsonl (dry run: a temp folder)")
    parser.add_argument("--resume", type=Path, help=f"earlier rows to skip (default {RESUME})")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole run's budget")
    parser.add_argument("--only", nargs="+", choices=list(STEPS), help="run only these steps")
    parser.add_argument("--commit", default="", help="the commit the tree is at (no .git there)")
    args = parser.parse_args(argv)
    start = time.time()
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu-dry-")) if args.dry_run else RESUME.parent)
    path = out / ROWS_NAME
    resume = args.resume or (None if args.dry_run else RESUME)
    command = "python -m suites.gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    context = {
        "dry_run": args.dry_run,
        "rows": str(path),
        "commit": args.commit,
        "command": command,
        "done": final_keys(path, *([resume] if resume else [])),
    }
    print(f"rows -> {path}", flush=True)
    for step in STEPS.values():
        if args.only and step.name not in args.only:
            continue
        left = args.budget_s - (time.time() - start)
        # Rule GR5: a dry run checks the code, not the timing: its budget only stops a hang
        allowed = DRY_STEP_S if args.dry_run else min(step.budget_s, left)
        if allowed < 5:
            print(f"{step.name}: no time left ({left:.0f} s)", flush=True)
            continue
        print(f"{step.name} ({allowed:.0f} s): {step.what}", flush=True)
        if step.name == "tests":
            if "tests" not in context["done"]:
                run_tests(step, allowed, context)
            continue
        launched = time.time()
        payload = {"step": step.name, "deadline": launched + allowed, "context": context}
        done = run("suites.gpu", payload, timeout_s=allowed + KILL_GRACE_S)
        print(done.stderr[-3000:], file=sys.stderr, flush=True)
        if done.returncode != 0:
            status = "timeout" if done.returncode is None else "error"
            append_row(
                path,
                make_row(
                    f"{step.name}|process",
                    status,
                    {"step": step.name},
                    {},
                    context=context,
                    started=launched,
                    reason=done.stderr[-1500:],
                    environment=None,
                ),
            )
    print(summary(path, command), flush=True)
    rows = [r for r in latest_rows(read_rows(path)) if r["run"]["command"] == command]
    bad = [r["key"] for r in rows if r["status"] in ("error", "timeout")]
    print(
        f"{len(rows)} rows, {len(bad)} error/timeout: {bad}"
        if bad
        else f"{len(rows)} rows, no errors"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    if "--json" in sys.argv:
        sys.exit(child(run_step))
    sys.exit(main())
