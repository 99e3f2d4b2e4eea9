"""Read the result files under ``reports/`` -- defensively: a missing file or field is a note in
the report, never a crash and never a number from somewhere else.

- ``equivalence/record.json``: written by ``python -m suites.equivalence``;
- ``benchmark/results.jsonl``: one JSON row per measured point (``suites/rows.py``), plus
  any ``benchmark/*.json`` with run metadata, and the PNGs next to them;
- ``imagenette/{label}_run.json``, ``_epochs.csv``, ``_steps.csv`` and PNGs
  (``suites/imagenette/train.py``, ``plots.py``); the real ImageNette run (``imagenette_``) is
  preferred to the STAND-IN (``STAND-IN_``) when both exist.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Source:
    """What was found for one section: data, figures, and notes on what is missing."""

    name: str
    folder: Path
    data: dict[str, Any] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return bool(self.data)


def read_json(path: Path, missing: list[str]) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        missing.append(f"`{path.name}` not found in `{path.parent}`")
    except (OSError, json.JSONDecodeError) as error:
        missing.append(f"`{path.name}` could not be read ({type(error).__name__}: {error})")
    return None


def read_csv(path: Path, missing: list[str]) -> list[dict[str, Any]]:
    try:
        with path.open(newline="") as f:
            return [{k: number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except FileNotFoundError:
        missing.append(f"`{path.name}` not found in `{path.parent}`")
    except (OSError, csv.Error) as error:
        missing.append(f"`{path.name}` could not be read ({error})")
    return []


def number(value: Any) -> Any:
    """A CSV cell as a float where it is one."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def get(mapping: Any, *keys: str, default: Any = None) -> Any:
    """``mapping[k1][k2]...`` or ``default`` when any level is missing."""
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return default
        mapping = mapping[key]
    return mapping


# ------------------------------------------------------------------------------------ loaders
def load_equivalence(reports: Path) -> Source:
    source = Source("equivalence", reports / "equivalence")
    record = read_json(source.folder / "record.json", source.missing)
    if isinstance(record, dict):
        source.data = record
    return source


def load_benchmark(reports: Path) -> Source:
    """``benchmark/results.jsonl`` (the full sweep), else ``benchmark/quick/results.jsonl``, read
    by the benchmark's own reader and analysis (``suites/benchmark/analysis.py``): ``rows`` are the
    latest row per key, flat; ``frame`` the same as the analysis's DataFrame."""
    from suites.benchmark import analysis
    from suites.rows import flat, latest_rows, read_rows

    source = Source("benchmark", reports / "benchmark")
    candidates = [source.folder, source.folder / "quick"]
    folder = next((f for f in candidates if (f / "results.jsonl").exists()), None)
    if folder is None:
        source.missing.append(f"no `results.jsonl` in `{source.folder}` or `{source.folder}/quick`")
        return source
    source.folder = folder
    try:
        raw = read_rows(folder / "results.jsonl")
    except ValueError as exc:  # not a row of the schema: say so (Rule P2), do not guess
        source.missing.append(str(exc))
        return source
    rows = [flat(r) for r in latest_rows(raw)]
    if rows:
        source.data = {"rows": rows, "frame": analysis.frame(raw), "quick": folder.name == "quick"}
    else:
        source.missing.append(f"`results.jsonl` in `{folder}` has no rows")
    source.figures = sorted(folder.glob("*.png"))
    return source


def load_imagenette(reports: Path) -> Source:
    source = Source("imagenette", reports / "imagenette")
    labels = [p.name.removesuffix("_run.json") for p in sorted(source.folder.glob("*_run.json"))]
    if not labels:
        source.missing.append(f"no `*_run.json` in `{source.folder}`")
        return source
    label = "imagenette" if "imagenette" in labels else labels[0]
    run = read_json(source.folder / f"{label}_run.json", source.missing)
    epochs = read_csv(source.folder / f"{label}_epochs.csv", source.missing)
    steps = read_csv(source.folder / f"{label}_steps.csv", source.missing)
    if isinstance(run, dict):
        source.data = {"label": label, "run": run, "epochs": epochs, "steps": steps}
        source.data["other_runs"] = _other_runs(source.folder, source.missing)
    source.figures = [
        p
        for p in (
            source.folder / f"{label}_fig4_curves.png",
            source.folder / f"{label}_loss_difference.png",
        )
        if p.exists()
    ]
    for name in ("fig4_curves", "loss_difference"):
        if not (source.folder / f"{label}_{name}.png").exists():
            source.missing.append(f"`{label}_{name}.png` not found in `{source.folder}`")
    return source


def _other_runs(folder: Path, missing: list[str]) -> list[dict[str, Any]]:
    """Runs in subfolders of ``imagenette/`` (e.g. a float64 run), with their step rows."""
    runs = []
    for path in sorted(folder.glob("*/*_run.json")):
        run = read_json(path, missing)
        label = path.name.removesuffix("_run.json")
        steps = read_csv(path.parent / f"{label}_steps.csv", missing)
        if isinstance(run, dict):
            runs.append({"folder": path.parent.name, "label": label, "run": run, "steps": steps})
    return runs
