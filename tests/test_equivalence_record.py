"""The equivalence record (``python -m suites.equivalence``): its quick path writes a well-formed
record of drawn networks (chains and DAGs), all checked, none failed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from suites.equivalence.__main__ import main
from suites.equivalence.draws import FAMILIES, examples_per_ndim
from suites.equivalence.record import DTYPES, KINDS, NDIMS

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


def test_examples_are_split_over_every_ndim() -> None:
    for total in (1, 2, 3, 6, 500):
        counts = examples_per_ndim(total)
        assert set(counts) == set(NDIMS) and min(counts.values()) >= 1
        assert total < 3 or sum(counts.values()) == total


@pytest.mark.slow
def test_quick_record_is_well_formed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--examples", "3", "--dag-examples", "3", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "record.json").read_text())
    cases = [json.loads(line) for line in (tmp_path / "cases.jsonl").read_text().splitlines()]

    # one progress line per (family, ndim, dtype) group, then the summary line
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("[") for line in lines) == len(FAMILIES) * len(NDIMS) * len(DTYPES)
    assert "0 failures" in lines[-1]
    assert (
        f"**Exact?** {record['summary']['n_cases']} generated networks"
        in (tmp_path / "SUMMARY.md").read_text()
    )

    summary = record["summary"]
    assert record["failures"] == [] and summary["n_failed"] == 0
    assert summary["n_cases"] == len(cases) == len(FAMILIES) * len(NDIMS) * len(DTYPES)
    for dtype in DTYPES:
        assert summary["networks"][dtype] == {f"{n}d": len(FAMILIES) for n in NDIMS}
        for family in FAMILIES:
            part = summary["by_family"][family]
            assert part["networks"][dtype] == {f"{n}d": 1 for n in NDIMS}
            assert part["n_failed"] == 0
        tiles = summary["tiles_per_case"][dtype]
        assert 2 <= tiles["min"] <= tiles["max"]
        for kind in ("output", "input_grad"):
            worst = summary["worst_rel_error"][dtype][kind]
            assert worst["max_rel_error"] <= worst["rtol"]
            assert str(worst["case"]) in record["worst_cases"]
    assert summary["worst_rel_error"]["float64"]["output"]["max_rel_error"] < 1e-12
    assert any(kind.startswith("Conv") for kind in summary["layer_kinds"])
    assert any(kind.startswith("join: ") for kind in summary["by_family"]["dag"]["layer_kinds"])
    assert not any(
        kind.startswith("join: ") for kind in summary["by_family"]["chain"]["layer_kinds"]
    )

    assert {case["family"] for case in cases} == set(FAMILIES)
    for case in cases:
        assert case["passed"] and case["n_tiles"] >= 2
        assert set(KINDS) <= set(case["worst_rel_error"])
    assert record["trunks"] == []  # --quick skips them

    meta = record["metadata"]
    assert meta["command"].startswith("python -m suites.equivalence --quick")
    env = meta["environment"]  # suites/environment.py, Rule E1
    assert env["torch"] and env["streamcheck"] and meta["hypothesis"]
    assert env["git_commit"] and env["threads"] == 1 and env["device"] == "cpu"


@pytest.mark.slow
def test_trunk_entry_is_well_formed() -> None:
    """One (small) torchvision trunk through the same path as the record's trunk table."""
    pytest.importorskip("torchvision")
    import torch

    from suites.equivalence.record import check_trunk
    from suites.trunks import TRUNKS

    trunk = next(t for t in TRUNKS if t.name == "MobileNetV2")
    row = check_trunk(trunk, torch.float64)
    assert row["passed"], row.get("error")
    assert row["n_tiles"] >= 4 and row["worst_rel_error"]["param_grad"] < 1e-12
