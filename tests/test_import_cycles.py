"""No import cycles among the project's modules (suites/import_cycles.py, Rules IC1-IC3)."""

from __future__ import annotations

from pathlib import Path

from suites.import_cycles import cycles, graph


def test_no_import_cycles() -> None:
    assert cycles() == []


def test_a_cycle_is_found(tmp_path: Path) -> None:
    """The oracle itself: a deferred import (inside a function) closes a cycle too; an import
    under ``if TYPE_CHECKING:`` and a submodule's own package do not."""
    package = tmp_path / "streamcheck"
    package.mkdir()
    (package / "__init__.py").write_text("from .a import f\n")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import g\n"
        "def f():\n    from .b import h\n"
    )
    (package / "b.py").write_text("from streamcheck.a import f\ndef h(): ...\n")
    (package / "c.py").write_text("from . import a\ndef g(): ...\n")
    assert graph(tmp_path)["streamcheck.a"] == {"streamcheck.b"}
    assert graph(tmp_path)["streamcheck.c"] == {"streamcheck.a"}
    assert cycles(tmp_path) == [["streamcheck.a", "streamcheck.b"]]
