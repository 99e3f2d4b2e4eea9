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


def test_quick_cache_run_writes_three_points_per_trunk_and_a_summary(tmp_path: Path) -> None:
    assert main(["--cache", "--quick", "--steps", "1", "--out", str(tmp_path)]) == 0
    rows = read_rows(results_path(tmp_path / "cache"))
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    cached = [r for r in rows if r["params"]["cache"]]
    assert len(cached) == 1 and cached[0]["metrics"]["kept_maps"]
    assert cached[0]["metrics"]["kept_bytes"] <= cached[0]["params"]["cache"]
    assert "| resnet18_train_bn |" in (tmp_path / "cache" / "SUMMARY.md").read_text()
