"""python -m suites.imagenette: paper Section 5 / Table 1 / Fig 4, conventional vs streaming.

python -m suites.imagenette --quick              # ~1 min on 2 CPU cores, STAND-IN, temp dir
python -m suites.imagenette                      # STAND-IN, 8 epochs, into reports/imagenette
python -m suites.imagenette --data PATH --epochs 200   # the real run (ImageNette layout)

See reports/imagenette/README.md for the paper's settings, our reading of them, and the outputs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from . import data as D

REPO = Path(__file__).resolve().parents[2]
REPORT_DIR = REPO / "reports" / "imagenette"
# The committed STAND-IN report: what fit in ~25 min of 2 shared CPU cores (3 runs with --control).
STANDIN_REPORT_EPOCHS = 8
STANDIN_REPORT_SPEC = D.StandinSpec(train_per_class=20, val_per_class=10)
QUICK = {
    "epochs": 1,
    "batch_size": 8,
    "steps_per_epoch": 6,
    "standin": D.StandinSpec(train_per_class=5, val_per_class=2),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m suites.imagenette",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        metavar="PATH",
        help="ImageNette folder with train/ and val/ (default: $IMAGENETTE_ROOT; if neither is set, the STAND-IN)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        help=f"default: 200 (paper) with --data, {STANDIN_REPORT_EPOCHS} on the STAND-IN",
    )
    p.add_argument(
        "--quick", action="store_true", help="a few steps on a small STAND-IN, output to a temp dir"
    )
    p.add_argument(
        "--make-standin", action="store_true", help="only generate the STAND-IN data set and exit"
    )
    p.add_argument(
        "--standin-dir",
        type=Path,
        help="where the STAND-IN is generated (default: data/imagenette-standin-<size>)",
    )
    p.add_argument(
        "--standin-per-class",
        type=int,
        nargs=2,
        metavar=("TRAIN", "VAL"),
        help=f"STAND-IN images per class (default {STANDIN_REPORT_SPEC.train_per_class} {STANDIN_REPORT_SPEC.val_per_class}, "
        f"--quick: {QUICK['standin'].train_per_class} {QUICK['standin'].val_per_class})",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (default: reports/imagenette, or a temp dir with --quick)",
    )
    p.add_argument("--batch-size", type=int, help="default 32 (paper)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument(
        "--momentum", type=float, default=0.0, help="the paper does not mention momentum"
    )
    p.add_argument("--image-size", type=int, default=320)
    p.add_argument("--tile", type=int, default=32, help="input-tile edge in px (overlap included)")
    p.add_argument("--steps-per-epoch", type=int, help="cap on training steps per epoch")
    p.add_argument(
        "--max-minutes",
        type=float,
        help="stop after the epoch that would overrun this wall-clock budget",
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: see README, 'Threads')",
    )
    p.add_argument(
        "--control",
        action="store_true",
        help="also train a conventional run with half-batch gradient sums: the drift of a mere reordering, for scale",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (TF32 is turned off)")
    p.add_argument("--quiet", action="store_true", help="no per-step lines")
    p.add_argument(
        "--plot-only", action="store_true", help="redraw the PNGs from the files in --out"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .plots import plot_run, write_summary

    out = args.out or (
        Path(tempfile.gettempdir()) / "streamcheck-imagenette-quick" if args.quick else REPORT_DIR
    )
    if args.plot_only:  # every run found in --out, from its files
        for run in sorted(out.glob("*_run.json")):
            label = run.name.removesuffix("_run.json")
            for p in [*plot_run(out, label), write_summary(out, label)]:
                print(p)
        return 0
    root = D.data_root_from(args.data)
    spec = QUICK["standin"] if args.quick else STANDIN_REPORT_SPEC
    if args.standin_per_class:
        spec = D.StandinSpec(*args.standin_per_class)
    standin_dir = (
        args.standin_dir
        or REPO
        / "data"
        / f"imagenette-standin-{spec.train_per_class}x{spec.val_per_class}-{spec.size_px}px"
    )
    if args.make_standin:
        D.make_standin(standin_dir, spec)
        print(f"{D.STANDIN_LABEL} data set in {standin_dir}")
        return 0
    if root is None:
        root, dataset = D.make_standin(standin_dir, spec), D.STANDIN_LABEL
    else:
        try:
            root = D.resolve_root(root)
        except D.DataLayoutError as e:
            sys.exit(str(e))
        dataset = D.STANDIN_LABEL if D.is_standin(root) else "ImageNette"
    label = D.STANDIN_LABEL if dataset == D.STANDIN_LABEL else "imagenette"

    from .train import Config, run_experiment

    epochs = args.epochs or (
        QUICK["epochs"]
        if args.quick
        else STANDIN_REPORT_EPOCHS
        if dataset == D.STANDIN_LABEL
        else 200
    )
    cfg = Config(
        data_root=root,
        dataset=dataset,
        out_dir=out,
        epochs=epochs,
        batch_size=args.batch_size or (QUICK["batch_size"] if args.quick else 32),
        lr=args.lr,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        image_size=args.image_size,
        tile=args.tile,
        seed=args.seed,
        dtype=args.dtype,
        threads=args.threads,
        steps_per_epoch=args.steps_per_epoch or (QUICK["steps_per_epoch"] if args.quick else None),
        max_minutes=args.max_minutes,
        control=args.control,
        device=args.device,
        command=("python", "-m", "suites.imagenette", *(sys.argv[1:] if argv is None else argv)),
    )
    paths = run_experiment(
        cfg, log=(lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    )
    for p in [*paths.values(), *plot_run(out, label), write_summary(out, label)]:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
