"""The benchmark pipeline (suites/benchmark) on tiny sizes: rows, resume, OOM rows, analysis,
plots, summary, gate, the CUDA path, and the environment record."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from suites import rows as results
from suites.benchmark import analysis, gate, grid, plots, point, runner, summary
from suites.benchmark.grid import Point

TINY = {"warmup": 1, "repeats": 2, "max_timing_s": 600.0}
MiB, GiB = 2**20, 2**30


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """One streaming point, end to end: its own fresh process, a row in a results file."""
    out = tmp_path_factory.mktemp("bench")
    points = [Point(name="streamcheck", input_px=128, tile_px=64, suite="tile", **TINY)]
    rows = runner.run_points(points, out, command="pytest", progress=False)
    return out, rows


def test_a_point_row_has_every_field(tiny_run: tuple[Path, list[dict[str, Any]]]) -> None:
    _, rows = tiny_run
    row = rows[0]
    assert row["status"] == "ok", row.get("reason")
    assert list(row) == [
        "name",
        "key",
        "status",
        "reason",
        "params",
        "environment",
        "metrics",
        "run",
    ]
    p, m, env = row["params"], row["metrics"], row["environment"]
    assert (row["name"], p["suite"], p["input_px"], p["tile_px"]) == (
        "streamcheck",
        "tile",
        128,
        64,
    )
    assert row["key"] == "streamcheck/paper/plain|cpu|float32|128|64|sum"  # Rule KS1: settings
    assert m["n_tiles"] == 9  # ceil(128 / (64 - 3 - 3))^2
    assert m["overlap_px"] == [3, 3] and m["settings"] == "PyTorch defaults"
    assert p["device"] == "cpu" and p["dtype"] == "float32" and env["threads"] >= 1
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["gpu"] is None
    assert env["git_commit"] and env["cpu"] and env["load_1min"] is not None
    assert row["run"]["command"] == "pytest" and row["run"]["wall_s"] > 0
    assert m["peak_alloc_bytes"] > 0 and "profiler" in m["alloc_meter"]
    assert m["peak_rss_bytes"] >= m["rss_baseline_bytes"] > 0
    assert m["rss_delta_bytes"] == m["peak_rss_bytes"] - m["rss_baseline_bytes"]
    assert len(m["time_s_all"]) == m["repeats_done"] == 2 and m["time_meter"].startswith("time.")
    assert min(m["time_s_all"]) <= m["time_s_median"] <= max(m["time_s_all"])
    assert m["cpu_s_median"] > 0 and m["other_processes_cores_busy"] >= 0
    assert 0 <= m["grad_rel_error"] < 1e-3  # float32 vs conventional float32, 128^2
    assert 0 <= m["grad_rel_error_f64"] < 1e-3  # vs conventional float64


def test_an_allocation_over_the_cap_is_an_oom_row() -> None:
    # In this process (a fresh one costs ~10 s of imports): measure() caps the address space at
    # its size + 32 MiB and lifts the cap before returning. The 64-channel activation
    # (64 x 512^2 x 4 B = 64 MiB) cannot be allocated.
    p = Point(name="conventional", input_px=512, mem_budget_bytes=2**25, **TINY)
    row = point.measure(p)
    assert row["status"] == "oom", row.get("reason")
    assert "can't allocate memory" in row["reason"]
    assert row["params"]["mem_budget_bytes"] == 2**25 and row["metrics"]["mem_cap_bytes"] > 2**25
    assert "time_s_median" not in row["metrics"]
    big = torch.ones(2**27, dtype=torch.uint8)  # 128 MiB: the cap is gone again
    del big


def test_a_rerun_resumes_and_adds_no_rows(tiny_run: tuple[Path, list[dict[str, Any]]]) -> None:
    out, rows = tiny_run
    path = results.results_path(out)
    before = path.read_text()
    points = [Point.from_dict({"name": r["name"], **r["params"]}) for r in rows]
    assert points[0].key == rows[0]["key"]
    assert runner.run_points(points, out, command="pytest", progress=False) == []
    assert path.read_text() == before


def make_row(
    name: str, n: int, tile: int | None, status: str = "ok", **metrics: Any
) -> dict[str, Any]:
    """A row as the pipeline writes it, with made-up metrics."""
    p = Point(name=name, input_px=n, tile_px=tile, suite="x")
    env = {"torch": "x", "streamcheck": "x", "git_commit": "abc", "cpu": "test CPU", "gpu": None}
    env |= {"threads": 2, "device": "cpu", "load_1min": 0.25}
    return point.new_row(p) | {
        "status": status,
        "environment": env,
        "metrics": metrics,
        "run": {"command": "pytest", "started_utc": "2031-01-01T00:00:00Z"},
    }


def write_rows(out: Path, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        results.append_row(results.results_path(out), row)


def test_latest_row_per_key_wins_and_torn_lines_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    write_rows(
        tmp_path, [make_row("conventional", 8, None, "error"), make_row("streamcheck", 8, 4)]
    )
    write_rows(tmp_path, [make_row("conventional", 8, None)])
    with path.open("a") as f:
        f.write('{"key": "c", "sta')  # a run killed mid-write
    latest = results.latest_rows(results.read_rows(path))
    assert [(r["name"], r["status"]) for r in latest] == [
        ("conventional", "ok"),
        ("streamcheck", "ok"),
    ]
    p = Point(name="conventional", input_px=8)
    assert not runner.is_done({"status": "error"}, p)
    assert runner.is_done({"status": "oom"}, p)
    assert runner.is_done({"status": "ok"}, p)


def test_rows_are_keyed_by_resolved_settings_and_read_by_what_they_recorded() -> None:
    # Rule KS1: two names for one setting are one point; the engine's defaults resolved (FD1-FD2).
    keep_freed = Point(name="streamcheck_keep_freed", input_px=8, tile_px=4)
    assert replace(keep_freed, name="streamcheck_defaults").key == keep_freed.key
    assert replace(keep_freed, name="streamcheck").key != keep_freed.key
    # Rule KS2: a committed row of the defaults of an earlier time (channels-last tiles) is read
    # as what it measured, the tuned settings, not as today's defaults.
    old = make_row("streamcheck_defaults", 8, 4)
    old["metrics"]["settings"] = "streamcheck defaults: on a CPU channels-last float32 tiles + kept freed memory"  # fmt: skip
    df = analysis.frame([old])
    assert len(analysis.ok(df, "streamcheck_tuned")) == 1
    assert len(analysis.ok(df, "streamcheck_defaults")) == 0


def test_a_row_of_another_shape_is_an_error_that_names_its_place(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"key": "conventional|cpu|float32|8|-|sum", "method": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"results.jsonl:1: a results row without status"):
        results.read_rows(path)


def test_grid_modes_are_deduplicated_and_pairs_run_back_to_back() -> None:
    quick = grid.points("quick", ["tile", "input"])
    keys = [p.key for p in quick]
    assert len(keys) == len(set(keys))
    assert [(p.name, p.input_px, p.tile_px) for p in quick] == [
        ("conventional", 1024, None),
        ("streamcheck", 1024, 512),
        ("conventional", 2048, None),
        ("streamcheck", 2048, 256),
        ("streamcheck", 2048, 512),
        ("streamcheck_defaults", 2048, 512),
        ("conventional_tuned", 2048, None),
        ("streamcheck_tuned", 2048, 512),
        ("conventional_compiled", 2048, None),
        ("streamcheck_compiled", 2048, 512),
    ]
    ceilings = gate.read_ceilings()
    gate_points = grid.points("gate")
    n, t = ceilings["input_px"], ceilings["tile_px"]
    assert [(p.name, p.input_px, p.tile_px) for p in gate_points] == [
        ("conventional", n, None),
        ("streamcheck", n, t),
        ("streamcheck_defaults", n, t),
        ("conventional_tuned", n, None),
        ("streamcheck_tuned", n, t),
    ]
    assert {c for pair in ceilings["pair"] for c in pair.values() if isinstance(c, str)} == set(
        ceilings["cases"]
    )
    # On a GPU the input sweep goes on to 32768^2 and the Table 2 network is measured; on CPU not.
    full_cpu = {p.name for p in grid.points("full")}
    full_cuda = grid.points("full", device="cuda")
    assert "table2_streamcheck" not in full_cpu and "conventional_tuned" in full_cpu
    assert {"table2_streamcheck", "table2_conventional"} <= {p.name for p in full_cuda}
    assert max(p.input_px for p in full_cuda if p.name == "streamcheck") == 32768
    assert all(p.device == "cuda" for p in full_cuda)


def _fixture_rows() -> list[dict[str, Any]]:
    """A synthetic results file shaped like a full sweep (numbers made up, shapes like the paper's)."""
    rows: list[dict[str, Any]] = []

    def row(name: str, n: int, tile: int | None, t: float, alloc: float) -> None:
        m = {
            "time_s_median": t,
            "time_s_all": [t, t],
            "peak_alloc_bytes": alloc * MiB,
            "rss_delta_bytes": 1.1 * alloc * MiB,
            "peak_rss_bytes": (600 + 1.1 * alloc) * MiB,
            "n_tiles": 1 if tile is None else max(1, (n // tile) ** 2),
            "grad_rel_error": None if name == "conventional" else 3e-3,
        }
        rows.append(make_row(name, n, tile, **m))

    for n in (512, 1024, 2048):
        row("conventional", n, None, 2.5 * (n / 1024) ** 2, 1000 * (n / 1024) ** 2)
        row("conventional_tuned", n, None, 1.25 * (n / 1024) ** 2, 1000 * (n / 1024) ** 2)
        row("conventional_compiled", n, None, 0.8 * (n / 1024) ** 2, 800 * (n / 1024) ** 2)
    for n in (4096, 8192):
        rows.append(make_row("conventional", n, None, "oom") | {"reason": "can't allocate memory"})
    for n in (512, 1024, 2048, 4096, 8192):
        row("streamcheck", n, 512, 3.0 * (n / 1024) ** 2, 100 + 10 * (n / 1024) ** 2)
        row("streamcheck_tuned", n, 512, 1.0 * (n / 1024) ** 2, 100 + 10 * (n / 1024) ** 2)
        row("streamcheck_defaults", n, 512, 1.0 * (n / 1024) ** 2, 100 + 10 * (n / 1024) ** 2)
        if n <= 4096:
            row("lightstream", n, 512, 4.0 * (n / 1024) ** 2, 120 + 12 * (n / 1024) ** 2)
    for tile in (128, 256, 1024, 2048):
        row("streamcheck", 2048, tile, 12.0, 40 + 400 * (tile / 1024) ** 2)
    return rows


def test_analysis_names_both_sides_of_every_ratio() -> None:
    df = analysis.frame(_fixture_rows())
    ratios = {
        pair: analysis.pair_ratio(df, *pair, "time_s_median", input_px=2048, tile_px=512)
        for pair in analysis.PAIRS
    }
    # 2048^2: streamcheck 12 / conventional 10; tuned 4 / 5; tuned 4 / compiled 3.2
    assert ratios["streamcheck", "conventional"].value == pytest.approx(1.2)
    assert ratios["streamcheck_tuned", "conventional_tuned"].value == pytest.approx(0.8)
    assert ratios["streamcheck_tuned", "conventional_compiled"].value == pytest.approx(1.25)
    tuned = ratios["streamcheck_tuned", "conventional_tuned"]
    assert tuned.same_settings and tuned.label == (
        "streamcheck_tuned (channels-last + keep_freed_host_memory()) / "
        "conventional_tuned (channels-last + keep_freed_host_memory())"
    )
    assert not ratios["streamcheck_tuned", "conventional_compiled"].same_settings
    # Rule B3: conventional at 8192^2 is estimated (flagged) from its linear trend: 64000 MiB.
    large = analysis.headline(df)["memory_large"]
    assert large.estimated and large.input_px == 8192
    assert large.value == pytest.approx((100 + 640) / 64000)
    assert analysis.conventional_at(df, 2048, "peak_alloc_bytes") == (4000 * MiB, False)


def test_plots_and_summary_build_from_a_results_file(tmp_path: Path) -> None:
    write_rows(tmp_path, _fixture_rows())
    written = plots.build(tmp_path)
    assert sorted(p.name for p in written) == ["fig2_tile.png", "fig3_input.png"]
    assert all(p.stat().st_size > 10_000 for p in written)
    md = summary.write(tmp_path, rebuild_command="python -m suites.benchmark --plots-only")
    assert md is not None
    text = md.read_text()
    # 2048^2: time 12 / 10 = 1.2 (met); allocator 140 / 4000 = 0.035; 8192^2 conventional is
    # estimated from the linear fit: 1000 * 64 = 64000 MiB vs 740 MiB streaming -> 0.0116.
    defaults = "streamcheck (PyTorch defaults) / conventional (PyTorch defaults)"
    assert f"| time {defaults}, 2048², tile 512 | 1.20 | <= 1.3 | met |" in text
    tuned = "streamcheck_tuned (channels-last + keep_freed_host_memory()) / conventional_tuned"
    assert f"| {tuned} (channels-last + keep_freed_host_memory()) | 0.80 | – | 0.04 |" in text
    assert "| 0.012 | <= 0.05 | met | conventional estimated (linear fit in pixels) |" in text
    peer = "streamcheck (PyTorch defaults) / lightstream (PyTorch defaults)"
    assert f"time {peer}, 2048², tile 512 | 0.75 |" in text
    assert "| 1.0000 | >= 0.99 | met |" in text  # time exactly linear in pixels
    assert "conventional/paper/plain|cpu|float32|8192|-|sum" in text and "oom" in text


def test_gate_passes_and_fails_against_the_ceilings(tmp_path: Path) -> None:
    write_rows(tmp_path, _fixture_rows())
    ceilings = gate.read_ceilings()
    passed, lines = gate.check(tmp_path, ceilings)
    assert passed, lines
    assert len(lines) == 3 * len(ceilings["pair"])
    tuned = next(p for p in ceilings["pair"] if p["streaming"] == "streamcheck_tuned")
    strict = {**ceilings, "pair": [{**tuned, "time_ratio_max": 0.7}]}  # fixture: 0.8
    passed, lines = gate.check(tmp_path, strict)
    assert not passed
    assert any(line.startswith("FAILED time") and "streamcheck_tuned" in line for line in lines)
    assert "GATE FAILED" in lines[-1]


def test_a_conventional_point_predicted_not_to_fit_is_not_run() -> None:
    # 1 GiB per 1024^2 -> 64 GiB at 8192^2
    rows = [
        make_row("conventional", n, None, rss_delta_bytes=GiB * (n / 1024) ** 2)
        for n in (1024, 2048)
    ]
    df = analysis.frame(rows)
    big = Point(name="conventional", input_px=8192)
    why = analysis.predicted_oom(big, df, budget_bytes=16 * GiB)
    assert why is not None and "64.0 GiB" in why
    assert analysis.predicted_oom(replace(big, input_px=2048), df, budget_bytes=16 * GiB) is None
    streamed = replace(big, name="streamcheck", tile_px=512)
    assert analysis.predicted_oom(streamed, df, budget_bytes=16 * GiB) is None
    # A tuned conventional point with no trend of its own uses plain conventional's.
    tuned = analysis.predicted_oom(
        replace(big, name="conventional_tuned"), df, budget_bytes=16 * GiB
    )
    assert tuned is not None and "conventional points" in tuned


def test_redo_measures_a_done_point_again_and_the_new_row_wins(tmp_path: Path) -> None:
    # Conventional points predicted not to fit are recorded without a process: a fast point.
    path = results.results_path(tmp_path)
    for n in (1024, 2048):  # 1 GiB per 1024^2 -> 64 GiB at 8192^2
        results.append_row(
            path, make_row("conventional", n, None, rss_delta_bytes=GiB * (n / 1024) ** 2)
        )
    big = Point(name="conventional", input_px=8192, mem_budget_bytes=16 * GiB)
    first = runner.run_points([big], tmp_path, command="first", progress=False)
    assert [r["status"] for r in first] == ["oom"]
    assert runner.run_points([big], tmp_path, command="resume", progress=False) == []
    again = runner.run_points(
        [big], tmp_path, command="redo", progress=False, redo=lambda p: "|8192|" in p.key
    )
    assert [r["run"]["command"] for r in again] == ["redo"]
    latest = {r["key"]: r for r in results.latest_rows(results.read_rows(path))}
    assert latest[big.key]["run"]["command"] == "redo"
    assert len(results.read_rows(path)) == 4  # the superseded row stays in the file


def test_the_cuda_path_runs_or_is_skipped_cleanly(tmp_path: Path) -> None:
    """``--device cuda``: on a machine without CUDA every point is a ``skipped`` row with its
    environment; with CUDA, rows measured by CUDA events and ``max_memory_allocated``."""
    points = grid.points("tiny", ["input"], device="cuda", grad_check_f64_max_px=0)
    assert points and all(p.device == "cuda" for p in points)
    rows = runner.run_points(points[:2], tmp_path, command="pytest", progress=False)
    for row in rows:
        assert row["environment"]["device"] == "cuda" and row["params"]["device"] == "cuda"
        if torch.cuda.is_available():
            assert row["status"] == "ok", row["reason"]
            assert row["environment"]["gpu"] == torch.cuda.get_device_name("cuda")
            assert row["metrics"]["time_meter"] == "CUDA events"
            assert row["metrics"]["alloc_meter"] == "torch.cuda.max_memory_allocated"
        else:
            assert (row["status"], row["reason"]) == ("skipped", "CUDA is not available")
            assert row["environment"]["gpu"] is None
    assert summary.write(tmp_path, rebuild_command="x") is not None  # the analysis reads them
    # A rerun on the same machine finds them done (skipped for a reason that still holds).
    assert runner.run_points(points[:2], tmp_path, command="pytest", progress=False) == []


@pytest.mark.gpu
def test_the_step_timer_reads_cuda_events() -> None:
    timer = point.StepTimer("cuda")
    x = torch.randn(2048, 2048, device="cuda")

    def step() -> None:
        (x @ x).sum()
        torch.cuda.synchronize()

    for _ in range(2):
        timer(step)
    m = timer.metrics()
    assert m["time_meter"] == "CUDA events" and len(m["time_s_all"]) == 2
    assert all(
        0 < g <= w * 1.5 + 1e-3 for g, w in zip(m["time_s_all"], m["wall_s_all"], strict=True)
    )


def test_the_table2_network_streams_with_the_conventional_gradients() -> None:
    """The paper's Table 2 case (GPU sweep) runs end to end on CPU at a tiny size."""
    p = Point(name="table2_streamcheck", input_px=256, tile_px=192, grad_check_f64_max_px=0, **TINY)
    row = point.measure(p)
    assert row["status"] == "ok", row["reason"]
    assert row["metrics"]["n_tiles"] == 16
    # float32 against conventional float32 (same dropout draw), ten streamed convolutions deep:
    # measured 7e-5; the float64 error of the same comparison is 1e-14.
    assert 0 <= row["metrics"]["grad_rel_error"] < 1e-3


@pytest.mark.parametrize("name", grid.RESNET18_CASES)
def test_the_second_network_cases_run_with_the_conventional_gradients(name: str) -> None:
    """The ResNet-18 cases (suite resnet18) end to end at a tiny size: one tile of the whole
    image (its receptive field, 435 px, needs larger tiles; its streaming is exact by
    tests/test_zoo.py), BatchNorm frozen on both sides, so every case has conventional's grads."""
    p = Point(name=name, input_px=448, tile_px=864, grad_check_f64_max_px=0, **TINY)
    row = point.measure(p)
    assert row["status"] == "ok", row["reason"]
    assert row["metrics"]["settings"] == grid.CASES[name].settings
    assert row["metrics"]["grad_ref"].startswith("conventional training")
    if name != "resnet18_conventional":  # the reference itself has no error row
        # float32: layout and kernel choice change the rounding only. Bound: unit roundoff x the
        # longest accumulation (3 x 3 x 512 terms) x the 20 convolutions it passes (measured
        # 1.9e-3 for the channels-last case).
        assert 0 <= row["metrics"]["grad_rel_error"] < 2**-24 * 3 * 3 * 512 * 20


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
