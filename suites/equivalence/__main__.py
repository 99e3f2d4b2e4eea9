"""python -m suites.equivalence: draw networks, check streamed == plain, write record.json.

python -m suites.equivalence                 # the committed record (~22 min on 2 shared CPU cores)
python -m suites.equivalence --quick         # 1-2 min: few networks, no torchvision trunks
python -m suites.equivalence --examples 200 --dag-examples 50  # other counts per dtype
python -m suites.equivalence --only unet --only pyramid  # re-run those families, keep the rest
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from .draws import FAMILIES
from .record import REPO, main_command, make_record, merge_records, read_record, write_record
from .summary import write_summary

DEFAULT_EXAMPLES = 1000
DEFAULT_DAG_EXAMPLES = 800
QUICK_EXAMPLES = 6
QUICK_DAG_EXAMPLES = 3
DEFAULT_MULTISCALE_EXAMPLES = 100  # U-Nets and pyramids, each
QUICK_MULTISCALE_EXAMPLES = 3
DEFAULT_STATISTICS_EXAMPLES = 170  # per dtype and statistics family: 1020 networks
STATISTICS = ("statistics_chain", "statistics_dag", "statistics_unet")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m suites.equivalence",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_EXAMPLES} networks per dtype, no trunks, output to a temp dir unless --out",
    )
    p.add_argument(
        "--examples",
        type=int,
        metavar="N",
        help=f"chains per dtype, split 1:2:1 over 1D/2D/3D (default {DEFAULT_EXAMPLES}, "
        f"--quick {QUICK_EXAMPLES}; 0: none)",
    )
    p.add_argument(
        "--dag-examples",
        type=int,
        metavar="N",
        help=f"DAG networks (streamcheck.testing.graphs) per dtype, split like --examples "
        f"(default {DEFAULT_DAG_EXAMPLES}, --quick {QUICK_DAG_EXAMPLES}; 0: none)",
    )
    for family in ("unet", "pyramid"):
        p.add_argument(
            f"--{family}-examples",
            type=int,
            metavar="N",
            help=f"{'U-Nets' if family == 'unet' else 'pyramids'} (streamcheck.testing.unets) per "
            f"dtype, split like --examples (default {DEFAULT_MULTISCALE_EXAMPLES}, --quick "
            f"{QUICK_MULTISCALE_EXAMPLES}; 0: none)",
        )
    p.add_argument(
        "--statistics-examples",
        type=int,
        metavar="N",
        help="networks with statistics over the map (streamcheck.testing.statistics) per dtype "
        f"and family (statistics_chain, _dag, _unet), split like --examples (default "
        f"{DEFAULT_STATISTICS_EXAMPLES}, --quick {QUICK_MULTISCALE_EXAMPLES}; 0: none)",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=list(FAMILIES),
        help="re-run only this family (repeatable): the record in --out keeps the other families' "
        "cases and its trunks (Rule R1c of record.py)",
    )
    p.add_argument("--no-trunks", action="store_true", help="skip the torchvision trunks")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed (the draws replay)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (default reports/equivalence; --quick: a temp dir)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or (
        Path(tempfile.gettempdir()) / "streamcheck-equivalence-quick"
        if args.quick
        else REPO / "reports" / "equivalence"
    )
    counts = {"chain": args.examples, "dag": args.dag_examples}
    counts |= {"unet": args.unet_examples, "pyramid": args.pyramid_examples}
    counts |= {f: args.statistics_examples for f in STATISTICS}
    for family, quick, default in (
        ("chain", QUICK_EXAMPLES, DEFAULT_EXAMPLES),
        ("dag", QUICK_DAG_EXAMPLES, DEFAULT_DAG_EXAMPLES),
        ("unet", QUICK_MULTISCALE_EXAMPLES, DEFAULT_MULTISCALE_EXAMPLES),
        ("pyramid", QUICK_MULTISCALE_EXAMPLES, DEFAULT_MULTISCALE_EXAMPLES),
        *((f, QUICK_MULTISCALE_EXAMPLES, DEFAULT_STATISTICS_EXAMPLES) for f in STATISTICS),
    ):
        if counts[family] is None:
            counts[family] = quick if args.quick else default
    if args.only:  # Rule R1c: the other families come from the record on disk
        if not (out / "record.json").exists():
            raise SystemExit(
                f"--only needs a record to merge into: {out / 'record.json'} is missing"
            )
        counts = {f: n if f in args.only else 0 for f, n in counts.items()}
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        record = make_record(
            examples=counts,
            seed=args.seed,
            with_trunks=not (args.quick or args.no_trunks or args.only),
            command=main_command(argv),
            log=lambda line: print(line, flush=True),
        )
    finally:
        torch.set_num_threads(threads_before)
    if args.only:
        previous, previous_cases = read_record(out)
        record = merge_records(previous, previous_cases, record, families=args.only)
    path, _ = write_record(record, out)
    summary = record["summary"]
    print(
        f"{summary['n_cases']} networks, {len(record['trunks'])} trunk checks, "
        f"{len(record['failures'])} failures, {record['metadata']['wall_s']} s -> {path}, "
        f"{write_summary(out)}"
    )
    return 1 if record["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
