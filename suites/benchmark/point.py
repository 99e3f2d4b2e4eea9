"""The measured body: one point, run in a fresh process.

    python -m suites.benchmark.point --json '{"name": "streamcheck", "input_px": 2048, ...}' \\
        --result row.json

Order inside the process (NOTE [ Memory meters ] in ``suites/meters.py``):

1. imports, threads, setup (network, image, wrapper): not measured;
2. on CPU, the address space is capped at (current size + ``mem_budget_bytes``) with
   ``RLIMIT_AS``, so a point that does not fit fails at its first big allocation with an
   exception (recorded as ``status="oom"``) instead of waking the kernel's OOM killer;
3. warm-up: the first warm-up step runs under ``torch.profiler`` -> ``peak_alloc_bytes`` (CPU
   allocator peak of live tensors); on CUDA ``max_memory_allocated`` over all steps instead;
4. freed memory is handed back and the peak-RSS mark reset, then the timed steps run inside an
   ``RssMeter`` -> ``peak_rss_bytes`` (raw VmHWM) and ``rss_delta_bytes`` (over the RSS just
   before them: input, weights and wrappers are in the baseline); each step is timed by
   ``StepTimer``: wall clock and process CPU time, and on CUDA the GPU's own clock (CUDA events),
   which is then the ``time_s_median``;
5. only then the conventional reference gradients of the same network and image (memory cap
   lifted; cached per size in ``grad_ref_dir``) -> ``grad_rel_error`` (vs conventional in the
   same dtype) and, up to ``grad_check_f64_max_px``, ``grad_rel_error_f64`` (vs conventional in
   float64, the exactness oracle; for the conventional row itself this is its own rounding
   error, the noise floor). The row is written before this step (``partial``), so a process
   killed here still leaves its measurements.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from suites import meters as memory

from ..environment import environment, load_1min
from .grid import Point

OOM_MESSAGES = ("can't allocate memory", "cannot allocate memory", "out of memory", "bad_alloc")


# oneDNN reports a failed allocation while building a convolution as this; counted as an OOM
# only inside an address-space cap.
CAPPED_OOM_MESSAGES = ("could not create a primitive",)


def is_oom(exc: BaseException, *, capped: bool = False) -> bool:
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    messages = OOM_MESSAGES + (CAPPED_OOM_MESSAGES if capped else ())
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in messages)


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmSize in /proc/self/status")


def _set_address_space_cap(budget_bytes: int | None) -> int | None:
    """Cap RLIMIT_AS at current size + budget; returns the cap (None where unsupported)."""
    if budget_bytes is None:
        return None
    try:
        cap = _vm_size_bytes() + budget_bytes
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (OSError, ValueError):
        return None
    return cap


def _lift_address_space_cap() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def _tf32_off() -> None:
    """fp32 convolutions and matmuls in full precision (the fp32_precision API where it exists)."""
    matmul = torch.backends.cuda.matmul
    conv: Any = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        matmul.fp32_precision = conv.fp32_precision = "ieee"
    else:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False


def machine_busy_s() -> float | None:
    """CPU seconds all processes on the machine have used since boot (``/proc/stat``)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def new_row(point: Point) -> dict[str, Any]:
    """The row of ``point`` before anything is measured: ``{name, key, status, reason, params,
    environment, metrics}`` (the results file's row shape, ``suites/rows.py`` Rule J1)."""
    return {
        "name": point.name,
        "key": point.key,
        "status": "error",
        "reason": None,
        "params": point.params(),
        "environment": None,
        "metrics": {},
    }


class StepTimer:
    """Times one step: wall clock and process CPU time; on CUDA also CUDA events (the GPU's own
    clock, from the first kernel queued to the last one finished)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.gpu: list[float] = []

    def __call__(self, step: Callable[[], None]) -> float:
        """Run ``step`` once, timed; returns the time the median is taken of (GPU time on CUDA)."""
        if self.cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
        cpu0, t0 = time.process_time(), time.perf_counter()
        step()  # the workload synchronizes before returning on CUDA
        self.wall.append(time.perf_counter() - t0)
        self.cpu.append(time.process_time() - cpu0)
        if not self.cuda:
            return self.wall[-1]
        end.record()
        end.synchronize()
        self.gpu.append(start.elapsed_time(end) / 1000.0)
        return self.gpu[-1]

    def metrics(self) -> dict[str, Any]:
        times = self.gpu if self.cuda else self.wall
        out = {
            "time_s_all": times,
            "time_s_median": statistics.median(times),
            "time_meter": "CUDA events" if self.cuda else "time.perf_counter (wall)",
            "wall_s_all": self.wall,
            "cpu_s_median": statistics.median(self.cpu),
            "repeats_done": len(times),
        }
        return out


def measure(
    point: Point, *, partial: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Measure ``point`` in this process; returns the result row (never raises for oom/error).

    ``partial(row)`` is called with the row as soon as memory and time are measured, before the
    reference gradients, so that a process killed there still leaves its measurements.
    """
    from . import workload

    threads = point.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    if point.device.startswith("cuda"):
        _tf32_off()
    dtype = getattr(torch, point.dtype)
    c = workload.case(point.name)
    row = new_row(point)
    m: dict[str, Any] = row["metrics"]
    cpu = not point.device.startswith("cuda")
    try:
        row["environment"] = environment(point.device)
        if c.kind == "lightstream":
            from . import peer

            row["environment"]["lightstream"] = peer.version()
        # Thread pool and profiler up (libraries loaded) before the address space is capped.
        memory.profiler_peak_bytes(
            lambda: torch.nn.functional.conv2d(torch.ones(1, 1, 8, 8), torch.ones(1, 1, 3, 3))
        )
        w = workload.build(
            point.name,
            input_px=point.input_px,
            tile_px=point.tile_px,
            device=point.device,
            dtype=dtype,
            seed=point.seed,
        )
        m.update(w.info)
        m["rss_setup_bytes"] = memory.current_rss_bytes()
        m["mem_cap_bytes"] = _set_address_space_cap(point.mem_budget_bytes) if cpu else None

        # 3. warm-up; the first one is the allocator measurement.
        cuda_base = 0 if cpu else torch.cuda.memory_allocated(point.device)
        warm_times = []
        for i in range(max(1, point.warmup)):
            t0 = time.perf_counter()
            if i > 0:
                w.step()
            elif cpu:
                m["peak_alloc_bytes"] = memory.profiler_peak_bytes(w.step)
                m["alloc_meter"] = "torch.profiler CPU allocator events (live tensors)"
            else:
                m["peak_alloc_bytes"] = memory.cuda_peak_bytes(w.step, device=point.device)
                m["alloc_meter"] = "torch.cuda.max_memory_allocated"
            warm_times.append(time.perf_counter() - t0)

        # 4. timed steps under the RSS meter; fewer of them when one step is slow.
        timer = StepTimer(point.device)
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        busy_before = machine_busy_s()
        with memory.RssMeter() as meter:
            n = point.repeats
            while len(timer.wall) < n:
                timer(w.step)
                if len(timer.wall) == 1:
                    n = max(1, min(point.repeats, math.floor(point.max_timing_s / timer.wall[0])))
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
        busy_after = machine_busy_s()
        if busy_before is not None and busy_after is not None:
            # The machine may be shared: how many cores other processes kept busy, on average,
            # while the timed steps ran (all CPU time on the machine minus this process's own).
            others = busy_after - busy_before - sum(timer.cpu)
            m["other_processes_cores_busy"] = round(max(0.0, others) / sum(timer.wall), 3)
        m["load_1min_after"] = load_1min()  # Rule E3 (suites/environment.py): before and after
        assert meter.reading is not None
        m.update(w.info)  # wrappers may learn their tiling during the first step
        if not cpu:
            peak_all_steps = torch.cuda.max_memory_allocated(point.device) - cuda_base
            m["peak_alloc_bytes"] = max(m["peak_alloc_bytes"], peak_all_steps)
        if c.compile:
            m["dynamo_unique_graphs"] = workload.dynamo_graphs()
        row["status"] = "ok"
        m.update(
            warmup_s=warm_times,
            **timer.metrics(),
            # CPU: every fresh buffer of 32 MiB or more is mapped anew and faulted in page by
            # page unless freed memory is kept (streamcheck/host_memory.py); per timed step.
            minor_page_faults_per_step=faults / len(timer.wall),
            peak_rss_bytes=meter.reading.peak_rss_bytes,
            rss_baseline_bytes=meter.reading.baseline_rss_bytes,
            rss_delta_bytes=meter.reading.delta_bytes,
            rss_peak_reset=meter.reading.reset,
            rss_meter="VmHWM of this fresh process (peak RSS), delta over the RSS before timing",
        )
    except Exception as exc:  # noqa: BLE001 -- every failure becomes a row
        if is_oom(exc, capped=m.get("mem_cap_bytes") is not None):
            row.update(status="oom", reason=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
        else:
            row.update(status="error", reason=traceback.format_exc()[-1500:])
        return row
    finally:
        if cpu:
            _lift_address_space_cap()

    if partial is not None:
        partial(row)

    # 5. gradient error vs conventional training (PyTorch defaults) of the same network and image.
    if point.input_px <= point.grad_check_max_px:
        try:
            network = w.network
            del w
            memory.release_free_memory()
            own = point.name == "conventional" or point.name == f"{c.network}_conventional"
            refs = reference_gradients(point, c.network, network if own else None)
            if not own:
                m["grad_rel_error"] = workload.max_relative_grad_error(network, refs[point.dtype])
            if "float64" in refs:
                m["grad_rel_error_f64"] = workload.max_relative_grad_error(network, refs["float64"])
            m["grad_ref"] = "conventional training (PyTorch defaults), same seed (network, image)"
        except Exception as exc:  # noqa: BLE001
            m["grad_ref"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    return row


def reference_gradients(
    point: Point, network: str, conventional: torch.nn.Module | None
) -> dict[str, dict[str, torch.Tensor]]:
    """Conventional parameter gradients in the point's dtype and in float64 (the oracle).

    Cached per (network, device, input, seed, loss) in ``point.grad_ref_dir`` so that each is
    computed once per sweep: the plain conventional point at each size (run first) writes it,
    passing its own gradients as the same-dtype reference.
    """
    from . import workload

    path = None
    if point.grad_ref_dir is not None:
        name = f"{network}-{point.device}-{point.input_px}px-seed{point.seed}-{point.loss}.pt"
        path = os.path.join(point.grad_ref_dir, name.replace(":", ""))
    wanted = {point.dtype} | (
        {"float64"} if point.input_px <= point.grad_check_f64_max_px else set()
    )
    if path is not None and os.path.exists(path):
        refs: dict[str, dict[str, torch.Tensor]] = torch.load(path)
        if wanted <= set(refs):
            return refs
    refs = {}
    if conventional is not None:
        refs[point.dtype] = {n: p.grad.detach().clone() for n, p in conventional.named_parameters()}
    for dtype in sorted(wanted - set(refs)):
        refs[dtype] = workload.reference_gradients(
            network=network,
            input_px=point.input_px,
            device=point.device,
            dtype=getattr(torch, dtype),
            seed=point.seed,
        )
        memory.release_free_memory()
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save({d: {n: g.cpu() for n, g in r.items()} for d, r in refs.items()}, tmp)
        os.replace(tmp, path)
    return refs


if __name__ == "__main__":
    from suites.fresh import child

    sys.exit(child(lambda payload, partial: measure(Point.from_dict(payload), partial=partial)))
