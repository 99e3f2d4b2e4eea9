"""``reports/zoo/SUMMARY.md`` from ``results.jsonl`` alone (the latest row per model).

>>> rows = [{"name": "a", "status": "exact", "worst_rel_error": 1e-15},
...         {"name": "b", "status": "refused", "refusal": "non-local"}]
>>> counts(rows)
{'models': 2, 'exact': 1, 'refused (non-local)': 1, 'refused (gap)': 0, 'refused (budget)': 0, 'refused (random)': 0, 'wrong': 0, 'crash': 0}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from suites.environment import provenance
from suites.rows import latest_rows, read_rows

from .run import EVAL, TRAIN, reclassify

# The zoo's rows predate the kit's schema (suites/rows.py Rule J1): flat, one per model.
ROW_KEYS = ("name", "status", "environment", "command")


def mode_of(row: dict[str, Any]) -> str:
    """Rule Z13: a row's mode; rows from before the mode was recorded are eval rows."""
    return str(row.get("mode", EVAL))


def latest(results: Path, *, mode: str | None = None) -> list[dict[str, Any]]:
    """The last row of every (model, mode) (Rule Z13), in first-seen order, classed by run.py
    Rule Z5 again; only ``mode``'s rows if given."""
    rows = read_rows(results, required=ROW_KEYS)
    last = latest_rows(rows, key=lambda r: (r["name"], mode_of(r)))
    return [reclassify(row) for row in last if mode is None or mode_of(row) == mode]


def counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    def n(status: str, refusal: str | None = None) -> int:
        return sum(
            r["status"] == status and (refusal is None or r.get("refusal") == refusal) for r in rows
        )

    return {
        "models": len(rows),
        "exact": n("exact"),
        "refused (non-local)": n("refused", "non-local"),
        "refused (gap)": n("refused", "gap"),
        "refused (budget)": n("refused", "budget"),
        "refused (random)": n("refused", "random"),
        "wrong": n("wrong"),
        "crash": n("crash"),
    }


def verdict(row: dict[str, Any]) -> str:
    """One cell: the worst error, the first refused layer with its reason, or the error."""
    if row["status"] in ("exact", "wrong"):
        return f"worst relative error {row['worst_rel_error']:.1e} over {row['n_tiles']} tiles"
    if row["status"] == "refused":
        first = next(
            (layer for layer in row["layers"] if layer["kind"] != "after non-local"),
            row["layers"][0],
        )
        more = len(row["layers"]) - 1
        where = f"`{first['path']}`: " if first["path"] else ""
        return where + first["reason"] + (f" (+{more} more)" if more else "")
    return row.get("error", "")


def result(row: dict[str, Any]) -> str:
    """One cell: the status, and a refusal's class (run.py Rule Z5)."""
    return row["status"] + (f" ({row['refusal']})" if row["status"] == "refused" else "")


def split_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Rule Z8's results: how many models were split, and how."""
    splits = [r["split"] for r in rows if "split" in r]
    return {
        "split": len(splits),
        "head(trunk(x)) == model(x)": sum(s["status"] == "equal" for s in splits),
        "different": sum(s["status"] == "different" for s in splits),
        "refused": sum(s["status"] == "refused" for s in splits),
        "crash": sum(s["status"] == "crash" for s in splits),
        "ends early": sum(bool(s.get("early")) for s in splits),
    }


def split_cell(row: dict[str, Any]) -> str:
    """One cell: where split cut the classifier, what stopped it, and whether the pair is equal."""
    split = row.get("split")
    if split is None:
        return "not run"
    if split["status"] in ("refused", "crash"):
        first = (split.get("layers") or [{}])[0]
        return f"{split['status']}: " + (
            f"`{first.get('path')}` {first.get('reason', '')}" if first else split.get("error", "")
        )
    stride = "x".join(str(s) for s in split["total_stride"])
    cell = f"after `{split['cut']}` (stride {stride})"
    stopped = split.get("stopped_by") or []
    if stopped:
        early = "ends early" if split.get("early") else "stops"
        cell += f", {early} at `{stopped[0]['path']}` ({split.get('stopped_class', '?')})"
    return cell + ("; equal" if split["status"] == "equal" else "; **different**")


def train_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Run.py Rule Z11's results: train rows per status."""
    return {"trunks": len(rows)} | {
        status: sum(r["status"] == status for r in rows)
        for status in ("exact", "budget", "refused", "wrong", "crash")
    }


def whole_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Run.py Rule Z12's results: whole classifiers per status."""
    wholes = [r["whole"] for r in rows if "whole" in r]
    return {"classifiers": len(wholes)} | {
        status: sum(w["status"] == status for w in wholes)
        for status in ("equal", "different", "refused", "crash")
    }


def cost_cells(record: dict[str, Any]) -> str:
    """Levels, passes and the plan's time factor (plan Rules PL1-PL3), where a plan was made."""
    if "levels" not in record:
        return " | | "
    return (
        f"{record['levels']} | {record['passes_training']} / {record['passes_inference']} | "
        f"{record['time_factor']:.2f}"
    )


def heading(title: str, prose: str, count: dict[str, int], columns: list[str]) -> list[str]:
    """A section's title, prose, counts and table header."""
    return [
        f"## {title}",
        "",
        prose,
        "",
        " | ".join(f"{k}: **{v}**" for k, v in count.items()),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]


def train_section(rows: list[dict[str, Any]]) -> list[str]:
    """Run.py Rule Z11's table."""
    if not rows:
        return ["## Training mode", "", "Not run yet (`python -m suites.zoo --train`).", ""]
    lines = heading(
        "Training mode (BatchNorm on batch statistics)",
        "Every trunk in `.train()` mode, streamed in float64 against the plain module (output, "
        "input gradient, every parameter gradient and the running statistics at rtol 1e-10; "
        "suites/zoo/run.py Rule Z11). *budget*: more statistic levels than the default "
        "`max_levels` (plan Rule PL2), so only a plan with `max_levels=None` ran. Passes are "
        "training / inference; the time factor is the plan's estimate against plain streaming "
        f"(plan Rule PL3). {provenance(rows)}.",
        train_counts(rows),
        ["model", "levels", "passes", "time factor", "result", "detail"],
    )
    for r in rows:
        detail = f"max_levels {r['max_levels']}" if r["status"] == "budget" else verdict(r)
        lines.append(
            f"| {r['name']} | {cost_cells(r)} | {result(r)} | {detail.replace('|', '/')} |"
        )
    return [*lines, ""]


def whole_section(rows: list[dict[str, Any]]) -> list[str]:
    """Run.py Rule Z12's table."""
    wholes = [r for r in rows if "whole" in r]
    if not wholes:
        return ["## Whole classifiers", "", "Not run yet (`python -m suites.zoo --whole`).", ""]
    lines = heading(
        "Whole classifiers, streamed to their logits",
        "`Streamed(model, tile=...)` on the whole torchvision/timm classifier (random weights, "
        "eval mode, float64), its logits against `model(x)` (relative error: the largest "
        "absolute difference over the largest absolute logit; *equal* within 1e-10; "
        f"suites/zoo/run.py Rule Z12). {provenance([r['whole'] for r in wholes])}.",
        whole_counts(rows),
        ["model", "input", "tile", "levels", "passes", "time factor", "result", "detail"],
    )
    for r in wholes:
        w = r["whole"]
        size = "x".join(str(n) for n in w.get("input_shape", [])[2:])
        tile = "x".join(str(n) for n in w.get("tile", []))
        if w["status"] in ("equal", "different"):
            detail = f"relative error {w['rel_error']:.1e}"
        else:
            detail = verdict(w)
        lines.append(
            f"| {r['name']} | {size} | {tile} | {cost_cells(w)} | {w['status']} | "
            f"{detail.replace('|', '/')} |"
        )
    return [*lines, ""]


def headline(folder: Path) -> str:
    """Counts per result in eval mode, then the split, training-mode and whole-classifier counts,
    for the report's index."""
    results = folder / "results.jsonl"
    rows = latest(results, mode=EVAL)
    c, split, whole = counts(rows), split_counts(rows), whole_counts(rows)
    text = (
        f"{c['models']} torchvision and timm trunks streamed in float64 against the plain module at "
        f"rtol 1e-10: {c['exact']} exact, {c['refused (non-local)']} refused for a non-local layer, "
        f"{c['refused (gap)']} refused by an engine gap, {c['wrong']} wrong, {c['crash']} crashed"
    )
    worst = max((r["worst_rel_error"] for r in rows if r["status"] == "exact"), default=None)
    text += f" (worst relative error {worst:.1e})." if worst is not None else "."
    if split["split"]:
        text += (
            f" `streamcheck.split` on {split['split']} whole classifiers: head(trunk(x)) equals "
            f"model(x) for {split['head(trunk(x)) == model(x)']}, differs for {split['different']}."
        )
    if train := latest(results, mode=TRAIN):
        t = train_counts(train)
        text += f" In training mode {t['exact']} of {t['trunks']} trunks stream exactly."
    if whole["classifiers"]:
        text += (
            f" Whole classifiers to their logits: {whole['equal']} of {whole['classifiers']} "
            "equal `model(x)`."
        )
    return text


def write_summary(results: Path, out: Path, *, total: int | None = None) -> None:
    rows = latest(results, mode=EVAL)
    c = counts(rows)
    lines = [
        "# Zoo: real torchvision and timm trunks, streamed in float64",
        "",
        f"Each row keeps its own {provenance(rows)}. Every trunk is the stem and early stages to "
        "total stride 8 with random weights in eval mode "
        "(suites/zoo/models.py Rules Z1-Z3), checked against the plain module at rtol 1e-10 "
        "(output, input gradient, every parameter gradient; suites/zoo/run.py Rules Z4-Z6).",
        "",
        " | ".join(f"{k}: **{v}**" for k, v in c.items()),
        "",
        *(
            [
                f"{len(rows)} of the zoo's {total} models are recorded; the other "
                f"{total - len(rows)} are not run yet (`python -m suites.zoo` resumes).",
                "",
            ]
            if total is not None and total > len(rows)
            else []
        ),
        "A *non-local* refusal names a genuinely non-local layer (global pooling, statistics over "
        "space, attention); a *gap* is a local operation the engine does not understand yet.",
        "",
        "The *split* column is `streamcheck.split` on the model's whole classifier (suites/zoo/run.py "
        "Rule Z8): the longest streamable prefix, what ended it (class by Rule Z5), and whether "
        "`head(trunk(x))` equals `model(x)` bit for bit in float64 "
        f"({provenance(r['split'] for r in rows if 'split' in r)}). "
        + " | ".join(f"{k}: **{v}**" for k, v in split_counts(rows).items()),
        "",
        "| model | family | expected | result | detail | split |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r.get('family', '')} | {r.get('expect', '')} | {result(r)} | "
            f"{verdict(r).replace('|', '/')} | {split_cell(r).replace('|', '/')} |"
        )
    readings = [r for r in rows if "reading" in r]
    if readings:
        lines += [
            "",
            "Refusals classed from reading the code (suites/zoo/models.py READ_NON_LOCAL):",
            "",
        ]
        lines += [f"- {r['name']}: {r['reading']}" for r in readings]
    lines += ["", *train_section(latest(results, mode=TRAIN)), *whole_section(rows)]
    out.write_text("\n".join(lines).rstrip("\n") + "\n")
