"""The one analysis of the results: latest rows, fits, ratios, predicted OOM.

``SUMMARY.md`` and its headline in the report and the README (summary.py), the figures
(plots.py) and the CI gate (gate.py) all read the results through this module.

Rules (benchmark analysis):

B1. The latest row per resolved-settings key is the point's value (``suites/rows.py`` Rule J2,
    workload Rules KS1-KS2: a committed row by the settings it recorded); rows are flattened to one
    column per parameter and metric, with the settings key in column ``settings_key``. A case
    name selects the rows of its resolved settings, whatever name they were measured under.
B1b. Rows of one key measured at the same commit (a working tree with uncommitted changes, commit
    ``+dirty``, counts as its commit) are draws of one measurement (two case names that resolve
    to the same settings, or a rerun): the point's time is the median of their times
    (``pooled_rows`` says how many), so that the luckier draw is never the value.
B2. A ratio names the case and settings of both sides (``Ratio.label``), and compares only cases
    of the same kind of settings: defaults with defaults, tuned with tuned (``PAIRS``).
B3. A conventional value that was not measured (out of memory) may be estimated from the linear
    trend in pixels of the same case's measured points, as the paper did; an estimate is always
    flagged (``estimated``), never shown as measured.
B4. The headline is three time ratios at the paper's size (``PAPER_INPUT_PX``, ``PAPER_TILE_PX``),
    not the most flattering point: defaults vs defaults, tuned vs tuned (``HEADLINE_PAIRS``) and
    best vs best (the fastest settings measured on each side).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..rows import flat, latest_rows, read_rows, results_path
from .grid import SPEED_CASES, point_key
from .workload import CASES, recorded_settings, spatial_dims

if TYPE_CHECKING:
    from .grid import Point

MiB = 2**20
GiB = 2**30
# The paper's Fig 2 input and Fig 3 tile; the largest size at which it measured conventional.
PAPER_INPUT_PX = 2048
PAPER_TILE_PX = 512
FIG2_INPUT_PX = PAPER_INPUT_PX
FIG3_TILE_PX = PAPER_TILE_PX
# Rule B2: (streaming, conventional) pairs with the same settings, and the tuned streamcheck
# against conventional's best (compiled).
PAIRS = (
    ("streamcheck", "conventional"),
    ("streamcheck_defaults", "conventional"),
    ("streamcheck_tuned", "conventional_tuned"),
    ("streamcheck_tuned", "conventional_compiled"),
    ("streamcheck_compiled", "conventional_compiled"),
)
HEADLINE_PAIRS = {
    "each side's defaults": ("streamcheck_defaults", "conventional"),
    "the same tuned settings": ("streamcheck_tuned", "conventional_tuned"),
}
NUMERIC = (
    "tile_px",
    "time_s_median",
    "cpu_s_median",
    "peak_alloc_bytes",
    "rss_delta_bytes",
    "peak_rss_bytes",
    "grad_rel_error",
    "grad_rel_error_f64",
    "n_tiles",
    "minor_page_faults_per_step",
    "env_load_1min",
    "load_1min_after",
    "other_processes_cores_busy",
)


def settings_key(row: dict[str, Any]) -> str:
    """Rule B1: the row's resolved settings key (its name where no case has it)."""
    s = recorded_settings(row["name"], row["metrics"].get("settings"))
    return s.key if s is not None else row["name"]


def _commit(row: dict[str, Any]) -> str:
    return str((row.get("environment") or {}).get("git_commit") or "").removesuffix("+dirty")


def frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Rules B1-B1b: the latest row per key, flat, as a DataFrame (empty if there are no rows)."""
    rows = list(rows)

    def key(r: dict[str, Any]) -> str:
        return point_key(settings_key(r), r["params"])

    latest = latest_rows(rows, key=key)
    records = []
    for row in latest:
        record = flat(row) | {"settings_key": settings_key(row), "pooled_rows": 1}
        commit = _commit(row)
        draws = [
            r["metrics"]["time_s_median"]
            for r in rows
            if key(r) == key(row)
            and r["status"] == "ok"
            and _commit(r) == commit
            and r["metrics"].get("time_s_median") is not None
        ]
        if row["status"] == "ok" and len(draws) > 1:  # Rule B1b
            record |= {"time_s_median": float(np.median(draws)), "pooled_rows": len(draws)}
        records.append(record)
    df = pd.DataFrame(records)
    if df.empty:
        return df
    for col in NUMERIC:
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else np.nan
    dims = [spatial_dims(CASES[n].network) if n in CASES else 2 for n in df["name"]]
    df["pixels"] = df["input_px"].astype(float) ** np.asarray(dims, dtype=float)  # voxels in 3-D
    return df


def load(out: Path) -> pd.DataFrame:
    """``frame`` of ``out``'s results file."""
    return frame(read_rows(results_path(out)))


def ok(df: pd.DataFrame, name: str, **where: Any) -> pd.DataFrame:
    """The measured (status ok) rows of case ``name`` matching ``where``, by input and tile."""
    if df.empty:
        return df
    label = CASES[name].resolved().key if name in CASES else name
    sel = (df["settings_key"] == label) & (df["status"] == "ok")
    for col, value in where.items():
        sel &= df[col].isna() if value is None else df[col] == value
    return df[sel].sort_values(["input_px", "tile_px"], na_position="first")


def _most_measured(df: pd.DataFrame, fixed: str, varied: str, preferred: int) -> int | None:
    """The value of ``fixed`` a sweep of streamcheck over ``varied`` used: ``preferred`` if
    measured, else the value with the most distinct ``varied`` values."""
    stream = ok(df, "streamcheck")
    if stream.empty:
        return None
    counts = stream.groupby(fixed)[varied].nunique()
    return preferred if preferred in counts.index else int(counts.idxmax())


def fig2_input_px(df: pd.DataFrame) -> int | None:
    """The input of the tile sweep: 2048 if measured, else the input with the most tiles tried."""
    return _most_measured(df, "input_px", "tile_px", FIG2_INPUT_PX)


def fig3_tile_px(df: pd.DataFrame) -> int | None:
    """The tile of the input sweep: 512 if measured, else the tile used at the most input sizes."""
    return _most_measured(df, "tile_px", "input_px", FIG3_TILE_PX)


@dataclass(frozen=True)
class LinearFit:
    """y = intercept + slope * x, least squares; ``r2`` over the points it was fitted on."""

    slope: float
    intercept: float
    r2: float
    n: int

    def __call__(self, x: Any) -> Any:
        return self.intercept + self.slope * np.asarray(x, dtype=float)


def linear_fit(x: Any, y: Any) -> LinearFit | None:
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 2 or np.ptp(x) == 0:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    total = y - y.mean()
    r2 = 1.0 - float(residual @ residual) / float(total @ total) if total.any() else 1.0
    return LinearFit(float(slope), float(intercept), r2, len(x))


def loglog_exponent(x: Any, y: Any) -> float | None:
    """Slope of log y vs log x (1.0: proportional)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    keep = (x > 0) & (y > 0)
    if keep.sum() < 2:
        return None
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


def trend(df: pd.DataFrame, name: str, metric: str, **where: Any) -> LinearFit | None:
    """Linear fit in pixels of ``metric`` over case ``name``'s measured points."""
    rows = ok(df, name, **where)
    if len(rows) < 2:
        return None
    return linear_fit(rows["pixels"], rows[metric])


def conventional_trend(
    df: pd.DataFrame, metric: str, name: str = "conventional"
) -> LinearFit | None:
    return trend(df, name, metric)


def value_at(
    df: pd.DataFrame, name: str, input_px: int, tile_px: int | None, metric: str
) -> float | None:
    """Case ``name``'s measured ``metric`` at (input, tile); None if not measured."""
    rows = ok(df, name, input_px=input_px, tile_px=tile_px)
    if not len(rows) or metric not in rows or not np.isfinite(rows[metric].iloc[0]):
        return None
    return float(rows[metric].iloc[0])


def conventional_at(
    df: pd.DataFrame, input_px: int, metric: str, name: str = "conventional"
) -> tuple[float | None, bool]:
    """(value, estimated): measured if that point is ok, else (Rule B3) the linear trend in pixels."""
    value = value_at(df, name, input_px, None, metric)
    if value is not None:
        return value, False
    fit = trend(df, name, metric)
    if fit is None:
        return None, True
    return float(fit(float(input_px) ** 2)), True


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def settings(name: str) -> str:
    return CASES[name].settings if name in CASES else "settings not recorded"


@dataclass(frozen=True)
class Ratio:
    """``streaming / conventional`` of one metric at one point; Rule B2's names on both sides."""

    streaming: str
    conventional: str
    metric: str
    input_px: int
    tile_px: int
    value: float | None
    estimated: bool  # Rule B3: the conventional side comes from its trend
    apart_s: float | None = None  # between the two sides' starts (a shared machine's load drifts)

    @property
    def label(self) -> str:
        return (
            f"{self.streaming} ({settings(self.streaming)}) / "
            f"{self.conventional} ({settings(self.conventional)})"
        )

    @property
    def same_settings(self) -> bool:
        return settings(self.streaming) == settings(self.conventional)


def pair_ratio(
    df: pd.DataFrame,
    streaming: str,
    conventional: str,
    metric: str,
    *,
    input_px: int = PAPER_INPUT_PX,
    tile_px: int = PAPER_TILE_PX,
    estimate: bool = False,
) -> Ratio:
    """The ratio of ``metric`` streaming / conventional at (input, tile); the conventional side
    estimated from its trend only where ``estimate`` (Rule B3). The "conventional" side may be
    another streaming case (the peer), measured at the same tile."""
    top = value_at(df, streaming, input_px, tile_px, metric)
    below = None if CASES[conventional].kind == "conventional" else tile_px
    if estimate:
        bottom, estimated = conventional_at(df, input_px, metric, conventional)
    else:
        bottom, estimated = value_at(df, conventional, input_px, below, metric), False
    starts = [
        _started(df, streaming, input_px, tile_px),
        None if estimated else _started(df, conventional, input_px, below),
    ]
    apart = abs((starts[0] - starts[1]).total_seconds()) if None not in starts else None
    value = ratio(top, bottom)
    return Ratio(streaming, conventional, metric, input_px, tile_px, value, estimated, apart)


def _started(df: pd.DataFrame, name: str, input_px: int, tile_px: int | None) -> Any:
    rows = ok(df, name, input_px=input_px, tile_px=tile_px)
    if (
        not len(rows)
        or "run_started_utc" not in rows
        or not isinstance(rows["run_started_utc"].iloc[0], str)
    ):
        return None
    return pd.Timestamp(rows["run_started_utc"].iloc[0])


def by_settings(names: Iterable[str]) -> dict[str, list[str]]:
    """Case names grouped by their resolved settings (Rule B1: one measurement per group)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(CASES[name].resolved().key, []).append(name)
    return groups


def fastest_settings(df: pd.DataFrame, n: int, t: int) -> dict[str, tuple[float, list[str]]]:
    """Rule B4: per kind (streamcheck, conventional), the median step time of its fastest settings
    of the benchmark network at (``n``, ``t``), and the speed cases that name those settings.

    One row per settings (Rule B1): two names for one setting are one measurement, so measuring a
    setting twice cannot make the better draw the headline. Migrated rows (another suite's run)
    are left out.
    """
    best: dict[str, tuple[float, list[str]]] = {}
    for names in by_settings(SPEED_CASES).values():
        kind = CASES[names[0]].kind
        rows = ok(df, names[0], input_px=n, tile_px=None if kind == "conventional" else t)
        if not len(rows) or isinstance(rows.iloc[0].get("run_migrated"), str):
            continue
        median = float(rows.iloc[0]["time_s_median"])
        if kind not in best or median < best[kind][0]:
            best[kind] = (median, names)
    return best


def predicted_oom(point: Point, df: pd.DataFrame, *, budget_bytes: float | None) -> str | None:
    """Why a conventional point will not fit, from the linear trend in pixels (through the two
    largest measured points of the same case, else of plain ``conventional``) of its peak memory
    (RSS delta on CPU, allocator peak on CUDA); None if it may fit or nothing is known.

    Running such a point until it hits the address-space cap would hold most of a shared
    machine's memory for minutes (the 8192^2 conventional step reaches ~20 GB before failing).
    """
    if df.empty or not budget_bytes or CASES[point.name].kind != "conventional":
        return None
    metric = "peak_alloc_bytes" if point.device.startswith("cuda") else "rss_delta_bytes"
    network = CASES[point.name].network
    plain = "conventional" if network == "paper" else f"{network}_conventional"
    for name in dict.fromkeys([point.name, plain]):
        rows = ok(df, name, device=point.device, dtype=point.dtype)
        rows = rows[np.isfinite(rows[metric])] if len(rows) else rows
        if len(rows) >= 2:
            break
    else:
        return None
    (x0, y0), (x1, y1) = sorted(zip(rows["pixels"], rows[metric], strict=True))[-2:]
    slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 0.0
    predicted = y1 + slope * (float(point.input_px) ** spatial_dims(network) - x1)
    if predicted <= budget_bytes:
        return None
    return (
        f"not run: predicted peak {predicted / GiB:.1f} GiB (linear in pixels through the two "
        f"largest measured {name} points) exceeds the memory budget {budget_bytes / GiB:.1f} GiB"
    )


def headline(df: pd.DataFrame) -> dict[str, Any]:
    """Rule B4: what the README and the report lead with, at the paper's size.

    ``time``: the three ratios a reader needs, each ``(what, streaming side, conventional side,
    ratio)`` with a side ``(settings, seconds)``: defaults vs defaults, tuned vs tuned, and best vs
    best (``fastest_settings``); a pair not measured on both sides is left out. ``memory``: the
    allocator ratio of the PyTorch-defaults pair; ``memory_large``: the same at the largest
    streamed size, against an estimated conventional where conventional did not run (flagged).
    """
    n, t = PAPER_INPUT_PX, PAPER_TILE_PX
    time: list[tuple[str, tuple[str, float], tuple[str, float], float]] = []
    names: list[str] = []  # the cases behind them
    for what, (s, c) in HEADLINE_PAIRS.items():
        top, bottom = (
            value_at(df, s, n, t, "time_s_median"),
            value_at(df, c, n, None, "time_s_median"),
        )
        if top is not None and bottom:
            time.append((what, (settings(s), top), (settings(c), bottom), top / bottom))
            names += [s, c]
    best = fastest_settings(df, n, t)
    if len(best) == 2:
        (s_time, s_names), (c_time, c_names) = best["streamcheck"], best["conventional"]
        sides = (settings(s_names[0]), s_time), (settings(c_names[0]), c_time)
        time.append(("each side's fastest settings measured", *sides, s_time / c_time))
        names += [s_names[0], c_names[0]]
    memory = pair_ratio(df, "streamcheck", "conventional", "peak_alloc_bytes")
    streamed = ok(df, "streamcheck", tile_px=PAPER_TILE_PX)
    large = None
    if len(streamed):
        biggest = int(streamed["input_px"].max())
        if biggest > PAPER_INPUT_PX:
            large = pair_ratio(
                df,
                "streamcheck",
                "conventional",
                "peak_alloc_bytes",
                input_px=biggest,
                estimate=True,
            )
    return {
        "time": time,
        "names": names,
        "memory": memory if memory.value is not None else None,
        "memory_large": large,
    }
