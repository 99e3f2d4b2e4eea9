"""python -m suites.unet: a small 2-D U-Net and a 3-D one at growing image sizes, streamed and
conventional (time and peak memory of one training step, as the paper's Fig 3 for a plain CNN).

    nice -n 10 python -m suites.unet            # the committed sweep -> reports/unet/
    python -m suites.unet --quick               # two sizes per network -> reports/unet/quick/
    python -m suites.unet --plots-only          # rebuild the figure and SUMMARY.md

The points are the benchmark's (``suites/benchmark``: one fresh process per point, the shared
environment record per row, OOM recorded as such, an append-only results.jsonl that a rerun
resumes; ``--fresh`` starts over). The cases are ``unet2d_*`` and ``unet3d_*`` of
``suites/benchmark/workload.py``; the networks and their sizes are ``suites/unet/networks.py``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from suites.benchmark import runner
from suites.benchmark.grid import Point
from suites.environment import REPO as REPO_ROOT
from suites.rows import results_path, start_fresh

from .networks import SIZES

TIMING = {"full": (1, 2, 60.0), "quick": (1, 1, 30.0)}  # warm-up, timed runs, slow-step cut-off
DEFAULT_OUT = {
    "full": REPO_ROOT / "reports" / "unet",
    "quick": REPO_ROOT / "reports" / "unet" / "quick",
}


def points(mode: str, *, threads: int | None = None) -> list[Point]:
    """Conventional, then streamed, at each size of each network (a pair back to back)."""
    warmup, repeats, max_timing_s = TIMING[mode]
    out = []
    for network, sizes in SIZES.items():
        for input_px in sizes[mode]:
            for kind in ("conventional", "streamcheck"):
                point = Point(
                    name=f"{network}_{kind}",
                    input_px=input_px,
                    tile_px=None if kind == "conventional" else int(sizes["tile"]),
                    suite="unet",
                    warmup=warmup,
                    repeats=repeats,
                    max_timing_s=max_timing_s,
                    grad_check_f64_max_px=min(sizes[mode]),  # the float64 oracle: smallest size
                )
                out.append(point if threads is None else replace(point, threads=threads))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m suites.unet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="two small sizes per network")
    p.add_argument("--out", type=Path, help="results folder (default: reports/unet[/quick])")
    p.add_argument("--fresh", action="store_true", help="move old results aside, start over")
    p.add_argument("--plots-only", action="store_true", help="only rebuild figure + summary")
    p.add_argument("--threads", type=int, help="torch threads per point (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from . import summary

    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    out = args.out or DEFAULT_OUT[mode]
    out.mkdir(parents=True, exist_ok=True)
    if not args.plots_only:
        if args.fresh and (moved := start_fresh(results_path(out))) is not None:
            print(f"--fresh: previous results moved to {moved}")
        command = "python -m suites.unet " + shlex.join(sys.argv[1:] if argv is None else argv)
        runner.run_points(
            points(mode, threads=args.threads),
            out,
            command=command.strip(),
            progress=not args.no_progress,
        )
    for path in summary.build(out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
