"""Section 3 of the report: memory and time (paper Figs 2-3), from the benchmark rows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .format import PAPER, err, figure, mib, missing_note, relpath, sec, table
from .sources import Source, finite, get


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
        parts += missing_note(bench, "python -m suites.benchmark")
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
        _per_input_tables(k),
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
        reasons = sorted(
            {
                str(r.get("reason"))
                for r in rows
                if r.get("method") == "lightstream" and r.get("reason")
            }
        )
        parts += [
            "",
            "**No lightstream row**: the peer library was not measured in these result files"
            + (f" ({'; '.join(reasons)})." if reasons else "."),
        ]
    parts += ["", *_figures(bench, out_dir, command)]
    return "\n".join(parts)


def _linearity(k: dict[str, Any], slope: float | None, span: tuple[int, int] | None) -> str:
    n = k.get("time_linear_n_streamcheck", 0)
    if slope is None or span is None or n < 3:
        return f"not measured ({n} input sizes; a trend needs three or more)"
    return (
        f"log-log slope {slope:.2f} over {span[0]}-{span[1]} px (1 = linear); R² of a straight "
        f"line in pixels {k['time_linear_r2_streamcheck']:.4f} ({n} sizes)"
    )


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
            _linearity(k, slope, span),
        ]
    )
    graded = [e for e in k["per_input"] if finite(get(e["streamcheck"], "grad_rel_error_f64"))]
    if graded:
        e = graded[-1]
        text = f"streamcheck {err(get(e['streamcheck'], 'grad_rel_error_f64'))}"
        if finite(get(e["conventional"], "grad_rel_error_f64")):
            text += f", conventional {err(get(e['conventional'], 'grad_rel_error_f64'))}"
        if finite(get(e["lightstream"], "grad_rel_error_f64")):
            text += f", lightstream {err(get(e['lightstream'], 'grad_rel_error_f64'))}"
        rows.append(
            [
                "weight-gradient error vs conventional float64",
                "equal gradients (Section 3 of the paper)",
                f"{text} at {e['input_px']} px ({get(e['streamcheck'], 'dtype', default='?')})",
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


def _pct(value: Any) -> str:
    return f"{value:.1f}" if finite(value) else "-"


def _ratio(value: Any) -> str:
    return f"{value:.2f}" if finite(value) else "-"


def _per_input_tables(k: dict[str, Any]) -> str:
    """Time, memory and gradient error per input size: three small tables."""
    time_rows, memory_rows, grad_rows = [], [], []
    for e in k["per_input"]:
        conv, stream, peer = e["conventional"], e["streamcheck"], e["lightstream"]
        missing = e["conventional_status"] or "not measured"

        def cell(row: dict[str, Any] | None, fmt: Any, key: str, absent: str = "-") -> str:
            return fmt(get(row, key)) if row else absent

        time_rows.append(
            [
                e["input_px"],
                cell(conv, sec, "time_s_median", missing),
                cell(stream, sec, "time_s_median", "not measured"),
                _ratio(e["time_ratio"]),
                cell(peer, sec, "time_s_median"),
                _ratio(e["peer_time_ratio"]),
            ]
        )
        memory_rows.append(
            [
                e["input_px"],
                cell(conv, mib, "peak_alloc_bytes", missing),
                cell(stream, mib, "peak_alloc_bytes", "not measured"),
                _pct(e["saving_pct_peak_alloc_bytes"]),
                cell(peer, mib, "peak_alloc_bytes"),
                cell(conv, mib, "rss_delta_bytes", missing),
                cell(stream, mib, "rss_delta_bytes", "not measured"),
                _pct(e["saving_pct_rss_delta_bytes"]),
                cell(peer, mib, "rss_delta_bytes"),
            ]
        )
        if any(get(r, key) is not None for r in (conv, stream, peer) for key in GRAD_KEYS):
            grad_rows.append(
                [
                    e["input_px"],
                    cell(conv, err, "grad_rel_error_f64"),
                    cell(stream, err, "grad_rel_error_f64"),
                    cell(peer, err, "grad_rel_error_f64"),
                    cell(stream, err, "grad_rel_error"),
                    cell(peer, err, "grad_rel_error"),
                ]
            )
    parts = [
        "Time per training step (median, seconds):",
        "",
        table(
            [
                "input px",
                "conventional",
                "streamcheck",
                "streamcheck / conv.",
                "lightstream",
                "lightstream / conv.",
            ],
            time_rows,
        ),
        "",
        "Peak memory (MiB) and the share streaming saves:",
        "",
        table(
            [
                "input px",
                "conv. alloc",
                "streamcheck alloc",
                "alloc saved %",
                "lightstream alloc",
                "conv. RSS",
                "streamcheck RSS",
                "RSS saved %",
                "lightstream RSS",
            ],
            memory_rows,
        ),
    ]
    if grad_rows:
        parts += [
            "",
            "Weight-gradient error, max over parameters of max|g - g_ref| / max|g_ref| "
            "(float64 reference: conventional training in float64; a conventional row against "
            "it is float32's own rounding, the noise floor):",
            "",
            table(
                [
                    "input px",
                    "conventional vs float64",
                    "streamcheck vs float64",
                    "lightstream vs float64",
                    "streamcheck vs conventional (same dtype)",
                    "lightstream vs conventional (same dtype)",
                ],
                grad_rows,
            ),
        ]
    return "\n".join(parts)


GRAD_KEYS = ("grad_rel_error", "grad_rel_error_f64")


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
                err(r.get("grad_rel_error_f64")),
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
                err(conv.get("grad_rel_error_f64")),
            ]
        )
    return f"Input {px} px.\n\n" + table(
        [
            "tile px",
            "tiles",
            "time s",
            "alloc MiB",
            "RSS MiB",
            "grad error vs conventional",
            "grad error vs float64",
        ],
        body,
    )


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
