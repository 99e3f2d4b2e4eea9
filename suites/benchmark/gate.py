"""The CI regression gate: streamcheck / conventional ratios at 2048^2 vs ``ceilings.toml``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomllib

from .analysis import load, ok

CEILINGS = Path(__file__).with_name("ceilings.toml")


def read_ceilings(path: Path = CEILINGS) -> dict[str, Any]:
    with path.open("rb") as f:
        return dict(tomllib.load(f)["gate"])


def check(out: Path, ceilings: dict[str, Any]) -> tuple[bool, list[str]]:
    """Compare the gate points in ``out``'s results with the ceilings; (passed, report lines)."""
    df = load(out)
    n, t = ceilings["input_px"], ceilings["tile_px"]
    conv = ok(df, "conventional", input_px=n)
    stream = ok(df, "streamcheck", input_px=n, tile_px=t)
    if conv.empty or stream.empty:
        bad = df[df["status"] != "ok"] if not df.empty else df
        why = "; ".join(f"{r['key']}: {r['status']} {r.get('reason')}" for _, r in bad.iterrows())
        return False, [f"GATE FAILED: the {n}² points did not both run ({why or 'no results'})"]
    checks = [
        ("peak memory (allocator)", "peak_alloc_bytes", "memory_alloc_ratio_max"),
        ("peak memory (RSS delta)", "rss_delta_bytes", "memory_rss_ratio_max"),
        ("time (median)", "time_s_median", "time_ratio_max"),
    ]
    lines, passed = [], True
    for label, metric, ceiling_key in checks:
        value = float(stream[metric].iloc[0]) / float(conv[metric].iloc[0])
        ceiling = float(ceilings[ceiling_key])
        good = value <= ceiling
        passed &= good
        lines.append(
            f"{'ok    ' if good else 'FAILED'} {label}: streamcheck / conventional = {value:.3f} "
            f"(ceiling {ceiling:g}, {ceiling_key} in {CEILINGS.name}) at {n}², tile {t}"
        )
    if not passed:
        lines.append(
            "GATE FAILED: a streamcheck / conventional ratio exceeds its committed ceiling; "
            "if the change is intended, raise the ceiling in suites/benchmark/ceilings.toml and "
            "say why in the commit message."
        )
    return passed, lines
