"""The GPU run (suites/gpu, Rules GR1-GR6): its plan as data, resuming, skipping, the tests it picks.

The whole dry run (``python -m suites.gpu --dry-run``) is CI's ``nox -s gpu``; here the pieces run
in this process on CPU at tiny sizes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from suites.gpu import __main__ as gpu
from suites.gpu import points
from suites.gpu.points import STEPS, Point, Step
from suites.rows import read_rows

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_tests_are_every_test_marked_gpu_and_the_unmarked_cuda_ones() -> None:
    """Against a plain reading of the sources: each ``@pytest.mark.gpu`` decorator's test."""
    found = set(gpu.gpu_tests())
    marked = set()
    for path in sorted((REPO / "tests").glob("test_*.py")):
        text = path.read_text()
        for match in re.finditer(r"@pytest\.mark\.gpu\n(?:@.*\n)*def (test_\w+)", text):
            marked.add(f"tests/{path.name}::{match.group(1)}")
    assert marked and marked <= found
    assert "tests/test_checker.py::test_cuda_float32_without_tf32" in found  # skipif only
    assert "tests/test_cli.py::test_cuda_without_cuda_exits_2" not in found  # runs without CUDA


def test_the_budgets_fit_eight_minutes() -> None:
    """Rule GR1: steps' budgets within the run's, the run's plus the kill grace within 480 s."""
    assert gpu.BUDGET_S + gpu.KILL_GRACE_S <= 480
    assert sum(s.budget_s for s in STEPS.values()) <= gpu.BUDGET_S
    assert list(STEPS) == ["tests", "equality", "figs23", "resnet34", "table2"]


def test_keys_are_unique_and_series_grow() -> None:
    """Rules GR2, GR4: one row per key; sizes rise along a series, so that a point skipped after
    an out-of-memory one is a larger one."""
    for dry_run in (False, True):
        all_points = [p for s in STEPS.values() for p in s.points(dry_run=dry_run)]
        assert len({p.key for p in all_points}) == len(all_points)
        series: dict[tuple[str, ...], list[int]] = {}
        for p in all_points:
            series.setdefault(p.series, []).append(p.size)
        assert all(sizes == sorted(set(sizes)) for sizes in series.values()), series


def test_the_dry_run_takes_every_path_of_the_full_run() -> None:
    """Rule GR5: each step's (network, kind, image) in its dry points, and bf16 autocast with a
    host image somewhere; the exception is stated in points.py (float64 Table 2 and ResNet-34)."""
    for step in STEPS.values():
        full = {(p.network, p.kind, p.image) for p in step.points(dry_run=False)}
        dry = {(p.network, p.kind, p.image) for p in step.points(dry_run=True)}
        missing = full - dry
        if step.name == "equality":  # the comparison is the same code for every network
            assert missing == {
                ("table2", "streamcheck", "device"),
                ("resnet34", "streamcheck", "device"),
            }
        else:
            assert not missing, (step.name, missing)
    dry_points = [p for s in STEPS.values() for p in s.points(dry_run=True)]
    assert any(
        p.dtype == "bfloat16" and p.image == "host" and p.kind == k
        for p in dry_points
        for k in ("streamcheck",)
    )
    full_points = [p for s in STEPS.values() for p in s.points(dry_run=False)]
    assert max(p.size for p in full_points if p.network == "table2") >= 32768
    assert (16384, "resnet34") in {
        (p.size, p.network) for p in full_points if p.kind == "streamcheck"
    }


def test_a_point_that_would_pass_the_deadline_is_skipped() -> None:
    """Rule GR4: 10 s at 1024² is ~40 s at 2048² (4x the pixels)."""
    deadline_in = {"30 s": 30.0, "60 s": 60.0}
    import time

    now = time.time()
    reason = gpu._too_slow(
        Point("s", "paper", "streamcheck", 2048, 512, "float32"),
        (1024, 10.0),
        now + deadline_in["30 s"],
    )
    assert reason is not None and reason.startswith("would take ~40 s")
    assert (
        gpu._too_slow(
            Point("s", "paper", "streamcheck", 2048, 512, "float32"),
            (1024, 10.0),
            now + deadline_in["60 s"],
        )
        is None
    )


def _payload(tmp_path: Path, done: list[str]) -> dict[str, Any]:
    import time

    context = {
        "dry_run": True,
        "rows": str(tmp_path / gpu.ROWS_NAME),
        "commit": "abc",
        "command": "test",
        "done": done,
    }
    return {"step": "figs23", "deadline": time.time() + 300, "context": context}


TINY = Step(
    "figs23",
    60,
    dry=(
        Point("figs23", "paper", "conventional", 32, None, "float32"),
        Point("figs23", "paper", "streamcheck", 32, 16, "float32"),
        Point("figs23", "paper", "streamcheck", 48, 16, "float32"),
    ),
)


def test_rows_are_written_per_point_and_a_rerun_skips_finished_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rules GR2, GR3, GR6, in this process on CPU."""
    monkeypatch.setitem(STEPS, "figs23", TINY)
    gpu.run_step(_payload(tmp_path, []), lambda _: None)
    rows = read_rows(tmp_path / gpu.ROWS_NAME)
    assert [r["key"] for r in rows] == [p.key for p in TINY.dry]
    assert all(r["status"] == "ok" for r in rows), rows
    streamed = rows[1]
    assert streamed["environment"]["commit"] == "abc" and streamed["environment"]["tf32"] is False
    assert streamed["metrics"]["n_tiles"] > 1 and "peak_bytes_estimate" in streamed["metrics"]
    # float32 streamed against conventional: the same sums in another order
    assert streamed["metrics"]["grad_rel_error"] < 1e-5
    gpu.run_step(_payload(tmp_path, gpu.final_keys(tmp_path / gpu.ROWS_NAME)), lambda _: None)
    assert len(read_rows(tmp_path / gpu.ROWS_NAME)) == len(rows)  # nothing measured again


def test_after_an_out_of_memory_point_the_larger_ones_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rule GR4: the 32² streamed point runs out of memory; 48² is a skipped row saying why."""
    monkeypatch.setitem(STEPS, "figs23", TINY)
    measure = points.measure

    def failing(point: Point, device: torch.device, **kw: Any) -> dict[str, Any]:
        if point.kind == "streamcheck":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")
        return measure(point, device, **kw)

    monkeypatch.setattr(gpu, "measure", failing)
    gpu.run_step(_payload(tmp_path, []), lambda _: None)
    statuses = [(r["status"], r["reason"]) for r in read_rows(tmp_path / gpu.ROWS_NAME)]
    assert [s for s, _ in statuses] == ["ok", "oom", "skipped"]
    assert statuses[2][1] == "32² ran out of memory"
    assert gpu.final_keys(tmp_path / gpu.ROWS_NAME) == [p.key for p in TINY.dry[:2]]


def test_equality_of_the_paper_network_in_float64() -> None:
    """The equality step's comparison: streamed vs plain, output and every gradient."""
    out = points.equality(
        Point("equality", "paper", "streamcheck", 40, 16, "float64"), torch.device("cpu")
    )
    assert out["compared"] == 2 + 6  # output, input gradient, 3 weights and 3 biases
    assert out["n_tiles"] > 1 and out["max_rel_error"] < 1e-12


def test_equality_of_a_network_streamed_from_kept_maps_in_float64() -> None:
    """The equality step's kept-maps point (kept Rules KM7-KM8 on the device): several passes,
    some from maps kept in host memory, equal to the plain module."""
    out = points.equality(
        Point("equality", "kept", "streamcheck", 48, 24, "float64"), torch.device("cpu")
    )
    assert out["kept_maps"] >= 1 and out["passes"] == 6 + out["kept_maps"]
    assert out["compared"] == 2 + 5 + 5 * 2  # output, input gradient, 5 convs, 5 BatchNorms
    assert out["max_rel_error"] < 1e-10


def test_junit_counts(tmp_path: Path) -> None:
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="3">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_a" name="test_skip"><skipped message="y"/></testcase>'
        "</testsuite></testsuites>"
    )
    counts = gpu._junit_counts(xml)
    assert counts["passed"] == 1 and counts["failed"] == ["tests.test_a::test_bad"]
