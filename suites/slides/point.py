"""One measurement in a fresh process: stream a slide, record peak RSS and time per step.

``python -m suites.slides.point --json '{"path": ..., "kind": "disk", "tile": 2048, "reps": 3}'
--result FILE`` (``suites/fresh.py``) writes one JSON object. Kinds: ``disk`` (an image source on the TIFF, read tile by tile), ``memory`` (the
level read whole into a uint8 tensor during setup, then streamed), ``file_memory`` (both, in the
same process, interleaved as below), ``paired`` (the source unmasked and with the tissue mask of
the thumbnail level, in the same process, interleaved A B B A ..., so that a change of the shared
machine's load falls on both sides alike). A step is forward, head, loss and backward (mode ``train``) or forward and head
without gradients (mode ``infer``). Times are wall-clock and process CPU seconds (all threads).
Peak RSS is taken with ``suites.meters.RssMeter`` around the measured steps, after setup and
a warm-up step (NOTE [ Memory meters ] Rule 3): the raw peak and the delta over that baseline.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def network() -> tuple[nn.Module, nn.Module]:
    """A small trunk (total stride 32, 8 channels out) and a classification head."""
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Conv2d(3, 8, 4, stride=4),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )
    head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    return trunk, head


def normalise(t: torch.Tensor) -> torch.Tensor:
    return (t.float() / 255 - 0.5) / 0.25


def measure(
    path: str,
    kind: str,
    tile: int,
    reps: int,
    mode: str,
    threads: int = 0,
    decode_threads: int = 1,
    cache_mib: int = 0,
) -> dict[str, Any]:
    import tifffile

    if threads:
        torch.set_num_threads(threads)
    import streamcheck
    from suites.meters import RssMeter

    trunk, head = network()
    streamed = streamcheck.Streamed(trunk, tile=tile, tile_transform=normalise)
    source = streamcheck.open_image(
        path, decode_threads=decode_threads, cache_bytes=cache_mib * 2**20
    )

    def step(x: Any, m: Any = None) -> None:
        if mode == "infer":  # forward only, as when scoring a slide
            with torch.no_grad():
                head(streamed(x, mask=m))
            return
        features = streamed(x, mask=m)
        loss = nn.functional.cross_entropy(head(features), torch.tensor([1]))
        loss.backward()

    def read_whole() -> torch.Tensor:
        pixels = torch.from_numpy(tifffile.imread(path, level=0))
        return pixels.permute(2, 0, 1)[None].contiguous()

    source[:, :, 0:1, 0:1]  # the first read imports tifffile and zarr: part of setup
    warm = torch.randint(0, 256, (1, 3, 2 * tile, 2 * tile), dtype=torch.uint8)
    step(warm)  # warm-up: kernels, allocator, threads
    plan = streamed.plan(source.shape)  # planned here, not in the first measured step
    if kind == "paired":  # background skipping
        mask = streamcheck.tissue_mask(streamcheck.open_image(path, level=-1))
        sides = {"unmasked": lambda: step(source), "masked": lambda: step(source, mask)}
        return _paired(sides, reps) | _tiles(streamed, source, plan, mask)
    if kind == "file_memory":  # the same pixels from the file and from a tensor
        image = read_whole()
        counts = {"cache_hits": 0, "tiles_decoded": 0}

        def from_file() -> None:
            # as a new slide each step: the file opened again, no decoded tile kept from the last
            source.close()
            step(source)
            cache = source._cache  # tiles served from the cache / decoded (Rule SF4)
            counts["cache_hits"] += cache.hits
            counts["tiles_decoded"] += cache.decoded

        sides = {"file": from_file, "memory": lambda: step(image)}
        return _paired(sides, reps) | {"tiles": plan.n_tiles, "nice": os.nice(0), **counts}
    if kind not in ("disk", "memory"):
        raise ValueError(f"unknown kind {kind!r}")
    image = read_whole() if kind == "memory" else source
    times = []
    with RssMeter() as meter:
        for _ in range(reps):
            start = time.perf_counter()
            step(image)
            times.append(time.perf_counter() - start)
    reading = meter.reading
    assert reading is not None
    megapixels = source.height * source.width / 1e6
    median = statistics.median(times)
    return {
        "peak_rss_bytes": reading.peak_rss_bytes,
        "baseline_rss_bytes": reading.baseline_rss_bytes,
        "delta_rss_bytes": reading.delta_bytes,
        "rss_reset": reading.reset,
        "step_s": times,
        "median_step_s": median,
        "s_per_megapixel": median / megapixels,
        "megapixels": megapixels,
        "tiles": plan.n_tiles,
        "nice": os.nice(0),
    }


def _tiles(streamed: Any, source: Any, plan: Any, mask: Any) -> dict[str, Any]:
    region = streamed.computed_region(source, mask=mask)
    computed = sum(
        bool(region[0, 0][tuple(slice(a, b) for a, b in t.output_box)].any()) for t in plan.tiles
    )
    return {
        "tiles": plan.n_tiles,
        "tiles_computed": computed,
        "tissue_in_mask": float(mask.mean()),
        "nice": os.nice(0),
    }


def _paired(sides: dict[str, Callable[[], None]], reps: int) -> dict[str, Any]:
    """Two kinds of step interleaved A B B A A B ... (each ``reps`` times, after one warm-up step
    each); the ratio first / second is the median of the per-pair ratios, in wall and CPU time,
    and the ratio of the least CPU times (load only ever adds to a time)."""
    names = list(sides)
    for run in sides.values():
        run()  # warm-up of both paths on the slide
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[:: 1 if rep % 2 == 0 else -1]:
            wall, proc = time.perf_counter(), time.process_time()
            sides[name]()
            times[name].append(time.perf_counter() - wall)
            cpu[name].append(time.process_time() - proc)
    first, second = names
    return {
        "step_s": times,
        "cpu_s": cpu,
        "median_step_s": {k: statistics.median(v) for k, v in times.items()},
        "speedup_wall": statistics.median(a / b for a, b in zip(*times.values(), strict=True)),
        "speedup_cpu": statistics.median(a / b for a, b in zip(*cpu.values(), strict=True)),
        "speedup_cpu_min": min(cpu[first]) / min(cpu[second]),
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    from suites.fresh import child

    options = ("path", "kind", "tile", "reps", "mode")
    tuning = ("threads", "decode_threads", "cache_mib")
    sys.exit(
        child(lambda a, _: measure(*(a[k] for k in options), **{k: a[k] for k in tuning if k in a}))
    )
