"""The report's zoo section: real trunks streamed in float64, read from ``reports/zoo/``
(written by ``python -m suites.zoo``; render.py Rules P1-P2)."""

from __future__ import annotations

from pathlib import Path

from suites.zoo.run import EVAL, TRAIN
from suites.zoo.summary import counts, latest, split_counts, train_counts, verdict, whole_counts


def zoo_section(reports: Path) -> str:
    """Counts per result, then every refusal that is a gap and every wrong or crashed model.

    >>> zoo_section(Path("/nonexistent")).splitlines()[-1]
    'Not measured: reports/zoo/results.jsonl is missing (run `python -m suites.zoo`).'
    """
    results = reports / "zoo" / "results.jsonl"
    lines = ["## Real trunks (the zoo)", ""]
    if not results.exists():
        lines.append(
            "Not measured: reports/zoo/results.jsonl is missing (run `python -m suites.zoo`)."
        )
        return "\n".join(lines)
    rows = latest(results, mode=EVAL)
    env = rows[-1]["environment"] if rows else {}
    c = counts(rows)
    lines += [
        f"{c['models']} torchvision and timm trunks (stem and early stages to stride 8, random "
        f"weights, eval mode), streamed in float64 and compared with the plain module at rtol "
        f"1e-10 ({len({r['environment'].get('git_commit') for r in rows})} commits, the last row's "
        f"{env.get('git_commit')}; every row's command and commit, and the per-model table, are "
        "in reports/zoo/SUMMARY.md).",
        "",
        "| exact | refused: non-local layer | refused: engine gap | wrong | crash |",
        "|---|---|---|---|---|",
        f"| {c['exact']} | {c['refused (non-local)']} | {c['refused (gap)']} | {c['wrong']} | "
        f"{c['crash']} |",
        "",
    ]
    split = split_counts(rows)
    if split["split"]:
        lines += [
            f"`streamcheck.split` on {split['split']} of these models' whole classifiers (longest "
            f"streamable prefix, `python -m suites.zoo --split`): head(trunk(x)) equals model(x) "
            f"bit for bit in float64 for {split['head(trunk(x)) == model(x)']}, differs for "
            f"{split['different']}, refused {split['refused']}, crashed {split['crash']}; the "
            f"prefix ends early (a non-local layer before the last feature map) in "
            f"{split['ends early']}.",
            "",
        ]
    train = latest(results, mode=TRAIN)
    if train:
        t = train_counts(train)
        lines += [
            f"In training mode (BatchNorm on batch statistics, `python -m suites.zoo --train`), "
            f"of {t['trunks']} trunks {t['exact']} stream exactly (running statistics included), "
            f"{t['budget']} have more statistic levels than the default budget (a plan only), "
            f"{t['refused']} are refused, {t['wrong']} wrong, {t['crash']} crashed.",
            "",
        ]
    whole = whole_counts(rows)
    if whole["classifiers"]:
        lines += [
            f"Whole classifiers streamed to their logits (`python -m suites.zoo --whole`): "
            f"{whole['equal']} of {whole['classifiers']} equal `model(x)` within 1e-10, "
            f"{whole['different']} differ, {whole['refused']} refused, {whole['crash']} crashed.",
            "",
        ]
    worst = max((r["worst_rel_error"] for r in rows if r["status"] == "exact"), default=None)
    if worst is not None:
        lines += [f"Worst relative error over the exact trunks: {worst:.1e}.", ""]
    flagged = [r for r in rows if r["status"] in ("wrong", "crash") or r.get("refusal") == "gap"]
    if flagged:
        lines += ["| model | result | detail |", "|---|---|---|"]
        for r in flagged:
            lines.append(f"| {r['name']} | {r['status']} | {verdict(r).replace('|', '/')} |")
    return "\n".join(lines)
