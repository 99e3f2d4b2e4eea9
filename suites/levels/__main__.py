"""``python -m suites.levels``: what statistics over space cost (issue "exact through global
statistics", evidence), written to ``reports/levels/``.

Rules (levels):

LV1. Time against statistic levels: the Figs 2-3 network with k = 0, 1, 2, 4, 8 squeeze-excite
     blocks (each a level, graph Rule G14) between its convs, and real trunks: torchvision's
     ResNet-18 to layer1 with train-mode BatchNorm (5 levels) and EfficientNet-B0's features to
     stage 3 with squeeze-excite (eval BatchNorm, 5 levels). Each is measured against its *twin
     with the statistics known* (each statistic read from a buffer: BatchNorm in eval mode, the
     squeeze a constant), which streams in one pass: the lower bound. The measured factor is
     the ratio of their training-step times; the plan's estimate (plan Rule PL3) sits beside it.
LV2. Memory: a whole classifier streamed to its logits (no stitched map, Rule PL1) against its
     trunk streamed with a stitched output and the head run plainly, peak RSS over the baseline,
     at 2048² and 8192² (where the stitched map and its gradient take 256 MiB).
LV4. Kept maps (``--cache``, written to ``reports/levels/cache/``): each real trunk three times
     in one run, groups interleaved (A B C, C B A): statistics known (the lower bound), streamed
     through them without a cache, and with ``cache=HostCache(bytes=8 x the image's bytes)``
     (kept Rules KM1-KM6); the plan's kept maps, bytes and estimate beside the measured factors.
LV3. Every point runs in a fresh process (suites/fresh.py Rules FP1-FP2), pairs interleaved
     (A B B A), one OpenMP thread with passive waiting (the cores are shared: say so), float32,
     one warm-up step then the median of ``--steps``; rows are appended as they finish and a
     rerun skips recorded keys (suites/rows.py Rules J1-J2), ``--redo NETWORK ...`` measures those
     networks again (a key's latest row is the one reported), ``--fresh`` starts over.

    python -m suites.levels                # every point, then SUMMARY.md
    python -m suites.levels --quick        # tiny sizes (the test's path)
    python -m suites.levels --cache        # Rule LV4
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # Rule LV3, before torch starts OpenMP
os.environ.setdefault("OMP_NUM_THREADS", "1")

from suites.environment import environment  # noqa: E402
from suites.fresh import run  # noqa: E402
from suites.rows import append_row, latest_rows, read_rows, results_path, start_fresh  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "reports" / "levels"
CHILD = "suites.levels.point"

SE_COUNTS = (0, 1, 2, 4, 8)
TRUNKS = ("resnet18_train_bn", "efficientnet_b0_se")


def cache_points(*, quick: bool) -> list[dict[str, Any]]:
    """Rule LV4: per trunk, statistics known, streamed without and with a cache budget."""
    size, tile = (96, 64) if quick else (512, 256)
    budget = 8 * 3 * size * size * 4  # 8 x the image's float32 bytes
    return [
        {
            "network": name,
            "known": known,
            "cache": cache,
            "size": size,
            "tile": tile,
            "kind": "time",
        }
        for name in (TRUNKS[:1] if quick else TRUNKS)
        for known, cache in ((True, 0), (False, 0), (False, budget))
    ]


def points(*, quick: bool) -> list[dict[str, Any]]:
    """Rule LV1-LV2: every (network, known) pair, then the memory pair."""
    size, tile = (96, 48) if quick else (1024, 256)
    trunk_size, trunk_tile = (96, 64) if quick else (512, 256)
    out: list[dict[str, Any]] = []
    for k in SE_COUNTS[:2] if quick else SE_COUNTS:
        for known in (False, True):
            out.append(
                {
                    "network": f"paper_se{k}",
                    "known": known,
                    "size": size,
                    "tile": tile,
                    "kind": "time",
                }
            )
    for name in () if quick else TRUNKS:
        for known in (False, True):
            out.append(
                {
                    "network": name,
                    "known": known,
                    "size": trunk_size,
                    "tile": trunk_tile,
                    "kind": "time",
                }
            )
    # tile >= its receptive field; at 8192² the stitched map and its gradient (256 MiB) show
    for memory_size in (576,) if quick else (2048, 8192):
        for whole in (True, False):
            out.append(
                {
                    "network": "resnet18_classifier",
                    "whole": whole,
                    "size": memory_size,
                    "tile": 512,
                    "kind": "memory",
                }
            )
    return out


def key(point: dict[str, Any]) -> str:
    return "/".join(f"{k}={point[k]}" for k in sorted(point))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m suites.levels", description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--fresh", action="store_true", help="move old results aside first")
    parser.add_argument("--cache", action="store_true", help="Rule LV4, into OUT/cache")
    parser.add_argument(
        "--redo", nargs="*", default=[], metavar="NETWORK", help="measure these networks again"
    )
    args = parser.parse_args(argv)
    out = args.out / "cache" if args.cache else args.out
    path = results_path(out)
    if args.fresh:
        start_fresh(path)
    done = {
        row["key"]
        for row in latest_rows(read_rows(path))
        if row["status"] == "ok" and row["params"]["network"] not in args.redo
    }
    grid = cache_points if args.cache else points
    todo = [p for p in grid(quick=args.quick) if key(p) not in done]
    # Rules LV3-LV4: each network's points together, groups interleaved A B B A / A B C C B A
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in todo:
        groups.setdefault(f"{p['network']}/{p['kind']}", []).append(p)
    order = [
        p for i, group in enumerate(groups.values()) for p in (group if i % 2 == 0 else group[::-1])
    ]
    command = shlex.join([sys.executable, "-m", "suites.levels", *(argv or sys.argv[1:])])
    for n, point in enumerate(order, 1):
        print(f"[{n}/{len(order)}] {key(point)}", flush=True)
        start = time.time()
        done_point = run(CHILD, {**point, "steps": args.steps}, timeout_s=3600)
        result = done_point.result or {}
        status = "ok" if done_point.returncode == 0 and result else "error"
        append_row(
            path,
            {
                "key": key(point),
                "status": status,
                "params": point,
                "environment": environment("cpu"),
                "metrics": result,
                "run": {
                    "command": command,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
                    "seconds": round(time.time() - start, 1),
                    "stderr": "" if status == "ok" else done_point.stderr[-2000:],
                },
            },
        )
    from .summary import write_cache_summary, write_summary

    (write_cache_summary if args.cache else write_summary)(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
