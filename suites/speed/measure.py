"""Configurations measured in this (fresh) process; prints one JSON result line for each.

``python -m suites.speed.measure '[<config as JSON>, ...]'`` -- run by ``python -m suites.speed``
with one process per timed configuration, so that a compiled graph, the allocator and peak RSS of
one never leak into another (the float64 checks share one process).

The measured body is ``step``: zero the gradients, forward, ``output.sum().backward()``. Setup
(network, image, memory format, compilation) is done before; the first call is a warm-up (it also
compiles), then ``repeats`` calls are timed (``time.perf_counter``) at an explicit thread count
(``torch.set_num_threads``), and the median is reported, with the process CPU time of the same runs (all threads): on a shared
machine the wall time also measures the neighbours' load, the CPU time much less so.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from streamcheck.testing import relative_error

from ..benchmark.workload import paper_network
from ..environment import cpu_name, git_commit

METHODS = ("conventional", "streamcheck")
# contiguous: as is. channels_last: the user moves the network and the image to channels-last.
# channels_last_tiles: both stay contiguous and ``Streamed(..., channels_last=True)`` lays out the
# tiles (streamcheck only).
MEMORY_FORMATS = ("contiguous", "channels_last", "channels_last_tiles")
# off: eager. module: torch.compile(network), the usual way. in_place: network.compile(), which
# keeps the module (and its submodules) as they are for code that inspects them, as the engine does.
COMPILES = ("off", "module", "in_place")
F64_RTOL = 1e-10


@dataclass(frozen=True)
class Config:
    """What to measure. ``kind`` 'time' times a training step; 'exactness' checks float64 results."""

    kind: str
    method: str = "streamcheck"
    memory_format: str = "contiguous"
    compile: str = "off"
    input_px: int = 2048
    tile_px: int = 512
    repeats: int = 3
    threads: int = 2
    seed: int = 0
    # How the process's host memory is set up; one of ALLOCATORS (environment variables).
    allocator: str = "default"

    @property
    def name(self) -> str:
        what = "exact_float64" if self.kind == "exactness" else "time_forward_backward"
        alloc = "" if self.allocator == "default" else f"_alloc-{self.allocator}"
        return f"{what}_{self.method}_{self.memory_format}_compile-{self.compile}{alloc}"

    def environment_variables(self) -> dict[str, str]:
        return ALLOCATORS[self.allocator]


# Every tile allocates fresh buffers of the same sizes (a 64-channel 512^2 activation is 64 MiB).
# glibc maps each allocation over 32 MiB anew and unmaps it on free, so by default every tile
# faults its buffers in again, 4 KiB page by page.
# keep_freed: the process first calls streamcheck.keep_freed_host_memory(): glibc serves
#   allocations below 1 GiB from its heap and keeps freed memory, so later tiles reuse the pages
#   earlier tiles faulted in (streamcheck/host_memory.py).
# huge_pages: the process runs with THP_MEM_ALLOC_ENABLE=1: PyTorch asks Linux for transparent
#   huge pages (madvise) for large CPU allocations: 2 MiB pages, 512x fewer faults, but still a
#   fresh mapping per buffer.
# The environment variables each setting needs:
ALLOCATORS: dict[str, dict[str, str]] = {
    "default": {},
    "keep_freed": {},
    "huge_pages": {"THP_MEM_ALLOC_ENABLE": "1"},
}


def memory_format(name: str) -> torch.memory_format:
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def build(
    config: Config, *, dtype: torch.dtype
) -> tuple[nn.Module, nn.Module, torch.Tensor, dict[str, Any]]:
    """(network, model to run, image, info): the model is the network, streamed and/or compiled."""
    torch.manual_seed(config.seed)
    fmt = memory_format(config.memory_format)
    network = paper_network().to(dtype=dtype, memory_format=fmt)
    generator = torch.Generator().manual_seed(config.seed + 1)
    image = torch.randn(1, 3, config.input_px, config.input_px, generator=generator, dtype=dtype)
    image = image.to(memory_format=fmt)
    info: dict[str, Any] = {}
    model: nn.Module = network
    if config.compile == "module":
        model = torch.compile(network)  # type: ignore[assignment]
    elif config.compile == "in_place":
        network.compile()
    if config.method == "streamcheck":
        import streamcheck

        tiles_last = config.memory_format == "channels_last_tiles"
        model = streamcheck.Streamed(model, tile=config.tile_px, channels_last=tiles_last)
        info["n_tiles"] = model.plan(image.shape, dtype=dtype).n_tiles
    return network, model, image, info


def time_step(config: Config) -> dict[str, Any]:
    kept = None
    if config.allocator == "keep_freed":
        import streamcheck

        kept = streamcheck.keep_freed_host_memory()
    network, model, image, info = build(config, dtype=torch.float32)
    info["keep_freed_host_memory"] = kept

    def step() -> None:
        for p in network.parameters():
            p.grad = None
        model(image).sum().backward()

    started = time.perf_counter()
    step()  # warm-up; compiles where asked
    info["warmup_s"] = time.perf_counter() - started
    # perf_counter, not torch.utils.benchmark.Timer: Timer.timeit(1) runs two more warm-up steps
    # before each measured one, which triples the run time of a 10-second step.
    times, cpu_times, faults = [], [], []
    for _ in range(config.repeats):
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cpu_started, started = time.process_time(), time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
        cpu_times.append(
            time.process_time() - cpu_started
        )  # all threads; less hurt by others' load
    info["output_memory_format"] = describe_format(model(image))
    return {
        "median_s": statistics.median(times),
        "times_s": times,
        "median_cpu_s": statistics.median(cpu_times),
        "cpu_times_s": cpu_times,
        "median_minor_page_faults": statistics.median(faults),
        **info,
        **compiled(config),
    }


def compiled(config: Config) -> dict[str, Any]:
    """How many graphs dynamo compiled: 0 means the compiled code was bypassed."""
    if config.compile == "off":
        return {}
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    counters.clear()  # the next configuration in this process counts from zero
    return {"dynamo_unique_graphs": graphs}


def describe_format(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return "contiguous"
    return "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else "strided"


def exactness(config: Config) -> dict[str, Any]:
    """Streamed ``config.memory_format`` against the plain contiguous network, float64."""
    network, model, image, info = build(config, dtype=torch.float64)
    reference = paper_network().double()
    reference.load_state_dict(network.state_dict())  # same weights, contiguous
    plain_image = image.contiguous()

    def run(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.detach().requires_grad_()
        y = module(x)
        upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
        params = list(module.parameters())
        return [y.detach(), *torch.autograd.grad(y, [x, *params], upstream)]

    names = ["output", "input", *(n for n, _ in reference.named_parameters())]
    errors = dict(
        zip(names, map(relative_error, run(model, image), run(reference, plain_image)), strict=True)
    )
    worst = max(errors.values())
    info |= compiled(config)
    return {"max_relative_error": worst, "errors": errors, "rtol": F64_RTOL, **info}


def environment(config: Config) -> dict[str, Any]:
    import streamcheck

    return {
        "python": platform.python_version(),
        "pytorch_version": torch.__version__,
        "streamcheck_version": streamcheck.__version__,
        "git_commit": git_commit("streamcheck", "suites/speed"),
        "device": "cpu",
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "allocator_environment": {
            k: os.environ[k] for env in ALLOCATORS.values() for k in env if k in os.environ
        },
        "transparent_hugepage": _transparent_hugepage_mode(),
        "platform": platform.platform(),
    }


def _transparent_hugepage_mode() -> str | None:
    """The kernel's THP mode, the bracketed word of e.g. ``always [madvise] never``."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()


def measure(config: Config) -> dict[str, Any]:
    torch.set_num_threads(config.threads)
    body: Callable[[Config], dict[str, Any]] = time_step if config.kind == "time" else exactness
    load_before = os.getloadavg()[0]
    started = time.time()
    try:
        metrics, status, note = body(config), "ok", None
    except Exception as error:  # recorded: "does the engine accept a compiled module?" is a result
        metrics, status = {}, "error"
        note = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    if config.kind == "exactness" and status == "ok" and metrics["max_relative_error"] > F64_RTOL:
        status = "inexact"
    metrics["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "name": config.name,
        "config": asdict(config),
        "status": status,
        "note": note,
        "metrics": metrics,
        "environ": environment(config),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": time.time() - started,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure the configurations given as a JSON list, in order; one JSON line each."""
    args = sys.argv[1:] if argv is None else argv
    for fields in json.loads(args[0]):
        print(json.dumps(measure(Config(**fields))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
