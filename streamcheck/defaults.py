"""What ``Streamed`` does for speed when it is not told: the settings a CPU run takes by default.

NOTE [ Fast defaults ]
Rule FD1. ``channels_last=None`` (the default) lays tiles out channels-last (NHWC, NDHWC) when they
          are 4-D or 5-D, the module computes on a CPU, and the compute dtype is a float other
          than float64: oneDNN's fast CPU convolutions work on that layout, and PyTorch converts
          every NCHW tile to it and back otherwise. float64 has no oneDNN kernels, so its tiles
          stay NCHW (as do CUDA tiles: cuDNN's choice there depends on the dtype and the GPU).
          An explicit ``True`` or ``False`` is obeyed. The layout changes which kernels run,
          not what any output element is (feed Rule F4).
Rule FD2. ``keep_host_memory=None`` (the default) applies ``keep_freed_host_memory()`` (host memory
          Rules H1-H3) once per process, when a call first streams on a CPU, unless the
          environment variable ``STREAMCHECK_KEEP_FREED_HOST_MEMORY`` is ``0``. Without it glibc
          unmaps every freed tile buffer of 32 MiB or more and the next tile faults it in again,
          4 KiB at a time. The setting is the whole process's (freed blocks below 1 GiB stay
          mapped for reuse, so resident memory stays at its high-water mark); ``False`` (or the
          variable) opts out; a setting once taken is never undone.
"""

from __future__ import annotations

import os

import torch

from .host_memory import keep_freed_host_memory

__all__ = ["ENV_KEEP_FREED", "channels_last_for", "keep_host_memory_for"]

ENV_KEEP_FREED = "STREAMCHECK_KEEP_FREED_HOST_MEMORY"
_kept = False  # Rule FD2: taken at most once per process


def channels_last_for(
    setting: bool | None, *, device: torch.device, dtype: torch.dtype | None
) -> bool:
    """Rule FD1: whether tiles are laid out channels-last.

    >>> cpu = torch.device("cpu")
    >>> channels_last_for(None, device=cpu, dtype=torch.float32)
    True
    >>> channels_last_for(None, device=cpu, dtype=torch.float64), channels_last_for(False, device=cpu, dtype=torch.float32)
    (False, False)
    """
    if setting is not None:
        return setting
    fast = dtype is None or (dtype.is_floating_point and dtype != torch.float64)  # None: autocast
    return device.type == "cpu" and fast


def keep_host_memory_for(setting: bool | None, *, device: torch.device) -> None:
    """Rule FD2: take ``keep_freed_host_memory()`` once, on the first CPU call that may."""
    global _kept
    if _kept or device.type != "cpu" or setting is False:
        return
    if setting is None and os.environ.get(ENV_KEEP_FREED, "1") == "0":
        return
    keep_freed_host_memory()
    _kept = True
