"""The U-Net sweep's one analysis, its figure and ``SUMMARY.md``, from ``results.jsonl`` only.

Rules (U-Net benchmark):

UB1. A pair is the conventional and the streamed point of one network at one input size, run
     back to back; a ratio is streamed / conventional of the same metric, both sides with
     PyTorch's default settings (benchmark Rule B2), and is given only where both were measured.
UB2. Memory is the CPU allocator's peak of live tensors (``peak_alloc_bytes``, torch.profiler)
     and the fresh process's peak RSS over its baseline (``rss_delta_bytes``); the streamed side's
     plan also says what its stitched output and that output's gradient take (``output_bytes``):
     a full-resolution segmentation output is as large as the image times the classes, streamed
     or not.
UB3. Every row keeps its status: a point that ran out of memory is shown as OOM, never dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from suites.benchmark.analysis import MiB, load, ratio
from suites.benchmark.plots import STYLE, _environment, _finish, _log_y, _px_axis, plt
from suites.benchmark.workload import spatial_dims
from suites.markdown import table

from .networks import SIZES

NETWORKS = {"unet2d": "2-D U-Net (4/8/16 channels)", "unet3d": "3-D U-Net (4/8 channels)"}


def pairs(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rule UB1: one record per network and input size, conventional beside streamed."""
    out: list[dict[str, Any]] = []
    if df.empty:
        return out
    for network in NETWORKS:
        for input_px in sorted(
            {int(n) for n in df[df["name"].str.startswith(network)]["input_px"]}
        ):
            sides = {}
            for kind in ("conventional", "streamcheck"):
                rows = df[(df["name"] == f"{network}_{kind}") & (df["input_px"] == input_px)]
                sides[kind] = rows.iloc[-1] if len(rows) else None
            conv, stream = sides["conventional"], sides["streamcheck"]

            def value(side: pd.Series | None, metric: str) -> float | None:
                if side is None or side["status"] != "ok" or metric not in side:
                    return None
                v = side[metric]
                return float(v) if v is not None and np.isfinite(v) else None

            record: dict[str, Any] = {
                "network": network,
                "input_px": input_px,
                "shape": "x".join([str(input_px)] * spatial_dims(network)),
                "status": {
                    k: (s["status"] if s is not None else "not run") for k, s in sides.items()
                },
                "tile_px": None if stream is None else stream.get("tile_px"),
                "n_tiles": value(stream, "n_tiles"),
                "load_1min": [value(s, "env_load_1min") for s in (conv, stream)],
            }
            for metric in ("time_s_median", "cpu_s_median", "peak_alloc_bytes", "rss_delta_bytes"):
                c, s = value(conv, metric), value(stream, metric)
                record[metric] = (c, s)
                record[f"{metric}_ratio"] = ratio(s, c)
            record["output_bytes"] = value(stream, "output_bytes")
            record["grad_rel_error_f64"] = value(stream, "grad_rel_error_f64")
            out.append(record)
    return out


def _cell(value: float | None, status: str, fmt: str) -> str:
    if status == "oom":
        return "OOM"
    if value is None:
        return status if status != "ok" else "n/a"
    return format(value, fmt)


def summary_table(records: list[dict[str, Any]]) -> str:
    """The pairs as a Markdown table (the SUMMARY and the report both print this one)."""
    rows = []
    for r in records:
        st_c, st_s = r["status"]["conventional"], r["status"]["streamcheck"]
        (tc, ts), (ac, as_) = r["time_s_median"], r["peak_alloc_bytes"]
        (cc, cs) = r["cpu_s_median"]
        (rc, rs) = r["rss_delta_bytes"]
        mib = [None if v is None else v / MiB for v in (ac, as_, rc, rs, r["output_bytes"])]
        rows.append(
            [
                NETWORKS[r["network"]],
                r["shape"],
                f"{int(r['tile_px'])} ({_cell(r['n_tiles'], st_s, '.0f')} tiles)"
                if r["tile_px"] is not None and np.isfinite(r["tile_px"])
                else "n/a",
                _cell(tc, st_c, ".2f"),
                _cell(ts, st_s, ".2f"),
                _cell(r["time_s_median_ratio"], "ok", ".2f"),
                _cell(cc, st_c, ".2f"),
                _cell(cs, st_s, ".2f"),
                _cell(r["cpu_s_median_ratio"], "ok", ".2f"),
                _cell(mib[0], st_c, ".0f"),
                _cell(mib[1], st_s, ".0f"),
                _cell(r["peak_alloc_bytes_ratio"], "ok", ".2f"),
                _cell(mib[2], st_c, ".0f"),
                _cell(mib[3], st_s, ".0f"),
                _cell(mib[4], st_s, ".2f"),
                _cell(r["grad_rel_error_f64"], st_s, ".1e"),
                " / ".join(_cell(v, "ok", ".1f") for v in r["load_1min"]),
            ]
        )
    headers = [
        "network",
        "image",
        "tile",
        "time conv. (s)",
        "time streamed (s)",
        "time ratio",
        "CPU conv. (s)",
        "CPU streamed (s)",
        "CPU ratio",
        "alloc peak conv. (MiB)",
        "alloc peak streamed (MiB)",
        "alloc ratio",
        "RSS delta conv. (MiB)",
        "RSS delta streamed (MiB)",
        "output + its grad (MiB)",
        "param grad err vs float64",
        "load (conv. / streamed)",
    ]
    return table(headers, rows)


def plot(df: pd.DataFrame, path: Path) -> Path | None:
    """Peak allocator memory and time per step vs image edge, per network."""
    records = pairs(df)
    if not records:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for row, network in zip(axes, NETWORKS, strict=True):
        mine = [r for r in records if r["network"] == network]
        sizes = [r["input_px"] for r in mine]
        for ax, metric, label in (
            (row[0], "peak_alloc_bytes", "peak memory, allocator (MiB)"),
            (row[1], "cpu_s_median", "process CPU time per forward + backward (s)"),
        ):
            scale = MiB if metric.endswith("bytes") else 1.0
            for side, kind in enumerate(("conventional", "streamcheck")):
                xs = [r["input_px"] for r in mine if r[metric][side] is not None]
                ys = [r[metric][side] / scale for r in mine if r[metric][side] is not None]
                ax.plot(xs, ys, **STYLE[kind], label=kind)
                for r in mine:
                    if r["status"][kind] == "oom":
                        ax.annotate("OOM", (r["input_px"], ax.get_ylim()[1]), fontsize=7)
            if metric == "peak_alloc_bytes":
                outs = [(r["input_px"], r["output_bytes"] / MiB) for r in mine if r["output_bytes"]]
                if outs:
                    ax.plot(*zip(*outs, strict=True), ls=":", color="#999999",
                            label="streamed: output + its gradient (plan)")  # fmt: skip
            if not ax.lines:
                continue
            _log_y(ax, label)
            _px_axis(ax, sizes, f"image edge ({'voxels' if spatial_dims(network) == 3 else 'px'})")
            ax.set_title(NETWORKS[network], fontsize=10)
            ax.legend(fontsize=7, loc="best")
    title = f"Streamed U-Nets vs conventional training\n{_environment(df)}"
    caption = (
        "One forward + backward (loss = sum of the logits); medians; tile fixed per network. CPU "
        "time, not wall time, is drawn: the machine is shared (load per point in SUMMARY.md)."
    )
    return _finish(fig, title, caption, path)


def headline(folder: Path) -> str:
    """Each network at its largest measured size: allocator peak and CPU time, streamed over
    conventional (the summary table's ratio columns)."""
    last = {r["network"]: r for r in pairs(load(folder))}
    return (
        "; ".join(
            f"{name} at {r['shape']}: allocator peak {_cell(r['peak_alloc_bytes_ratio'], 'ok', '.2f')}x, "
            f"CPU time {_cell(r['cpu_s_median_ratio'], 'ok', '.2f')}x conventional's"
            for name, r in last.items()
        )
        + " (streamed / conventional, PyTorch defaults on both sides)."
    )


def build(out: Path) -> list[Path]:
    """``out/unet.png`` and ``out/SUMMARY.md`` from ``out/results.jsonl``."""
    df = load(out)
    if df.empty:
        return []
    written = [p for p in [plot(df, out / "unet.png")] if p is not None]
    commands = sorted({str(c) for c in df.get("run_command", pd.Series(dtype=str)).dropna()})
    commits = sorted({str(c) for c in df.get("env_git_commit", pd.Series(dtype=str)).dropna()})
    tiles = ", ".join(f"{name} tile {sizes['tile']}" for name, sizes in SIZES.items())
    lines = [
        "# U-Net benchmark: streamed vs conventional training",
        "",
        "Generated by `suites/unet/summary.py` from `results.jsonl` in this folder; do not edit.",
        "",
        f"Machine: {_environment(df)}. Made by {', '.join(f'`{c}`' for c in commands)} at "
        f"commit {', '.join(commits)}. Sizes and tiles: `suites/unet/networks.py` (`SIZES`: "
        f"{tiles}).",
        "",
        summary_table(pairs(df)),
        "",
        "Ratios are streamed / conventional, both with PyTorch's default settings (Rule UB1). "
        "Times are medians of the timed steps: wall clock, and this process's CPU time, which "
        "other processes on a shared machine disturb less. The output column is what the plan "
        "reports for the stitched full-resolution output and its gradient (Rule UB2). The load "
        "is the 1-minute load average at each point's start: on a shared machine time ratios "
        "move with it.",
    ]
    md = out / "SUMMARY.md"
    md.write_text("\n".join(lines) + "\n")
    return [*written, md]
