"""Stitched feature maps kept at cut points, so that later passes need not recompute the trunk.

NOTE [ Kept maps ]
Rule KM1. With ``Streamed(..., cache=HostCache(bytes=...))`` or ``DiskCache(path, bytes=...)`` the
          stitched map of a few cut points (graph Rule G16) is kept during one call: in host memory,
          or in a file-backed ``np.memmap`` in ``path``, in the dtype the tiles computed it in.
          The budget counts each map twice (the map and, in training, its gradient), in the
          plan's dtype, and holds per call: two calls alive at once (gradient accumulation
          before one backward) keep two sets.
Rule KM2. Forward: once the statistics of level l are known (plan Rule PL1), the map of each
          chosen cut that depends on no deeper statistics is made by a pass from the previous
          kept cut (or the image) and stitched into its kept map; every later pass starts at the
          latest kept cut before its targets and reads that map region by region, as a pass
          reads an image (one path: a pass's source is the image or a kept map).
Rule KM3. A pass of level j may start at cut c only if c comes before all its targets (its
          reductions' inputs, or the outputs) and c's map depends on statistics of levels < j;
          both hold for a prefix of the cut points, since along cut points levels never fall.
Rule KM4. Backward runs the passes in the reverse order of forward. A pass that read cut c adds
          its tiles' input gradients into c's gradient map; c's own pass then backpropagates the
          slices of that gradient its tiles own, as the output pass does with the output
          gradient. It runs after every pass that read c, and before the statistic pass whose
          values c depends on, since it sends gradients into them.
Rule KM5. The cuts minimise an estimate of the work under the budget, by dynamic programming along
          the chain of cut points: with the multiply-accumulates of the whole map per node
          (plan Rule PL3 without the halo), a pass from cut c costs the work of its targets'
          ancestors minus the work of c's (everything before c flows through c), and making the
          maps of cuts c_1 < ... < c_k costs the work of c_k's ancestors in all. A cut whose
          passes would not plan at the scaled tile (its receptive field from the cut is larger)
          is left out and the choice made again.
Rule KM6. Kept maps belong to the one call that made them: backward reads them after checking
          that the module is unchanged (streaming Rule K4), and releases them (files deleted) at
          its end. A second backward through the same forward, or a map read before its pass
          finished, is an error, never a read of stale values.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .errors import StreamcheckError, internal_error

__all__ = ["Cache", "DiskCache", "HostCache", "choose_cuts"]


@dataclass(frozen=True)
class HostCache:
    """Keep stitched maps in host memory, ``bytes`` at most per call (Rule KM1).

    >>> import torch.nn as nn, streamcheck
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
    ...                     nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))  # train mode
    >>> p = streamcheck.plan(net, (1, 3, 256, 256), tile=64, cache=streamcheck.HostCache(bytes=2**22))
    >>> [net_path for net_path in p.cut_paths], p.cache_bytes  # 2 * 8 * 256 * 256 * 4 bytes
    (['2'], 4194304)
    """

    bytes: int

    def __post_init__(self) -> None:
        _check_budget(self.bytes)


@dataclass(frozen=True)
class DiskCache:
    """Keep stitched maps in files under the directory ``path`` (``np.memmap``), ``bytes`` at most
    per call (Rule KM1); the files are deleted when the call's backward ends (Rule KM6)."""

    path: str | os.PathLike[str]
    bytes: int

    def __post_init__(self) -> None:
        _check_budget(self.bytes)
        if not Path(self.path).is_dir():
            raise StreamcheckError(
                f"streamcheck: DiskCache path {str(self.path)!r} is not a directory. Fix: create "
                "it (on a fast local disk) or give an existing one"
            )


Cache = HostCache | DiskCache


def _check_budget(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StreamcheckError(
            f"streamcheck: a cache budget is a number of bytes >= 0, got {value!r}. Fix: "
            "HostCache(bytes=8 * 2**30) for 8 GiB"
        )


class KeptMaps:
    """One call's kept maps and their gradients (Rules KM1, KM6)."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.maps: dict[int, torch.Tensor] = {}
        self.grads: dict[int, torch.Tensor] = {}
        self.complete: set[int] = set()
        self.files: list[IO[bytes]] = []
        self.released = False

    def writable(self, node: int, like: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """The map of ``node``, made on its pass's first tile in that tile's dtype."""
        if node not in self.maps:
            self.maps[node] = self._array(tuple(shape), like.dtype, pin=like.is_cuda)
        return self.maps[node]

    def finish(self, node: int) -> None:
        self.complete.add(node)

    def read(self, node: int) -> torch.Tensor:
        self._check_live()
        if node not in self.complete:
            raise internal_error(f"kept map of node {node} read before its pass finished")
        return self.maps[node]

    def gradient(self, node: int) -> torch.Tensor:
        """The gradient map of ``node``, zeros when first asked for (Rule KM4)."""
        self._check_live()
        if node not in self.grads:
            kept = self.read(node)
            self.grads[node] = self._array(tuple(kept.shape), kept.dtype, pin=False, zero=True)
        return self.grads[node]

    def release(self) -> None:
        self.maps.clear()
        self.grads.clear()
        for file in self.files:
            file.close()
        self.files.clear()
        self.released = True

    def _check_live(self) -> None:
        if self.released:
            raise StreamcheckError(
                "streamcheck: the maps this forward kept (cache=) were released by its first "
                "backward; a second backward through the same forward would read nothing. Fix: "
                "run forward again before each backward, or stream without cache="
            )

    def _array(
        self, shape: tuple[int, ...], dtype: torch.dtype, *, pin: bool, zero: bool = False
    ) -> torch.Tensor:
        if isinstance(self.cache, HostCache):
            if zero:
                return torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return torch.empty(shape, dtype=dtype, pin_memory=pin)
        try:
            np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        except TypeError as error:
            raise StreamcheckError(
                f"streamcheck: DiskCache keeps maps in NumPy dtypes; the maps are {dtype}. Fix: "
                "HostCache(bytes=...), or stream without autocast"
            ) from error
        file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed by release()
            dir=self.cache.path, prefix="streamcheck-", suffix=".kept"
        )
        self.files.append(file)
        array = np.memmap(file, dtype=np_dtype, mode="w+", shape=shape)  # a new file reads zeros
        return torch.from_numpy(array)


@dataclass(frozen=True)
class Candidate:
    """A cut point, for the choice of Rule KM5."""

    node: int
    level: int  # the deepest statistic level its map depends on
    bytes: int  # its map and gradient
    macs: int  # the work of its ancestors, itself included


@dataclass(frozen=True)
class Target:
    """A tile pass, for the choice of Rule KM5."""

    level: int  # its statistic level (the output pass: one more than the deepest)
    first: int  # its first target node
    macs: int  # the work of its targets' ancestors


def choose_cuts(
    candidates: Sequence[Candidate], passes: Sequence[Target], *, budget: int
) -> tuple[int, ...]:
    """The candidates (positions) that minimise the estimated work within ``budget`` (Rule KM5).

    >>> a, b = Candidate(3, 0, bytes=100, macs=50), Candidate(7, 1, bytes=10, macs=80)
    >>> passes = [Target(1, 5, macs=60), Target(2, 9, macs=100), Target(3, 9, macs=100)]
    >>> choose_cuts([a, b], passes, budget=10)    # b serves two passes: 260 -> 260 - 160 + 80
    (1,)
    >>> choose_cuts([a, b], passes, budget=110)   # 260 - 50 - 160 + 80 = 130
    (0, 1)
    >>> choose_cuts([a, b], passes, budget=9)
    ()
    """
    allowed = []  # per pass, the last candidate it may start at (Rule KM3): a prefix
    for p in passes:
        fits = [k for k, c in enumerate(candidates) if c.node < p.first and c.level < p.level]
        if fits != list(range(len(fits))):
            raise internal_error("cut points whose levels fall along the chain")
        allowed.append(len(fits) - 1)

    def work(source: int) -> int:
        return candidates[source].macs if source >= 0 else 0

    # per current source: (bytes, gain, chosen), Pareto-optimal in bytes and gain
    states: dict[int, list[tuple[int, int, tuple[int, ...]]]] = {-1: [(0, 0, ())]}
    served = {k: sum(1 for a in allowed if a == k) for k in range(-1, len(candidates))}
    states = _serve(states, served[-1], work)
    for k, candidate in enumerate(candidates[: max(allowed, default=-1) + 1]):
        grown: dict[int, list[tuple[int, int, tuple[int, ...]]]] = {}
        for source, front in states.items():
            for used, gain, chosen in front:
                grown.setdefault(source, []).append((used, gain, chosen))
                if used + candidate.bytes <= budget:
                    grown.setdefault(k, []).append((used + candidate.bytes, gain, (*chosen, k)))
        states = _serve(grown, served[k], work)
    best = min(
        (work(source) - gain, used, len(chosen), chosen)
        for source, front in states.items()
        for used, gain, chosen in front
    )
    return best[3]


def _serve(
    states: dict[int, list[tuple[int, int, tuple[int, ...]]]], count: int, work: Any
) -> dict[int, list[tuple[int, int, tuple[int, ...]]]]:
    """Credit ``count`` passes to each state's source, then keep each source's Pareto front."""
    kept: dict[int, list[tuple[int, int, tuple[int, ...]]]] = {}
    for source, front in states.items():
        best = -1
        for used, gain, chosen in sorted(front, key=lambda s: (s[0], -s[1], len(s[2]))):
            gain += count * work(source)
            if gain > best:
                kept.setdefault(source, []).append((used, gain, chosen))
                best = gain
    return kept
