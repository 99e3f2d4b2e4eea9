"""The levels suite's quick path (suites/levels, Rules LV1-LV3): rows, factors and the summary."""

from __future__ import annotations

from pathlib import Path

from suites.levels.__main__ import main
from suites.rows import read_rows, results_path


def test_quick_run_writes_rows_and_a_summary(tmp_path: Path) -> None:
    assert main(["--quick", "--steps", "1", "--out", str(tmp_path)]) == 0
    rows = {r["key"]: r for r in read_rows(results_path(tmp_path))}
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows.values())
    levels = {
        (r["params"]["network"], r["params"]["known"]): r["metrics"]["levels"]
        for r in rows.values()
        if r["params"]["kind"] == "time"
    }
    assert levels == {
        ("paper_se0", False): 0,
        ("paper_se0", True): 0,
        ("paper_se1", False): 1,
        ("paper_se1", True): 0,
    }
    whole = [r for r in rows.values() if r["params"]["kind"] == "memory"]
    assert {r["metrics"]["plan_output_bytes"] == 0 for r in whole} == {True, False}
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "| paper_se1 |" in summary and "streamed whole, to its logits" in summary
    assert main(["--quick", "--steps", "1", "--out", str(tmp_path)]) == 0  # resumes: nothing new
    assert len(read_rows(results_path(tmp_path))) == 6


def test_quick_cache_run_writes_time_memory_and_budget_points_and_a_summary(
    tmp_path: Path,
) -> None:
    assert main(["--cache", "--quick", "--steps", "1", "--out", str(tmp_path)]) == 0
    rows = read_rows(results_path(tmp_path / "cache"))
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    by = {(r["params"]["kind"], r["params"]["variant"]): r for r in rows}
    for variant in ("host", "disk"):  # Rule LV4: the same budget, the same plan
        cached = by[("time", variant)]["metrics"]
        assert (
            cached["kept_maps"] and cached["kept_bytes"] <= by[("time", variant)]["params"]["cache"]
        )
        assert len(cached["cpu_times"]) == 1 and cached["cpu_times"][0] > 0
    assert (
        by[("time", "host")]["metrics"]["kept_maps"] == by[("time", "disk")]["metrics"]["kept_maps"]
    )
    assert by[("time", "streamed")]["metrics"]["kept_maps"] == []
    conventional = by[("memory", "conventional")]["metrics"]
    assert conventional["run"] and conventional["saved_tensor_bytes"] > 0  # Rule LV5
    plans = by[("budgets", "plan")]["metrics"]["plans"]  # Rule LV6: more budget, less work
    factors = [q["time_factor_estimate"] for q in plans]
    assert factors == sorted(factors, reverse=True) and factors[-1] < factors[0]
    summary = (tmp_path / "cache" / "SUMMARY.md").read_text()
    assert summary.count("| resnet18_train_bn |") == 3  # time, budgets, memory
