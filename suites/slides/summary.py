"""SUMMARY.md and slides.png from ``results.jsonl`` alone (slides suite Rule V4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from suites.markdown import table
from suites.rows import latest_rows, read_rows

# Rows of the kit's schema (suites/rows.py Rule J1); the committed ones have no status (all ok).
ROW_KEYS = ("key", "params", "environment", "metrics", "run")


def load(results: Path) -> list[dict[str, Any]]:
    """The latest row per key (rows from several ``--only`` runs merge by key)."""
    return latest_rows(read_rows(results, required=ROW_KEYS))


def _by(rows: list[dict[str, Any]], experiment: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["params"]["experiment"] == experiment]


def _paired(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Skipping rows measured as interleaved pairs (older rows, one process per side, are not
    comparable under a shared machine's load and are left out)."""
    return [r for r in _by(rows, "skipping") if r["params"]["kind"] == "paired"]


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return table(header, body, align="l" * len(header)).splitlines()


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def write_summary(results: Path, out: Path) -> None:
    rows = load(results)
    lines = ["# Slides: streaming whole-slide images from disk", ""]
    if not rows:
        (out / "SUMMARY.md").write_text("\n".join([*lines, "No results yet.", ""]))
        return
    lines += body(rows, results_name=results.name)
    (out / "SUMMARY.md").write_text("\n".join(lines))
    _figure(
        sorted(_by(rows, "rss"), key=lambda r: r["params"]["file_bytes"]),
        {r["params"]["kind"]: r for r in _by(rows, "disk_vs_memory")},
        sorted(_paired(rows), key=lambda r: r["params"]["fraction"]),
        out / "slides.png",
    )


def headline(folder: Path) -> str:
    """The largest slide streamed from its file: peak RSS against the file's size."""
    r = max(_by(load(folder / "results.jsonl"), "rss"), key=lambda r: r["params"]["file_bytes"])
    return (
        f"Streaming a {r['params']['side']}² slide from its {_mib(r['params']['file_bytes'])} MiB "
        f"file ({r['params']['mode']}, tile {r['params']['tile']}) peaked at "
        f"{_mib(r['metrics']['peak_rss_bytes'])} MiB RSS."
    )


def body(rows: list[dict[str, Any]], *, results_name: str) -> list[str]:
    """The summary's text and tables."""
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
            if k in ("disk", "memory")
        ],
    )
    lines += [
        "",
        "Each row above is its own process (for its peak RSS); their times are comparable only "
        "as far as the shared machine's load (last column) held still.",
    ]
    if "file_memory" in pair:
        m = pair["file_memory"]["metrics"]
        lines += [
            "",
            f"Measured together (one process, one thread, {len(m['cpu_s']['file'])} interleaved "
            f"pairs, tile {pair['file_memory']['params']['tile']}, load "
            f"{pair['file_memory']['environment']['load_1min']}): from the file / from memory = "
            f"**{m['speedup_cpu_min']:.2f}x** the least CPU time per step "
            f"({min(m['cpu_s']['file']):.2f} s / {min(m['cpu_s']['memory']):.2f} s; median pair "
            f"{m['speedup_cpu']:.2f}x CPU, {m['speedup_wall']:.2f}x wall). Both run the same "
            "tiles and kernels; the file adds decoding the regions each tile needs (on the "
            "prefetch thread, counted in the process's CPU time).",
        ]
    lines += [
        "",
        "## Background skipping (masked against unmasked, same slide; train steps)",
        "",
    ]
    skip = sorted(_paired(rows), key=lambda r: r["params"]["fraction"])
    lines += _table(
        [
            "tissue",
            "mask fraction",
            "tiles computed",
            "tiles ratio",
            "least CPU s, unmasked / masked",
            "speed-up (least CPU)",
            "speed-up (CPU, median pair)",
            "speed-up (wall, median pair)",
            "threads",
            "load",
        ],
        [
            [
                f"{r['params']['fraction']:.0%}",
                f"{m['tissue_in_mask']:.2f}",
                f"{m['tiles_computed']}/{m['tiles']}",
                f"{m['tiles'] / m['tiles_computed']:.2f}x",
                f"{min(m['cpu_s']['unmasked']):.2f} / {min(m['cpu_s']['masked']):.2f}",
                f"{m['speedup_cpu_min']:.2f}x",
                f"{m['speedup_cpu']:.2f}x",
                f"{m['speedup_wall']:.2f}x",
                str(m["threads"]),
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
        "machine's load falls on both sides alike, on one intra-op thread so that the process's "
        "CPU time measures the work (with several threads, waiting threads spin and CPU time "
        "grows with the load). Load only ever adds to a time, so the ratio of the least CPU "
        "times is the headline; the medians of the per-pair ratios show the spread a loaded "
        "machine adds (wall-clock most). A tile is computed when its input box touches the "
        "mask, so blobs spread over many tiles keep more tiles than their area (`tiles "
        "computed`); the work saved follows the tiles skipped (`tiles ratio`: all tiles / "
        "computed tiles), not the tissue fraction. A skipped tile is neither read from the file "
        "nor converted nor computed (forward or backward); what is not skipped (planning, the "
        "head, the loss, scaling the mask) keeps the speed-up below the tiles ratio.",
        "",
    ]
    return lines + _decoding(rows)


def _decoding(rows: list[dict[str, Any]]) -> list[str]:
    """Rule V5: a JPEG slide from its file / from its decoded pixels in memory, per setting."""
    decoding = sorted(
        _by(rows, "decoding"),
        key=lambda r: (r["params"]["decode_threads"], r["params"]["cache_mib"]),
    )
    if not decoding:
        return []
    first = decoding[0]
    lines = [
        "## A JPEG slide from its file against its decoded pixels in memory (train steps)",
        "",
        f"{first['params']['side']}² px, JPEG tiles of 256 px at quality 90, tile "
        f"{first['params']['tile']}, torch's default threads "
        f"({first['metrics']['threads']}); each row one process running the two steps "
        f"alternately ({len(first['metrics']['step_s']['file'])} of each after a warm-up of "
        "each). `file / memory` is the median of the per-pair wall-clock ratios (what a user "
        "waits for; the decoding threads compete with torch's for the same cores), then the ratio "
        "of the least CPU times. Each step from the file starts as on a new slide (the source "
        "closed: the file opened again, no decoded tile kept from the step before), so the cache "
        "serves only a step's own repeated reads (backward's, overlaps); cache hits / decodes "
        "count the JPEG tiles served from it / decoded over all steps of the process."
        + _omp(decoding),
        "",
    ]
    lines += _table(
        [
            "decode threads",
            "cache MiB",
            "file / memory (wall, median pair)",
            "file / memory (least CPU)",
            "median step s, file / memory",
            "cache hits / decodes",
            "load",
        ],
        [
            [
                str(r["params"]["decode_threads"]),
                str(r["params"]["cache_mib"]),
                f"**{m['speedup_wall']:.2f}x**",
                f"{m['speedup_cpu_min']:.2f}x",
                f"{m['median_step_s']['file']:.2f} / {m['median_step_s']['memory']:.2f}",
                f"{m['cache_hits']:,} / {m['tiles_decoded']:,}",
                str(r["environment"]["load_1min"]),
            ]
            for r in decoding
            for m in [r["metrics"]]
        ],
    )
    return [*lines, ""]


def _omp(rows: list[dict[str, Any]]) -> str:
    policies = sorted({str(r["run"].get("omp_wait_policy")) for r in rows})
    return f" OMP_WAIT_POLICY: {', '.join(policies)} (None: not set)."


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
    if "file_memory" in pair:  # measured together: least CPU time per megapixel
        row = pair["file_memory"]
        megapixels = row["params"]["side"] ** 2 / 1e6
        kinds = ["file", "memory"]
        heights = [min(row["metrics"]["cpu_s"][k]) / megapixels for k in kinds]
        ylabel = "least CPU s per megapixel (train step, 1 thread)"
    else:
        kinds = sorted(k for k in pair if k in ("disk", "memory"))
        heights = [pair[k]["metrics"]["s_per_megapixel"] for k in kinds]
        ylabel = "s per megapixel (train step)"
    ax.bar(kinds, heights, color=["C0", "C1"][: len(kinds)])
    ax.set(ylabel=ylabel, title="From the file vs from memory")
    ax = axes[2]
    tissue = [100 * r["params"]["fraction"] for r in skip]
    for key, style, label in (
        ("speedup_cpu_min", "o-", "measured, least CPU time"),
        ("speedup_wall", "^:", "measured, wall-clock (median pair)"),
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
