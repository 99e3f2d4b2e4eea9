"""SUMMARY.md and slides.png from ``results.jsonl`` alone (slides suite Rule V4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load(results: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def _by(rows: list[dict[str, Any]], experiment: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["params"]["experiment"] == experiment]


def _paired(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Skipping rows measured as interleaved pairs (older rows, one process per side, are not
    comparable under a shared machine's load and are left out)."""
    return [r for r in _by(rows, "skipping") if r["params"]["kind"] == "paired"]


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def write_summary(results: Path, out: Path) -> None:
    rows = load(results)
    lines = ["# Slides: streaming whole-slide images from disk", ""]
    if not rows:
        (out / "SUMMARY.md").write_text("\n".join([*lines, "No results yet.", ""]))
        return
    lines += body(rows, results_name=results.name, figure="![figure](slides.png)", level="##")
    (out / "SUMMARY.md").write_text("\n".join(lines))
    _figure(
        sorted(_by(rows, "rss"), key=lambda r: r["params"]["file_bytes"]),
        {r["params"]["kind"]: r for r in _by(rows, "disk_vs_memory")},
        sorted(_paired(rows), key=lambda r: r["params"]["fraction"]),
        out / "slides.png",
    )


def body(rows: list[dict[str, Any]], *, results_name: str, figure: str, level: str) -> list[str]:
    """The summary's text and tables (also the report's slides section), headings at ``level``."""
    lines: list[str] = []
    env = rows[-1]["environment"]
    commands = " and ".join(sorted({"`" + r["run"]["command"] + "`" for r in rows}))
    commits = ", ".join(sorted({"`" + r["environment"]["git_commit"] + "`" for r in rows}))
    loads = [r["environment"]["load_1min"] for r in rows if r["environment"]["load_1min"]]
    quick = any(r["run"]["quick"] for r in rows)
    lines += [
        f"Made by {commands} from `{results_name}` ({len(rows)} points"
        + (", **--quick: tiny slides, not evidence**" if quick else "")
        + f"), each a fresh process at niceness {rows[-1]['run']['nice']} (the machine's cores are "
        "shared). A step streams a small trunk (4 convs, total stride 32) and its head over a "
        "generated slide (random tissue blobs on white, tiled 256 px, uncompressed "
        "pyramidal TIFF): forward, loss and backward (`train`) or forward only (`infer`). Peak RSS is the process's VmHWM over the measured steps (reset after setup "
        "and a warm-up step); the delta is over the RSS at that reset. The file is read through "
        "the OS page cache (just written; cold-disk reads are not measured).",
        "",
        f"Environment: streamcheck {env['streamcheck']} at {commits}, torch {env['torch']}, "
        f"{env['cpu']} ({env['threads']} threads, {env['cores']} cores); 1-minute load "
        f"{min(loads, default=0):.1f} to {max(loads, default=0):.1f} during the points (other "
        "sessions share the machine: times are comparable only within a pair measured together).",
        "",
        figure,
        "",
        f"{level} Peak RSS against file size (streamed from the file)",
        "",
    ]
    rss = sorted(_by(rows, "rss"), key=lambda r: r["params"]["file_bytes"])
    lines += _table(
        [
            "slide px",
            "file MiB",
            "peak RSS MiB",
            "delta MiB",
            "peak / file",
            "s per Mpx",
            "tile",
            "mode",
        ],
        [
            [
                f"{r['params']['side']}²",
                _mib(r["params"]["file_bytes"]),
                _mib(r["metrics"]["peak_rss_bytes"]),
                _mib(r["metrics"]["delta_rss_bytes"]),
                f"{r['metrics']['peak_rss_bytes'] / r['params']['file_bytes']:.3f}",
                f"{r['metrics']['s_per_megapixel']:.3f}",
                str(r["params"]["tile"]),
                r["params"]["mode"],
            ]
            for r in rss
        ],
    )
    lines += [
        "",
        f"{level} From the file against from memory (same slide, tile and network; train steps)",
        "",
    ]
    pair = {r["params"]["kind"]: r for r in _by(rows, "disk_vs_memory")}
    lines += _table(
        ["source", "slide px", "median step s", "s per Mpx", "peak RSS MiB", "steps", "load"],
        [
            [
                {"disk": "TIFF source (open_image)", "memory": "uint8 tensor in RAM"}[k],
                f"{r['params']['side']}²",
                f"{r['metrics']['median_step_s']:.2f}",
                f"{r['metrics']['s_per_megapixel']:.4f}",
                _mib(r["metrics"]["peak_rss_bytes"]),
                str(len(r["metrics"]["step_s"])),
                str(r["environment"]["load_1min"]),
            ]
            for k, r in sorted(pair.items())
        ],
    )
    if {"disk", "memory"} <= set(pair):
        ratio = (
            pair["disk"]["metrics"]["median_step_s"] / pair["memory"]["metrics"]["median_step_s"]
        )
        lines += [
            "",
            f"From the file / from memory: {ratio:.2f}x the time per step (medians). Both run the "
            "same tiles and kernels, the file adds the reads (on the prefetch thread); a ratio "
            "that moves below 1 is the shared machine's load.",
        ]
    lines += [
        "",
        f"{level} Background skipping (masked against unmasked, same slide; train steps)",
        "",
    ]
    skip = sorted(_paired(rows), key=lambda r: r["params"]["fraction"])
    lines += _table(
        [
            "tissue",
            "mask fraction",
            "tiles computed",
            "unmasked s",
            "masked s",
            "speed-up (wall)",
            "speed-up (CPU)",
            "tiles ratio",
            "load",
        ],
        [
            [
                f"{r['params']['fraction']:.0%}",
                f"{m['tissue_in_mask']:.2f}",
                f"{m['tiles_computed']}/{m['tiles']}",
                f"{m['median_step_s']['unmasked']:.2f}",
                f"{m['median_step_s']['masked']:.2f}",
                f"{m['speedup_wall']:.2f}x",
                f"{m['speedup_cpu']:.2f}x",
                f"{m['tiles'] / m['tiles_computed']:.2f}x",
                str(r["environment"]["load_1min"]),
            ]
            for r in skip
            for m in [r["metrics"]]
        ],
    )
    each = len(skip[0]["metrics"]["step_s"]["masked"]) if skip else 0
    lines += [
        "",
        "Each row is one process that runs the unmasked and the masked step alternately (A B B A "
        f"..., {each} of each, after a warm-up step of each), so that a change of the shared "
        "machine's load falls on both sides alike; the speed-ups are medians of the per-pair "
        "ratios, in wall-clock and in process CPU time (all threads; the steadier figure when "
        "other work shares the cores). A tile is computed when its input box touches the mask, "
        "so blobs spread over many tiles keep more tiles than their area (`tiles computed`); the "
        "work saved follows the tiles skipped (`tiles ratio`: all tiles / computed tiles), not "
        "the tissue fraction. A skipped tile is neither read from the file nor converted nor "
        "computed (forward or backward), so the measured speed-up can exceed the tiles ratio by "
        "the share of reading in a step; the head, the loss and the mask's own work are not "
        "skipped.",
        "",
    ]
    return lines


def _figure(
    rss: list[dict[str, Any]], pair: dict[str, Any], skip: list[dict[str, Any]], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    files = [r["params"]["file_bytes"] / 2**30 for r in rss]
    ax.plot(files, [r["metrics"]["peak_rss_bytes"] / 2**30 for r in rss], "o-", label="peak RSS")
    ax.plot(files, files, "--", color="grey", label="file size (a tensor of it)")
    ax.set(xlabel="slide file, GiB", ylabel="GiB", title="Peak RSS, streamed from the file (infer)")
    ax.legend()
    ax = axes[1]
    kinds = sorted(pair)
    ax.bar(
        kinds,
        [pair[k]["metrics"]["s_per_megapixel"] for k in kinds],
        color=["C0", "C1"][: len(kinds)],
    )
    ax.set(ylabel="s per megapixel (train step)", title="From the file vs from memory")
    ax = axes[2]
    tissue = [100 * r["params"]["fraction"] for r in skip]
    for key, style, label in (
        ("speedup_wall", "o-", "measured, wall-clock"),
        ("speedup_cpu", "^-", "measured, CPU time"),
    ):
        ax.plot(tissue, [r["metrics"][key] for r in skip], style, label=label)
    ax.plot(
        tissue,
        [r["metrics"]["tiles"] / r["metrics"]["tiles_computed"] for r in skip],
        "s--",
        label="all tiles / computed tiles",
    )
    ax.set(xlabel="tissue, %", ylabel="unmasked / masked", title="Background skipping speed-up")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
