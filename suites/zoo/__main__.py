"""``python -m suites.zoo``: stream every zoo trunk in float64 and write ``reports/zoo/``.

Rule Z7. One JSONL row per model (``results.jsonl``), each with the shared environment record
         (``suites.environment.environment``) and the command; a rerun skips models already
         recorded at the same git commit (resumable, finished models are never lost), ``--redo``
         runs them again. ``SUMMARY.md`` is written from the rows alone (``summary.py``).

    python -m suites.zoo                      # every model (Rule Z6 sizes), then the summary
    python -m suites.zoo --only resnet mobilenet   # models whose name contains one of these
    python -m suites.zoo --split              # add run.py Rule Z8's split check to rows without it
    python -m suites.zoo --train              # run.py Rule Z11: every trunk in training mode
    python -m suites.zoo --whole              # add run.py Rule Z12's whole classifier check

Rule Z10. OpenMP's worker threads sleep rather than spin while they wait (``OMP_WAIT_POLICY=PASSIVE``,
          set before torch starts, as in suites/resolution Rule X4): on shared cores spinning
          threads made the zoo's float64 checks many times slower. ``OMP_NUM_THREADS=1`` runs
          several models side by side (``--only`` with disjoint lists).
Rule Z9. ``--split`` appends, for every selected model whose latest row has no ``split`` field
         (all of them with ``--redo``), that row with the field added: the split check's own
         environment record and command go inside the field, the streaming check's stay where
         they are. ``--whole`` does the same with a ``whole`` field (run.py Rule Z12).
Rule Z13. A row is keyed by (name, mode): ``mode`` is ``"eval"`` (rows written before the mode was
          recorded are eval rows) or ``"train"`` (``--train``, run.py Rule Z11). ``--split`` and
          ``--whole`` add to the eval rows.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # Rule Z10: before torch starts OpenMP

import torch  # noqa: E402

from suites.environment import environment
from suites.rows import append_row

from .models import ZooModel, zoo
from .run import EVAL, TRAIN, check_model, check_split, check_whole
from .summary import ROW_KEYS, latest, mode_of, write_summary

OUT = Path(__file__).resolve().parents[2] / "reports" / "zoo"


def costs(results: Path) -> dict[str, float]:
    """Seconds of each model's latest eval row: ``--cheap-first`` runs the cheapest first (a
    model without a row first of all; a refused one costs a plan only)."""
    return {r["name"]: float(r.get("seconds", 0.0)) for r in latest(results, mode=EVAL)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m suites.zoo", description=__doc__)
    parser.add_argument("--only", nargs="*", default=None, help="name fragments to run")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--redo", action="store_true", help="run models already recorded")
    parser.add_argument(
        "--cheap-first", action="store_true", help="the fastest models (by their eval rows) first"
    )
    parser.add_argument(
        "--split", action="store_true", help="add the split check to recorded rows (Rule Z9)"
    )
    parser.add_argument("--train", action="store_true", help="trunks in training mode (Rule Z11)")
    parser.add_argument(
        "--whole", action="store_true", help="add the whole classifier check (Rules Z9, Z12)"
    )
    args = parser.parse_args(argv)
    mode = TRAIN if args.train else EVAL
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    env = environment("cpu")
    done = set()
    if not args.redo:
        done = {
            r["name"]
            for r in latest(results)
            if r["environment"]["git_commit"] == env["git_commit"] and mode_of(r) == mode
        }
    models = [m for m in zoo() if args.only is None or any(part in m.name for part in args.only)]
    if args.cheap_first:
        seconds = costs(results)
        models.sort(key=lambda m: seconds.get(m.name, 0.0))
    command = "python -m suites.zoo " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.split or args.whole:
        field = "split" if args.split else "whole"
        add_field(models, results, command.strip(), field=field, redo=args.redo)
        write_summary(results, args.out / "SUMMARY.md", total=len(zoo()))
        return 0
    for i, model in enumerate(models, 1):
        if model.name in done:
            continue
        print(f"[{i}/{len(models)}] {mode} {model.name} ...", end=" ", flush=True)
        record = check_model(model, mode=mode)
        record["environment"] = environment("cpu")
        record["command"] = command.strip()
        append_row(results, record, required=ROW_KEYS)
        print(record["status"], record.get("refusal", ""), f"{record['seconds']} s", flush=True)
    write_summary(results, args.out / "SUMMARY.md", total=len(zoo()))
    return 0


def add_field(
    models: list[ZooModel], results: Path, command: str, *, field: str, redo: bool
) -> None:
    """Rule Z9: ``field`` is ``"split"`` (Rule Z8) or ``"whole"`` (Rule Z12)."""
    check = check_split if field == "split" else check_whole
    rows = {row["name"]: row for row in latest(results, mode=EVAL)}
    todo = [m for m in models if m.name in rows and (redo or field not in rows[m.name])]
    for i, model in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {field} {model.name} ...", end=" ", flush=True)
        found = check(model) | {"environment": environment("cpu"), "command": command}
        # the row as it is now: a run beside this one may have appended a newer one meanwhile
        row = next(r for r in latest(results, mode=EVAL) if r["name"] == model.name)
        append_row(results, row | {field: found}, required=ROW_KEYS)
        print(found["status"], found.get("cut", ""), f"{found['seconds']} s", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
