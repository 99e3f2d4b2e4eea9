"""python -m suites.speed: do channels-last or torch.compile speed up streaming on CPU?

python -m suites.speed --quick        # 1024^2 input, to a temp dir (a few minutes on 2 cores)
python -m suites.speed                # 2048^2 input, to reports/speed/ (results.jsonl, SUMMARY.md)
python -m suites.speed --summary-only # rebuild SUMMARY.md from reports/speed/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from ..environment import REPO
from .measure import Config
from .summary import write_summary

REPORT_DIR = REPO / "reports" / "speed"
PER_PROCESS_TIMEOUT_S = 300

# The grid, as data. Checks (float64, small): streaming stays exact under channels-last, and what
# the engine does with a compiled module (it traces the module with torch.fx and calls the layers'
# functions itself, so torch.compile is rejected or bypassed). Timed (float32, the paper's sizes):
# the conventional baseline and streamcheck in each memory format (channels_last_tiles is the
# engine option ``Streamed(..., channels_last=True)``), with the host-memory settings of
# ``measure.ALLOCATORS``, and the baseline compiled.
CHECK = {"kind": "exactness", "method": "streamcheck", "input_px": 96, "tile_px": 40}
CONFIGS = (
    Config(**CHECK, memory_format="contiguous"),
    Config(**CHECK, memory_format="channels_last"),
    Config(**CHECK, memory_format="channels_last_tiles"),
    Config(**CHECK, memory_format="contiguous", compile="module"),
    Config(**CHECK, memory_format="contiguous", compile="in_place"),
    # Timed, most telling first (--max-minutes skips what is left).
    Config("time", method="conventional", memory_format="contiguous"),
    Config("time", method="streamcheck", memory_format="contiguous"),
    Config("time", method="streamcheck", memory_format="channels_last_tiles"),
    Config("time", method="streamcheck", memory_format="channels_last"),
    Config("time", method="streamcheck", memory_format="contiguous", allocator="keep_freed"),
    Config(
        "time", method="streamcheck", memory_format="channels_last_tiles", allocator="keep_freed"
    ),
    Config("time", method="conventional", memory_format="contiguous", allocator="keep_freed"),
    Config("time", method="streamcheck", memory_format="contiguous", allocator="huge_pages"),
    Config(
        "time", method="streamcheck", memory_format="channels_last_tiles", allocator="huge_pages"
    ),
    Config("time", method="conventional", memory_format="contiguous", allocator="huge_pages"),
    Config("time", method="conventional", memory_format="channels_last"),
    Config("time", method="conventional", memory_format="contiguous", compile="module"),
)
QUICK_INPUT_PX = 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m suites.speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="1024^2 input, results to a temp dir")
    p.add_argument("--out", type=Path, help="output folder (default: reports/speed, or a temp dir)")
    p.add_argument("--input-px", type=int, help="input edge for the timed runs (default 2048)")
    p.add_argument("--tile-px", type=int, default=512, help="input-tile edge (default 512)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up")
    p.add_argument("--only", nargs="*", help="run only configurations whose name contains one")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=8.0,
        help="skip the remaining configurations after this long (default 8; the machine is shared)",
    )
    p.add_argument("--summary-only", action="store_true", help="only rebuild SUMMARY.md")
    return p.parse_args(argv)


def run_in_fresh_process(configs: list[Config]) -> list[dict]:
    """Measure ``configs`` in one fresh Python process; its stdout has one JSON line for each."""
    command = [
        sys.executable,
        "-m",
        "suites.speed.measure",
        json.dumps([asdict(c) for c in configs]),
    ]
    status, note, lines = "crashed", "", []
    try:
        env = os.environ | {k: v for c in configs for k, v in c.environment_variables().items()}
        done = subprocess.run(
            command,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=PER_PROCESS_TIMEOUT_S,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        tail = done.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        note = f"exit {done.returncode}: {tail[0][:300]}"
    except subprocess.TimeoutExpired as error:
        out = error.stdout.decode() if isinstance(error.stdout, bytes) else error.stdout or ""
        lines = [line for line in out.splitlines() if line.startswith("{")]
        status, note = "timeout", f"over {PER_PROCESS_TIMEOUT_S} s"
    results = [json.loads(line) for line in lines]
    for config in configs[len(results) :]:  # what the process did not report
        results.append({"name": config.name, "config": asdict(config), "metrics": {}})
        results[-1] |= {"status": status, "note": note}
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="speed-")) if args.quick else REPORT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if args.summary_only:
        write_summary(results, out / "SUMMARY.md")
        print(out / "SUMMARY.md")
        return 0
    input_px = args.input_px or (QUICK_INPUT_PX if args.quick else 2048)
    command = "python -m suites.speed " + shlex.join(argv if argv is not None else sys.argv[1:])
    configs = [
        replace(c, threads=args.threads)
        if c.kind == "exactness"
        else replace(
            c, input_px=input_px, tile_px=args.tile_px, threads=args.threads, repeats=args.repeats
        )
        for c in CONFIGS
        if not args.only or any(part in c.name for part in args.only)
    ]
    # The float64 checks share one process; every timed configuration gets its own.
    checks = [c for c in configs if c.kind == "exactness"]
    groups = ([checks] if checks else []) + [[c] for c in configs if c.kind != "exactness"]
    started = time.time()
    with results.open("w") as f:
        for group in groups:
            if time.time() - started > 60 * args.max_minutes:
                note = f"--max-minutes {args.max_minutes} reached"
                found = [
                    {"name": c.name, "config": asdict(c), "metrics": {}, "status": "skipped"}
                    | {"note": note}
                    for c in group
                ]
            else:
                found = run_in_fresh_process(group)
            for result in found:
                result["command"] = command.strip()
                f.write(json.dumps(result) + "\n")
                f.flush()
                median = result["metrics"].get("median_s")
                shown = f"{median:.2f} s" if median is not None else result.get("note") or ""
                print(f"{result['name']:<62} {result['status']:<8} {shown}", flush=True)
    print(f"total {time.time() - started:.0f} s")
    write_summary(results, out / "SUMMARY.md")
    print(out / "SUMMARY.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
