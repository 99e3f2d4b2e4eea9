"""python -m suites.benchmark: memory and time sweeps of streaming vs conventional training.

    python -m suites.benchmark                 # full CPU sweep -> reports/benchmark/
    python -m suites.benchmark --device cuda   # the same cases on a GPU -> reports/benchmark/cuda/
    python -m suites.benchmark --quick         # a few minutes -> reports/benchmark/quick/
    python -m suites.benchmark --suite tile    # one suite (tile, input, peer, speed, table2)
    python -m suites.benchmark --plots-only    # rebuild figures and SUMMARY.md from results
    python -m suites.benchmark --gate          # CI gate vs suites/benchmark/ceilings.toml

A rerun resumes: points already in ``<out>/results.jsonl`` are skipped (``--fresh`` starts over;
``--redo 'streamcheck/paper/plain|cpu|float32|8192|'`` measures the points whose key or case
name contains that again, and
the new rows supersede the old, which stay in the file).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from ..environment import REPO as REPO_ROOT
from ..rows import results_path, start_fresh
from . import grid, runner

DEFAULT_OUT = {
    ("full", "cpu"): REPO_ROOT / "reports" / "benchmark",
    ("quick", "cpu"): REPO_ROOT / "reports" / "benchmark" / "quick",
    ("full", "cuda"): REPO_ROOT / "reports" / "benchmark" / "cuda",
    ("quick", "cuda"): REPO_ROOT / "reports" / "benchmark" / "cuda" / "quick",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m suites.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1024² and 2048² only, 1 + 3 runs")
    mode.add_argument("--gate", action="store_true", help="CI regression gate (exit 1 on failure)")
    mode.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: 128², tile 64
    parser.add_argument(
        "--suite",
        action="append",
        choices=sorted(grid.SUITES),
        help="run only this suite (repeatable)",
    )
    parser.add_argument(
        "--input-px",
        type=int,
        action="append",
        metavar="N",
        help="only the points of this input size (repeatable; to size a run to the time there is)",
    )
    parser.add_argument(
        "--out", type=Path, help="results folder (default: by mode; gate: a tmp dir)"
    )
    parser.add_argument("--fresh", action="store_true", help="move old results aside, start over")
    parser.add_argument(
        "--redo",
        action="append",
        default=[],
        metavar="KEY_PART",
        help="measure the points whose key (settings|device|dtype|input|tile|loss) or case name "
        "contains this again, even if done (repeatable)",
    )
    parser.add_argument("--plots-only", action="store_true", help="only rebuild figures + summary")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, help="torch threads per point (default: all cores)")
    parser.add_argument(
        "--mem-budget-gib",
        type=float,
        help="memory cap per point (default: 70%% of MemAvailable at its start)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _mode(args: argparse.Namespace) -> str:
    return "gate" if args.gate else "quick" if args.quick else "tiny" if args.tiny else "full"


def build_reports(out: Path, *, mode: str) -> list[Path]:
    from . import plots, summary

    rebuild = f"python -m suites.benchmark --plots-only --out {_display(out)}"
    written = plots.build(out)
    note = summary.legal_tile_note if mode == "full" else None
    md = summary.write(out, rebuild_command=rebuild, legal_tile=note)
    return written + ([md] if md else [])


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = _mode(args)
    if args.out is not None:
        out = args.out
    elif mode == "gate" or mode == "tiny":
        out = Path(tempfile.mkdtemp(prefix=f"streamcheck-{mode}-"))
    else:
        out = DEFAULT_OUT[(mode, grid.device_kind(args.device))]
    out.mkdir(parents=True, exist_ok=True)

    if args.plots_only:
        for path in build_reports(out, mode=mode):
            print(f"wrote {_display(path)}")
        return 0

    if args.fresh and (moved := start_fresh(results_path(out))) is not None:
        print(f"--fresh: previous results moved to {_display(moved)}")
    overrides: dict[str, object] = {"device": args.device, "dtype": args.dtype}
    if args.threads:
        overrides["threads"] = args.threads
    if mode == "gate":
        overrides["grad_check_max_px"] = 0  # the gate checks memory and time only
    if args.mem_budget_gib:
        overrides["mem_budget_bytes"] = int(args.mem_budget_gib * 2**30)
    points = grid.points(mode, args.suite, **overrides)
    if args.input_px:
        points = [p for p in points if p.input_px in args.input_px]
    command = "python -m suites.benchmark " + shlex.join(argv if argv is not None else sys.argv[1:])
    runner.run_points(
        points,
        out,
        command=command.strip(),
        progress=not args.no_progress,
        redo=lambda point: any(part in f"{point.name} {point.key}" for part in args.redo),
    )
    print(f"results: {_display(results_path(out))}")

    if mode == "gate":
        from . import gate

        passed, lines = gate.check(out, gate.read_ceilings())
        print("\n".join(lines))
        return 0 if passed else 1
    for path in build_reports(out, mode=mode):
        print(f"wrote {_display(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
