"""The CI regression gate: streaming / conventional ratios at 2048^2, pair by pair, vs ``ceilings.toml``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomllib

from .analysis import load, pair_ratio

CEILINGS = Path(__file__).with_name("ceilings.toml")
CHECKS = (
    ("peak memory (allocator)", "peak_alloc_bytes", "memory_alloc_ratio_max"),
    ("peak memory (RSS delta)", "rss_delta_bytes", "memory_rss_ratio_max"),
    ("time (median)", "time_s_median", "time_ratio_max"),
)


def read_ceilings(path: Path = CEILINGS) -> dict[str, Any]:
    with path.open("rb") as f:
        return dict(tomllib.load(f)["gate"])


def check(out: Path, ceilings: dict[str, Any]) -> tuple[bool, list[str]]:
    """Compare the gate points in ``out``'s results with the ceilings; (passed, report lines)."""
    df = load(out)
    n, t = ceilings["input_px"], ceilings["tile_px"]
    lines, passed = [], True
    for pair in ceilings["pair"]:
        for label, metric, ceiling_key in CHECKS:
            r = pair_ratio(
                df, pair["streaming"], pair["conventional"], metric, input_px=n, tile_px=t
            )
            if r.value is None:
                bad = df[df["status"] != "ok"] if not df.empty else df
                why = "; ".join(
                    f"{b['key']}: {b['status']} {b.get('reason')}" for _, b in bad.iterrows()
                )
                return False, [
                    f"GATE FAILED: {r.label} at {n}² did not run ({why or 'no results'})"
                ]
            ceiling = float(pair[ceiling_key])
            good = r.value <= ceiling
            passed &= good
            lines.append(
                f"{'ok    ' if good else 'FAILED'} {label}: {r.label} = {r.value:.3f} "
                f"(ceiling {ceiling:g}, {ceiling_key} in {CEILINGS.name}) at {n}², tile {t}"
            )
    if not passed:
        lines.append(
            "GATE FAILED: a streaming / conventional ratio exceeds its committed ceiling; "
            "if the change is intended, raise the ceiling in suites/benchmark/ceilings.toml and "
            "say why in the commit message."
        )
    return passed, lines
