"""The report as Markdown (``REPORT.md``) and as one self-contained HTML file (``report.html``).

NOTE [ Where the report's numbers come from ]
Rule P1. Every number is read from a result file under ``reports/`` (or computed from such numbers:
         ratios, savings, slopes) at generation time; the only numbers typed here are the paper's
         published claims (``PAPER``), each labelled as the paper's with its place in the paper.
Rule P2. A missing file or field is said in the section it belongs to ("not measured", "not in the
         result files"), never filled in.
Rule P3. Every figure is a PNG written by a suite; its caption gives the command line that
         produced it, from the result metadata.
Rule P4. The list of layers that cannot be streamed is asked of the engine when the report is
         built (``limits.py``), so it cannot drift from the code.
Rule P5. Every suite's ``SUMMARY.md`` is rewritten from its result files by the same command
         (``summaries.py``), so a summary cannot fall behind its rows or its writer.
"""

from __future__ import annotations

import base64
import html
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..environment import environment
from .benchmark import bench_commands, headline_cost, memory_section, row_values
from .equivalence import equivalence_section
from .format import PAPER, commit, err, plural, table
from .resolution import resolution_section
from .slides import slides_section
from .sources import Source, finite, get
from .training import training_section
from .unet import unet_section
from .zoo import zoo_section


# ------------------------------------------------------------------------------ 1. environment
def _environment_cells(e: dict[str, Any]) -> list[Any]:
    """commit, versions, device and threads of one environment record (suites/environment.py;
    an older record's ``versions`` block and ``torch_threads`` are read too)."""

    def version(name: str) -> Any:
        return e.get(name) or get(e, "versions", name, default="n/a")

    return [
        commit(e.get("git_commit")),
        version("python"),
        version("torch"),
        version("torchvision"),
        version("streamcheck"),
        f"{e.get('device', 'n/a')} ({e.get('gpu') or e.get('cpu', 'n/a')})",
        e.get("threads", e.get("torch_threads", "n/a")),
    ]


def environment_section(eq: Source, bench: Source, imn: Source, report_env: dict[str, Any]) -> str:
    rows = []
    e = get(eq.data, "metadata", "environment", default={})
    if eq.found:
        rows.append(
            [
                "equivalence record",
                get(eq.data, "metadata", "finished_utc", default="n/a"),
                *_environment_cells(e),
            ]
        )
    if bench.found:
        brow = [r for r in bench.data["rows"] if r.get("status") == "ok"] or bench.data["rows"]
        dates = sorted(str(r["run_started_utc"]) for r in brow if r.get("run_started_utc"))
        commits = sorted({str(r["env_git_commit"]) for r in brow if r.get("env_git_commit")})
        devices = {(r.get("env_device"), r.get("env_gpu") or r.get("env_cpu")) for r in brow}
        rows.append(
            [
                "benchmark" + (" (quick mode)" if bench.data.get("quick") else ""),
                f"{dates[0]} to {dates[-1]}" if len(dates) > 1 else (dates or ["n/a"])[0],
                ", ".join(commit(c) for c in commits) or "n/a",
                row_values(brow, "env_python"),
                row_values(brow, "env_torch"),
                row_values(brow, "env_torchvision"),
                row_values(brow, "env_streamcheck"),
                ", ".join(sorted(f"{d} ({n})" for d, n in devices)),
                row_values(brow, "env_threads"),
            ]
        )
    if imn.found:
        env = get(imn.data, "run", "environment", default={})
        rows.append(
            [
                f"ImageNette suite ({imn.data['label']})",
                get(imn.data, "run", "finished_utc", default="n/a"),
                *_environment_cells(env),
            ]
        )
    rows.append(
        [
            "this report",
            report_env["date"],
            commit(report_env["git_commit"]),
            report_env["python"],
            report_env["torch"],
            report_env["torchvision"],
            report_env["streamcheck"],
            report_env["device"],
            "n/a",
        ]
    )
    parts = [
        "## 1. Environment",
        "",
        "Read from the metadata each suite writes next to its results; the last row is the "
        "environment that generated this report.",
        "",
        table(
            "source | date (UTC) | git commit | Python | torch | torchvision | streamcheck | device | threads",
            rows,
            align="lllllllll",
        ),
    ]
    missing = [s.name for s in (eq, bench, imn) if not s.found]
    if missing:
        parts += [
            "",
            f"No result files were found for: {', '.join(missing)} (see the sections below).",
        ]
    devices = _devices(eq, bench, imn)
    gpu = sorted(d for d in devices if not d.startswith("cpu"))
    if gpu:
        parts += ["", f"GPU results: {', '.join(gpu)} (the rest on CPU)."]
    else:
        parts += [
            "",
            "**No GPU result**: every number in this report was measured on CPU. The paper's "
            f"Figs 2-3 were measured on an {PAPER['hardware']}; compare ratios, not seconds or bytes.",
        ]
    return "\n".join(parts)


def _devices(eq: Source, bench: Source, imn: Source) -> set[str]:
    """The devices the result files say they ran on ("cpu", "cuda ...")."""
    found = {str(get(eq.data, "metadata", "environment", "device", default="cpu"))}
    for r in bench.data.get("rows", []) if bench.found else []:
        if r.get("status") == "ok":
            device = str(r.get("device", "cpu"))
            found.add(device if device == "cpu" else f"{device} ({r.get('env_gpu', '?')})")
    if imn.found:
        found.add(str(get(imn.data, "run", "environment", "device", default="cpu")))
    return found


# ------------------------------------------------------------------------------- 5. limits
def limits_section(verdicts: tuple[list[Any], list[Any], Any]) -> str:
    refused, streams, reflect = verdicts
    parts = [
        "## 5. Limits",
        "",
        "Streaming is exact only for layers where each output pixel depends on a bounded window "
        "of input pixels, computed the same way wherever the window is. A layer that needs the "
        "whole image (a statistic over space, a global pooling, a reshape of space into "
        "features), or that would draw different random numbers when a tile is recomputed in "
        "the backward pass, cannot be streamed; it has to go after the streamed part, into the "
        "head, which runs normally. The engine refuses such layers before computing anything, "
        "naming the layer. The table below is produced by asking the engine, when this report is "
        "built, to plan each layer placed after a convolution; the reasons are its own messages.",
        "",
        table(
            ["layer", "engine's verdict", "reason (engine message)", "fix (engine message)"],
            ([v.label, v.status, *_reason_and_fix(v.message)] for v in refused),
            align="llll",
        ),
        "",
        "For contrast, the same probe on layers that stream: "
        + ", ".join(
            v.label + ("" if v.status == "streams" else f" (**{v.status}**)") for v in streams
        )
        + (" -- all accepted." if all(v.status == "streams" for v in streams) else "."),
        "",
        (
            f"Reflect padding ({reflect.label[0].lower() + reflect.label[1:]}): streams exactly "
            "(this probe runs the case the property tests pinned as an engine bug)."
            if reflect.status == "streams"
            else f"Known engine gap: {reflect.label} -- {reflect.status} "
            f"(`{_first_line(reflect.message)}`). The equivalence record does not draw reflect "
            "padding while this stands."
        ),
        "",
        "Other limits, in plain words:",
        "",
        "- Cost: the streamed part runs its forward pass twice per tile (once without gradients, "
        "once again in the backward pass), and tiles overlap by the receptive field, so streaming "
        "is slower than conventional training when the image fits; Section 3 has the measured "
        "ratio.",
        "- float32: streamed and conventional runs sum the same terms in a different order, so "
        "float32 results differ by rounding (the checker's float32 tolerance grows with the square "
        "root of the number of pixels summed, Section 2), and two float32 trainings drift apart "
        "over many steps, as a conventional run with reordered sums also does (Section 4). "
        "float64 is the exactness check.",
        "- The memory saving applies to the streamed part; the stitched output of the streamed "
        "part and its gradient are held whole, as is the input image.",
    ]
    return "\n".join(parts)


def _reason_and_fix(message: str) -> list[str]:
    line = message.strip().splitlines()[-1].strip() if message.strip() else ""
    line = re.sub(r"^- '[^']*': ", "", line)
    reason, _, fix = line.partition(" Fix: ")
    if not fix and "; use " in line:  # the tile message: "...; use tile >= 7 or ..."
        reason, _, fix = line.partition("; ")
        reason = reason.removeprefix("streamcheck: ")
    return [reason.rstrip("."), fix.rstrip(".") or "-"]


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


# ------------------------------------------------------------------------------- document
def report_environment() -> dict[str, Any]:
    """The environment record (suites/environment.py) of this report, with its date."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment(device)
    env["torchvision"] = env["torchvision"] or "not installed"
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **env}


def markdown_report(
    eq: Source, bench: Source, imn: Source, verdicts: Any, out_dir: Path, env: dict[str, Any]
) -> str:
    answer = headline(eq, bench)
    sections = [
        "# streamcheck: is streaming exact, and what does it cost?",
        "",
        "Generated by `python -m suites.report` from the result files under `reports/`; do not "
        "edit by hand. Every measured number below is read from those files (Rule P1 of "
        "`suites/report/render.py`); the paper's published claims are labelled as such.",
        "",
        *answer,
        environment_section(eq, bench, imn, env),
        "",
        equivalence_section(eq),
        "",
        memory_section(bench, out_dir),
        "",
        training_section(imn, out_dir),
        "",
        resolution_section(imn.folder.parent, out_dir),  # reports/resolution/summary.json
        "",
        zoo_section(imn.folder.parent),  # reports/zoo/results.jsonl
        "",
        slides_section(imn.folder.parent, out_dir),  # reports/slides/results.jsonl
        "",
        unet_section(imn.folder.parent, out_dir),  # reports/unet/results.jsonl
        "",
        limits_section(verdicts),
        "",
        commands_section(eq, bench, imn, env.get("command", "python -m suites.report")),
        "",
    ]
    return "\n".join(sections)


def _suite_commands(reports: Path) -> list[list[str]]:
    """The commands recorded by the resolution, zoo and slides suites (none where not run)."""
    from suites.slides.summary import load as load_slides
    from suites.zoo.summary import latest

    found: list[tuple[str, Any]] = []
    summary = reports / "resolution" / "summary.json"
    if summary.is_file():
        found.append(("resolution experiment", json.loads(summary.read_text()).get("command")))
    if (reports / "zoo" / "results.jsonl").is_file():
        found += [("zoo", r.get("command")) for r in latest(reports / "zoo" / "results.jsonl")]
    if (reports / "slides" / "results.jsonl").is_file():
        found += [
            ("slides", r["run"]["command"])
            for r in load_slides(reports / "slides" / "results.jsonl")
        ]
    rows: list[list[str]] = []
    for name, command in found:
        if command and [name, f"`{command}`"] not in rows:
            rows.append([name, f"`{command}`"])
    return rows


def commands_section(eq: Source, bench: Source, imn: Source, this: str) -> str:
    """The command lines recorded in the result files, in the order a reader would rerun them."""
    rows = []
    if eq.found:
        rows.append(
            ["equivalence record", f"`{get(eq.data, 'metadata', 'command', default='n/a')}`"]
        )
    if bench.found:
        rows += [["benchmark", f"`{c}`"] for c in bench_commands(bench)]
    if imn.found:
        rows.append(["training", f"`{get(imn.data, 'run', 'command', default='n/a')}`"])
        rows += [
            ["training", f"`{r['run'].get('command', 'n/a')}`"]
            for r in imn.data.get("other_runs", [])
        ]
    rows += _suite_commands(imn.folder.parent)
    rows.append(["this report", f"`{this}`"])
    return "\n".join(
        [
            "## Commands that produced this report",
            "",
            "As recorded in the result files (run from the repository root):",
            "",
            table(["result", "command"], rows, align="ll"),
        ]
    )


def headline(eq: Source, bench: Source) -> list[str]:
    """The report's two-line answer: is streaming exact, and what does it cost."""
    lines = []
    if eq.found:
        s = eq.data.get("summary", {})
        w = s.get("worst_rel_error", {})
        worst64 = max(
            (
                v["max_rel_error"]
                for v in w.get("float64", {}).values()
                if v and finite(v.get("max_rel_error"))
            ),
            default=None,
        )
        failures = eq.data.get("failures", [])
        rounding = sum(1 for f in failures if get(f, "float64_recheck", "passed") is True)
        note = ""
        if rounding:
            note = (
                " (float32 rounding beyond tolerance; "
                + ("the same network is" if rounding == 1 else "the same networks are")
                + " exact in float64)"
                if rounding == len(failures)
                else f" ({rounding} of them float32 rounding, exact in float64)"
            )
        rtol64 = get(w, "float64", "output", "rtol")
        lines.append(
            f"- **Exact?** {s.get('n_cases', 'n/a')} generated networks and "
            f"{len(eq.data.get('trunks', []))} torchvision trunk checks: "
            f"{plural(len(failures), 'failure')}{note}; worst float64 relative error "
            f"{err(worst64)}" + (f" (tolerance {rtol64:g})." if finite(rtol64) else ".")
        )
    else:
        lines.append("- **Exact?** No equivalence record found.")
    if bench.found:
        lines.append(headline_cost(bench))
    else:
        lines.append("- **Cost?** No benchmark results found.")
    return [*lines, ""]


def to_html(markdown_text: str, out_dir: Path, title: str) -> str:
    """One self-contained page: images inlined as base64 data URIs."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code", "toc"])

    def inline(match: re.Match[str]) -> str:
        src = html.unescape(match.group(2))
        path = (out_dir / src).resolve()
        if not path.exists():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'{match.group(1)}"data:image/png;base64,{data}"'

    body = re.sub(r'(<img[^>]*?src=)"([^"]+)"', inline, body)
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
tr:nth-child(even) td {{ background: #fbfcfd; }}
code {{ background: #f6f8fa; padding: 0 .25em; border-radius: 4px; font-size: 0.9em; }}
pre {{ background: #f6f8fa; padding: .8em; overflow-x: auto; }}
img {{ max-width: 100%; border: 1px solid #d0d7de; }}
blockquote {{ border-left: 4px solid #d29922; background: #fff8c5; margin: 1em 0;
             padding: .5em 1em; }}
em {{ color: #57606a; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""
