"""Tables and fits computed from the results file only (used by plots.py and summary.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .results import latest_rows, read_rows, results_path

MiB = 2**20
FIG2_INPUT_PX = 2048
FIG3_TILE_PX = 512


def load(out: Path) -> pd.DataFrame:
    """The latest row per point, as a DataFrame (empty if there is no results file)."""
    rows = latest_rows(read_rows(results_path(out)))
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for col in (
        "tile_px",
        "time_s_median",
        "peak_alloc_bytes",
        "rss_delta_bytes",
        "peak_rss_bytes",
        "grad_rel_error",
        "grad_rel_error_f64",
        "n_tiles",
    ):
        if col not in df:
            df[col] = np.nan
    df["pixels"] = df["input_px"].astype(float) ** 2
    return df


def fig2_input_px(df: pd.DataFrame) -> int | None:
    """The input of the tile sweep: 2048 if measured, else the input with the most tiles tried."""
    stream = ok(df, "streamcheck")
    if stream.empty:
        return None
    counts = stream.groupby("input_px")["tile_px"].nunique()
    return FIG2_INPUT_PX if FIG2_INPUT_PX in counts.index else int(counts.idxmax())


def fig3_tile_px(df: pd.DataFrame) -> int | None:
    """The tile of the input sweep: 512 if measured, else the tile used at the most input sizes."""
    stream = ok(df, "streamcheck")
    if stream.empty:
        return None
    counts = stream.groupby("tile_px")["input_px"].nunique()
    return FIG3_TILE_PX if FIG3_TILE_PX in counts.index else int(counts.idxmax())


def ok(df: pd.DataFrame, method: str, **where: Any) -> pd.DataFrame:
    if df.empty:
        return df
    sel = (df["method"] == method) & (df["status"] == "ok")
    for col, value in where.items():
        sel &= df[col] == value
    return df[sel].sort_values(["input_px", "tile_px"], na_position="first")


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


def conventional_trend(df: pd.DataFrame, metric: str) -> LinearFit | None:
    """Linear fit in pixels of a conventional metric over its measured (status ok) points."""
    conv = ok(df, "conventional")
    if len(conv) < 2:
        return None
    return linear_fit(conv["pixels"], conv[metric])


def conventional_at(df: pd.DataFrame, input_px: int, metric: str) -> tuple[float | None, bool]:
    """(value, estimated): measured if that point is ok, else the linear trend in pixels."""
    conv = ok(df, "conventional", input_px=input_px)
    if len(conv) and np.isfinite(conv[metric].iloc[0]):
        return float(conv[metric].iloc[0]), False
    fit = conventional_trend(df, metric)
    if fit is None:
        return None, True
    return float(fit(float(input_px) ** 2)), True


def value_at(
    df: pd.DataFrame, method: str, input_px: int, tile_px: int, metric: str
) -> float | None:
    rows = ok(df, method, input_px=input_px, tile_px=tile_px)
    if not len(rows) or not np.isfinite(rows[metric].iloc[0]):
        return None
    return float(rows[metric].iloc[0])


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b
