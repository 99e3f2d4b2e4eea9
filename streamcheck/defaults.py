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

__all__ = ["ENV_KEEP_FREED", "keep_host_memory_for"]

ENV_KEEP_FREED = "STREAMCHECK_KEEP_FREED_HOST_MEMORY"
_kept = False  # Rule FD2: taken at most once per process


def keep_host_memory_for(setting: bool | None, *, device: torch.device) -> None:
    """Rule FD2: take ``keep_freed_host_memory()`` once, on the first CPU call that may."""
    global _kept
    if _kept or device.type != "cpu" or setting is False:
        return
    if setting is None and os.environ.get(ENV_KEEP_FREED, "1") == "0":
        return
    keep_freed_host_memory()
    _kept = True
