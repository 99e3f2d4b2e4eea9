"""Memory meters of the suites: what code costs in bytes, measured three ways never confused.

Three meters, each named by what it counts (see the NOTE below):

- :func:`profiler_peak_bytes` -- CPU *allocator* peak: the highest running sum of the allocation and
  free events that ``torch.profiler`` (``profile_memory=True``) records while a callable runs. Live
  tensors only, relative to the start (tensors that already existed are not counted).
- :class:`RssMeter` / :func:`peak_rss_bytes` -- *process* peak resident set size (``VmHWM``):
  everything the process touched, tensors, allocator caches, libraries. Honest only in a fresh
  process, so report the raw peak and the delta over a baseline taken after imports and setup.
- :func:`cuda_peak_bytes` -- CUDA *allocator* peak (``torch.cuda.max_memory_allocated``) over a
  baseline, after ``reset_peak_memory_stats``.

NOTE [ Memory meters ]
  Rule 1. A number is reported together with the meter that produced it (``peak_alloc_bytes`` is an
          allocator figure, ``peak_rss_bytes`` a process figure); they are never compared directly.
  Rule 2. Allocator meters count bytes *allocated during* the measured call; a tensor created before
          it (the input image, the weights) is not counted, one freed during it is subtracted.
  Rule 3. Peak RSS is a high-water mark of the whole process lifetime. Linux lets a process
          reset it (``/proc/self/clear_refs`` <- ``5``); :meth:`RssMeter.__enter__` does so when it
          can and otherwise falls back to the lifetime peak (``reset=False`` in the reading).
  Rule 4. On Linux the peak is read from ``VmHWM`` in ``/proc/self/status``, not from
          ``getrusage(RUSAGE_SELF).ru_maxrss``: the kernel carries ``ru_maxrss`` across fork and
          execve, so a fresh child of a 1 GB parent reports a >= 1 GB ``ru_maxrss`` before it
          allocates anything (measured here), and ``clear_refs`` does not reset that carried value.

Only torch and the standard library are used. No engine module imports these meters: they are the
benchmarks' (``python -m suites.meters`` is a fresh-process child, ``suites/fresh.py``, that
measures the peak RSS of a snippet).

Example (a 4 MiB tensor, allocated and freed inside the measured call):

>>> import torch
>>> nbytes = profiler_peak_bytes(lambda: torch.ones(1024, 1024))  # 4 MiB = 1024 * 1024 * 4 bytes
>>> nbytes
4194304
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = [
    "RssMeter",
    "RssReading",
    "cuda_peak_bytes",
    "current_rss_bytes",
    "peak_from_events",
    "peak_rss_bytes",
    "profiler_peak_bytes",
    "release_free_memory",
    "reset_peak_rss",
]


# ------------------------------------------------------------- allocator meter (torch.profiler)


def peak_from_events(events: Iterable[tuple[int, int]]) -> int:
    """Peak of the running sum of ``(time_ns, nbytes)`` allocation events (frees are negative).

    The events are sorted by time first; the running sum starts at 0 and the peak is never negative.

    >>> peak_from_events([(0, 64), (1, 32), (2, -64), (3, 16), (4, -48)])  # 64 + 32 live at t=1
    96
    """
    running = peak = 0
    for _, nbytes in sorted(events):
        running += nbytes
        peak = max(peak, running)
    return peak


def profiler_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of live CPU tensors allocated while ``fn()`` runs (torch.profiler events).

    See NOTE [ Memory meters ] Rules 1-2: an allocator figure, relative to the start of the call.
    """
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        # "allocated before the profiling started" and the like: Rule 2 intends exactly that.
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    return peak_from_events(_cpu_memory_events(prof))


def _cpu_memory_events(prof: Any) -> list[tuple[int, int]]:
    """The ``[memory]`` events of a finished profiler run, as ``(start_ns, nbytes)`` on the CPU."""
    events = prof.profiler.kineto_results.events()
    cpu = torch.autograd.DeviceType.CPU
    return [
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == cpu
    ]


# ------------------------------------------------------------------------ process meter (peak RSS)


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (Linux ``VmHWM``; else ``ru_maxrss``).

    See NOTE [ Memory meters ] Rule 4 for why not ``ru_maxrss`` on Linux.
    """
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def current_rss_bytes() -> int:
    """This process's resident set size now, in bytes (Linux ``VmRSS``; else the peak RSS)."""
    rss = _proc_status_bytes("VmRSS")
    return peak_rss_bytes() if rss is None else rss


def reset_peak_rss() -> bool:
    """Reset the peak-RSS high-water mark to the current RSS (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``) if possible.

    Makes a following RSS baseline reflect live data rather than allocator caches.
    """
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    try:
        libc = ctypes.CDLL(libc_name)
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@dataclass(frozen=True)
class RssReading:
    """Peak RSS of a measured block (NOTE [ Memory meters ] Rule 3).

    ``peak_rss_bytes`` is the raw high-water mark (of the block if ``reset``, else of the
    process lifetime); ``baseline_rss_bytes`` the RSS when the block started; ``delta_bytes``
    their difference.
    """

    peak_rss_bytes: int
    baseline_rss_bytes: int
    reset: bool

    @property
    def delta_bytes(self) -> int:
        return max(0, self.peak_rss_bytes - self.baseline_rss_bytes)


class RssMeter:
    """Context manager measuring the peak RSS of its block over the RSS when it was entered.

    Use it in a fresh process (Rule 3): after imports and setup, enter; run the workload; read
    ``meter.reading``.

    >>> with RssMeter() as meter:
    ...     x = bytearray(8 * 2**20)  # 8 MiB, touched
    >>> meter.reading.delta_bytes >= 0
    True
    """

    def __init__(self, *, release: bool = True) -> None:
        self._release = release
        self._baseline = 0
        self._reset = False
        self.reading: RssReading | None = None

    def __enter__(self) -> RssMeter:
        if self._release:
            release_free_memory()
        self._reset = reset_peak_rss()
        self._baseline = current_rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        self.reading = RssReading(
            peak_rss_bytes=peak_rss_bytes(), baseline_rss_bytes=self._baseline, reset=self._reset
        )


# ------------------------------------------------------------------------ CUDA allocator meter


def cuda_peak_bytes(fn: Callable[[], Any], *, device: torch.device | str | None = None) -> int:
    """Peak bytes the CUDA caching allocator had allocated during ``fn()``, over what was allocated
    before it (``reset_peak_memory_stats`` / ``max_memory_allocated``; Rules 1-2)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - baseline)


def _snippet_rss(payload: dict[str, Any], _: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Peak RSS of ``payload["code"]`` over a baseline taken after ``payload["setup"]`` (run first,
    not measured; one namespace for both)."""
    namespace: dict[str, Any] = {}
    exec(payload["setup"], namespace)
    with RssMeter() as meter:
        exec(payload["code"], namespace)
    assert meter.reading is not None
    return {**asdict(meter.reading), "delta_bytes": meter.reading.delta_bytes}


if __name__ == "__main__":
    from suites.fresh import child

    sys.exit(child(_snippet_rss))
