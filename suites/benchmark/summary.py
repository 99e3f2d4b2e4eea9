"""``SUMMARY.md``: key ratios vs targets, the tables, versions and commands, from the results only."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import tomllib

from ..markdown import finite, mib, table
from . import analysis as A
from .analysis import (
    FIG2_INPUT_PX,
    FIG3_TILE_PX,
    PAIRS,
    MiB,
    by_settings,
    fastest_settings,
    linear_fit,
    load,
    loglog_exponent,
    ok,
    pair_ratio,
    ratio,
    settings,
    value_at,
)
from .gate import CEILINGS
from .grid import MAX_TILES, ORDER, RESNET18_CASES, SPEED_CASES
from .workload import CASES

# The paper's published claims (Pinckaers et al., TPAMI 2020), quoted, not measured here.
PAPER = {
    "memory_saving_pct": 97,  # Fig. 3 caption: "significantly less memory required (up to 97 percent)"
    "time": "almost linear in input size",  # Section 4.3 / Fig. 3: "increases almost linearly"
    "conventional_estimated_above_px": 2048,  # Fig. 3 caption: "above 2048x2048 ... estimated"
}


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    limit: float
    compare: str  # "<=" or ">="
    fmt: str
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.value is None or math.isnan(self.value):
            return "not measured"
        good = self.value <= self.limit if self.compare == "<=" else self.value >= self.limit
        return "met" if good else "**missed**"


def _fmt(value: float | None, fmt: str) -> str:
    return "–" if value is None or math.isnan(value) else format(value, fmt)


def _mib(value: float | None) -> str:
    return _fmt(None if value is None else value / MiB, ",.0f")


with CEILINGS.open("rb") as _f:
    TARGETS = tomllib.load(_f)["target"]  # as data, beside the gate's ceilings
METERS = {"time_s_median": "time", "peak_alloc_bytes": "allocator", "rss_delta_bytes": "RSS delta"}


def targets(df: pd.DataFrame) -> list[Target]:
    """``ceilings.toml``'s targets, measured: ratios (``pair_ratio``), best against best, and the
    fits of memory in tile pixels and of time in input pixels."""
    n, t = FIG2_INPUT_PX, FIG3_TILE_PX
    out = []
    for spec in TARGETS:
        note = spec.get("note", "")
        if "fit" in spec:
            out += _fit_targets(df, spec["fit"], spec["min_r2"], n, t)
        elif spec.get("best"):
            out.append(best_against_best(df, n, t, spec["max"], note))
        else:
            metric, px = spec.get("metric", "time_s_median"), spec.get("input_px", n)
            r = pair_ratio(
                df, spec["streaming"], spec["other"], metric, input_px=px, tile_px=t,
                estimate=spec.get("estimate", False),
            )  # fmt: skip
            name = f"{METERS[metric]} {r.label}, {px}², tile {t}"
            if r.estimated and r.value is not None:
                note = "conventional estimated (linear fit in pixels)"
            fmt = ".2f" if metric == "time_s_median" else ".3f"
            out.append(Target(name, r.value, spec["max"], "<=", fmt, note))
    return out


def _fit_targets(df: pd.DataFrame, fit: str, min_r2: float, n: int, t: int) -> list[Target]:
    """R² of memory = a + b·tile² (streamcheck at ``n``), or of time = a + b·pixels per method."""
    if fit == "tile":
        tiles = ok(df, "streamcheck", input_px=n)
        f = (
            linear_fit(tiles["tile_px"].astype(float) ** 2, tiles["peak_alloc_bytes"])
            if len(tiles)
            else None
        )
        what = (
            f"memory linear in tile pixels (streamcheck, {n}², allocator): R² of mem = a + b·tile²"
        )
        how = (
            f"b = {f.slope:.1f} B per tile px, a = {f.intercept / MiB:.0f} MiB, {f.n} tiles"
            if f
            else ""
        )
        return [Target(what, None if f is None else f.r2, min_r2, ">=", ".4f", how)]
    out = []
    for method in _streaming_methods(df):
        stream = ok(df, method, tile_px=t)
        f = linear_fit(stream["pixels"], stream["time_s_median"]) if len(stream) else None
        slope = loglog_exponent(stream["pixels"], stream["time_s_median"]) if len(stream) else None
        what = f"time linear in input ({method}, tile {t}): R² of time = a + b·pixels"
        how = (
            f"b = {f.slope * 1e6:.3g} s per Mpx, a = {f.intercept:.3g} s, {f.n} sizes; "
            f"log-log exponent {_fmt(slope, '.2f')}"
            if f
            else ""
        )
        out.append(Target(what, None if f is None else f.r2, min_r2, ">=", ".4f", how))
    return out


def best_against_best(df: pd.DataFrame, n: int, t: int, limit: float, note: str) -> Target:
    """The fastest streamcheck settings / the fastest conventional settings (``fastest_settings``),
    both sides named."""
    best = fastest_settings(df, n, t)

    def side(kind: str) -> str:
        if kind not in best:
            return f"{kind}: not measured"
        names = best[kind][1]
        return f"{' = '.join(names)} ({settings(names[0])}, {best[kind][0]:.2f} s)"

    value = best["streamcheck"][0] / best["conventional"][0] if len(best) == 2 else None
    name = f"time best / best: {side('streamcheck')} / {side('conventional')}, {n}², tile {t}"
    return Target(name, value, limit, "<=", ".2f", note)


def _streaming_methods(df: pd.DataFrame) -> list[str]:
    """streamcheck, and streamcheck_tuned (its CPU speed settings) where it was measured."""
    return ["streamcheck"] + (["streamcheck_tuned"] if len(ok(df, "streamcheck_tuned")) else [])


def _table(header: str | list[str], rows: list[list[str]]) -> list[str]:
    return table(header, rows).splitlines()


def _load(r: pd.Series) -> str:
    """The machine's load around a point: 1-minute load average at its start, and the cores other
    processes kept busy during its timed steps."""
    return f"{_fmt(r.get('env_load_1min'), '.1f')} / {_fmt(r.get('other_processes_cores_busy'), '.2f')}"


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"**{seconds / 3600:.0f} h**"
    return f"**{seconds / 86400:.0f} days**"


def like_with_like(df: pd.DataFrame) -> list[str]:
    """Rule B2/B4 of analysis.py: every pair at the paper's size, then by input size."""
    n, t = FIG2_INPUT_PX, FIG3_TILE_PX
    rows = []
    for streaming, conventional in PAIRS:
        ratios = [
            pair_ratio(df, streaming, conventional, m, input_px=n, tile_px=t)
            for m in ("time_s_median", "cpu_s_median", "peak_alloc_bytes", "rss_delta_bytes")
        ]
        if all(r.value is None for r in ratios):
            continue
        loads = []
        for name, tile in ((streaming, t), (conventional, None)):
            found = ok(df, name, input_px=n, tile_px=tile)
            loads.append(_load(found.iloc[0]) if len(found) else "–")
        apart = ratios[0].apart_s
        rows.append(
            [
                ratios[0].label,
                *(_fmt(r.value, ".2f") for r in ratios),
                *loads,
                "–" if apart is None else _duration(apart),
            ]
        )
    inputs = sorted({int(p) for p in ok(df, "conventional_tuned")["input_px"]}) if len(df) else []
    by_size = []
    for px in inputs:
        cells = [f"{px}²"]
        for streaming, conventional in PAIRS:
            r = pair_ratio(df, streaming, conventional, "time_s_median", input_px=px, tile_px=t)
            cells.append(_fmt(r.value, ".2f"))
        by_size.append(cells)
    if not rows:
        return ["No pair measured on both sides at the paper's size."]
    ok_all = df[df["status"] == "ok"]
    busy = ok_all[ok_all["other_processes_cores_busy"] > 0.5]
    if len(busy):
        quiet = len(ok_all) - len(busy)
        by_date = sorted({str(d)[:10] for d in busy.get("run_started_utc", pd.Series()).dropna()})
        rows_note = [
            "",
            f"**Load warning**: {len(busy)} timed points (measured {', '.join(by_date)}) ran while "
            "other processes kept more than half a core of this 2-core machine busy (column *load*, "
            f"up to {busy['other_processes_cores_busy'].max():.2f} cores): their wall times are "
            f"inflated. The other {quiet} points were measured at other times (most before the "
            "load was recorded), so time ratios and time fits that combine the two groups (the "
            "peer ratio, time linearity, the tables by input size beyond the sizes above) do not "
            "compare like with like; the memory meters are not affected.",
        ]
    else:
        rows_note = []
    lines = [
        f"Streaming / conventional at {n}², tile {t}, each side named with its settings (below 1:",
        "streaming uses less). *CPU time*: of the process, all threads (less disturbed by other",
        "processes than the wall time). *load*: the 1-minute load average at the point's start / cores other",
        "processes kept busy during its timed steps, on this 2-core machine shared with other jobs;",
        "*sides measured apart*: between the two points' starts (in bold when over an hour: the",
        "machine's load may differ between them, so the time ratio may not compare like with like).",
        "",
        *_table(
            "streaming / conventional | time | CPU time | allocator peak | RSS delta | load, streaming | load, conventional | sides measured apart",
            rows,
        ),
    ]
    if by_size:
        lines += [
            "",
            f"Time ratio by input size (tile {t}):",
            "",
            *_table(["input", *(f"{s} / {c}" for s, c in PAIRS)], by_size),
        ]
    return lines + rows_note


def speed_table(
    df: pd.DataFrame,
    *,
    cases: Sequence[str] = SPEED_CASES,
    input_px: int = FIG2_INPUT_PX,
    tile_px: int = FIG3_TILE_PX,
    prefix: str = "",
) -> list[str]:
    """Each setting alone and together, against the same kind with PyTorch's defaults (the cases
    ``<prefix>conventional`` and ``<prefix>streamcheck``), at one input and tile."""
    n, t = input_px, tile_px
    base = {kind: f"{prefix}{kind}" for kind in ("conventional", "streamcheck")}
    conventional_s = value_at(df, base["conventional"], n, None, "time_s_median")
    rows = []
    for names in by_settings(cases).values():
        name, kind = names[0], CASES[names[0]].kind
        tile = None if kind == "conventional" else t
        found = ok(df, name, input_px=n, tile_px=tile)
        if not len(found):
            continue
        r = found.iloc[0]
        time_s = float(r["time_s_median"])
        speedup = ratio(value_at(df, base[kind], n, tile, "time_s_median"), time_s)
        computed = _pixels_computed(n, r.get("tile_px_used"), r.get("overlap_px"))
        computed = 1.0 if kind == "conventional" else computed
        rows.append(
            [
                " = ".join(names),
                settings(name),
                _fmt(time_s, ".2f"),
                _fmt(r.get("cpu_s_median"), ".2f"),
                _fmt(speedup, ".2f"),
                _fmt(ratio(time_s, conventional_s), ".2f"),
                _fmt(computed, ".2f"),
                _fmt(r.get("minor_page_faults_per_step"), ",.0f"),
                _mib(r.get("peak_alloc_bytes")),
                _mib(r.get("rss_delta_bytes")),
                _load(r),
                "migrated" if isinstance(r.get("run_migrated"), str) else "",
            ]
        )
    if not rows:
        return ["Not measured."]
    return [
        f"Input {n}², tile {t} (streamcheck), one fresh process each. *speed-up*: the same kind",
        "(conventional or streamcheck) with PyTorch defaults / this case, by median wall time;",
        f"*/ conventional*: this case's time / {base['conventional']} (PyTorch defaults);",
        "*pixels computed*: input pixels of all tiles / image pixels (the overlap's cost).",
        "*migrated*: a row of the former speed suite (no allocator or RSS meter).",
        "",
        *_table(
            "case | settings | time (s) | CPU time (s) | speed-up vs defaults | / conventional | pixels computed | page faults / step | allocator peak (MiB) | RSS delta (MiB) | load | ",
            rows,
        ),
    ]


def _pixels_computed(n: int, tile: object, overlap: object) -> float | None:
    """Input pixels all tiles read / image pixels, on an n x n image: each tile owns
    ``tile - before - after`` px per axis and reads its overlap beyond that, clipped to the image."""
    if not isinstance(overlap, (list, tuple)) or len(overlap) != 2 or not finite(tile):
        return None
    before, after = (int(v) for v in overlap)
    owned = int(tile) - before - after  # type: ignore[call-overload]
    if owned <= 0:
        return None
    read = sum(
        min(start + owned + after, n) - max(start - before, 0) for start in range(0, n, owned)
    )
    return (read / n) ** 2


def second_network(df: pd.DataFrame) -> list[str]:
    """Suite ``resnet18``: the speed settings on a ResNet-18 trunk (issue 17)."""
    found = df[(df["suite"] == "resnet18") & (df["status"] == "ok")]
    if not len(found):
        return ["Not measured (`python -m suites.benchmark --suite resnet18`)."]
    n = int(found["input_px"].max())
    tiles = found["tile_px"].dropna()
    t = int(tiles.iloc[0]) if len(tiles) else FIG3_TILE_PX
    return [
        "The speed settings checked off the benchmark network: a ResNet-18 trunk (torchvision,",
        "random init, BatchNorm frozen) streamed until the global pool, the pool and classifier",
        "as the head. Its tiles overlap by hundreds of pixels (receptive field), so a tile much",
        "larger than 512 is needed and streaming computes more pixels than the image has",
        "(column *pixels computed*).",
        "",
        *speed_table(df, cases=RESNET18_CASES, input_px=n, tile_px=t, prefix="resnet18_"),
    ]


def _points_table(df: pd.DataFrame) -> list[str]:
    rows = []
    order = {name: i for i, name in enumerate(ORDER)}
    df = df[df["suite"] != "speed"]  # in the speed table
    df = df.assign(_o=df["name"].map(order).fillna(len(order)))
    df = df.sort_values(["input_px", "_o", "name", "tile_px"])
    for _, r in df.iterrows():
        tile = "–" if pd.isna(r.get("tile_px")) else str(int(r["tile_px"]))
        n_tiles = "–" if pd.isna(r.get("n_tiles")) else str(int(r["n_tiles"]))
        times = r.get("time_s_all")
        runs = f"{len(times)}" if isinstance(times, list) else "–"
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**"
        rows.append(
            [
                r["name"],
                f"{int(r['input_px'])}²",
                tile,
                n_tiles,
                status,
                _fmt(r.get("time_s_median"), ".2f"),
                runs,
                _mib(r.get("peak_alloc_bytes")),
                _mib(r.get("rss_delta_bytes")),
                _mib(r.get("peak_rss_bytes")),
                _fmt(r.get("grad_rel_error"), ".1e"),
                _fmt(r.get("grad_rel_error_f64"), ".1e"),
                _load(r),
            ]
        )
    return _table(
        "case | input | tile | tiles | status | time (s, median) | timed runs | allocator peak (MiB) | RSS delta (MiB) | RSS peak raw (MiB) | grad err vs conv. | grad err vs float64 | load",
        rows,
    )


def _peer_table(df: pd.DataFrame) -> list[str]:
    """streamcheck / lightstream at every (input, tile) both measured."""
    rows = []
    for _, r in ok(df, "lightstream").iterrows():
        n, t = int(r["input_px"]), int(r["tile_px"])
        ratios = [
            ratio(value_at(df, "streamcheck", n, t, m), value_at(df, "lightstream", n, t, m))
            for m in ("time_s_median", "peak_alloc_bytes", "rss_delta_bytes")
        ]
        if any(v is not None for v in ratios):
            rows.append([f"{n}²", str(t), *(_fmt(v, ".2f") for v in ratios)])
    if not rows:
        return ["Peer (lightstream): no point measured with both (see *Not measured* below)."]
    return [
        "Streamcheck / lightstream on the same points (below 1: streamcheck uses less):",
        "",
        *_table(["input", "tile", "time", "allocator peak", "RSS delta"], rows),
    ]


def _first(df: pd.DataFrame, col: str) -> str:
    values = [
        str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
        for v in df.get(col, pd.Series(dtype=object)).dropna().unique()
    ]
    return ", ".join(values) if values else "–"


def write(
    out: Path, *, rebuild_command: str, legal_tile: Callable[[], str] | None = None
) -> Path | None:
    """Write ``out/SUMMARY.md`` from ``out/results.jsonl``; returns its path (None: no results)."""
    df = load(out)
    if df.empty:
        return None
    lines = [
        "# Benchmark summary: streaming vs conventional training (paper Figs 2-3)",
        "",
        "Generated by `suites/benchmark/summary.py` from `results.jsonl` in this folder; do not edit.",
        "",
        f"- {headline(out)}",
        "",
        "## Like with like",
        "",
        *like_with_like(df),
        "",
        "## Against the paper's claims",
        "",
        paper_claims(df),
        "",
        "## Targets",
        "",
    ]
    rows = [
        [t.name, _fmt(t.value, t.fmt), f"{t.compare} {t.limit:g}", t.verdict, t.note]
        for t in targets(df)
    ]
    lines += _table(["quantity", "measured", "target", "verdict", "note"], rows)

    n, t = FIG2_INPUT_PX, FIG3_TILE_PX

    def err(method: str, metric: str, input_px: int | None = None) -> str:
        rows = ok(df, method)
        if input_px is not None:
            tile = None if method.startswith("conventional") else t
            rows = rows[rows["input_px"] == input_px]
            rows = rows[rows["tile_px"].isna()] if tile is None else rows[rows["tile_px"] == tile]
        values = rows[metric].dropna() if metric in rows else []
        return _fmt(float(values.max()) if len(values) else None, ".1e")

    errors = [
        [
            m,
            err(m, "grad_rel_error", n),
            err(m, "grad_rel_error_f64", min(n, 1024)),
            err(m, "grad_rel_error"),
            err(m, "grad_rel_error_f64"),
        ]
        for m in ORDER
    ]
    lines += [
        "",
        "## Gradients",
        "",
        "Max over parameters of max|g − g_ref| / max|g_ref|, with g_ref the parameter gradients",
        "of conventional training of the same network and image (same seed): in the sweep's",
        "dtype (*vs conv.*, inputs up to 2048²) and in float64 (*vs float64*, the exactness",
        "oracle, inputs up to 1024²: float64 CPU convolutions use im2col, 19 GiB at 2048²).",
        "The conventional row's *vs float64* is its own rounding error: the noise floor.",
        "",
        *_table(
            f"case | vs conv., {n}² | vs float64, {min(n, 1024)}² | vs conv., max all points | "
            "vs float64, max all points",
            errors,
        ),
        "",
        *_peer_table(df),
        "",
        "## Meters",
        "",
        "- **allocator peak**: highest running sum of CPU allocation/free events recorded by",
        "  `torch.profiler` (`profile_memory=True`) during one forward + backward: live tensors",
        "  only, not counting the input and weights that existed before "
        "(`suites.meters.profiler_peak_bytes`).",
        "- **RSS delta**: peak resident set size (VmHWM) of the fresh process during the timed",
        "  steps minus its RSS just before them (input, weights, wrappers and allocator caches are",
        "  in the baseline); **RSS peak raw** is the VmHWM itself, libraries included.",
        "- **time**: median of the timed forward + backward steps after one warm-up, in one fresh",
        "  process per point; slow points get fewer timed runs (column *timed runs*).",
        "",
        "## All points",
        "",
        "Cases and their settings (`suites/benchmark/workload.py`): "
        + "; ".join(f"*{name}*: {settings(name)}" for name in ORDER)
        + ". Channels-last for streamcheck is the engine option `Streamed(..., channels_last=True)`;",
        "for conventional, the network and the image are converted. *load*: 1-minute load average",
        "at the point's start / cores other processes kept busy during its timed steps.",
        "",
        *_points_table(df),
        "",
        "## Speed settings",
        "",
        *speed_table(df),
        "",
        "## Second network",
        "",
        *second_network(df),
    ]
    not_ok = df[df["status"] != "ok"]
    if len(not_ok):
        lines += ["", "Not measured:", ""]
        for _, r in not_ok.iterrows():
            reason = str(r.get("reason") or "").strip().splitlines()
            lines.append(f"- `{r['key']}`: {r['status']} — {reason[-1] if reason else ''}")
    if legal_tile is not None:
        lines += ["", legal_tile()]
    lines += [
        "",
        "## Environment and commands",
        "",
        f"- device: {_first(df, 'env_cpu')} ({_first(df, 'env_cores')} cores); GPU: "
        f"{_first(df, 'env_gpu')}; threads: {_first(df, 'env_threads')}; dtype: {_first(df, 'dtype')}",
        f"- torch {_first(df, 'env_torch')}; torchvision {_first(df, 'env_torchvision')}; "
        f"streamcheck {_first(df, 'env_streamcheck')}; lightstream {_first(df, 'env_lightstream')}; "
        f"python {_first(df, 'env_python')}",
        f"- git commit(s): {_first(df, 'env_git_commit')}",
        f"- measured with: {'; '.join(f'`{c}`' for c in df['run_command'].dropna().unique())}",
        f"- this summary and the figures rebuilt with: `{rebuild_command}`",
        "",
        "![Fig 2](fig2_tile.png)",
        "",
        "![Fig 3](fig3_input.png)",
        "",
    ]
    path = out / "SUMMARY.md"
    path.write_text("\n".join(lines))
    return path


def _v(df: pd.DataFrame, name: str, px: int, tile: int | None, metric: str) -> float | None:
    return A.value_at(df, name, px, None if name.startswith("conventional") else tile, metric)


def paper_claims(df: pd.DataFrame) -> str:
    """The paper's published claims (``PAPER``) next to the measured numbers, or the section that
    has them."""
    tile = A.fig3_tile_px(df) or A.PAPER_TILE_PX
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
    rows += [
        ["streaming time vs input pixels", PAPER["time"] + " (Fig. 3)", "*Targets*: time linear in input"],
        ["weight gradients", "equal (Section 3 of the paper)", "*Gradients*: against conventional and float64"],
        ["time streaming / conventional", "longer (Figs 2-3; no single number)", "*Like with like*: every pair, named with its settings"],
    ]  # fmt: skip
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


def headline(folder: Path) -> str:
    """The README's cost line (Rule B4): three time ratios, each naming its settings once, and the
    memory saved."""
    df = load(folder)
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
    text = f"**Cost?** One training step at {n}², tile {t}, streamed / conventional time: "
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


def legal_tile_note(input_px: int = FIG2_INPUT_PX) -> str:
    """A sentence on the smallest legal tile and why the sweep starts higher."""
    from .grid import smallest_legal_tile

    legal, practical = smallest_legal_tile(input_px, max_tiles=MAX_TILES)
    return (
        f"Tile sweep: the smallest legal tile at {input_px}² is {legal} px; the sweep starts at the "
        f"smallest tile giving at most {MAX_TILES} tiles ({practical} px, or the next listed size "
        "within 25 %), since every tile adds a fixed per-tile overhead."
    )
