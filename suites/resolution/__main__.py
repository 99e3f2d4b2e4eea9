"""python -m suites.resolution: does training at higher resolution find lesions lower ones miss?

python -m suites.resolution                    # the full configuration (committed in reports/resolution)
python -m suites.resolution --config shared-cpu   # a smaller run (256² slides)
python -m suites.resolution --quick            # a smoke test in a temp dir (CI)

Synthetic STAND-IN slides (suites/resolution/slides.py) are generated under data/resolution/<config>
(gitignored) and reused; results go to reports/resolution/ (summary.json, runs/, logs/, figures).
A finished resolution is reused when the configuration is unchanged (NOTE [ Resolution experiment ]).

Rule X4. OpenMP's worker threads sleep rather than spin while they wait (``OMP_WAIT_POLICY=PASSIVE``,
         set here before torch loads unless already set; recorded in the summary). On 2 cores
         shared with other work, spinning threads wait on a preempted peer: a 256² slide step
         measured 3-6 s with 2 spinning threads and 0.15 s with 2 passive ones at 1-min load ~7.5
         (0.07 s on free cores). The results do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # Rule X4: before torch starts OpenMP

import numpy as np  # noqa: E402
import torch  # noqa: E402

import streamcheck  # noqa: E402

from . import experiment as X  # noqa: E402
from . import saliency as SA  # noqa: E402
from . import slides as S  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
REPORT_DIR = REPO / "reports" / "resolution"
DATA_DIR = REPO / "data" / "resolution"

CONFIGS = {
    c.name: c
    for c in (
        X.Config(
            name="full",
            spec=S.SlideSpec(size_px=512, n_train=384, n_test=192),
            factors=(1, 2, 4, 8),
            epochs=12,
            tile=256,
            description="512² slides at 512/256/128/64 px, the default of nox -s resolution: "
            "384 training slides x 12 epochs, 192 test slides, sized for about 40 min on 2 free "
            "cores from slide steps timed at 1-min load 7.5 (Rule X4); each resolution's measured "
            "seconds per slide step and 1-min load are in its record",
        ),
        X.Config(
            name="shared-cpu",
            spec=S.SlideSpec(size_px=256, n_train=48, n_test=48, lesions=(2, 4)),
            factors=(1, 2, 4, 8),
            epochs=5,
            accumulate=2,
            tile=192,
            description="256² slides at 256/128/64/32 px: sized for <= 30 min on 2 CPU cores "
            "shared with other work",
        ),
        X.Config(
            name="quick",
            spec=S.SlideSpec(size_px=128, n_train=8, n_test=8, lesions=(2, 3)),
            factors=(1, 2, 4),
            channels=(4, 8),
            epochs=1,
            accumulate=2,
            tile=64,
            lsuv_slides=2,
            bootstrap=50,
            permutations=50,
            overlay_slides=2,
            description="smoke test (CI): a few steps, numbers meaningless",
        ),
    )
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m suites.resolution",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", choices=sorted(CONFIGS), default="full")
    p.add_argument("--quick", action="store_true", help="--config quick into a temp dir")
    p.add_argument("--out", type=Path, help=f"results folder (default {REPORT_DIR})")
    p.add_argument("--data", type=Path, help=f"slide folder (default {DATA_DIR}/<config>)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = CONFIGS["quick" if args.quick else args.config]
    command = "python -m suites.resolution " + shlex.join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        default_out = Path(tmp) if args.quick else REPORT_DIR
        out = args.out or default_out
        root = args.data or (Path(tmp) / "slides" if args.quick else DATA_DIR / config.name)
        run(config, out, root, threads=args.threads, progress=not args.quiet, command=command)
    return 0


def run(
    config: X.Config, out: Path, root: Path, *, threads: int, progress: bool, command: str
) -> dict:
    """Generate (or reuse) the slides, train every resolution (or reuse it), write the summary."""
    from . import plots
    from .summary import write_summary

    def log(message: str) -> None:
        print(f"[resolution {config.name}] {message}", flush=True)

    torch.set_num_threads(threads)
    streamcheck.keep_freed_host_memory()  # glibc reuses tile buffers (docs/SCALING.md)
    X.quiet_lightning()
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    S.make_slides(root, config.spec, log=log)
    test_positives = [
        i for i, s in enumerate(S.slide_table(config.spec)) if s.split == "test" and s.label
    ]
    visibility = S.lesion_visibility(config.spec, config.factors, slides=test_positives[:4])
    log("lesion visibility (max change / texture std): " + str(visibility))
    cache = root / "saliency" / out.resolve().as_posix().strip("/").replace("/", "_")
    records = [
        X.train_one(config, f, root, out, cache, progress=progress, log=log)
        for f in sorted(config.factors)  # highest resolution first: the slowest, and the test
    ]
    positives = [s.name for s in S.read_table(root) if s.split == "test" and s.label]
    prior = {
        name: SA.saliency_lesion_auc(SA.border_distance(mask.shape), mask)
        for name, mask in ((name, S.read_slide(root, name)[1]) for name in positives)
    }
    summary = X.summarize(config, records, visibility, border=prior)
    runs = [r["lsuv_s"] + r["train_s"] + r["eval_s"] for r in records]
    from ..environment import environment

    summary = {
        "label": S.STANDIN_LABEL,
        "config": {"name": config.name, "description": config.description}
        | {k: v for k, v in asdict(config).items() if k not in ("name", "description")},
        "command": command,
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - t0,
        # Rule X2: a rerun reuses finished resolutions; their own times are kept in runs/
        "train_and_eval_s": sum(runs),
        "runs_load_1min": {r["input_px"]: r["environment"]["load_1min"] for r in records},
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),  # Rule X4
        **summary,
        # Rule SA4: the lesion AUC of a map that only knows distance from the border
        "saliency_baseline_border_distance_auc": float(np.mean(list(prior.values()))),
        "environment": environment("cpu"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plots.auc_vs_resolution(summary, out / "auc_vs_resolution.png", label=S.STANDIN_LABEL)
    plots.saliency_grid(
        summary, records, root, cache, out / "saliency_overlays.png", label=S.STANDIN_LABEL
    )
    write_summary(out)
    log(f"wrote {out / 'summary.json'} in {summary['wall_s']:.0f} s")
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
