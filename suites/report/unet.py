"""The report's segmentation section: streamed U-Nets and pyramids, read from
``reports/unet/results.jsonl`` (``python -m suites.unet``) and the equivalence record's U-Net and
pyramid families (render.py Rules P1-P2)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from suites.benchmark.analysis import load
from suites.unet.summary import pairs, summary_table

from .format import commit, err, figure


def unet_section(reports: Path, out_dir: Path) -> str:
    """Exactness of drawn U-Nets and pyramids, then time and memory of the U-Net sweep.

    >>> unet_section(Path("/nonexistent"), Path(".")).splitlines()[-1]
    'Not measured: reports/unet/results.jsonl is missing (run `python -m suites.unet`).'
    """
    lines = ["## Segmentation: U-Nets and pyramids", ""]
    record = reports / "equivalence" / "record.json"
    families = {}
    if record.is_file():
        families = json.loads(record.read_text()).get("summary", {}).get("by_family", {})
    for family, label in (("unet", "U-Nets"), ("pyramid", "pyramids (several outputs)")):
        part = families.get(family)
        if part is None:
            lines.append(f"No {label} in the equivalence record (`python -m suites.equivalence`).")
            continue
        worst = part.get("worst_rel_error", {}).get("float64", {})
        grads = [
            (worst.get(k) or {}).get("max_rel_error")
            for k in ("output", "param_grad", "input_grad")
        ]
        lines.append(
            f"- {label}: {part['n_cases']} drawn networks (float64 and float32), "
            f"{part['n_failed']} failed; worst float64 error output / parameter grads / input "
            f"grad {' / '.join(err(g) for g in grads)} (section 2's table has every figure)."
        )
    lines.append("")
    results = reports / "unet" / "results.jsonl"
    if not results.is_file():
        lines.append(
            "Not measured: reports/unet/results.jsonl is missing (run `python -m suites.unet`)."
        )
        return "\n".join(lines)
    df = load(reports / "unet")
    commands = sorted({str(c) for c in df.get("run_command", pd.Series(dtype=str)).dropna()})
    commits = sorted({str(c) for c in df.get("env_git_commit", pd.Series(dtype=str)).dropna()})
    png = reports / "unet" / "unet.png"
    lines += [
        "One training step (forward + backward) of a small 2-D and 3-D U-Net "
        "(`suites/unet/networks.py`) at growing sizes, streamed and conventional, PyTorch "
        f"defaults on both sides (commit {', '.join(commit(c) for c in commits)}; "
        "`reports/unet/SUMMARY.md` has the same table):",
        "",
        summary_table(pairs(df)),
        "",
        figure(png, out_dir, "Fig. U1", "Streamed and conventional U-Nets.", "; ".join(commands))
        if png.is_file()
        else "(reports/unet/unet.png is missing)",
    ]
    return "\n".join(lines)
