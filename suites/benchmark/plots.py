"""Figures rebuilt from the results file only (``python -m suites.benchmark --plots-only``).

- ``fig2_tile.png``: peak memory and time vs tile size at 2048^2 (paper Fig 2);
- ``fig3_input.png``: time and peak memory vs input size at tile 512 (paper Fig 3), conventional
  measured (solid) and estimated from the linear trend in pixels where it did not fit (dashed),
  streamcheck and lightstream.

The paper's published *shape* is quoted under each figure; no number of the paper is drawn.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402

from .analysis import (  # noqa: E402
    MiB,
    conventional_trend,
    fig2_input_px,
    fig3_tile_px,
    load,
    ok,
    settings,
)

STYLE = {
    "conventional": {"color": "#444444", "marker": "o"},
    "streamcheck": {"color": "#1f77b4", "marker": "o"},
    "streamcheck_tuned": {"color": "#2ca02c", "marker": "^"},
    "conventional_tuned": {"color": "#9467bd", "marker": "v"},
    "conventional_compiled": {"color": "#8c564b", "marker": "D", "markersize": 5},
    "lightstream": {"color": "#d62728", "marker": "s", "markersize": 5},
}
METERS = {
    "peak_alloc_bytes": "allocator peak (torch.profiler, live tensors)",
    "rss_delta_bytes": "peak RSS − baseline (fresh process)",
}
PAPER_FIG2 = (
    "Paper (Fig 2, RTX 2080 Ti, same network): memory grows linearly with tile size; "
    "time does not increase until 81 tiles."
)
PAPER_FIG3 = (
    "Paper (Fig 3, RTX 2080 Ti, same network): time linear in input size; streaming memory "
    "up to 97 % lower; conventional memory above 2048² estimated."
)


def _log_y(ax: plt.Axes, label: str) -> None:
    """Log y axis with plain-number labels; denser ticks when the data span less than 20x."""
    ax.set_yscale("log")
    low, high = ax.dataLim.y0, ax.dataLim.y1
    narrow = low > 0 and high / low < 20
    subs = tuple(float(k) for k in range(1, 10)) if narrow else (1.0, 2.0, 5.0)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.6g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
    ax.set_ylabel(label)
    ax.margins(y=0.15)


def _px_axis(ax: plt.Axes, values: list[int], label: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(values)
    ax.set_xticklabels([str(v) for v in values])
    ax.minorticks_off()
    ax.set_xlabel(label)
    ax.grid(True, which="major", alpha=0.3)
    ax.margins(x=0.08)


def _environment(df: pd.DataFrame) -> str:
    good = df[df["status"] == "ok"]
    first = good.iloc[0] if len(good) else df.iloc[0]
    parts = [
        str(first.get("env_gpu") or first.get("env_cpu") or first.get("device", "?")),
        f"{int(first['env_threads']) if pd.notna(first.get('env_threads')) else '?'} threads",
        str(first.get("dtype", "")),
        f"torch {first.get('env_torch', '?')}",
        f"streamcheck {first.get('env_streamcheck', '?')}",
    ]
    return ", ".join(parts)


def _finish(fig: plt.Figure, title: str, caption: str, path: Path) -> Path:
    fig.suptitle(title, fontsize=10)
    fig.text(
        0.5, 0.012, caption, ha="center", va="bottom", fontsize=8, style="italic", color="#555555"
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def fig2_tile(df: pd.DataFrame, path: Path) -> Path | None:
    n = fig2_input_px(df)
    if n is None:
        return None
    stream = ok(df, "streamcheck", input_px=n)
    conv = ok(df, "conventional", input_px=n)
    tiles = [int(t) for t in stream["tile_px"]]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(12, 4.8))
    for metric, ls in zip(METERS, ("-", "--"), strict=True):
        ax_mem.plot(
            tiles,
            stream[metric] / MiB,
            ls=ls,
            **STYLE["streamcheck"],
            label=f"streamcheck: {METERS[metric]}",
        )
        if len(conv):
            ax_mem.axhline(
                conv[metric].iloc[0] / MiB,
                ls=ls,
                color=STYLE["conventional"]["color"],
                label=f"conventional: {METERS[metric]}",
            )
    _log_y(ax_mem, "peak memory (MiB)")
    ax_mem.set_title(f"Peak memory, input {n}×{n}", fontsize=10)
    ax_mem.legend(fontsize=7, loc="center right")
    _px_axis(ax_mem, tiles, "tile edge (px, overlap included)")

    ax_time.plot(
        tiles, stream["time_s_median"], **STYLE["streamcheck"], label="streamcheck (median)"
    )
    for t, y, k in zip(tiles, stream["time_s_median"], stream["n_tiles"], strict=True):
        ax_time.annotate(
            f"{int(k)} tiles",
            (t, y),
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
            fontsize=7,
        )
    if len(conv):
        ax_time.axhline(
            conv["time_s_median"].iloc[0],
            color=STYLE["conventional"]["color"],
            label="conventional (median)",
        )
    _log_y(ax_time, "time per forward + backward (s)")
    ax_time.set_title(f"Time, input {n}×{n}", fontsize=10)
    ax_time.legend(fontsize=7, loc="best")
    _px_axis(ax_time, tiles, "tile edge (px, overlap included)")
    title = f"Fig 2 reproduction: three 3×3 convs (3, 64, 3 channels)\n{_environment(df)}"
    return _finish(fig, title, PAPER_FIG2, path)


def _input_panel(ax: plt.Axes, df: pd.DataFrame, metric: str, scale: float, tile: int) -> list[int]:
    sizes: set[int] = set()
    conv = ok(df, "conventional")
    if len(conv):
        x = conv["input_px"].astype(int).tolist()
        sizes.update(x)
        ax.plot(x, conv[metric] / scale, **STYLE["conventional"], label="conventional (measured)")
        fit = conventional_trend(df, metric)
        oom = df.loc[(df["name"] == "conventional") & (df["status"] == "oom"), "input_px"]
        beyond = [p for p in df.loc[df["status"] == "ok", "input_px"] if p > max(x)]
        wanted = sorted({int(p) for p in [*oom, *beyond]})
        if fit is not None and wanted:
            xe = [max(x), *wanted]
            ax.plot(
                xe,
                fit(np.asarray(xe, dtype=float) ** 2) / scale,
                ls="--",
                color=STYLE["conventional"]["color"],
                marker="o",
                mfc="white",
                label="conventional (estimated: linear fit in pixels)",
            )
            sizes.update(xe)
    for name in ("conventional_tuned", "conventional_compiled"):
        rows = ok(df, name)
        if len(rows):
            x = rows["input_px"].astype(int).tolist()
            sizes.update(x)
            ax.plot(x, rows[metric] / scale, **STYLE[name], label=f"{name} ({settings(name)})")
    for name in ("streamcheck", "streamcheck_tuned", "lightstream"):
        rows = ok(df, name, tile_px=tile)
        if len(rows):
            x = rows["input_px"].astype(int).tolist()
            sizes.update(x)
            label = f"{name}, tile {tile} ({settings(name)})"
            ax.plot(x, rows[metric] / scale, **STYLE[name], label=label)
    return sorted(sizes)


def fig3_input(df: pd.DataFrame, path: Path) -> Path | None:
    tile = fig3_tile_px(df)
    if tile is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.0))
    panels = [
        ("time_s_median", 1.0, "time per forward + backward (s)", "Time (median)"),
        ("peak_alloc_bytes", MiB, "peak memory (MiB)", "Memory: " + METERS["peak_alloc_bytes"]),
        ("rss_delta_bytes", MiB, "peak memory (MiB)", "Memory: " + METERS["rss_delta_bytes"]),
    ]
    for ax, (metric, scale, ylabel, title) in zip(axes, panels, strict=True):
        sizes = _input_panel(ax, df, metric, scale, tile)
        _log_y(ax, ylabel)
        ax.set_title(title, fontsize=10)
        _px_axis(ax, sizes, "input edge (px); image = edge × edge")
        ax.legend(fontsize=7, loc="upper left")
    title = f"Fig 3 reproduction: tile {tile} px, log-log axes\n{_environment(df)}"
    return _finish(fig, title, PAPER_FIG3, path)


def build(out: Path) -> list[Path]:
    """Write the figures into ``out`` from ``out/results.jsonl``; returns the files written."""
    df = load(out)
    if df.empty:
        return []
    written = [fig2_tile(df, out / "fig2_tile.png"), fig3_input(df, out / "fig3_input.png")]
    return [p for p in written if p is not None]
