"""What re-validating the plan cache costs per call, next to computing one tile.

``python -m suites.revalidation`` -> reports/revalidation/{results.json,SUMMARY.md}.

Every ``Streamed`` call derives the module's state key (NOTE [ Plan cache ], Rule K1), checks that
parameters share one device and dtype, and records tensor versions (Rule K4); backward derives
the key and the versions again. This measures those steps (median of many repetitions) for real
trunks and sets them against one forward of the trunk on one tile of the given size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from streamcheck.state import module_state, tensor_versions
from streamcheck.streaming import _placement
from suites.environment import environment, provenance
from suites.trunks import RESNET, torchvision_trunk, tv_features

OUT = Path(__file__).resolve().parents[2] / "reports" / "revalidation"


def trunks() -> dict[str, nn.Module]:
    return {
        "resnet50 to layer2": torchvision_trunk("resnet50", RESNET[:6]).eval(),
        "convnext_tiny features[:4]": tv_features("convnext_tiny", 4).eval(),
    }


def median_seconds(step: Callable[[], Any], *, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_call_checks(module: nn.Module) -> None:
    """What forward and backward add per call (Rules K1, K4), beyond computing tiles."""
    module_state(module)
    _placement(module)
    tensor_versions(module)
    module_state(module)  # backward: Rule K4
    tensor_versions(module)


def measure(name: str, module: nn.Module, *, tile: int, repeats: int) -> dict[str, Any]:
    x = torch.randn(1, 3, tile, tile)
    with torch.no_grad():
        module(x)  # warm-up
        tile_s = median_seconds(lambda: module(x), repeats=3)
    checks_s = median_seconds(lambda: per_call_checks(module), repeats=repeats)
    return {
        "model": name,
        "submodules": sum(1 for _ in module.modules()),
        "tensors": sum(1 for _ in module.parameters()) + sum(1 for _ in module.buffers()),
        "tile_px": tile,
        "checks_ms": round(checks_s * 1e3, 3),
        "one_tile_forward_ms": round(tile_s * 1e3, 1),
        "checks_over_one_tile": checks_s / tile_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=512, help="tile edge in px (default 512)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    rows = []
    for name, module in trunks().items():
        rows.append(measure(name, module, tile=args.tile, repeats=args.repeats))
        print(rows[-1], flush=True)
    record = {
        "command": f"python -m suites.revalidation --tile {args.tile} --repeats {args.repeats}",
        "environment": environment("cpu"),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    write_summary(record, args.out)


def write_summary(record: dict[str, Any], out: Path) -> None:
    """``SUMMARY.md`` from the record alone (``results.json``)."""
    lines = [
        "# Plan-cache re-validation cost per call",
        "",
        f"Run: {provenance([record])}.",
        "",
        "Per call, forward and backward together derive the module's state key twice, check its "
        "placement once and read tensor versions twice (NOTE [ Plan cache ] in "
        "streamcheck/state.py). Set against one float32 forward of the trunk on one tile, "
        "without grad (a streamed call computes every tile twice, so the real share is smaller "
        "still).",
        "",
        "| trunk | submodules | parameters + buffers | checks per call | one tile forward "
        "| checks / one tile |",
        "|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        lines.append(
            f"| {r['model']} | {r['submodules']} | {r['tensors']} | {r['checks_ms']:.2f} ms | "
            f"{r['one_tile_forward_ms']:.0f} ms ({r['tile_px']}² px) | "
            f"{100 * r['checks_over_one_tile']:.2f} % |"
        )
    (out / "SUMMARY.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
