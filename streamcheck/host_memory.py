"""Keeping freed host memory for reuse, so that streaming on a CPU does not fault every tile in.

NOTE [ Host memory ]
Rule H1. Streaming allocates buffers of the same sizes for every tile (a 64-channel 512² float32
         activation is 64 MiB). glibc serves allocations of 32 MiB and more by mapping fresh pages
         and unmaps them when they are freed, so by default every tile faults its buffers in again,
         4 KiB at a time: 3.7 million page faults in one 2048² training step at tile 512, most of
         its time (the benchmark's speed cases: reports/benchmark/SUMMARY.md, "Speed settings").
Rule H2. ``keep_freed_host_memory`` asks glibc (``mallopt``) to serve allocations below
         ``max_bytes`` from its heap and not to hand freed heap memory back to the system below
         ``max_bytes``, so later tiles reuse the pages earlier tiles faulted in. Resident memory
         then stays at its high-water mark instead of shrinking between tiles.
Rule H3. It is a setting of the whole process, taken only when asked for, and only with glibc;
         elsewhere it does nothing and returns False. Starting Python with
         ``MALLOC_MMAP_THRESHOLD_=<bytes> MALLOC_TRIM_THRESHOLD_=<bytes>`` does the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_host_memory"]

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_host_memory(*, max_bytes: int = 2**30) -> bool:
    """Make glibc reuse freed memory for allocations below ``max_bytes`` (Rules H1-H3).

    Returns True if glibc took both settings. Call it once, early; it changes the whole process.

    >>> import streamcheck
    >>> streamcheck.keep_freed_host_memory()  # on Linux with glibc; False elsewhere
    True
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    value = min(max_bytes, 2**31 - 1)  # mallopt takes an int
    took_mmap = mallopt(_M_MMAP_THRESHOLD, value) == 1
    took_trim = mallopt(_M_TRIM_THRESHOLD, value) == 1
    return took_mmap and took_trim
