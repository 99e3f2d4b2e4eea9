"""``REPORT.md`` (and ``report.html``): an index of the suites, each with its headline and a link
to its own ``SUMMARY.md``, then the limits the engine states.

NOTE [ Where the report's numbers come from ]
Rule P1. Each suite presents its numbers once, in its ``SUMMARY.md``; its headline here is the
         string its summary module makes from the same result files (``headline``), never
         derived again here.
Rule P2. A suite whose result files are missing is said to be not measured, with the command that
         measures it, never filled in.
Rule P3. Every figure is a PNG written by a suite and shown in that suite's summary.
Rule P4. The list of layers that cannot be streamed is asked of the engine when the report is
         built (``limits.py``), so it cannot drift from the code.
Rule P5. Every suite's ``SUMMARY.md`` is rewritten from its result files by the same command
         (``summaries.py``), so a summary cannot fall behind its rows or its writer.
"""

from __future__ import annotations

import html
import importlib
from dataclasses import dataclass
from pathlib import Path

from suites.markdown import relpath


@dataclass(frozen=True)
class Suite:
    """One entry of the index: where its files are and what it answers."""

    title: str
    folder: str  # under reports/
    needs: str  # the result file whose absence means "not measured"
    command: str
    about: str
    module: str  # its ``headline(folder)`` makes the line shown here; "": none
    summaries: str = "*SUMMARY.md"  # linked, under the folder


SUITES = (
    Suite(
        "Equivalence: is streaming exact?", "equivalence", "record.json",
        "python -m suites.equivalence",
        "Networks drawn by hypothesis (chains, DAGs, U-Nets, pyramids, with and without "
        "statistics over the map) and torchvision trunks, each run plainly and streamed tile by "
        "tile on the same weights and input; the output, the input gradient and every parameter "
        "gradient compared in float64 and float32.",
        "suites.equivalence.summary",
    ),
    Suite(
        "Memory and time (paper Figs 2-3)", "benchmark", "results.jsonl",
        "python -m suites.benchmark",
        "The paper's Figs 2-3 network, one training step per point in a fresh process, streamed "
        "and conventional with each side's settings named; the paper's published claims beside "
        "the measured numbers.",
        "suites.benchmark.summary",
    ),
    Suite(
        "Training (paper Fig. 4)", "imagenette", "*_run.json", "python -m suites.imagenette",
        "The Table 1 network trained twice from the same weights on identical batches, "
        "conventionally and streamed (STAND-IN data where ImageNette is not available).",
        "suites.imagenette.plots", "**/*SUMMARY.md",
    ),
    Suite(
        "Resolution and saliency (paper Tables 3-5, Figs 5-6)", "resolution", "summary.json",
        "python -m suites.resolution",
        "Image-level labels on generated slides with small lesions, trained streamed at several "
        "resolutions: does accuracy rise with resolution, does saliency find the lesions.",
        "suites.resolution.summary",
    ),
    Suite(
        "Real trunks (the zoo)", "zoo", "results.jsonl", "python -m suites.zoo",
        "torchvision and timm trunks with random weights, streamed in float64 and compared with "
        "the plain module; whole classifiers split into a streamed trunk and a head.",
        "suites.zoo.summary",
    ),
    Suite(
        "Whole-slide images from disk", "slides", "results.jsonl", "python -m suites.slides",
        "Generated pyramidal slides streamed from their files: peak memory against file size, "
        "file against memory, background skipping, JPEG decoding.",
        "suites.slides.summary",
    ),
    Suite(
        "Segmentation: U-Nets", "unet", "results.jsonl", "python -m suites.unet",
        "One training step of a small 2-D and 3-D U-Net at growing sizes, streamed and "
        "conventional (their exactness is in the equivalence record's U-Net family).",
        "suites.unet.summary",
    ),
    Suite(
        "What statistics over space cost", "levels", "results.jsonl", "python -m suites.levels",
        "Networks with BatchNorm in training mode or squeeze-excite, streamed through their "
        "statistic levels, against a twin that reads the statistics from buffers; the plan's "
        "time estimate beside the measured factor.",
        "suites.levels.summary",
    ),
    Suite(
        "Kept maps: what a cache budget buys", "levels/cache", "results.jsonl",
        "python -m suites.levels --cache",
        "The same trunks with intermediate maps kept in host memory or on disk within a budget.",
        "",
    ),
    Suite(
        "The plan's memory estimate", "memory_estimate", "results.jsonl",
        "python -m suites.memory_estimate",
        "`plan`'s peak memory estimate against the allocator's and the process's measured peaks "
        "on three networks at several tiles.",
        "suites.memory_estimate",
    ),
)  # fmt: skip


def suite_section(suite: Suite, reports: Path, out: Path) -> list[str]:
    """The suite's paragraph, its headline (Rule P1) and the links to its summaries."""
    folder = reports / suite.folder
    lines = [f"## {suite.title}", "", suite.about, ""]
    if not any(folder.glob(suite.needs)):
        return [*lines, f"**Not measured**: no `{suite.needs}` in `{suite.folder}/`; run `{suite.command}`.", ""]  # fmt: skip
    if suite.module and (text := importlib.import_module(suite.module).headline(folder)):
        lines += [text, ""]
    summaries = sorted(folder.glob(suite.summaries))
    links = [f"[`{p.relative_to(reports).as_posix()}`]({relpath(p, out)})" for p in summaries]
    return [*lines, "Details: " + (", ".join(links) or "no summary written yet") + ".", ""]


def markdown_report(reports: Path, out: Path, *, command: str) -> str:
    from .limits import limits_section

    lines = [
        "# streamcheck: is streaming exact, and what does it cost?",
        "",
        f"Generated by `{command}` from the result files under `reports/`; do not edit by hand. "
        "Each suite below presents its numbers in its own summary (linked); the lines here are "
        "those summaries' headlines (Rule P1 of `suites/report/render.py`).",
        "",
    ]
    for suite in SUITES:
        lines += suite_section(suite, reports, out)
    return "\n".join([*lines, limits_section(), ""])


def readme_headline(reports: Path) -> list[str]:
    """The README's two lines: is streaming exact (equivalence), what does it cost (benchmark)."""
    lines = []
    for suite, missing in ((SUITES[0], "**Exact?** No equivalence record found."),
                           (SUITES[1], "**Cost?** No benchmark results found.")):  # fmt: skip
        folder = reports / suite.folder
        found = any(folder.glob(suite.needs))
        lines.append(
            "- " + (importlib.import_module(suite.module).headline(folder) if found else missing)
        )
    return lines


def to_html(markdown_text: str, title: str) -> str:
    """One page; links to the summaries stay relative."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code", "toc"])
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1.5em; color: #1f2328; line-height: 1.5; }}
h1 {{ border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }}
h2 {{ border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 2em; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.85em; display: block;
        overflow-x: auto; }}
th, td {{ border: 1px solid #d0d7de; padding: 4px 8px; vertical-align: top; }}
th {{ background: #f6f8fa; }}
code {{ background: #f6f8fa; padding: 0 .25em; border-radius: 4px; font-size: 0.9em; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""
