"""The suites' kit runs its own docstring examples (pytest collects doctests in streamcheck/ only)."""

from __future__ import annotations

import doctest
from types import ModuleType

import pytest

from suites import environment, fresh, meters, rows, trunks
from suites.benchmark import grid, workload


@pytest.mark.parametrize(
    "module", [environment, fresh, meters, rows, trunks, grid, workload], ids=lambda m: m.__name__
)
def test_docstring_examples_run(module: ModuleType) -> None:
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.failed == 0
    assert result.attempted > 0
