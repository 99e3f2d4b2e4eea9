"""The benchmark harness (suites/benchmark) on tiny sizes: rows, resume, OOM rows, plots, gate."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from suites.benchmark import gate, grid, plots, point, results, runner, summary
from suites.benchmark.grid import Point

TINY = {"warmup": 1, "repeats": 2, "max_timing_s": 600.0}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """One streaming point, end to end: its own fresh process, a row in a results file."""
    out = tmp_path_factory.mktemp("bench")
    points = [Point(suite="tile", method="streamcheck", input_px=128, tile_px=64, **TINY)]
    rows = runner.run_points(points, out, command="pytest", progress=False)
    return out, rows


def test_a_point_row_has_every_field(tiny_run: tuple[Path, list[dict[str, Any]]]) -> None:
    _, rows = tiny_run
    row = rows[0]
    assert row["status"] == "ok", row.get("reason")
    assert (row["suite"], row["method"], row["input_px"], row["tile_px"]) == (
        "tile",
        "streamcheck",
        128,
        64,
    )
    assert row["n_tiles"] == 9  # ceil(128 / (64 - 3 - 3))^2
    assert row["overlap_px"] == [3, 3]
    assert row["device"] == "cpu" and row["dtype"] == "float32" and row["threads"] >= 1
    for key in ("torch_version", "streamcheck_version", "git_commit", "device_name", "command"):
        assert row[key]
    assert row["peak_alloc_bytes"] > 0 and "profiler" in row["alloc_meter"]
    assert row["peak_rss_bytes"] >= row["rss_baseline_bytes"] > 0
    assert row["rss_delta_bytes"] == row["peak_rss_bytes"] - row["rss_baseline_bytes"]
    assert len(row["time_s_all"]) == row["repeats_done"] == 2
    assert min(row["time_s_all"]) <= row["time_s_median"] <= max(row["time_s_all"])
    assert 0 <= row["grad_rel_error"] < 1e-3  # float32 vs conventional float32, 128^2
    assert 0 <= row["grad_rel_error_f64"] < 1e-3  # vs conventional float64


def test_an_allocation_over_the_cap_is_an_oom_row() -> None:
    # In this process (a fresh one costs ~10 s of imports): measure() caps the address space at
    # its size + 32 MiB and lifts the cap before returning. The 64-channel activation
    # (64 x 512^2 x 4 B = 64 MiB) cannot be allocated.
    p = Point(suite="input", method="conventional", input_px=512, mem_budget_bytes=2**25, **TINY)
    row = point.measure(p)
    assert row["status"] == "oom", row.get("reason")
    assert "can't allocate memory" in row["reason"]
    assert row["mem_budget_bytes"] == 2**25 and row["mem_cap_bytes"] > 2**25
    assert "time_s_median" not in row
    big = torch.ones(2**27, dtype=torch.uint8)  # 128 MiB: the cap is gone again
    del big


def test_a_rerun_resumes_and_adds_no_rows(tiny_run: tuple[Path, list[dict[str, Any]]]) -> None:
    out, rows = tiny_run
    path = results.results_path(out)
    before = path.read_text()
    points = [Point.from_dict({k: r[k] for k in Point.__dataclass_fields__}) for r in rows]
    assert runner.run_points(points, out, command="pytest", progress=False) == []
    assert path.read_text() == before


def test_latest_row_per_key_wins_and_torn_lines_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    results.append_row(path, {"key": "a", "status": "error"})
    results.append_row(path, {"key": "b", "status": "ok"})
    results.append_row(path, {"key": "a", "status": "ok"})
    with path.open("a") as f:
        f.write('{"key": "c", "sta')  # a run killed mid-write
    latest = results.latest_rows(results.read_rows(path))
    assert [(r["key"], r["status"]) for r in latest] == [("a", "ok"), ("b", "ok")]
    p = Point(suite="tile", method="conventional", input_px=8)
    assert not runner.is_done({"status": "error"}, p)
    assert runner.is_done({"status": "oom"}, p)


def test_grid_modes_are_deduplicated_and_conventional_first() -> None:
    quick = grid.points("quick", ["tile", "input"])
    keys = [p.key for p in quick]
    assert len(keys) == len(set(keys))
    assert [(p.method, p.input_px, p.tile_px) for p in quick] == [
        ("conventional", 1024, None),
        ("streamcheck", 1024, 512),
        ("conventional", 2048, None),
        ("streamcheck", 2048, 256),
        ("streamcheck", 2048, 512),
    ]
    gate_points = grid.points("gate")
    ceilings = gate.read_ceilings()
    assert {(p.method, p.input_px, p.tile_px) for p in gate_points} == {
        ("conventional", ceilings["input_px"], None),
        ("streamcheck", ceilings["input_px"], ceilings["tile_px"]),
    }


def _fixture_rows() -> list[dict[str, Any]]:
    """A synthetic results file shaped like a full sweep (numbers made up, shapes like the paper's)."""
    mib = 2**20
    rows: list[dict[str, Any]] = []

    def row(method: str, n: int, tile: int | None, t: float, alloc: float, **kw: Any) -> None:
        rows.append(
            {
                "key": f"{method}|cpu|float32|{n}|{tile or '-'}|sum",
                "suite": "x",
                "method": method,
                "input_px": n,
                "tile_px": tile,
                "status": "ok",
                "time_s_median": t,
                "time_s_all": [t, t],
                "peak_alloc_bytes": alloc * mib,
                "rss_delta_bytes": 1.1 * alloc * mib,
                "peak_rss_bytes": (600 + 1.1 * alloc) * mib,
                "n_tiles": 1 if tile is None else max(1, (n // tile) ** 2),
                "grad_rel_error": None if method == "conventional" else 3e-3,
                "device_name": "test CPU",
                "threads": 2,
                "dtype": "float32",
                "torch_version": "x",
                "streamcheck_version": "x",
                "git_commit": "abc",
                "command": "pytest",
                **kw,
            }
        )

    for n in (512, 1024, 2048):
        row("conventional", n, None, 2.5 * (n / 1024) ** 2, 1000 * (n / 1024) ** 2)
    for n in (4096, 8192):
        rows.append(
            {
                "key": f"conventional|{n}",
                "method": "conventional",
                "input_px": n,
                "tile_px": None,
                "status": "oom",
                "reason": "can't allocate memory",
            }
        )
    for n in (512, 1024, 2048, 4096, 8192):
        row("streamcheck", n, 512, 3.0 * (n / 1024) ** 2, 100 + 10 * (n / 1024) ** 2)
        if n <= 4096:
            row("lightstream", n, 512, 4.0 * (n / 1024) ** 2, 120 + 12 * (n / 1024) ** 2)
    for tile in (128, 256, 1024, 2048):
        row("streamcheck", 2048, tile, 12.0, 40 + 400 * (tile / 1024) ** 2)
    return rows


def test_plots_and_summary_build_from_a_results_file(tmp_path: Path) -> None:
    path = results.results_path(tmp_path)
    path.write_text("".join(json.dumps(r) + "\n" for r in _fixture_rows()))
    written = plots.build(tmp_path)
    assert sorted(p.name for p in written) == ["fig2_tile.png", "fig3_input.png"]
    assert all(p.stat().st_size > 10_000 for p in written)
    md = summary.write(tmp_path, rebuild_command="python -m suites.benchmark --plots-only")
    assert md is not None
    text = md.read_text()
    # 2048^2: time 12 / 10 = 1.2 (met); allocator 140 / 4000 = 0.035; 8192^2 conventional is
    # estimated from the linear fit: 1000 * 64 = 64000 MiB vs 740 MiB streaming -> 0.0116.
    assert "| time streamcheck / conventional, 2048², tile 512 | 1.20 | <= 1.3 | met |" in text
    assert "| 0.012 | <= 0.05 | met | conventional estimated (linear fit in pixels) |" in text
    assert "time streamcheck / lightstream, 2048², tile 512 | 0.75 |" in text
    assert "| 1.0000 | >= 0.99 | met |" in text  # time exactly linear in pixels
    assert "conventional|8192" in text and "oom" in text


def test_gate_passes_and_fails_against_the_ceilings(tmp_path: Path) -> None:
    path = results.results_path(tmp_path)
    path.write_text("".join(json.dumps(r) + "\n" for r in _fixture_rows()))
    ceilings = gate.read_ceilings()
    passed, lines = gate.check(tmp_path, ceilings)
    assert passed, lines
    strict = {**ceilings, "time_ratio_max": 1.1}  # fixture ratio is 1.2
    passed, lines = gate.check(tmp_path, strict)
    assert not passed
    assert any(line.startswith("FAILED time") for line in lines)
    assert "GATE FAILED" in lines[-1]


def test_a_conventional_point_predicted_not_to_fit_is_not_run() -> None:
    gib = 2**30
    rows = [
        {
            "method": "conventional",
            "status": "ok",
            "device": "cpu",
            "dtype": "float32",
            "input_px": n,
            "rss_delta_bytes": gib * (n / 1024) ** 2,
        }
        for n in (1024, 2048)
    ]  # 1 GiB per 1024^2 -> 64 GiB at 8192^2
    big = Point(suite="input", method="conventional", input_px=8192, mem_budget_bytes=16 * gib)
    why = runner.predicted_oom(big, rows)
    assert why is not None and "64.0 GiB" in why
    assert runner.predicted_oom(replace(big, input_px=2048), rows) is None
    assert runner.predicted_oom(replace(big, method="streamcheck", tile_px=512), rows) is None


def test_redo_measures_a_done_point_again_and_the_new_row_wins(tmp_path: Path) -> None:
    # Conventional points predicted not to fit are recorded without a process: a fast point.
    gib = 2**30
    path = results.results_path(tmp_path)
    for n in (1024, 2048):  # 1 GiB per 1024^2 -> 64 GiB at 8192^2
        row = {"key": f"conventional|cpu|float32|{n}|-|sum", "method": "conventional"}
        row |= {"status": "ok", "device": "cpu", "dtype": "float32", "input_px": n}
        results.append_row(path, row | {"rss_delta_bytes": gib * (n / 1024) ** 2})
    big = Point(suite="input", method="conventional", input_px=8192, mem_budget_bytes=16 * gib)
    first = runner.run_points([big], tmp_path, command="first", progress=False)
    assert [r["status"] for r in first] == ["oom"]
    assert runner.run_points([big], tmp_path, command="resume", progress=False) == []
    again = runner.run_points(
        [big], tmp_path, command="redo", progress=False, redo=lambda p: "|8192|" in p.key
    )
    assert [r["command"] for r in again] == ["redo"]
    latest = {r["key"]: r for r in results.latest_rows(results.read_rows(path))}
    assert latest[big.key]["command"] == "redo"
    assert len(results.read_rows(path)) == 4  # the superseded row stays in the file


def test_the_environment_record_has_one_spelling_and_marks_a_dirty_tree(tmp_path: Path) -> None:
    import os
    import platform
    import subprocess

    from suites import environment

    env = environment.environment("cpu")
    assert env["torch"] == torch.__version__ and env["python"] == platform.python_version()
    assert env["device"] == "cpu" and env["gpu"] is None
    assert env["threads"] == torch.get_num_threads()
    assert 0 <= env["load_1min"] <= os.getloadavg()[0] + 5  # read at a slightly different time
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=environment.REPO, capture_output=True, text=True
    ).stdout.strip()
    assert env["git_commit"].removesuffix("+dirty") == head
    # Rule E2: an untracked file under a watched path makes the commit dirty.
    probe = environment.REPO / "suites" / f".env_probe_{os.getpid()}"
    probe.write_text("x")
    try:
        assert (
            environment.environment("cpu", watched=(str(probe),))["git_commit"] == head + "+dirty"
        )
    finally:
        probe.unlink()
    assert not environment.git_commit(str(probe)).endswith("+dirty")
