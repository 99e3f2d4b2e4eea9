"""Section 3 of the report: memory and time (paper Figs 2-3), from the benchmark rows.

Every ratio, fit and estimate comes from ``suites/benchmark/analysis.py`` (the one analysis of the
results); this module only lays them out next to the paper's claims.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from suites.benchmark import analysis as A
from suites.benchmark.summary import like_with_like

from .format import PAPER, err, figure, mib, missing_note, relpath, table
from .sources import Source, finite


def row_values(rows: list[dict[str, Any]], key: str) -> str:
    """The distinct values of ``key`` over (flat) benchmark rows, comma-separated."""
    found = sorted(
        {str(r[key]) for r in rows if r.get(key) is not None and r.get(key) == r.get(key)}
    )
    return ", ".join(found) if found else "n/a"


def bench_commands(bench: Source) -> list[str]:
    """The commands that measured the benchmark rows (``run.command`` of each row)."""
    return sorted(
        {str(r["run_command"]) for r in bench.data.get("rows", []) if r.get("run_command")}
    )


def _v(df: pd.DataFrame, name: str, px: int, tile: int | None, metric: str) -> float | None:
    return A.value_at(df, name, px, None if name.startswith("conventional") else tile, metric)


def _claims_table(df: pd.DataFrame, tile: int) -> str:
    rows = []
    head = A.headline(df)
    for meter, label in (("peak_alloc_bytes", "allocator peak"), ("rss_delta_bytes", "RSS delta")):
        both = []
        for px in sorted({int(p) for p in A.ok(df, "streamcheck", tile_px=tile)["input_px"]}):
            r = A.pair_ratio(df, "streamcheck", "conventional", meter, input_px=px, tile_px=tile)
            if r.value is not None:
                both.append((100 * (1 - r.value), px))
        best = max(both) if both else None
        text = f"{best[0]:.1f} % at {best[1]} px (both measured)" if best else "not measured"
        large = head["memory_large"]
        if large is not None and large.estimated:
            r = A.pair_ratio(
                df, "streamcheck", "conventional", meter, input_px=large.input_px, tile_px=tile,
                estimate=True,
            )  # fmt: skip
            conv, _ = A.conventional_at(df, large.input_px, meter)
            if r.value is not None:
                text += (
                    f"; {100 * (1 - r.value):.1f} % at {large.input_px} px against an estimated "
                    f"conventional {mib(conv)} MiB (linear in pixels; conventional did not run there)"
                )
        rows.append(
            [
                f"memory saved by streaming ({label}; both PyTorch defaults)",
                f"up to {PAPER['memory_saving_pct']} % (Fig. 3; conventional estimated above "
                f"{PAPER['conventional_estimated_above_px']} px)",
                text,
            ]
        )
    stream = A.ok(df, "streamcheck", tile_px=tile)
    fit = A.linear_fit(stream["pixels"], stream["time_s_median"]) if len(stream) else None
    slope = A.loglog_exponent(stream["pixels"], stream["time_s_median"]) if len(stream) else None
    if fit is None or slope is None or fit.n < 3:
        linear = f"not measured ({len(stream)} input sizes; a trend needs three or more)"
    else:
        span = (int(stream["input_px"].min()), int(stream["input_px"].max()))
        linear = (
            f"log-log slope {slope:.2f} over {span[0]}-{span[1]} px (1 = linear); R² of a "
            f"straight line in pixels {fit.r2:.4f} ({fit.n} sizes)"
        )
    rows.append(["streaming time vs input pixels", PAPER["time"] + " (Fig. 3)", linear])
    graded = stream[stream["grad_rel_error_f64"].notna()] if len(stream) else stream
    if len(graded):
        px = int(graded["input_px"].max())
        parts = [
            f"{name} {err(_v(df, name, px, tile, 'grad_rel_error_f64'))}"
            for name in ("streamcheck", "conventional", "lightstream")
            if _v(df, name, px, tile, "grad_rel_error_f64") is not None
        ]
        rows.append(
            [
                "weight-gradient error vs conventional float64",
                "equal gradients (Section 3 of the paper)",
                f"{', '.join(parts)} at {px} px ({graded['dtype'].iloc[0]})",
            ]
        )
    time = "every pair, named with its settings: *Like with like* below"
    rows.append(["time streaming / conventional", "longer (Figs 2-3; no single number)", time])
    peer = [
        (px, A.ratio(_v(df, "lightstream", px, tile, "time_s_median"), _v(df, "conventional", px, tile, "time_s_median")))
        for px in sorted({int(p) for p in A.ok(df, "lightstream")["input_px"]})
    ]  # fmt: skip
    peer = [(px, r) for px, r in peer if r is not None]
    rows.append(
        [
            "lightstream / conventional time (both PyTorch defaults)",
            "-",
            ", ".join(f"{r:.2f} at {px} px" for px, r in peer)
            if peer
            else "not measured (no lightstream row)",
        ]
    )
    return table(["quantity", "paper (published, GPU)", "here (measured)"], rows, align="lll")


def memory_section(bench: Source, out_dir: Path) -> str:
    parts = ["## 3. Memory and time (paper Figs 2-3)", ""]
    if not bench.found:
        parts += missing_note(bench, "python -m suites.benchmark")
        parts += _figures(bench, out_dir, None)
        return "\n".join(parts)
    df: pd.DataFrame = bench.data["frame"]
    rows = bench.data["rows"]
    command = "; ".join(bench_commands(bench)) or None
    tile = A.fig3_tile_px(df) or A.PAPER_TILE_PX
    measured = [r for r in rows if r.get("status") == "ok"] or rows
    devices = sorted(
        {str(r.get("env_gpu") or r.get("env_cpu") or r.get("device")) for r in measured}
    )
    dtypes = sorted({str(r.get("dtype")) for r in measured if r.get("dtype")})
    parts += [
        "The paper's Figs 2-3 network (three 3x3 convolutions with 3, 64 and 3 output channels), "
        f"one forward + backward per step, measured on {', '.join(devices)} in {', '.join(dtypes)}. "
        "Two memory meters, never mixed: *allocator peak* (live tensors, from torch's profiler on "
        "CPU or CUDA's allocator statistics) and *RSS delta* (peak resident memory of a fresh "
        "process above its size before the timed steps). Time is the median of the timed steps. "
        "Every ratio names the settings of both sides (`suites/benchmark/analysis.py`, Rule B2).",
        "",
        "### Key ratios next to the paper's claims",
        "",
        _claims_table(df, tile),
        "",
        "### Like with like",
        "",
        *like_with_like(df),
        "",
        "Every point, per input and tile size, with its load and gradient errors: the benchmark's "
        "own summary (linked below).",
    ]
    statuses = [r for r in rows if r.get("status", "ok") != "ok" and r.get("suite") != "speed"]
    if statuses:
        parts += [
            "",
            "Points that did not complete: "
            + "; ".join(
                f"{r.get('name')} {r.get('input_px')} px"
                + (f" tile {r.get('tile_px')}" if finite(r.get("tile_px")) else "")
                + f": {r.get('status')}"
                for r in statuses
            )
            + ".",
        ]
    if not len(A.ok(df, "lightstream")):
        reasons = sorted(
            {
                str(r.get("reason"))
                for r in rows
                if r.get("name") == "lightstream" and r.get("reason")
            }
        )
        parts += [
            "",
            "**No lightstream row**: the peer library was not measured in these result files"
            + (f" ({'; '.join(reasons)})." if reasons else "."),
        ]
    parts += ["", *_figures(bench, out_dir, command)]
    return "\n".join(parts)


def headline_cost(bench: Source) -> str:
    """The README's cost line (Rule B4): three time ratios, each naming its settings once, and the
    memory saved."""
    df = bench.data["frame"]
    head = A.headline(df)
    n, t = A.PAPER_INPUT_PX, A.PAPER_TILE_PX
    parts = []
    for what, (s_settings, s_time), (c_settings, c_time), value in head["time"]:
        sides = (
            f"both {s_settings}, {s_time:.2f} s / {c_time:.2f} s"
            if s_settings == c_settings
            else f"{s_settings}, {s_time:.2f} s / {c_settings}, {c_time:.2f} s"
        )
        parts.append(f"**{value:.2f}x** with {what} ({sides})")
    text = f"- **Cost?** One training step at {n}², tile {t}, streamed / conventional time: "
    text += "; ".join(parts) if parts else "not measured on both sides"
    timed = [A.ok(df, name, input_px=n) for name in head["names"]]
    busy = [b for x in timed for b in x.get("other_processes_cores_busy", []) if finite(b)]
    if busy and max(busy) > 0.5:  # Rule E3 (suites/environment.py): the load is part of a timing
        text += (
            f" (measured on a shared 2-core CPU while other jobs kept {min(busy):.1f}-"
            f"{max(busy):.1f} cores busy)"
        )
    memory, large = head["memory"], head["memory_large"]
    if memory is not None:
        text += f". Peak memory (allocator, both PyTorch defaults): {100 * memory.value:.0f} % of conventional's"
    if large is not None and large.value is not None:
        how = (
            "an estimated conventional (linear in pixels; it did not run)"
            if large.estimated
            else "conventional"
        )
        text += f"; at {large.input_px}², {100 * large.value:.1f} % of {how}"
    return text + "."


# What each benchmark figure shows (file names from suites/benchmark/plots.py).
FIGURE_CAPTIONS = {
    "fig2_tile": "Fig. 2 replica: peak memory and time against the tile size, one input size.",
    "fig3_input": "Fig. 3 replica: time and peak memory against the input size at one tile size; "
    "conventional points it could not measure are estimated, as in the paper.",
}


def _figures(source: Source, out_dir: Path, command: str | None) -> list[str]:
    if not source.figures:
        return [f"No figures (`*.png`) in `{source.folder}`."]
    parts = []
    for i, path in enumerate(source.figures, 1):
        caption = FIGURE_CAPTIONS.get(path.stem, path.stem.replace("_", " ") + ".")
        parts += [figure(path, out_dir, f"Figure 3.{i}", caption, command), ""]
    summary = source.folder / "SUMMARY.md"
    if summary.exists():
        parts += [
            f"The benchmark's own summary: [`{relpath(summary, out_dir)}`]({relpath(summary, out_dir)}).",
            "",
        ]
    return parts
