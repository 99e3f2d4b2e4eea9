"""The suites' kit runs its own docstring examples (pytest collects doctests in streamcheck/ only)."""

from __future__ import annotations

import doctest
import json
from pathlib import Path
from types import ModuleType

import pytest

from suites import environment, fresh, markdown, meters, rows, trunks
from suites.benchmark import grid, workload


@pytest.mark.parametrize(
    "module",
    [environment, fresh, markdown, meters, rows, trunks, grid, workload],
    ids=lambda m: m.__name__,
)
def test_docstring_examples_run(module: ModuleType) -> None:
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.failed == 0
    assert result.attempted > 0


def test_only_a_last_line_may_be_torn(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    row = {"key": "a", "status": "ok", "params": {}, "environment": {}, "metrics": {}, "run": {}}
    path.write_text(json.dumps(row) + "\n" + '{"key": "b", "sta')  # a run killed mid-write
    assert rows.read_rows(path) == [row]
    path.write_text('{"key": "b", "sta\n' + json.dumps(row) + "\n")  # damage, not a killed run
    with pytest.raises(ValueError, match=r"results.jsonl:1: not JSON"):
        rows.read_rows(path)
