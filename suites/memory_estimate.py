"""Is ``plan``'s peak memory estimate an upper bound of what a training step takes, and how tight?

    OMP_WAIT_POLICY=PASSIVE python -m suites.memory_estimate [--quick] [--out DIR]

Issue 27 item 2, on a CPU. Every point (network, image edge, tile) runs in a fresh process
(``suites/fresh.py``): the network in float32 and a random image are built, then a training step
(``out = Streamed(net, tile=...)(image)``, ``loss = (out * g).sum()`` with a fixed random ``g``
built beforehand, so the output's gradient is a real full-size map, ``loss.backward()``, parameter
gradients set to None before each step) is measured three ways (NOTE [ Memory meters ] in
``suites/meters.py``: never compared with each other, each with the estimate):

- ``first``: peak RSS of the first step over the RSS after setup (library start-up included);
- ``rss``: peak RSS of a second step over the RSS after the first one and ``malloc_trim``, with
  the engine's defaults (freed host memory reused inside the tile loops: Rule FD2) -- the figure
  users size tiles by, and the one the estimate must bound;
- ``alloc``: the peak of live CPU tensors during a third step (``torch.profiler`` allocation
  events): what the estimate models, without the allocator's own slack.

Rows go to ``<out>/results.jsonl`` (``suites/rows.py``), the table to ``<out>/SUMMARY.md`` (also
rewritten from the rows by ``python -m suites.report``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import fresh
from .environment import environment, provenance
from .markdown import table
from .rows import append_row, last_run, results_path

OUT = Path(__file__).resolve().parents[1] / "reports" / "memory_estimate"

# (network, image edge, tile): the Figs 2-3 network, a ResNet-18 trunk (conv1 to layer4, output
# stride 32, receptive field 435 px) and the benchmark's 2-D U-Net, three tiles each.
FULL = (
    ("figs23", 2048, 256),
    ("figs23", 2048, 512),
    ("figs23", 2048, 1024),
    ("resnet18", 768, 544),
    ("resnet18", 768, 640),
    ("resnet18", 768, 768),
    ("unet2d", 512, 96),
    ("unet2d", 512, 160),
    ("unet2d", 512, 256),
)
QUICK = (("figs23", 512, 128), ("resnet18", 640, 544), ("unet2d", 256, 96))
# Settings (one fresh process each): the engine's defaults, and every buffer of 64 KiB or more
# mapped by glibc and unmapped when freed (no kept memory): resident memory then follows the
# live tensors, which says how much of the defaults' RSS is the C allocator's (heap) slack.
SETTINGS = {
    "defaults": ({}, None),
    "mapped": ({"MALLOC_MMAP_THRESHOLD_": "65536"}, False),
}


def build_network(name: str) -> Any:
    """The streamed network by name, float32, seed 0."""
    import torch

    torch.manual_seed(0)
    if name == "figs23":
        from .benchmark.workload import paper_network

        return paper_network()
    if name == "resnet18":
        from .benchmark.workload import resnet18_network

        return resnet18_network()[0]
    if name == "unet2d":
        from .unet.networks import benchmark_unet

        return benchmark_unet("unet2d")
    raise ValueError(f"unknown network {name!r}; known: figs23, resnet18, unet2d")


def measure(payload: dict[str, Any], partial: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """One point in this (fresh) process: the child of ``suites/fresh.py``."""
    import torch

    import streamcheck

    from .meters import RssMeter, profiler_peak_bytes, release_free_memory

    name, size, tile = payload["network"], payload["size"], payload["tile"]
    network = build_network(name)
    image = torch.randn(1, 3, size, size)
    reuse = SETTINGS[payload["setting"]][1]
    options = {} if reuse is None else {"keep_host_memory": reuse}
    streamed = streamcheck.Streamed(network, tile=tile, **options)
    p = streamed.plan(image.shape)
    g = torch.randn(p.output_shape)

    def step() -> None:
        for q in network.parameters():
            q.grad = None
        out = streamed(image)
        (out * g).sum().backward()

    result: dict[str, Any] = {
        "estimate_bytes": p.peak_bytes_estimate,
        "output_bytes": p.output_bytes,
        "tiles": p.n_tiles,
        "tile_px_used": list(p.tile_px_used),
    }
    release_free_memory()
    with RssMeter(release=False) as first:
        t0 = time.perf_counter()
        step()
        result["first_s"] = time.perf_counter() - t0
    assert first.reading is not None
    result["first_rss_bytes"] = first.reading.delta_bytes
    partial(result)
    with RssMeter() as steady:  # malloc_trim, then the mark reset
        t0 = time.perf_counter()
        step()
        result["step_s"] = time.perf_counter() - t0
    assert steady.reading is not None
    result["rss_bytes"] = steady.reading.delta_bytes
    result["rss_reset"] = steady.reading.reset
    partial(result)
    release_free_memory()
    if payload["setting"] == "defaults":
        result["alloc_bytes"] = profiler_peak_bytes(step)
    result["environment"] = environment("cpu")
    return result


def summary(rows: list[dict[str, Any]]) -> str:
    """One line per point: the estimate, each meter, and the estimate over each."""
    points: dict[tuple[str, int, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        p = r["params"]
        if r["status"] == "ok":
            points.setdefault((p["network"], p["size"], p["tile"]), {})[p["setting"]] = r["metrics"]
    lines = [
        "# plan's peak memory estimate against measured peaks (issue 27 item 2)",
        "",
        "Float32, one training step per measure (the output held, a full-size output gradient), "
        "one fresh process per setting and point (`suites/memory_estimate.py` says what each "
        "meter counts). The machine is shared (2 cores, other sessions running): times are "
        f"disturbed, allocations are not. Runs: {provenance(rows)}.",
        "",
        "- allocator: peak of live CPU tensors in the step (torch.profiler events), the engine's "
        "defaults: what the estimate models (NOTE [ Memory estimate ]).",
        "- RSS defaults: peak RSS over the RSS before the (second) step, the engine's defaults "
        "(freed memory kept inside the tile loops where a tile buffer reaches 32 MiB, Rule FD2b).",
        "- RSS mapped: the same with `MALLOC_MMAP_THRESHOLD_=65536` and `keep_host_memory=False` "
        "(every buffer of 64 KiB or more mapped and unmapped when freed).",
        "",
    ]

    def mib(m: dict[str, Any] | None, field: str) -> str:
        return "–" if m is None or field not in m else f"{m[field] / 2**20:.0f}"

    def ratio(est: int, m: dict[str, Any] | None, field: str) -> str:
        return "–" if m is None or field not in m else f"{est / max(m[field], 1):.2f}"

    def seconds(m: dict[str, Any] | None) -> str:
        return "–" if m is None or "step_s" not in m else f"{m['step_s']:.1f}"

    rows = []
    for (network, size, tile), by in points.items():
        d, mapped = by.get("defaults"), by.get("mapped")
        est = (d or mapped or {}).get("estimate_bytes", 0)
        rows.append(
            [network, f"{size}²", tile, (d or mapped or {}).get("tiles", "–"), f"{est / 2**20:.0f}"]
            + [mib(d, "alloc_bytes"), ratio(est, d, "alloc_bytes"), mib(d, "rss_bytes")]
            + [
                ratio(est, d, "rss_bytes"),
                mib(mapped, "rss_bytes"),
                ratio(est, mapped, "rss_bytes"),
            ]
            + [seconds(d), seconds(mapped)]
        )
    headers = (
        "network | image | tile | tiles | estimate MiB | allocator MiB | estimate / allocator | "
        "RSS defaults MiB | estimate / RSS defaults | RSS mapped MiB | estimate / RSS mapped | "
        "step s defaults | step s mapped"
    )
    lines.append(table(headers, rows, align="l" * 13))
    return "\n".join(lines) + "\n"


def headline(out: Path) -> str:
    """The range of the estimate over the allocator's measured peak (the table's column)."""
    fractions = [
        r["metrics"]["estimate_bytes"] / max(r["metrics"]["alloc_bytes"], 1)
        for r in last_run(results_path(out))
        if r["status"] == "ok" and r["params"]["setting"] == "defaults"
    ]
    return (
        f"`plan`'s peak memory estimate is {min(fractions):.2f}x to {max(fractions):.2f}x the "
        f"allocator's measured peak over {len(fractions)} points (estimate / allocator)."
    )


def write_summary(out: Path) -> Path:
    """``out/SUMMARY.md`` from the last run's rows (``rows.last_run``)."""
    rows = last_run(results_path(out))
    (out / "SUMMARY.md").write_text(summary(rows) if rows else "no rows\n")
    return out / "SUMMARY.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m suites.memory_estimate", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="three small points")
    parser.add_argument("--only", action="append", default=[], help="a network (repeatable)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    path = results_path(args.out)
    command = "python -m suites.memory_estimate " + " ".join(argv or sys.argv[1:])
    points = QUICK if args.quick else FULL
    for network, size, tile in points:
        if args.only and network not in args.only:
            continue
        for setting, (env_vars, _) in SETTINGS.items():
            payload = {"network": network, "size": size, "tile": tile, "setting": setting}
            key = f"{network}|{size}|{tile}|{setting}"
            row = fresh.row(
                "suites.memory_estimate", payload, key=key, command=command, env=env_vars
            )
            append_row(path, row)
            metrics = row["metrics"]
            print(
                key, row["status"], {k: v for k, v in metrics.items() if "bytes" in k}, flush=True
            )
    print(write_summary(args.out).read_text())
    return 0


if __name__ == "__main__":
    if "--json" in sys.argv:
        sys.exit(fresh.child(measure))
    sys.exit(main())
