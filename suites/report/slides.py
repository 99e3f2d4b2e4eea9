"""The report's slides section: whole-slide images streamed from disk, read from
``reports/slides/results.jsonl`` (written by ``python -m suites.slides``; render.py Rules P1-P2)."""

from __future__ import annotations

from pathlib import Path

from suites.slides.summary import body, load

from .format import figure


def slides_section(reports: Path, out_dir: Path) -> str:
    """Peak RSS against file size, file against memory, and background skipping.

    >>> slides_section(Path("/nonexistent"), Path(".")).splitlines()[-1]
    'Not measured: reports/slides/results.jsonl is missing (run `python -m suites.slides`).'
    """
    results = reports / "slides" / "results.jsonl"
    lines = ["## Whole-slide images from disk", ""]
    rows = load(results) if results.exists() else []
    if not rows:
        lines.append(
            "Not measured: reports/slides/results.jsonl is missing (run `python -m suites.slides`)."
        )
        return "\n".join(lines)
    png = reports / "slides" / "slides.png"
    commands = "; ".join(sorted({r["run"]["command"] for r in rows}))
    picture = (
        figure(png, out_dir, "Fig. S1", "Peak RSS, file against memory, skipping.", commands)
        if png.is_file()
        else "(reports/slides/slides.png is missing)"
    )
    lines += body(rows, results_name="reports/slides/results.jsonl", figure=picture, level="###")
    return "\n".join(lines)
