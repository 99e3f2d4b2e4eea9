"""Convert result rows of the older shapes to the current one (results.py Rule J1), in place.

    python -m suites.benchmark.migrate reports/benchmark/results.jsonl \\
        --speed reports/speed/results.jsonl

Two older shapes: the benchmark's flat rows (Point fields and measurements side by side, versions
as ``torch_version`` etc.) and the former speed suite's rows (``suites/speed``: ``config``,
``metrics``, ``environ``). Every value is kept under its new name; what the old rows did not
record (torchvision, the load for benchmark rows) is ``None``, and each row's ``run.migrated``
says where it came from. One value is dropped: the speed rows' ``peak_rss_bytes`` was
``ru_maxrss`` (a lifetime peak, which ``streamcheck/memory.py`` Rule 4 rules out as a meter).
The speed rows are written first: where a speed row and a benchmark row share a key, the
benchmark row (which has the allocator meter and gradient checks) stays the latest.
Already-converted rows pass through unchanged, so running it twice changes nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .grid import Point

PARAMS = {f for f in Point.__dataclass_fields__ if f != "name"}
ENV_NAMES = {
    "python_version": "python",
    "torch_version": "torch",
    "streamcheck_version": "streamcheck",
    "lightstream_version": "lightstream",
}
RUN_NAMES = ("command", "started_utc", "wall_s")
TOP = ("key", "status", "reason")

# The speed suite's timed configurations that are one of workload.CASES:
# (method, memory format, compile, allocator) -> case name. The others keep their speed name.
SPEED_CASES = {
    ("conventional", "contiguous", "off", "default"): "conventional",
    ("conventional", "channels_last", "off", "default"): "conventional_channels_last",
    ("conventional", "contiguous", "off", "keep_freed"): "conventional_keep_freed",
    ("conventional", "contiguous", "off", "huge_pages"): "conventional_huge_pages",
    ("conventional", "contiguous", "module", "default"): "conventional_compiled_defaults",
    ("streamcheck", "contiguous", "off", "default"): "streamcheck",
    ("streamcheck", "channels_last_tiles", "off", "default"): "streamcheck_channels_last",
    ("streamcheck", "contiguous", "off", "keep_freed"): "streamcheck_keep_freed",
    ("streamcheck", "channels_last_tiles", "off", "keep_freed"): "streamcheck_tuned",
    ("streamcheck", "contiguous", "off", "huge_pages"): "streamcheck_huge_pages",
}
SPEED_METRICS = {
    "median_s": "time_s_median",
    "times_s": "time_s_all",
    "median_cpu_s": "cpu_s_median",
    "cpu_times_s": "cpu_s_all",
    "median_minor_page_faults": "minor_page_faults_per_step",
}


def from_flat(row: dict[str, Any]) -> dict[str, Any]:
    """A benchmark row of the flat shape."""
    device_name = str(row.get("device_name") or "")
    cpu = device_name.split(" (")[0] if not str(row.get("device")).startswith("cuda") else None
    env = {new: row.get(old) for old, new in ENV_NAMES.items() if old in row}
    environment = {
        "python": env.get("python"),
        "torch": env.get("torch"),
        "torchvision": None,
        "streamcheck": env.get("streamcheck"),
        "git_commit": row.get("git_commit"),
        "device": row.get("device"),
        "threads": row.get("threads"),
        "cores": None,
        "cpu": cpu,
        "gpu": device_name if str(row.get("device")).startswith("cuda") else None,
        "load_1min": None,
        "device_name": device_name,
    }
    if row.get("method") == "lightstream":
        environment["lightstream"] = env.get("lightstream")
    used = PARAMS | set(TOP) | set(RUN_NAMES) | set(ENV_NAMES) | {"method", "git_commit"}
    used |= {"device_name"}
    return {
        "name": row["method"],
        "key": row["key"],
        "status": row["status"],
        "reason": row.get("reason"),
        "params": {k: row.get(k) for k in sorted(PARAMS) if k in row},
        "environment": environment,
        "metrics": {k: v for k, v in row.items() if k not in used},
        "run": {k: row.get(k) for k in RUN_NAMES}
        | {"migrated": "benchmark flat row (suites/benchmark/migrate.py)"},
    }


def from_speed(row: dict[str, Any]) -> dict[str, Any]:
    """A row of the former speed suite."""
    config, old_env = row["config"], row.get("environ", {})
    signature = (config["method"], config["memory_format"], config["compile"], config["allocator"])
    timed = config["kind"] == "time"
    name = SPEED_CASES.get(signature, row["name"]) if timed else row["name"]
    dtype = "float32" if timed else "float64"
    tile = None if config["method"] == "conventional" else config["tile_px"]
    key = "|".join([name, "cpu", dtype, str(config["input_px"]), str(tile or "-"), "sum"])
    metrics = {
        SPEED_METRICS.get(k, k): v for k, v in row["metrics"].items() if k != "peak_rss_bytes"
    }
    load = row.get("load_average_1min") or {}
    if "after" in load:
        metrics["load_1min_after"] = load["after"]
    environment = {
        "python": old_env.get("python"),
        "torch": old_env.get("pytorch_version"),
        "torchvision": None,
        "streamcheck": old_env.get("streamcheck_version"),
        "git_commit": old_env.get("git_commit"),
        "device": old_env.get("device", "cpu"),
        "threads": old_env.get("torch_threads"),
        "cores": old_env.get("cpu_count"),
        "cpu": old_env.get("cpu"),
        "gpu": None,
        "load_1min": load.get("before"),
        "platform": old_env.get("platform"),
    }
    for extra in ("mkldnn", "allocator_environment", "transparent_hugepage"):
        if extra in old_env:
            environment[extra] = old_env[extra]
    params = {
        "input_px": config["input_px"],
        "tile_px": tile,
        "suite": "speed",
        "device": "cpu",
        "dtype": dtype,
        "threads": config.get("threads"),
        "warmup": 1,
        "repeats": config.get("repeats"),
        "seed": config.get("seed", 0),
        "loss": "sum",
        "speed_config": config,
    }
    return {
        "name": name,
        "key": key,
        "status": row["status"],
        "reason": row.get("note"),
        "params": params,
        "environment": environment,
        "metrics": metrics,
        "run": {k: row.get(k) for k in RUN_NAMES}
        | {"migrated": "speed suite row (suites/benchmark/migrate.py); ru_maxrss dropped"},
    }


def convert(row: dict[str, Any]) -> dict[str, Any]:
    if "params" in row:
        return row
    return from_speed(row) if "config" in row else from_flat(row)


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def migrate(path: Path, *, speed: Path | None = None) -> int:
    """Rewrite ``path`` in the current row shape, the speed rows (if any) first; returns rows."""
    rows = [convert(r) for r in (read(speed) if speed else [])]
    rows += [convert(r) for r in read(path)] if path.exists() else []
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m suites.benchmark.migrate", description=__doc__)
    parser.add_argument("results", type=Path, help="the results file to rewrite in place")
    parser.add_argument("--speed", type=Path, help="the former speed suite's results.jsonl")
    args = parser.parse_args(argv)
    n = migrate(args.results, speed=args.speed)
    print(f"{args.results}: {n} rows in the current shape")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
