"""``reports/levels/SUMMARY.md`` from ``results.jsonl`` alone (Rules LV1-LV2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from suites.rows import latest_rows, read_rows, results_path


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def factor_rows(rows: list[dict[str, Any]]) -> list[str]:
    """Rule LV1: measured factor (streamed with statistics / twin with them known) and estimate."""
    times = {
        (r["params"]["network"], r["params"]["known"]): r
        for r in rows
        if r["params"]["kind"] == "time" and r["status"] == "ok"
    }
    lines = [
        "| network | size, tile | levels | passes (training) | step, statistics known | "
        "step, streamed through them | measured factor | plan's estimate | estimate / measured | "
        "steps' spread (max / min, both sides) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (network, known), row in times.items():
        if known or (network, True) not in times:
            continue
        twin = times[(network, True)]
        m, p = row["metrics"], row["params"]
        measured = m["seconds"] / twin["metrics"]["seconds"]
        estimate = m["time_factor_estimate"]
        lines.append(
            f"| {network} | {p['size']}², {p['tile']} | {m['levels']} | {m['passes_training']} | "
            f"{twin['metrics']['seconds']:.2f} s | {m['seconds']:.2f} s | {measured:.2f}x | "
            f"{estimate:.2f}x | {estimate / measured:.2f} | {_spread(row)}, {_spread(twin)}"
            f"{' (disturbed)' if max(_spread(row), _spread(twin)) > DISTURBED else ''} |"
        )
    return lines


DISTURBED = 1.25  # steps of one point spread more than this: the machine's load, not the method


def _spread(row: dict[str, Any]) -> float:
    times = row["metrics"].get("times") or [row["metrics"]["seconds"]]
    return round(max(times) / min(times), 2)


def memory_rows(rows: list[dict[str, Any]]) -> list[str]:
    """Rule LV2."""
    lines = [
        "| ResNet-18 classifier | size, tile | passes (training) | stitched maps (plan) | "
        "peak RSS over baseline | step |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        p, m = row["params"], row["metrics"]
        if p["kind"] != "memory" or row["status"] != "ok":
            continue
        what = "streamed whole, to its logits" if p["whole"] else "trunk streamed, head plain"
        lines.append(
            f"| {what} | {p['size']}², {p['tile']} | {m['passes_training']} | "
            f"{_mib(m['plan_output_bytes'])} | {_mib(m['peak_rss_over_baseline_bytes'])} | "
            f"{m['seconds']:.1f} s |"
        )
    return lines


def cache_rows(rows: list[dict[str, Any]]) -> list[str]:
    """Rule LV4: per trunk, the factors without and with kept maps, measured and estimated."""
    times = {
        (r["params"]["network"], r["params"]["known"], r["params"]["cache"]): r
        for r in rows
        if r["status"] == "ok"
    }
    lines = [
        "| network | size, tile | cache budget | kept maps (plan) | passes (training), without "
        "/ with | step, statistics known | measured factor without / with cache | plan's "
        "estimate without / with | estimate / measured, with | steps' spread (max / min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (network, known, cache), row in times.items():
        twin, plain = times.get((network, True, 0)), times.get((network, False, 0))
        if known or not cache or twin is None or plain is None:
            continue
        m, p = row["metrics"], row["params"]
        base = twin["metrics"]["seconds"]
        without, with_ = plain["metrics"]["seconds"] / base, m["seconds"] / base
        spread = max(_spread(r) for r in (row, twin, plain))
        kept = ", ".join(f"`{k}`" for k in m["kept_maps"]) or "none"
        lines.append(
            f"| {network} | {p['size']}², {p['tile']} | {_mib(cache)} | {kept}: "
            f"{m['kept_bytes'] / 2**20:.1f} MiB | {plain['metrics']['passes_training']} / "
            f"{m['passes_training']} | {base:.2f} s | {without:.2f}x / {with_:.2f}x | "
            f"{plain['metrics']['time_factor_estimate']:.2f}x / {m['time_factor_estimate']:.2f}x "
            f"| {m['time_factor_estimate'] / with_:.2f} | {spread}"
            f"{' (disturbed)' if spread > DISTURBED else ''} |"
        )
    return lines


def _runs(rows: list[dict[str, Any]]) -> list[str]:
    envs = {(r["environment"]["cpu"], r["environment"]["git_commit"]) for r in rows}
    commands = sorted({r["run"]["command"] for r in rows})
    loads = [r["environment"]["load_1min"] for r in rows if r["environment"].get("load_1min")]
    versions = sorted(
        {
            ", ".join(f"{k} {r['environment'][k]}" for k in ("python", "torch", "torchvision"))
            for r in rows
        }
    )
    return [
        *(f"- CPU {cpu}, commit {commit}" for cpu, commit in sorted(envs)),
        *(f"- versions: {v}" for v in versions),
        f"- 1-minute load while measuring: {min(loads):.1f} to {max(loads):.1f}" if loads else "",
        *(f"- `{c}`" for c in commands),
    ]


def write_cache_summary(out: Path) -> Path:
    """Rule LV4: ``OUT/cache/SUMMARY.md``."""
    rows = latest_rows(read_rows(results_path(out)))
    text = [
        "# Kept maps: what a cache budget buys (Rule LV4)",
        "",
        "Generated by `python -m suites.levels --cache` from `results.jsonl`. Float32 on CPU, one "
        "thread per process with passive OpenMP waiting, fresh processes, each trunk's three "
        "points together and the groups interleaved; each time is the median of the recorded "
        "steps after one warm-up. Factors are against the twin with its statistics known (one "
        "pass, the lower bound); the estimates are the plan's (Rules PL3, PL4, KM5). The cores "
        "are shared with other work: the spread column says how disturbed each group was "
        f"(marked above {DISTURBED}x).",
        "",
        *cache_rows(rows),
        "",
        "## Runs",
        "",
        *_runs(rows),
        "",
    ]
    return _write(out, text)


def write_summary(out: Path) -> Path:
    rows = latest_rows(read_rows(results_path(out)))
    text = [
        "# What statistics over space cost",
        "",
        "Generated by `python -m suites.levels` from `results.jsonl` (suites/levels, Rules "
        "LV1-LV3). Float32 on CPU, one thread per process with passive OpenMP waiting, fresh "
        "processes, pairs interleaved; each time is the median of the recorded steps after one "
        "warm-up.",
        "",
        "## Time against statistic levels (Rule LV1)",
        "",
        "The twin reads every statistic from a buffer (BatchNorm in eval mode, the squeeze a "
        "constant) and streams in one pass: the lower bound. The plan's estimate counts "
        "multiply-accumulates per pass over the last pass (plan Rule PL3). A point whose steps "
        f"spread more than {DISTURBED}x (max / min) on either side is marked disturbed: on "
        "shared cores its factor measures the other processes, not the passes.",
        "",
        *factor_rows(rows),
        "",
        "## Memory: whole classifier against trunk + head (Rule LV2)",
        "",
        *memory_rows(rows),
        "",
        "## Runs",
        "",
        *_runs(rows),
        "",
    ]
    return _write(out, text)


def _write(out: Path, text: list[str]) -> Path:
    path = out / "SUMMARY.md"
    path.write_text("\n".join(text))
    return path
