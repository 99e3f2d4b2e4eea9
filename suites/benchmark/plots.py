"""Figures rebuilt from the results file only (``python -m suites.benchmark --plots-only``).

- ``fig2_tile.png``: peak memory and time vs tile size at 2048^2 (paper Fig 2);
- ``fig3_input.png``: time and peak memory vs input size at tile 512 (paper Fig 3), conventional
  measured (solid) and estimated from the linear trend in pixels where it did not fit (dashed),
  streamcheck and lightstream.

The paper's published *shape* is quoted as a note on each figure; no number of the paper is drawn.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .analysis import (  # noqa: E402
    MiB,
    conventional_trend,
    fig2_input_px,
    fig3_tile_px,
    load,
    ok,
)

COLORS = {"conventional": "#444444", "streamcheck": "#1f77b4", "lightstream": "#d62728"}
METERS = {
    "peak_alloc_bytes": "allocator peak (torch.profiler, live tensors)",
    "rss_delta_bytes": "peak RSS - baseline (fresh process)",
}
PAPER_FIG2 = "paper (Fig 2, RTX 2080 Ti): memory linear in tile size;\ntime flat until 81 tiles"
PAPER_FIG3 = (
    "paper (Fig 3, RTX 2080 Ti): time linear in input size; memory up to 97 % lower;\n"
    "conventional memory above 2048² estimated"
)


def _note(ax: plt.Axes, text: str) -> None:
    ax.text(
        0.02,
        0.98,
        text,
        transform=ax.transAxes,
        va="top",
        ha="left",
        fontsize=7.5,
        style="italic",
        color="#555555",
        bbox={"boxstyle": "round", "fc": "white", "ec": "#cccccc", "alpha": 0.9},
    )


def _px_axis(ax: plt.Axes, values: list[int], label: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(values)
    ax.set_xticklabels([str(v) for v in values])
    ax.minorticks_off()
    ax.set_xlabel(label)
    ax.grid(True, which="major", alpha=0.3)


def _environment(df: pd.DataFrame) -> str:
    first = df[df["status"] == "ok"].iloc[0] if (df["status"] == "ok").any() else df.iloc[0]
    parts = [
        str(first.get("device_name", first.get("device", "?"))),
        f"{first.get('threads', '?')} threads",
        str(first.get("dtype", "")),
        f"torch {first.get('torch_version', '?')}",
        f"streamcheck {first.get('streamcheck_version', '?')}",
    ]
    return ", ".join(parts)


def fig2_tile(df: pd.DataFrame, path: Path) -> Path | None:
    n = fig2_input_px(df)
    if n is None:
        return None
    stream = ok(df, "streamcheck", input_px=n)
    conv = ok(df, "conventional", input_px=n)
    tiles = [int(t) for t in stream["tile_px"]]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.3))
    for metric, style in zip(METERS, ("-", "--"), strict=True):
        ax_mem.plot(
            tiles,
            stream[metric] / MiB,
            style,
            marker="o",
            color=COLORS["streamcheck"],
            label=f"streamcheck: {METERS[metric]}",
        )
        if len(conv):
            ax_mem.axhline(
                conv[metric].iloc[0] / MiB,
                ls=style,
                color=COLORS["conventional"],
                label=f"conventional: {METERS[metric]}",
            )
    ax_mem.set_yscale("log")
    ax_mem.set_ylabel("peak memory (MiB)")
    ax_mem.set_title(f"Peak memory, input {n}×{n}")
    ax_mem.legend(fontsize=7, loc="lower right")
    _px_axis(ax_mem, tiles, "tile edge (px, overlap included)")
    _note(ax_mem, PAPER_FIG2)

    ax_time.plot(
        tiles,
        stream["time_s_median"],
        "-o",
        color=COLORS["streamcheck"],
        label="streamcheck (median)",
    )
    for t, y, n in zip(tiles, stream["time_s_median"], stream["n_tiles"], strict=True):
        ax_time.annotate(
            f"{int(n)} tiles",
            (t, y),
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
            fontsize=7,
        )
    if len(conv):
        ax_time.axhline(
            conv["time_s_median"].iloc[0],
            color=COLORS["conventional"],
            label="conventional (median)",
        )
    ax_time.set_yscale("log")
    ax_time.set_ylabel("time per forward + backward (s)")
    ax_time.set_title("Time")
    ax_time.legend(fontsize=7, loc="lower right")
    _px_axis(ax_time, tiles, "tile edge (px, overlap included)")
    fig.suptitle(
        f"Fig 2 reproduction: three 3×3 convs (3, 64, 3 channels) — {_environment(df)}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _input_panel(ax: plt.Axes, df: pd.DataFrame, metric: str, scale: float, tile: int) -> list[int]:
    sizes: set[int] = set()
    conv = ok(df, "conventional")
    if len(conv):
        x = conv["input_px"].astype(int).tolist()
        sizes.update(x)
        ax.plot(
            x,
            conv[metric] / scale,
            "-o",
            color=COLORS["conventional"],
            label="conventional (measured)",
        )
        fit = conventional_trend(df, metric)
        wanted = sorted(
            set(df.loc[(df["method"] == "conventional") & (df["status"] == "oom"), "input_px"])
            | {p for p in df["input_px"] if p > max(x)}
        )
        if fit is not None and wanted:
            xe = [max(x), *[int(p) for p in wanted]]
            ax.plot(
                xe,
                fit(np.asarray(xe, dtype=float) ** 2) / scale,
                "--o",
                color=COLORS["conventional"],
                mfc="white",
                label="conventional (estimated: linear fit in pixels; did not fit / not run)",
            )
            sizes.update(xe)
    for method in ("streamcheck", "lightstream"):
        rows = ok(df, method, tile_px=tile)
        if len(rows):
            x = rows["input_px"].astype(int).tolist()
            sizes.update(x)
            ax.plot(
                x,
                rows[metric] / scale,
                "-o",
                color=COLORS[method],
                label=f"{method} (tile {tile})",
            )
    ax.set_yscale("log")
    return sorted(sizes)


def fig3_input(df: pd.DataFrame, path: Path) -> Path | None:
    tile = fig3_tile_px(df)
    if tile is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = [
        ("time_s_median", 1.0, "time per forward + backward (s)", "Time (median)"),
        ("peak_alloc_bytes", MiB, "peak memory (MiB)", "Memory: " + METERS["peak_alloc_bytes"]),
        ("rss_delta_bytes", MiB, "peak memory (MiB)", "Memory: " + METERS["rss_delta_bytes"]),
    ]
    for ax, (metric, scale, ylabel, title) in zip(axes, panels, strict=True):
        sizes = _input_panel(ax, df, metric, scale, tile)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        _px_axis(ax, sizes, "input edge (px); image = edge × edge")
        ax.legend(fontsize=6.5, loc="lower right")
    _note(axes[0], PAPER_FIG3)
    fig.suptitle(f"Fig 3 reproduction: tile {tile} px, log-log — {_environment(df)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def build(out: Path) -> list[Path]:
    """Write the figures into ``out`` from ``out/results.jsonl``; returns the files written."""
    df = load(out)
    if df.empty:
        return []
    written = [fig2_tile(df, out / "fig2_tile.png"), fig3_input(df, out / "fig3_input.png")]
    return [p for p in written if p is not None]
