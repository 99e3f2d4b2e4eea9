"""Every suite's ``SUMMARY.md``, rewritten from the result files next to it.

Rule P5 (NOTE in render.py): ``python -m suites.report`` rewrites them before ``REPORT.md``, so
that one command regenerates every report from the committed result files, and a summary that
no longer matches its rows (a writer changed, rows added without a rebuild) shows as a diff;
``tests/test_report.py`` checks that each committed summary regenerates to the byte. Figures are
redrawn only where the suite's writer draws them with its summary (slides, U-Net).
"""

from __future__ import annotations

from pathlib import Path


def write_all(reports: Path) -> list[Path]:
    """Rewrite each summary whose result files are under ``reports``; returns what was written."""
    from suites import memory_estimate
    from suites.benchmark import summary as benchmark
    from suites.equivalence.summary import write_summary as equivalence
    from suites.imagenette.plots import write_summary as imagenette
    from suites.levels import summary as levels
    from suites.resolution.summary import write_summary as resolution
    from suites.slides.summary import write_summary as slides
    from suites.unet import summary as unet
    from suites.zoo.models import zoo
    from suites.zoo.summary import write_summary as zoo_summary

    def has(folder: str, name: str = "results.jsonl") -> Path | None:
        return reports / folder if (reports / folder / name).is_file() else None

    written: list[Path | None] = []
    if out := has("equivalence", "record.json"):
        written.append(equivalence(out))
    if out := has("benchmark"):
        rebuild = f"python -m suites.benchmark --plots-only --out {reports.name}/benchmark"
        written.append(
            benchmark.write(out, rebuild_command=rebuild, legal_tile=benchmark.legal_tile_note)
        )
    if out := has("unet"):
        written += [p for p in unet.build(out) if p.suffix == ".md"]
    if out := has("zoo"):
        zoo_summary(out / "results.jsonl", out / "SUMMARY.md", total=len(zoo()))
        written.append(out / "SUMMARY.md")
    if out := has("levels"):
        written.append(levels.write_summary(out))
    if out := has("levels/cache"):
        written.append(levels.write_cache_summary(out))
    if out := has("slides"):
        slides(out / "results.jsonl", out)
        written.append(out / "SUMMARY.md")
    if out := has("memory_estimate"):
        written.append(memory_estimate.write_summary(out))
    for run in sorted((reports / "imagenette").glob("**/*_run.json")):
        written.append(imagenette(run.parent, run.name.removesuffix("_run.json")))
    if out := has("resolution", "summary.json"):
        written.append(resolution(out))
    return [p for p in written if p is not None]
