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
"""

from __future__ import annotations

import base64
import html
import math
import platform
import re
import subprocess
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .sources import Source, finite, get

# Rule P1: the paper's published claims (Pinckaers et al., TPAMI 2020), quoted, not measured here.
PAPER = {
    "memory_saving_pct": 97,  # Fig. 3 caption: "significantly less memory required (up to 97 percent)"
    "time": "almost linear in input size",  # Section 4.3 / Fig. 3: "increases almost linearly"
    "hardware": "RTX 2080 Ti GPU",
    "conventional_estimated_above_px": 2048,  # Fig. 3 caption: "above 2048x2048 ... estimated"
}

MiB = 2**20
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ helpers
def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A Markdown table; ``align`` has one letter per column (l or r), default left then right."""
    rows = [[str(cell) for cell in row] for row in rows]
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def err(x: Any) -> str:
    """A relative error: 3 significant digits, scientific."""
    return f"{x:.2e}" if finite(x) else "n/a"


def mib(b: Any) -> str:
    return f"{b / MiB:.1f}" if finite(b) else "n/a"


def sec(t: Any) -> str:
    return f"{t:.3g}" if finite(t) else "n/a"


def code(text: Any) -> str:
    return f"`{text}`" if text else "(not recorded)"


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def figure(path: Path, out_dir: Path, number: str, caption: str, command: str | None) -> str:
    """Markdown for a figure: the image, then a caption with the producing command (Rule P3)."""
    rel = Path(_relpath(path, out_dir)).as_posix()
    made_by = (
        f"Produced by {code(command)}."
        if command
        else "The command that produced it is not in the result files."
    )
    return f"![{number}]({rel})\n\n*{number}. {caption} {made_by}*"


def _relpath(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())


# ------------------------------------------------------------------------------ 1. environment
def environment_section(eq: Source, bench: Source, imn: Source, report_env: dict[str, Any]) -> str:
    rows = []
    e = get(eq.data, "metadata", "environment", default={})
    if eq.found:
        rows.append(
            [
                "equivalence record",
                get(eq.data, "metadata", "finished_utc", default="n/a"),
                code(e.get("git_commit")),
                get(e, "versions", "python", default="n/a"),
                get(e, "versions", "torch", default="n/a"),
                get(e, "versions", "torchvision", default="n/a"),
                get(e, "versions", "streamcheck", default="n/a"),
                f"{e.get('device', 'n/a')} ({e.get('cpu', 'n/a')})",
                e.get("torch_threads", "n/a"),
            ]
        )
    if bench.found:
        brow = [r for r in bench.data["rows"] if r.get("status") == "ok"] or bench.data["rows"]
        dates = sorted(str(r["started_utc"]) for r in brow if r.get("started_utc"))
        commits = sorted({str(r["git_commit"]) for r in brow if r.get("git_commit")})
        rows.append(
            [
                "benchmark" + (" (quick mode)" if bench.data.get("quick") else ""),
                f"{dates[0]} to {dates[-1]}" if len(dates) > 1 else (dates or ["n/a"])[0],
                ", ".join(code(c) for c in commits) or "n/a",
                row_values(brow, "python_version"),
                row_values(brow, "torch_version"),
                "not recorded",
                row_values(brow, "streamcheck_version"),
                row_values(brow, "device_name"),
                row_values(brow, "threads"),
            ]
        )
    if imn.found:
        env = get(imn.data, "run", "environment", default={})
        rows.append(
            [
                f"ImageNette suite ({imn.data['label']})",
                get(imn.data, "run", "finished_utc", default="n/a"),
                code(env.get("git_commit")),
                env.get("python", "n/a"),
                env.get("torch", "n/a"),
                env.get("torchvision", "n/a"),
                env.get("streamcheck", "n/a"),
                f"{env.get('device', 'n/a')} ({env.get('cpu', 'n/a')})",
                env.get("torch_threads", "n/a"),
            ]
        )
    rows.append(
        [
            "this report",
            report_env["date"],
            code(report_env["git_commit"]),
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
            [
                "source",
                "date (UTC)",
                "git commit",
                "Python",
                "torch",
                "torchvision",
                "streamcheck",
                "device",
                "threads",
            ],
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
    if not any("cuda" in str(r[7]).lower() or "gpu" in str(r[7]).lower() for r in rows):
        parts += [
            "",
            "**No GPU result**: every number in this report was measured on CPU. The paper's "
            f"Figs 2-3 were measured on an {PAPER['hardware']}; compare ratios, not seconds or bytes.",
        ]
    return "\n".join(parts)


# ------------------------------------------------------------------------------ 2. equivalence
def equivalence_section(eq: Source) -> str:
    parts = ["## 2. Equivalence: is streaming exact?", ""]
    if not eq.found:
        return "\n".join(parts + _missing(eq, "python -m suites.equivalence"))
    rec = eq.data
    summary, meta, method = rec.get("summary", {}), rec.get("metadata", {}), rec.get("method", {})
    networks = summary.get("networks", {})
    n_cases = summary.get("n_cases", "n/a")
    failures = rec.get("failures", [])
    trunks = rec.get("trunks", [])
    verdict = f"**{plural(len(failures), 'failure')}**" if failures else "**no failures**"
    parts += [
        f"{n_cases} randomly generated networks (drawn by hypothesis from "
        f"`{method.get('strategy', 'the project strategies')}`, seed {meta.get('seed', 'n/a')}) and "
        f"{len(trunks)} torchvision trunk checks were each run twice -- plainly and streamed tile by "
        f"tile -- on the same weights and input, and the output, the input gradient and every "
        f"parameter gradient compared ({method.get('checker', 'the equivalence checker')}): "
        f"{verdict}. Errors are max |streamed - plain| / max |plain| per tensor; the table gives "
        "the worst over all networks of each dtype.",
        "",
    ]
    worst = summary.get("worst_rel_error", {})
    tiles = summary.get("tiles_per_case", {})
    fractions = summary.get("worst_fraction_of_rtol", {})
    rows = []
    for dtype in ("float64", "float32"):
        if dtype not in networks:
            continue
        counts = networks[dtype]
        w = worst.get(dtype, {})
        n_failed = sum(1 for f in failures if f.get("dtype") == dtype and "trunk" not in f)
        rows.append(
            [
                dtype,
                sum(v for v in counts.values() if finite(v)),
                " / ".join(str(counts.get(k, 0)) for k in ("1d", "2d", "3d")),
                f"{get(tiles, dtype, 'min', default='n/a')}-{get(tiles, dtype, 'max', default='n/a')}",
                err(get(w, "output", "max_rel_error")),
                err(get(w, "param_grad", "max_rel_error")),
                err(get(w, "input_grad", "max_rel_error")),
                _tolerance(method, dtype),
                err(fractions.get(dtype)),
                n_failed,
            ]
        )
    parts.append(
        table(
            [
                "dtype",
                "networks",
                "1D / 2D / 3D",
                "tiles per network",
                "output",
                "parameter grads",
                "input grad",
                "tolerance",
                "worst error / tolerance",
                "failed",
            ],
            rows,
        )
    )
    parts += ["", "How the networks were drawn:", "", _draw_notes(method)]
    if failures:
        parts += ["", "### Failures", ""]
        for f in failures:
            parts += _failure(f)
    parts += ["", "### Layers the generated networks contained", "", _kinds_table(summary)]
    parts += ["", "### Torchvision trunks", ""]
    if trunks:
        parts += [
            "Random weights, eval mode (BatchNorm with random running statistics), checked in "
            "float64 and float32 with the checker's default tolerances.",
            "",
            _trunk_table(trunks),
        ]
    else:
        parts.append("Not in this record (it was made with `--quick` or `--no-trunks`).")
    parts += [
        "",
        f"Record: `{eq.folder.name}/record.json`, made by `{meta.get('command', 'n/a')}` "
        f"in {meta.get('wall_s', 'n/a')} s.",
    ]
    return "\n".join(parts)


def _tolerance(method: dict[str, Any], dtype: str) -> str:
    text = get(method, "tolerances", dtype, default="n/a")
    return str(text).replace(" relative to max|reference|", "").replace("*", "x")


def _draw_notes(method: dict[str, Any]) -> str:
    lines = []
    for dtype, opts in method.get("draw_options", {}).items():
        desc = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in opts.items())
        lines.append(f"- {dtype} networks drawn with {desc}.")
    for what, why in method.get("excluded", {}).items():
        lines.append(f"- Not drawn: {what} -- {why}.")
    draws = method.get("draws", {})
    if draws:
        single, ill = (
            sum(d.get(key, 0) for d in draws.values())
            for key in ("single_tile_draws_skipped", "ill_posed_draws_skipped")
        )
        lines.append(
            f"- Draws skipped: {single} whose tile covered the whole input (nothing streamed), "
            f"{ill} ill-posed (PyTorch's own output not finite)."
        )
    return "\n".join(lines)


def _layer_group(name: str) -> str:
    if "Conv" in name or "Pool" in name:
        return "window"
    if "(eval)" in name or "(train)" in name:
        return "mode"
    return "pointwise"


def _kinds_table(summary: dict[str, Any]) -> str:
    """Window layers one per row with their options; eval-mode layers; activations in one row."""
    kinds = summary.get("layer_kinds", {})
    networks = summary.get("layer_kinds_networks", {})
    if not kinds:
        return "The record lists no layer kinds."
    options: dict[str, list[str]] = {}
    for k, v in kinds.items():
        if ": " in k:
            layer, _, option = k.partition(": ")
            options.setdefault(layer, []).append(f"{option} ({v})")
    layers = [(k, v) for k, v in kinds.items() if ": " not in k]
    rows = [
        [k, v, networks.get(k, "n/a"), ", ".join(options.get(k, [])) or "-"]
        for k, v in layers
        if _layer_group(k) != "pointwise"
    ]
    pointwise = [(k, v) for k, v in layers if _layer_group(k) == "pointwise"]
    if pointwise:
        rows.append(
            [
                "pointwise activations",
                sum(v for _, v in pointwise),
                "-",
                ", ".join(f"{k} ({v})" for k, v in pointwise),
            ]
        )
    return table(
        ["layer", "times drawn", "networks", "options or kinds drawn (times)"], rows, align="lrrl"
    )


def _failure(f: dict[str, Any]) -> list[str]:
    what = (
        f"trunk {f['trunk']} ({f.get('dtype')})"
        if f.get("trunk")
        else (
            f"network {f.get('case')} ({f.get('dtype')}, input {f.get('input_shape')}, tile "
            f"{f.get('tile')}): `{'`; `'.join(f.get('layers') or [])}`"
        )
    )
    lines = [f"Failed: {what}.", "", "```", *str(f.get("error")).splitlines(), "```", ""]
    recheck = f.get("float64_recheck")
    if isinstance(recheck, dict):
        worst = [v for v in (recheck.get("worst_rel_error") or {}).values() if finite(v)]
        text = (
            "The same network in float64: "
            + ("passed" if recheck.get("passed") else "FAILED")
            + f", worst relative error {err(max(worst)) if worst else 'n/a'}."
        )
        if recheck.get("passed"):
            text += (
                " Streaming is exact on it; the float32 difference is rounding beyond the "
                "checker's float32 tolerance, which is relative to the tensor's largest entry "
                "(small here: the gradient is a cancelling sum)."
            )
        lines += [text, ""]
    return lines


def _trunk_table(trunks: list[dict[str, Any]]) -> str:
    by_name: dict[str, dict[str, dict[str, Any]]] = {}
    for t in trunks:
        by_name.setdefault(t.get("name", "?"), {})[t.get("dtype", "?")] = t
    rows = []
    for name, per_dtype in by_name.items():
        first = next(iter(per_dtype.values()))
        shape = first.get("input_shape") or []
        cells = [
            name,
            first.get("description", ""),
            "x".join(map(str, shape[2:])) if shape else "n/a",
            first.get("tile", "n/a"),
            first.get("n_tiles", "n/a"),
        ]
        for dtype in ("float64", "float32"):
            t = per_dtype.get(dtype)
            if t is None:
                cells.append("not run")
                continue
            worst = [v for v in t.get("worst_rel_error", {}).values() if finite(v)]
            status = "" if t.get("passed") else " FAILED"
            cells.append((err(max(worst)) if worst else "n/a") + status)
        rows.append(cells)
    return table(
        [
            "trunk",
            "part",
            "input px",
            "tile px",
            "tiles",
            "float64 worst rel. error",
            "float32 worst rel. error",
        ],
        rows,
        align="llrrrrr",
    )


# ---------------------------------------------------------------------------- 3. memory, time
def row_values(rows: list[dict[str, Any]], key: str) -> str:
    """The distinct values of ``key`` over benchmark rows, comma-separated."""
    found = sorted({str(r[key]) for r in rows if r.get(key) is not None})
    return ", ".join(found) if found else "n/a"


def _bench_command(bench: Source) -> str | None:
    commands = sorted({str(r["command"]) for r in bench.data.get("rows", []) if r.get("command")})
    return "; ".join(commands) if commands else None


def _ok(rows: list[dict[str, Any]], method: str, **where: Any) -> list[dict[str, Any]]:
    return [
        r
        for r in rows
        if r.get("method") == method
        and r.get("status", "ok") == "ok"
        and all(r.get(k) == v for k, v in where.items())
    ]


def _one(rows: list[dict[str, Any]], method: str, **where: Any) -> dict[str, Any] | None:
    found = _ok(rows, method, **where)
    return found[-1] if found else None  # the latest measurement of that point


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log y against log x (1 = linear); None with < 2 points."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pairs) < 2:
        return None
    mx = sum(p[0] for p in pairs) / len(pairs)
    my = sum(p[1] for p in pairs) / len(pairs)
    sxx = sum((p[0] - mx) ** 2 for p in pairs)
    return sum((p[0] - mx) * (p[1] - my) for p in pairs) / sxx if sxx else None


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float] | None:
    """Least-squares ``y = a + b x``: ``(b, a, r2)``; None with < 2 distinct x."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    a = my - b * mx
    total = sum((y - my) ** 2 for y in ys)
    residual = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return b, a, 1 - residual / total if total else 1.0


def key_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers the memory/time table compares with the paper, computed from result rows."""
    out: dict[str, Any] = {"per_input": [], "tile_px": None}
    stream_tiles = sorted({r.get("tile_px") for r in _ok(rows, "streamcheck") if r.get("tile_px")})
    conv_inputs = {r.get("input_px") for r in _ok(rows, "conventional")}
    # the tile of the input suite: the one measured at most input sizes (512 in the paper's Fig 3)
    tile = max(
        stream_tiles,
        key=lambda t: (len({r.get("input_px") for r in _ok(rows, "streamcheck", tile_px=t)}), t),
        default=None,
    )
    out["tile_px"] = tile
    inputs = sorted(
        {r.get("input_px") for r in rows if r.get("input_px") is not None}
        & ({r.get("input_px") for r in _ok(rows, "streamcheck", tile_px=tile)} | conv_inputs)
    )
    for px in inputs:
        conv = _one(rows, "conventional", input_px=px)
        stream = _one(rows, "streamcheck", input_px=px, tile_px=tile)
        peer = _one(rows, "lightstream", input_px=px, tile_px=tile)
        failed_conv = [
            r
            for r in rows
            if r.get("method") == "conventional"
            and r.get("input_px") == px
            and r.get("status", "ok") != "ok"
        ]
        entry: dict[str, Any] = {
            "input_px": px,
            "conventional": conv,
            "streamcheck": stream,
            "lightstream": peer,
            "conventional_status": failed_conv[-1].get("status")
            if failed_conv and conv is None
            else None,
        }
        for meter in ("peak_alloc_bytes", "rss_delta_bytes"):
            a, b = get(stream, meter), get(conv, meter)
            entry[f"saving_pct_{meter}"] = (
                100 * (1 - a / b) if finite(a) and finite(b) and b else None
            )
        a, b = get(stream, "time_s_median"), get(conv, "time_s_median")
        entry["time_ratio"] = a / b if finite(a) and finite(b) and b else None
        c = get(peer, "time_s_median")
        entry["peer_time_ratio"] = c / b if finite(c) and finite(b) and b else None
        entry["peer_over_streamcheck_time"] = c / a if finite(c) and finite(a) and a else None
        for meter in ("peak_alloc_bytes", "rss_delta_bytes"):
            p, q = get(peer, meter), get(conv, meter)
            entry[f"peer_saving_pct_{meter}"] = (
                100 * (1 - p / q) if finite(p) and finite(q) and q else None
            )
        out["per_input"].append(entry)
    for method in ("streamcheck", "conventional", "lightstream"):
        points = [
            (e["input_px"] ** 2, get(e[method], "time_s_median"))
            for e in out["per_input"]
            if finite(get(e[method], "time_s_median"))
        ]
        out[f"time_slope_{method}"] = loglog_slope([p[0] for p in points], [p[1] for p in points])
        out[f"time_slope_{method}_range"] = (
            (int(math.sqrt(points[0][0])), int(math.sqrt(points[-1][0])))
            if len(points) >= 2
            else None
        )
    for meter in ("peak_alloc_bytes", "rss_delta_bytes"):
        savings = [
            (e[f"saving_pct_{meter}"], e["input_px"])
            for e in out["per_input"]
            if finite(e[f"saving_pct_{meter}"])
        ]
        out[f"max_saving_{meter}"] = max(savings) if savings else None
        # Where conventional did not run (out of memory), the paper estimated it; so do we, from
        # the linear trend in pixels of the measured conventional points, and say so.
        measured = [(e["input_px"] ** 2, get(e["conventional"], meter)) for e in out["per_input"]]
        measured = [(x, y) for x, y in measured if finite(y)]
        fit = linear_fit([x for x, _ in measured], [y for _, y in measured])
        estimated = []
        for e in out["per_input"]:
            stream = get(e["streamcheck"], meter)
            if fit is None or e["conventional"] is not None or not finite(stream):
                continue
            conv_estimate = fit[1] + fit[0] * e["input_px"] ** 2
            if conv_estimate > 0:
                estimated.append((100 * (1 - stream / conv_estimate), e["input_px"], conv_estimate))
        out[f"estimated_saving_{meter}"] = max(estimated) if estimated else None
    streamed = [
        (e["input_px"] ** 2, get(e["streamcheck"], "time_s_median"))
        for e in out["per_input"]
        if finite(get(e["streamcheck"], "time_s_median"))
    ]
    fit = linear_fit([x for x, _ in streamed], [y for _, y in streamed])
    out["time_linear_r2_streamcheck"] = fit[2] if fit else None
    out["time_linear_n_streamcheck"] = len(streamed)
    return out


def memory_section(bench: Source, out_dir: Path) -> str:
    parts = ["## 3. Memory and time (paper Figs 2-3)", ""]
    if not bench.found:
        parts += _missing(bench, "python -m suites.benchmark")
        parts += _figures(bench, out_dir, None)
        return "\n".join(parts)
    rows = bench.data["rows"]
    command = _bench_command(bench)
    k = key_ratios(rows)
    measured = [r for r in rows if r.get("status") == "ok"] or rows
    devices = sorted({str(r.get("device_name") or r.get("device")) for r in measured})
    dtypes = sorted({str(r.get("dtype")) for r in measured if r.get("dtype")})
    parts += [
        "The paper's Figs 2-3 network (three 3x3 convolutions with 3, 64 and 3 output channels), "
        f"one forward + backward per step, measured on {', '.join(devices)} in {', '.join(dtypes)}. "
        "Two memory meters, never mixed: *allocator peak* (live tensors, from torch's profiler on "
        "CPU or CUDA's allocator statistics) and *RSS delta* (peak resident memory of a fresh "
        "process above its size before the timed steps). Time is the median of the timed steps.",
        "",
        "### Key ratios next to the paper's claims",
        "",
        _claims_table(k),
        "",
        "### Per input size" + (f" (streaming tile {k['tile_px']} px)" if k["tile_px"] else ""),
        "",
        _per_input_table(k),
    ]
    tile_table = _tile_table(rows)
    if tile_table:
        parts += ["", "### Per tile size", "", tile_table]
    statuses = [r for r in rows if r.get("status", "ok") != "ok"]
    if statuses:
        parts += [
            "",
            "Points that did not complete: "
            + "; ".join(
                f"{r.get('method')} {r.get('input_px')} px"
                + (f" tile {r.get('tile_px')}" if r.get("tile_px") else "")
                + f": {r.get('status')}"
                for r in statuses
            )
            + ".",
        ]
    if not _ok(rows, "lightstream"):
        parts += [
            "",
            "**No lightstream row**: the peer library was not measured in these result files "
            "(its suite is skipped when lightstream is not installed).",
        ]
    parts += ["", *_figures(bench, out_dir, command)]
    return "\n".join(parts)


def _claims_table(k: dict[str, Any]) -> str:
    rows = []
    for meter, label in (("peak_alloc_bytes", "allocator peak"), ("rss_delta_bytes", "RSS delta")):
        best = k.get(f"max_saving_{meter}")
        estimate = k.get(f"estimated_saving_{meter}")
        text = f"{best[0]:.1f} % at {best[1]} px (both measured)" if best else "not measured"
        if estimate:
            text += (
                f"; {estimate[0]:.1f} % at {estimate[1]} px against an estimated conventional "
                f"{mib(estimate[2])} MiB (linear in pixels; conventional did not run there)"
            )
        rows.append(
            [
                f"memory saved by streaming ({label})",
                f"up to {PAPER['memory_saving_pct']} % (Fig. 3; conventional estimated above "
                f"{PAPER['conventional_estimated_above_px']} px)",
                text,
            ]
        )
    slope = k.get("time_slope_streamcheck")
    span = k.get("time_slope_streamcheck_range")
    rows.append(
        [
            "streaming time vs input pixels",
            PAPER["time"] + " (Fig. 3)",
            f"log-log slope {slope:.2f} over {span[0]}-{span[1]} px (1 = linear); "
            f"R² of a straight line in pixels {k['time_linear_r2_streamcheck']:.4f} "
            f"({k['time_linear_n_streamcheck']} sizes)"
            if slope is not None and span and finite(k.get("time_linear_r2_streamcheck"))
            else "not measured (fewer than two input sizes)",
        ]
    )
    ratios = [(e["input_px"], e["time_ratio"]) for e in k["per_input"] if finite(e["time_ratio"])]
    rows.append(
        [
            "streaming time / conventional time",
            "longer (Figs 2-3; no single number)",
            ", ".join(f"{r:.2f} at {px} px" for px, r in ratios) if ratios else "not measured",
        ]
    )
    peer = [
        (e["input_px"], e["peer_time_ratio"], e["peer_over_streamcheck_time"])
        for e in k["per_input"]
        if finite(e["peer_time_ratio"])
    ]
    rows.append(
        [
            "lightstream time / conventional time",
            "-",
            ", ".join(f"{r:.2f} at {px} px" for px, r, _ in peer)
            if peer
            else "not measured (no lightstream row)",
        ]
    )
    peer_saving = [
        (e["input_px"], e["peer_saving_pct_peak_alloc_bytes"])
        for e in k["per_input"]
        if finite(e["peer_saving_pct_peak_alloc_bytes"])
    ]
    rows.append(
        [
            "memory saved by lightstream (allocator peak)",
            "-",
            ", ".join(f"{s:.1f} % at {px} px" for px, s in peer_saving)
            if peer_saving
            else "not measured (no lightstream row)",
        ]
    )
    return table(["quantity", "paper (published, GPU)", "here (measured)"], rows, align="lll")


def _per_input_table(k: dict[str, Any]) -> str:
    rows = []
    for e in k["per_input"]:
        conv, stream, peer = e["conventional"], e["streamcheck"], e["lightstream"]
        conv_note = e["conventional_status"] or "not measured"
        rows.append(
            [
                e["input_px"],
                sec(get(conv, "time_s_median")) if conv else conv_note,
                sec(get(stream, "time_s_median")) if stream else "not measured",
                f"{e['time_ratio']:.2f}" if finite(e["time_ratio"]) else "-",
                mib(get(conv, "peak_alloc_bytes")) if conv else conv_note,
                mib(get(stream, "peak_alloc_bytes")) if stream else "not measured",
                f"{e['saving_pct_peak_alloc_bytes']:.1f}"
                if finite(e["saving_pct_peak_alloc_bytes"])
                else "-",
                mib(get(conv, "rss_delta_bytes")) if conv else conv_note,
                mib(get(stream, "rss_delta_bytes")) if stream else "not measured",
                f"{e['saving_pct_rss_delta_bytes']:.1f}"
                if finite(e["saving_pct_rss_delta_bytes"])
                else "-",
                err(get(stream, "grad_rel_error")) if stream else "-",
                sec(get(peer, "time_s_median")) if peer else "-",
            ]
        )
    return table(
        [
            "input px",
            "conv. time s",
            "stream. time s",
            "time ratio",
            "conv. alloc MiB",
            "stream. alloc MiB",
            "alloc saved %",
            "conv. RSS MiB",
            "stream. RSS MiB",
            "RSS saved %",
            "stream. grad rel. error",
            "lightstream time s",
        ],
        rows,
    )


def _tile_table(rows: list[dict[str, Any]]) -> str:
    """Fig 2: the input size with the most streamcheck tiles measured, across tiles."""
    stream = _ok(rows, "streamcheck")
    if not stream:
        return ""
    sizes = {}
    for r in stream:
        sizes.setdefault(r.get("input_px"), set()).add(r.get("tile_px"))
    px = max(sizes, key=lambda p: (len(sizes[p]), p or 0))
    if len(sizes[px]) < 2:
        return ""
    conv = _one(rows, "conventional", input_px=px)
    body = []
    for tile in sorted(t for t in sizes[px] if t is not None):
        r = _one(rows, "streamcheck", input_px=px, tile_px=tile)
        if r is None:
            continue
        body.append(
            [
                tile,
                r.get("n_tiles", "n/a"),
                sec(r.get("time_s_median")),
                mib(r.get("peak_alloc_bytes")),
                mib(r.get("rss_delta_bytes")),
                err(r.get("grad_rel_error")),
            ]
        )
    if conv:
        body.append(
            [
                "conventional",
                1,
                sec(conv.get("time_s_median")),
                mib(conv.get("peak_alloc_bytes")),
                mib(conv.get("rss_delta_bytes")),
                "-",
            ]
        )
    return f"Input {px} px.\n\n" + table(
        ["tile px", "tiles", "time s", "alloc MiB", "RSS MiB", "grad rel. error"], body
    )


def _figures(source: Source, out_dir: Path, command: str | None) -> list[str]:
    if not source.figures:
        return [f"No figures (`*.png`) in `{source.folder}`."]
    parts = []
    for i, path in enumerate(source.figures, 1):
        title = path.stem.replace("_", " ")
        parts += [figure(path, out_dir, f"Figure 3.{i}", f"{title} (`{path.name}`).", command), ""]
    return parts


# ----------------------------------------------------------------------------- 4. training
def training_section(imn: Source, out_dir: Path) -> str:
    parts = ["## 4. Training (paper Fig. 4)", ""]
    if not imn.found:
        return "\n".join(
            parts + _missing(imn, "python -m suites.imagenette") + _figures(imn, out_dir, None)
        )
    run, epochs, steps = imn.data["run"], imn.data["epochs"], imn.data["steps"]
    label = imn.data["label"]
    synthetic = run.get("synthetic", label != "imagenette")
    if synthetic:
        parts += [
            f"> **STAND-IN data, not ImageNette.** This run trained on `{run.get('dataset', label)}`: "
            "synthetic textures in ImageNette's folder layout, generated on this machine. It "
            "checks that conventional and streamed training coincide, not ImageNette accuracy.",
            "",
        ]
    cfg = run.get("config", {})
    stream = run.get("streaming", {})
    parts.append(
        f"The Table 1 network trained twice from the same initial weights on identical batches, "
        f"once conventionally and once with its first layers streamed "
        f"({stream.get('n_tiles_per_image', 'n/a')} tiles of {stream.get('tile_px', 'n/a')} px per "
        f"{cfg.get('image_size', 'n/a')} px image): {run.get('epochs_completed', 'n/a')} of "
        f"{cfg.get('epochs', 'n/a')} epochs, {run.get('steps_completed', 'n/a')} steps of batch "
        f"{cfg.get('batch_size', 'n/a')}, {get(run, 'environment', 'dtype', default='n/a')}; status: "
        f"{run.get('status', 'n/a')}."
    )
    if epochs:
        last = epochs[-1]
        rows = []
        for what, conv_key, stream_key, fmt in (
            ("training loss", "train_loss_conventional", "train_loss_streaming", "{:.6f}"),
            ("tuning loss", "val_loss_conventional", "val_loss_streaming", "{:.6f}"),
            ("tuning accuracy", "val_acc_conventional", "val_acc_streaming", "{:.3f}"),
        ):
            a, b = last.get(conv_key), last.get(stream_key)
            control = last.get(conv_key.replace("conventional", "reordered"))
            rows.append(
                [
                    what,
                    fmt.format(a) if finite(a) else "n/a",
                    fmt.format(b) if finite(b) else "n/a",
                    err(abs(a - b)) if finite(a) and finite(b) else "n/a",
                    err(abs(a - control)) if finite(a) and finite(control) else "not run",
                ]
            )
        parts += [
            "",
            f"Final epoch ({_int(last.get('epoch'))}, after step {_int(last.get('step'))}):",
            "",
            table(
                [
                    "",
                    "conventional",
                    "streaming",
                    "|conventional - streaming|",
                    "|conventional - control|",
                ],
                rows,
            ),
            "",
            "The control is a third, conventional run whose batch gradient is summed as two "
            "half-batch sums: only the floating-point summation order differs, as with streaming. "
            "Its distance from the conventional run is the yardstick for the streaming run's.",
        ]
    else:
        parts += ["", "No per-epoch rows in the result files yet."]
    if steps:
        rel = [s.get("loss_rel_diff") for s in steps if finite(s.get("loss_rel_diff"))]
        rel_c = [
            s.get("loss_rel_diff_reordered")
            for s in steps
            if finite(s.get("loss_rel_diff_reordered"))
        ]
        trunk = steps[-1].get("trunk_weight_rel_diff")
        trunk_c = steps[-1].get("trunk_weight_rel_diff_reordered")
        line = (
            f"Over {len(steps)} steps the per-step training losses differ by at most "
            f"{err(max(rel)) if rel else 'n/a'} relative"
        )
        line += f" (control: {err(max(rel_c))})" if rel_c else ""
        line += f"; after the last step the streamed trunk's weights are {err(trunk)} apart (relative norm)"
        line += f" (control: {err(trunk_c)})." if finite(trunk_c) else "."
        parts += ["", line]
    parts += [""]
    command = run.get("command")
    captions = {
        "fig4_curves": "Fig. 4 replica: loss and tuning accuracy of both runs drawn over each other.",
        "loss_difference": "How far apart the runs are, per step, on a log scale (with the control run, if made).",
    }
    for i, path in enumerate(imn.figures, 1):
        kind = path.stem.removeprefix(f"{label}_")
        caption = ("STAND-IN data. " if synthetic else "") + captions.get(kind, path.name)
        parts += [figure(path, out_dir, f"Figure 4.{i}", caption, command), ""]
    parts += [
        f"Details: `{imn.folder.name}/` ({label}_SUMMARY.md, if generated, and the CSV/JSON files)."
    ]
    if imn.missing:
        parts += ["", "Missing: " + "; ".join(imn.missing) + "."]
    return "\n".join(parts)


def _int(value: Any) -> str:
    return str(int(value)) if finite(value) else "n/a"


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
        "For contrast, these stream (same probe): "
        + ", ".join(f"{v.label} ({v.status})" for v in streams)
        + ".",
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
        "float32 results differ by rounding (tolerance 8 eps sqrt(pixels) per tensor) and two "
        "float32 trainings drift apart over many steps, exactly as a reordered conventional run "
        "does (Section 4). float64 is the exactness check.",
        "- The memory saving applies to the streamed part; the stitched output of the streamed "
        "part and its gradient are held whole, as is the input image.",
    ]
    return "\n".join(parts)


def _reason_and_fix(message: str) -> list[str]:
    line = message.strip().splitlines()[-1].strip() if message.strip() else ""
    line = re.sub(r"^- '[^']*': ", "", line)
    reason, _, fix = line.partition(" Fix: ")
    return [reason.rstrip("."), fix.rstrip(".") or "-"]


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _missing(source: Source, command: str) -> list[str]:
    notes = source.missing or [f"no result files in `{source.folder}`"]
    return [f"**Not available**: {'; '.join(notes)}. Produce them with `{command}`.", ""]


# ------------------------------------------------------------------------------- document
def report_environment() -> dict[str, Any]:
    import torch

    import streamcheck

    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:
        tv = "not installed"
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": tv,
        "streamcheck": streamcheck.__version__,
        "device": "cpu" + (" + cuda" if torch.cuda.is_available() else ""),
    }


def markdown_report(
    eq: Source, bench: Source, imn: Source, verdicts: Any, out_dir: Path, env: dict[str, Any]
) -> str:
    headline = _headline(eq, bench)
    sections = [
        "# streamcheck: is streaming exact, and what does it cost?",
        "",
        "Generated by `python -m suites.report` from the result files under `reports/`; do not "
        "edit by hand. Every number below is read from those files (Rule P1 of "
        "`suites/report/render.py`); the paper's published claims are labelled as such.",
        "",
        *headline,
        environment_section(eq, bench, imn, env),
        "",
        equivalence_section(eq),
        "",
        memory_section(bench, out_dir),
        "",
        training_section(imn, out_dir),
        "",
        limits_section(verdicts),
        "",
    ]
    return "\n".join(sections)


def _headline(eq: Source, bench: Source) -> list[str]:
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
        n_fail = len(eq.data.get("failures", []))
        lines.append(
            f"- **Exact?** {s.get('n_cases', 'n/a')} generated networks and "
            f"{len(eq.data.get('trunks', []))} torchvision trunk checks: {plural(n_fail, 'failure')}; worst "
            f"float64 relative error {err(worst64)}."
        )
    else:
        lines.append("- **Exact?** No equivalence record found.")
    if bench.found:
        k = key_ratios(bench.data["rows"])
        best = k.get("max_saving_peak_alloc_bytes")
        ratio = [
            (e["input_px"], e["time_ratio"]) for e in k["per_input"] if finite(e["time_ratio"])
        ]
        text = "- **Cost?** "
        text += (
            f"{best[0]:.1f} % less memory (allocator peak) at {best[1]} px"
            if best
            else "memory saving not measured"
        )
        text += (
            f"; {ratio[-1][1]:.2f}x the conventional time at {ratio[-1][0]} px." if ratio else "."
        )
        lines.append(text)
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
