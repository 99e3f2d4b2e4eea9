"""What ``Streamed`` does for speed when it is not told: the settings a CPU run takes by default.

NOTE [ Fast defaults ]
Rule FD1. Tiles keep the image's memory layout unless ``channels_last=True`` (the default is
          ``False``): a channels-last image gives channels-last tiles, as PyTorch's own operators
          keep the layout of their input, and ``True`` lays every 4-D or 5-D tile out NHWC or
          NDHWC. No layout is imposed because the faster one depends on the CPU, its oneDNN
          kernels and the network: on the benchmark machine (2-core AVX2 AMD EPYC, torch 2.15,
          oneDNN 3.13), with freed memory kept, NCHW tiles trained the Figs 2-3 network in 2.8-3.7
          s per step against 4.9 s channels-last, and a ResNet-18 trunk in 14.2 s against 20.7 s,
          most of the difference in the convolution backward (reports/benchmark/SUMMARY.md, "Speed
          settings" and "Second network"), while an earlier host measured channels-last faster
          for the first. The layout changes which kernels run, not what any output element is
          (feed Rule F4).
Rule FD2. On a CPU each tile loop of a streamed call (forward's, backward's) runs inside
          ``host_memory_scope``: freed host memory is reused while its tiles run and handed back
          to the system when the loop ends (host memory Rules H3-H4), so no allocator setting
          outlives the call. Without it glibc unmaps every freed tile buffer of 32 MiB or more and
          the next tile faults it in again, 4 KiB at a time.
Rule FD2b. The scope keeps freed memory only when a tile computes a buffer at least as large as
          glibc's mmap threshold outside the scope (``thresholds_outside``: 32 MiB, where glibc's
          own adaptation ends, unless the process set it). Smaller buffers glibc already serves
          from its heap and reuses, so the scope would add only its exit's ``malloc_trim``, after
          which the next call faults the heap in again. Measured (2-core AMD EPYC, torch 2.15,
          float32, fresh processes, steps after a warm-up step): a ResNet-18 trunk at 768², tile
          544 (largest buffer 17 MiB), CPU s per step, A B B A: 32.3 and 30.1 with the scope
          against 26.9 and 27.5 without; the peak RSS of a step after a ``malloc_trim`` is about
          1 GB either way (reports/memory_estimate/). The Figs 2-3 network at 2048², tile 512
          (64 MiB buffers) takes 6.1 s with the scope against 16.6 s without (one thread).
Rule FD3. Whether the scope reuses memory is one process-level setting, ``host_memory_reuse()``:
          the last ``set_host_memory_reuse(True/False)`` (a call sets it; a ``with`` block sets
          it and restores the previous value on leaving, like ``torch.set_grad_enabled``), else
          the environment variable ``STREAMCHECK_REUSE_HOST_MEMORY`` (``1`` or ``0``), else on.
          A setting given to the scope itself (``True``/``False``) wins over it. Keeping freed
          memory for the whole process is the explicit opt-in ``keep_freed_host_memory()``.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType

import torch

from .errors import StreamcheckError
from .host_memory import reusing_freed_host_memory, thresholds_outside

__all__ = [
    "ENV_REUSE_HOST_MEMORY",
    "host_memory_reuse",
    "host_memory_scope",
    "set_host_memory_reuse",
]

ENV_REUSE_HOST_MEMORY = "STREAMCHECK_REUSE_HOST_MEMORY"
_reuse: bool | None = None  # Rule FD3: set_host_memory_reuse's value; None: the environment's


def host_memory_reuse() -> bool:
    """Rule FD3: whether streamed CPU calls reuse freed host memory while their tiles run.

    >>> host_memory_reuse()  # on, unless STREAMCHECK_REUSE_HOST_MEMORY=0 or set otherwise
    True
    """
    if _reuse is not None:
        return _reuse
    value = os.environ.get(ENV_REUSE_HOST_MEMORY, "1")
    if value not in ("0", "1"):
        raise StreamcheckError(
            f"streamcheck: {ENV_REUSE_HOST_MEMORY}={value!r} is neither 1 (reuse freed host "
            f"memory while tiles stream, the default) nor 0 (never). Fix: set it to 1 or 0, or "
            "unset it"
        )
    return value == "1"


class set_host_memory_reuse:  # lower case: used like a function, as torch.set_grad_enabled
    """Set Rule FD3's process-level setting; as a context manager, restore the previous value.

    ``None`` goes back to the environment variable's value (or the default).

    >>> with set_host_memory_reuse(False):   # inside: off
    ...     host_memory_reuse()
    False
    >>> host_memory_reuse()                  # after: the previous value again
    True
    """

    def __init__(self, enabled: bool | None) -> None:
        global _reuse
        if enabled not in (True, False, None):
            raise StreamcheckError(
                f"streamcheck: set_host_memory_reuse takes True, False or None, got {enabled!r}"
            )
        self._previous = _reuse
        _reuse = enabled

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        global _reuse
        _reuse = self._previous


def host_memory_scope(
    setting: bool | None, *, device: torch.device, largest_bytes: int
) -> AbstractContextManager[None]:
    """Rules FD2-FD2b: the context one tile loop on ``device`` runs in, whose largest tile buffer
    is ``largest_bytes``; ``setting`` None follows FD3.

    >>> import torch
    >>> with host_memory_scope(None, device=torch.device("cpu"), largest_bytes=2**26):
    ...     _ = [torch.ones(2**24) for _ in range(2)]  # two 64 MiB buffers in turn: reused
    """
    enabled = host_memory_reuse() if setting is None else setting
    if device.type != "cpu" or not enabled or largest_bytes < thresholds_outside()[0]:
        return nullcontext()
    return reusing_freed_host_memory()
