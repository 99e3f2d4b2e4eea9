"""SUMMARY.md and slides.png from ``results.jsonl`` alone (slides suite Rule V4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load(results: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def _by(rows: list[dict[str, Any]], experiment: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["params"]["experiment"] == experiment]


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
    env = rows[-1]["environment"]
    commands = " and ".join(sorted({"`" + r["run"]["command"] + "`" for r in rows}))
    commits = ", ".join(sorted({"`" + r["environment"]["git_commit"] + "`" for r in rows}))
    loads = [r["environment"]["load_1min"] for r in rows if r["environment"]["load_1min"]]
    quick = any(r["run"]["quick"] for r in rows)
    lines += [
        f"Made by {commands} from `{results.name}` ({len(rows)} points"
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
        "![figure](slides.png)",
        "",
        "## Peak RSS against file size (streamed from the file)",
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
        "## From the file against from memory (same slide, tile and network; train steps)",
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
            "that moves below 1 is the shared machine's load, which swung as much within the "
            "pairs below.",
        ]
    lines += ["", "## Background skipping (masked against unmasked, same slide; train steps)", ""]
    skip = _by(rows, "skipping")
    body = []
    for fraction in sorted({r["params"]["fraction"] for r in skip}):
        both = {r["params"]["kind"]: r for r in skip if r["params"]["fraction"] == fraction}
        if {"disk", "masked"} <= set(both):
            full, masked = both["disk"]["metrics"], both["masked"]["metrics"]
            body.append(
                [
                    f"{fraction:.0%}",
                    f"{masked['tissue_in_mask']:.2f}",
                    f"{masked['tiles_computed']}/{masked['tiles']}",
                    f"{full['median_step_s']:.2f} (load {both['disk']['environment']['load_1min']})",
                    f"{masked['median_step_s']:.2f} (load {both['masked']['environment']['load_1min']})",
                    f"{full['median_step_s'] / masked['median_step_s']:.2f}x",
                    f"{masked['tiles'] / masked['tiles_computed']:.2f}x",
                ]
            )
    lines += _table(
        [
            "tissue",
            "mask fraction",
            "tiles computed",
            "unmasked s",
            "masked s",
            "measured speed-up",
            "tiles ratio",
        ],
        body,
    )
    lines += [
        "",
        "A tile is computed when its input box touches the mask, so blobs spread over many tiles "
        "keep more tiles than their area (the `tiles computed` column); the work saved follows the "
        "tiles skipped (`tiles ratio`: all tiles / computed tiles), not the tissue fraction. The two "
        "steps of a pair run in consecutive processes; where the machine's load (1-minute average, "
        "in brackets) changed between them, the measured speed-up mixes the mask's effect with the "
        "load's, and the tiles ratio is the load-free figure.",
        "",
    ]
    (out / "SUMMARY.md").write_text("\n".join(lines))
    _figure(rss, pair, skip, out / "slides.png")


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
    pairs = []
    for f in sorted({r["params"]["fraction"] for r in skip}):
        both = {r["params"]["kind"]: r["metrics"] for r in skip if r["params"]["fraction"] == f}
        if {"disk", "masked"} <= set(both):
            pairs.append((100 * f, both["disk"], both["masked"]))
    ax.plot(
        [p[0] for p in pairs],
        [p[1]["median_step_s"] / p[2]["median_step_s"] for p in pairs],
        "o-",
        label="measured (shared machine)",
    )
    ax.plot(
        [p[0] for p in pairs],
        [p[2]["tiles"] / p[2]["tiles_computed"] for p in pairs],
        "s--",
        label="all tiles / computed tiles",
    )
    ax.set(xlabel="tissue, %", ylabel="unmasked / masked", title="Background skipping speed-up")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
