"""What scoping the host-memory setting to a call costs and saves (issue 27 item 1), on a CPU.

    OMP_WAIT_POLICY=PASSIVE python -m suites.host_memory_scope [--rounds 2] [--out DIR]

The Figs 2-3 network at 2048², tile 512, float32, one training step (loss = output.sum()) per
timed repeat, each mode in a fresh process (``suites/fresh.py``), the modes interleaved A B C ..
C B A per round. Modes:

- ``off``: glibc's defaults (``keep_host_memory=False``): every tile faults its buffers in.
- ``process``: the old default, ``keep_freed_host_memory()`` for the whole process (and
  ``keep_host_memory=False``, so that no scope undoes it).
- ``scope``: the engine's default: each tile loop (forward's, backward's) runs in
  ``host_memory_scope``, freed memory reused inside and handed back after (Rule FD2).
- ``conventional``: the plain network, PyTorch defaults (the denominator of the RSS ratio).

Per process: one warm-up step, freed memory handed back (``malloc_trim``) and the peak-RSS mark
reset, then the timed steps under ``RssMeter`` (peak RSS over the baseline); ``rss_after_bytes``
is what stays resident after the last step over that baseline. Rows go to
``<out>/results.jsonl`` (``suites/rows.py``), the table to ``<out>/SUMMARY.md`` (also rewritten
from the rows by ``python -m suites.report``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import fresh
from .environment import environment, provenance
from .rows import append_row, last_run, results_path

MODES = ("off", "process", "scope", "conventional")
OUT = Path(__file__).resolve().parents[1] / "reports" / "host_memory"


def _streamed_step(mode: str, network: Any, image: Any, tile: int) -> Callable[[], None]:
    import streamcheck

    if mode == "process":
        streamcheck.keep_freed_host_memory()
    # scope: the engine's default (its tile loops run in host_memory_scope, Rule FD2)
    options = {} if mode == "scope" else {"keep_host_memory": False}
    streamed = streamcheck.Streamed(network, tile=tile, **options)

    def step() -> None:
        for p in network.parameters():
            p.grad = None
        streamed(image).sum().backward()

    return step


def measure(payload: dict[str, Any], partial: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """One mode in this (fresh) process: the child of ``suites/fresh.py``."""
    import torch

    from .benchmark.workload import paper_network
    from .meters import RssMeter, current_rss_bytes, release_free_memory

    mode, size, tile, repeats = (payload[k] for k in ("mode", "size", "tile", "repeats"))
    torch.manual_seed(0)
    network = paper_network()
    image = torch.randn(1, 3, size, size)
    if mode == "conventional":

        def step() -> None:
            for p in network.parameters():
                p.grad = None
            network(image).sum().backward()

    else:
        step = _streamed_step(mode, network, image, tile)
    t0 = time.perf_counter()
    step()  # warm-up
    warmup_s = time.perf_counter() - t0
    times = []
    with RssMeter() as meter:  # releases freed memory and resets the peak mark first
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        after = current_rss_bytes()
    assert meter.reading is not None
    release_free_memory()
    return {
        "warmup_s": warmup_s,
        "time_s_all": times,
        "time_s_median": statistics.median(times),
        "peak_rss_bytes": meter.reading.peak_rss_bytes,
        "rss_delta_bytes": meter.reading.delta_bytes,
        "rss_after_bytes": after - meter.reading.baseline_rss_bytes,
        "rss_meter": "VmHWM over the RSS after warm-up and malloc_trim (suites/meters.py)",
        "environment": environment("cpu"),
    }


def summary(rows: list[dict[str, Any]]) -> str:
    """Medians per mode over the rounds, and ratios to ``off`` (time) and conventional (RSS)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "ok":
            by.setdefault(r["params"]["mode"], []).append(r["metrics"])
    if not by:
        return "no finished rows\n"

    def med(mode: str, field: str) -> float:
        return statistics.median(m[field] for m in by[mode])

    conventional = med("conventional", "rss_delta_bytes") if "conventional" in by else None
    lines = [
        "# Host memory: scoped to the call vs for the process vs off",
        "",
        f"Figs 2-3 network, {rows[-1]['params']['size']}² tile {rows[-1]['params']['tile']}, "
        f"float32; fresh process per row, modes interleaved (A B .. B A), "
        f"{max(len(v) for v in by.values())} processes per mode; medians over them. "
        f"Runs: {provenance(rows)} (each row's own: others committed during the run).",
        "",
        "| mode | step s (median) | / off | peak RSS over baseline MiB | / conventional "
        "| resident after the step MiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode in MODES:
        if mode not in by:
            continue
        t = med(mode, "time_s_median")
        rss = med(mode, "rss_delta_bytes")
        off = f"{t / med('off', 'time_s_median'):.2f}" if "off" in by else "–"
        ratio = f"{rss / conventional:.3f}" if conventional else "–"
        lines.append(
            f"| {mode} | {t:.2f} | {off} | {rss / 2**20:.0f} "
            f"(range {min(m['rss_delta_bytes'] for m in by[mode]) / 2**20:.0f}-"
            f"{max(m['rss_delta_bytes'] for m in by[mode]) / 2**20:.0f}) | {ratio} | "
            f"{med(mode, 'rss_after_bytes') / 2**20:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_summary(out: Path) -> Path:
    """``out/SUMMARY.md`` from the last run's rows (``rows.last_run``)."""
    (out / "SUMMARY.md").write_text(summary(last_run(results_path(out))))
    return out / "SUMMARY.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m suites.host_memory_scope", description=__doc__)
    parser.add_argument("--rounds", type=int, default=2, help="A B .. B A rounds (default 2)")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    path = results_path(args.out)
    command = "python -m suites.host_memory_scope " + " ".join(argv or sys.argv[1:])
    for r in range(args.rounds):
        order = args.modes if r % 2 == 0 else args.modes[::-1]
        for mode in [*order, *order[::-1]]:
            payload = {"mode": mode, "size": args.size, "tile": args.tile}
            payload["repeats"] = args.repeats
            key = f"{mode}|{args.size}|{args.tile}|{r}"
            row = fresh.row("suites.host_memory_scope", payload, key=key, command=command)
            append_row(path, row)
            status, metrics = row["status"], row["metrics"]
            t = metrics.get("time_s_median", float("nan"))
            rss = metrics.get("rss_delta_bytes", 0) / 2**20
            print(f"{key}: {status} {t:.2f} s, RSS +{rss:.0f} MiB", flush=True)
    print(write_summary(args.out).read_text())
    return 0


if __name__ == "__main__":
    if "--json" in sys.argv:
        sys.exit(fresh.child(measure))
    sys.exit(main())
