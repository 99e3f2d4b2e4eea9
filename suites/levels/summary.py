"""``reports/levels/SUMMARY.md`` from ``results.jsonl`` alone (Rules LV1-LV2)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from suites.rows import latest_rows, read_rows, results_path

VARIANTS = ("conventional", "known", "streamed", "host", "disk")  # Rule LV4


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def _factor_pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Rule LV1's pairs: (streamed through its statistics, the twin with them known)."""
    times = {
        (r["params"]["network"], r["params"]["known"]): r
        for r in rows
        if r["params"]["kind"] == "time" and r["status"] == "ok"
    }
    return [
        (row, times[(network, True)])
        for (network, known), row in times.items()
        if not known and (network, True) in times
    ]


def headline(out: Path) -> str:
    """The range of Rule LV1's measured factors and of the plan's estimate over them."""
    pairs = _factor_pairs(latest_rows(read_rows(results_path(out))))
    measured = [r["metrics"]["seconds"] / twin["metrics"]["seconds"] for r, twin in pairs]
    over = [
        r["metrics"]["time_factor_estimate"] / m for (r, _), m in zip(pairs, measured, strict=True)
    ]
    return (
        f"Streaming through statistics over space takes {min(measured):.2f}x to "
        f"{max(measured):.2f}x the step of a twin with the statistics known ({len(pairs)} "
        f"networks); the plan's estimate is {min(over):.2f} to {max(over):.2f} times the measured "
        "factor."
    )


def factor_rows(rows: list[dict[str, Any]]) -> list[str]:
    """Rule LV1: measured factor (streamed with statistics / twin with them known) and estimate."""
    lines = [
        "| network | size, tile | levels | passes (training) | step, statistics known | "
        "step, streamed through them | measured factor | plan's estimate | estimate / measured | "
        "steps' spread (max / min, both sides) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, twin in _factor_pairs(rows):
        network, m, p = row["params"]["network"], row["metrics"], row["params"]
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


def _cpu(row: dict[str, Any]) -> float:
    """Rule LV4: the median process CPU time of a point's steps."""
    return statistics.median(row["metrics"]["cpu_times"])


def _wall_over_cpu(row: dict[str, Any]) -> float:
    """Rule LV4: how much longer the steps took than their work (other processes on the cores)."""
    return row["metrics"]["seconds"] / _cpu(row)


def _by_variant(rows: list[dict[str, Any]], kind: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Rules LV4-LV5: the good rows of ``kind`` by (network, variant)."""
    return {
        (r["params"]["network"], r["params"]["variant"]): r
        for r in rows
        if r["status"] == "ok" and r["params"]["kind"] == kind
    }


def cache_rows(rows: list[dict[str, Any]]) -> list[str]:
    """Rule LV4: per trunk, the step's CPU time five ways, the factors and the plan's estimates."""
    times = _by_variant(rows, "time")
    lines = [
        "| network | size, tile | cache budget (x image) | kept maps (plan) | passes (training), "
        "without / with | CPU s per step: conventional, known twin, no cache, host, disk | "
        "against conventional: no cache / host / disk | against the known twin, measured: no "
        "cache / host / disk | plan's estimate: no cache / with | estimate / measured: no cache "
        "/ host / disk | wall / CPU, most |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    networks = dict.fromkeys(network for network, _ in times)
    for network in networks:
        if any((network, v) not in times for v in VARIANTS):
            continue
        rs = {v: times[(network, v)] for v in VARIANTS}
        cpu = {v: _cpu(r) for v, r in rs.items()}
        host, plain = rs["host"], rs["streamed"]
        p, m = host["params"], host["metrics"]
        image = 3 * p["size"] ** 2 * 4
        kept = ", ".join(f"`{k}`" for k in m["kept_maps"]) or "none"
        streamed = ("streamed", "host", "disk")
        conventional = " / ".join(f"{cpu[v] / cpu['conventional']:.2f}x" for v in streamed)
        measured = {v: cpu[v] / cpu["known"] for v in streamed}
        estimate = {v: rs[v]["metrics"]["time_factor_estimate"] for v in streamed}
        disturbed = max(_wall_over_cpu(r) for r in rs.values())
        lines.append(
            f"| {network} | {p['size']}², {p['tile']} | {_mib(p['cache'])} "
            f"({p['cache'] / image:.0f}x) | {kept}: {m['kept_bytes'] / 2**20:.0f} MiB | "
            f"{plain['metrics']['passes_training']} / {m['passes_training']} | "
            + ", ".join(f"{cpu[v]:.1f}" for v in VARIANTS)
            + f" | {conventional} | "
            + " / ".join(f"{measured[v]:.2f}x" for v in streamed)
            + f" | {estimate['streamed']:.2f}x / {estimate['host']:.2f}x | "
            + " / ".join(f"{estimate[v] / measured[v]:.2f}" for v in streamed)
            + f" | {disturbed:.2f}{' (disturbed)' if disturbed > DISTURBED else ''} |"
        )
    return lines


def kept_memory_rows(rows: list[dict[str, Any]]) -> list[str]:
    """Rule LV5: peak RSS of one step, conventional (or what its saved tensors need) and kept."""
    found = _by_variant(rows, "memory")
    lines = [
        "| network | size, tile | conventional: peak RSS over baseline (tensors saved for "
        "backward) | streamed, host cache: peak RSS over baseline | its kept maps | its plan's "
        "peak estimate | its step (wall) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (network, variant), row in found.items():
        conventional = found.get((network, "conventional"))
        if variant != "host" or conventional is None:
            continue
        c, m, p = conventional["metrics"], row["metrics"], row["params"]
        measured = (
            _mib(c["peak_rss_over_baseline_bytes"])
            if c["run"]
            else "not run: more than 40 % of the memory available"
        )
        lines.append(
            f"| {network} | {p['size']}², {p['tile']} | {measured} ({_mib(c['saved_tensor_bytes'])}) "
            f"| {_mib(m['peak_rss_over_baseline_bytes'])} | {_mib(m['kept_bytes'])} | "
            f"{_mib(m['peak_bytes_estimate'])} | {m['seconds']:.0f} s |"
        )
    return lines


def budget_rows(rows: list[dict[str, Any]]) -> list[str]:
    """Rule LV6: per trunk, the plan's kept maps and estimate against the budget."""
    found = [r for r in rows if r["status"] == "ok" and r["params"]["kind"] == "budgets"]
    if not found:
        return []
    multiples = [q["multiple"] for q in found[0]["metrics"]["plans"]]
    lines = [
        "| network | size, tile | "
        + " | ".join(f"budget {k}x the image" for k in multiples)
        + " |",
        "|---|---|" + "---|" * len(multiples),
    ]
    for row in found:
        p = row["params"]
        cells = [
            f"{q['time_factor_estimate']:.2f}x, {len(q['kept_maps'])} "
            f"map{'' if len(q['kept_maps']) == 1 else 's'} "
            f"({_mib(q['kept_bytes'])}), {q['passes_training']} passes"
            for q in row["metrics"]["plans"]
        ]
        lines.append(f"| {p['network']} | {p['size']}², {p['tile']} | " + " | ".join(cells) + " |")
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
        "# Kept maps: what a cache budget buys (Rules LV4-LV5)",
        "",
        "Generated by `python -m suites.levels --cache` from `results.jsonl`. Float32 on CPU, one "
        "thread per process with passive OpenMP waiting, fresh processes, each trunk's points "
        "together and the groups interleaved; each time is the median of the recorded steps "
        "after one warm-up. The trunks are those of Rule LV1: torchvision's ResNet-18 to "
        "`layer1` with train-mode BatchNorm, EfficientNet-B0's `features[:4]` with "
        "squeeze-excite and eval BatchNorm (5 statistic levels each). *Conventional* is the "
        "plain module's training step (PyTorch defaults, everything in memory); the *known twin* "
        "streams in one pass with its statistics read from buffers (the lower bound: plain "
        "streaming). The budget is 8x the image's own bytes (float32), the same for the host "
        "and the disk cache. Times are the process's CPU time (one thread: its work); the cores "
        "are shared with other work, and the last column says by how much the wall time exceeded "
        f"it (marked above {DISTURBED}x). The plan's estimates (Rules PL3, PL4, KM5) are against "
        "the known twin.",
        "",
        "## Time per training step (Rule LV4)",
        "",
        *cache_rows(rows),
        "",
        "## The plan's estimate against the budget (Rule LV6)",
        "",
        "The plan alone, before any work: the time factor estimate against the known twin, the "
        "kept maps and their bytes (map and gradient), the passes per training step.",
        "",
        *budget_rows(rows),
        "",
        "## Memory at a larger image (Rule LV5)",
        "",
        "One training step each. Conventional training runs only where the tensors it saves for "
        "backward (a meta-device trace, in parentheses) take under 40 % of the memory available.",
        "",
        *kept_memory_rows(rows),
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
