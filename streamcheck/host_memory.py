"""Reusing freed host memory while tiles stream on a CPU, and handing it back when they are done.

NOTE [ Host memory ]
Rule H1. Streaming allocates buffers of the same sizes for every tile (a 64-channel 512² float32
         activation is 64 MiB). glibc serves allocations of 32 MiB and more by mapping fresh pages
         and unmaps them when they are freed, so by default every tile faults its buffers in again,
         4 KiB at a time: 3.7 million page faults in one 2048² training step at tile 512, most of
         its time (the benchmark's speed cases: reports/benchmark/SUMMARY.md, "Speed settings").
Rule H2. Kept freed memory: glibc (``mallopt``) serves allocations below 1 GiB from its heap and
         hands freed heap memory back to the system only above 1 GiB, so later tiles reuse the
         pages earlier tiles faulted in; resident memory stays at its high-water mark meanwhile.
Rule H3. ``reusing_freed_host_memory()`` keeps freed memory (Rule H2) for the duration of a
         ``with`` block, then sets the thresholds back (Rule H4) and calls ``malloc_trim(0)``, which
         hands every free page of the heap back to the system: nothing of it outlives the block.
         Blocks nest and may run in several threads at once: the first to enter takes the
         settings, the last to leave undoes them (a count under a lock).
Rule H4. What "back" is. glibc has no getter for its thresholds, and any ``mallopt`` ends its
         own adaptation (by default it raises the mmap threshold to the size of each freed mapped
         buffer up to 32 MiB, with the trim threshold at twice that). So the block restores, in
         this order of precedence: the values ``keep_freed_host_memory`` took for the process;
         those the process started with (``GLIBC_TUNABLES`` glibc.malloc.mmap_threshold /
         trim_threshold, or ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``; glibc's
         128 KiB for one not given); else 32 MiB and 64 MiB, where glibc's adaptation ends.
Rule H5. ``keep_freed_host_memory()`` takes Rule H2's settings for the whole process, for good:
         an explicit opt-in, never taken by the engine itself; blocks then restore its values.
Rule H6. Only glibc on Linux has these settings; elsewhere both do nothing (and the function
         returns False).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["keep_freed_host_memory", "reusing_freed_host_memory"]

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEPT_BYTES = 2**30  # Rule H2
_GLIBC_INITIAL = 128 * 1024  # DEFAULT_MMAP_THRESHOLD_MIN and DEFAULT_TRIM_THRESHOLD
_GLIBC_ADAPTED = (32 * 2**20, 64 * 2**20)  # Rule H4: where glibc's own adaptation ends

_lock = threading.Lock()
_depth = 0  # Rule H3: blocks entered and not yet left, over all threads
_process_wide: tuple[int, int] | None = None  # Rule H5: what keep_freed_host_memory took


def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None  # Rule H6
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def _set_thresholds(libc: ctypes.CDLL, mmap_bytes: int, trim_bytes: int) -> bool:
    took_mmap = libc.mallopt(_M_MMAP_THRESHOLD, min(mmap_bytes, 2**31 - 1)) == 1  # takes an int
    took_trim = libc.mallopt(_M_TRIM_THRESHOLD, min(trim_bytes, 2**31 - 1)) == 1
    return took_mmap and took_trim


def thresholds_outside() -> tuple[int, int]:
    """Rule H4: the (mmap, trim) thresholds in bytes that hold outside any block.

    >>> mmap_bytes, trim_bytes = thresholds_outside()  # 32 MiB, 64 MiB unless the process set them
    """
    if _process_wide is not None:
        return _process_wide
    tunables = dict(
        item.split("=", 1)
        for item in os.environ.get("GLIBC_TUNABLES", "").split(":")
        if item.count("=") == 1
    )
    given = [
        tunables.get(f"glibc.malloc.{name}_threshold") or os.environ.get(f"MALLOC_{alias}_")
        for name, alias in (("mmap", "MMAP_THRESHOLD"), ("trim", "TRIM_THRESHOLD"))
    ]
    if not any(given):
        return _GLIBC_ADAPTED
    mmap_bytes, trim_bytes = (int(v, 0) if v else _GLIBC_INITIAL for v in given)
    return mmap_bytes, trim_bytes


@contextmanager
def reusing_freed_host_memory() -> Iterator[None]:
    """Keep freed host memory for reuse inside the block, hand it back after (Rules H3-H4).

    >>> import torch
    >>> with reusing_freed_host_memory():   # two 64 MiB buffers in turn: the second reuses the
    ...     for _ in range(2):              # first one's pages instead of faulting in new ones
    ...         _ = torch.ones(2**24)       # 64 MiB = 2**24 float32
    """
    global _depth
    libc = _libc()
    if libc is None:  # Rule H6
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _set_thresholds(libc, _KEPT_BYTES, _KEPT_BYTES)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set_thresholds(libc, *thresholds_outside())
                libc.malloc_trim(0)


def keep_freed_host_memory(*, max_bytes: int = _KEPT_BYTES) -> bool:
    """Make glibc reuse freed memory below ``max_bytes`` for the rest of the process (Rules H2, H5).

    Returns True if glibc took both settings. An explicit opt-in: the engine never calls it, and
    no block of ``reusing_freed_host_memory`` undoes it.

    >>> import streamcheck
    >>> streamcheck.keep_freed_host_memory()  # on Linux with glibc; False elsewhere
    True
    """
    global _process_wide
    libc = _libc()
    if libc is None:
        return False
    with _lock:
        _process_wide = (max_bytes, max_bytes)
        return _set_thresholds(libc, *_process_wide)
