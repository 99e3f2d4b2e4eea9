"""Stitched feature maps kept at cut points, so that later passes need not recompute the trunk.

NOTE [ Kept maps ]
Rule KM1. With ``Streamed(..., cache=HostCache(bytes=...))`` or ``DiskCache(path, bytes=...)`` the
          stitched map of a few cut points (graph Rule G16) is kept during one call: in host memory,
          or in a file-backed ``np.memmap`` in ``path``, in the dtype the tiles computed it in
          (its gradient in float32 at least). The budget counts each map twice (the map and, in
          training, its gradient), in the plan's dtype, and holds per call: two calls alive at
          once (gradient accumulation before one backward) keep two sets.
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
Rule KM7. Precision: a map is kept in the wider of the plan's dtype (the module's parameters')
          and the dtype its tiles are computed in, its gradient in float32 at least (overlapping
          tiles add into it). So under autocast a map computed in autocast's dtype is widened
          when kept and narrowed back to that dtype when read: both exact, so a pass from the cut
          reads the values it would have computed. With ``keep_autocast_dtype=True`` such a map
          is kept in autocast's dtype instead (half the bytes of float32, nothing lost); a map
          computed in float32 stays in float32 whatever the option says, since rounding it would
          change the numbers. The dtype each map is computed in is found before any work, by
          running the module's graph on fake tensors (shapes and dtypes: no memory, no
          arithmetic) under the call's autocast, statistics in the dtype the engine finalizes
          them in; the plan counts each map in its dtype and names it. If the trace fails, the
          plan's dtype is assumed, and a tile that the kept map cannot hold exactly is an error,
          never a rounded map.
Rule KM8. Placement: maps and gradients live in pageable host memory (or their files), also when
          the module runs on a GPU; the device holds only the tiles. A tile read from a map, and
          a slice of its gradient that the cut's own pass reads in backward, reach the device as
          image tiles do (feed Rule F2: gathered into pinned staging, copied on a side stream one
          tile ahead); a tile written into a map, forward's stitched tile or backward's input
          gradient, leaves it by feed Rule F7 (copied into pinned staging on a side stream,
          written into the map one tile later). Pinning whole maps would lock host memory the
          size of the budget.
"""

from __future__ import annotations

import copy
import itertools
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from .errors import StreamcheckError, internal_error

if TYPE_CHECKING:
    from .graph import Graph

__all__ = ["Cache", "DiskCache", "HostCache", "autocast_dtype", "choose_cuts", "kept_dtypes"]


@dataclass(frozen=True)
class HostCache:
    """Keep stitched maps in host memory, ``bytes`` at most per call (Rule KM1).

    >>> import torch.nn as nn, streamcheck
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
    ...                     nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))  # train mode
    >>> p = streamcheck.plan(net, (1, 3, 256, 256), tile=64, cache=streamcheck.HostCache(bytes=2**22))
    >>> p.cut_paths, p.cache_bytes   # after the first ReLU; 4194304 = 2 * 8 * 256 * 256 * 4 bytes
    (('2',), 4194304)

    ``keep_autocast_dtype=True`` keeps the maps that autocast computes in bfloat16 or float16 in
    that dtype, half the bytes of float32 (Rule KM7); others stay in the plan's dtype.
    """

    bytes: int
    keep_autocast_dtype: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        _check_budget(self.bytes)


@dataclass(frozen=True)
class DiskCache:
    """Keep stitched maps in files under the directory ``path`` (``np.memmap``), ``bytes`` at most
    per call (Rule KM1); the files are deleted when the call's backward ends (Rule KM6).
    ``keep_autocast_dtype`` as for ``HostCache`` (Rule KM7)."""

    path: str | os.PathLike[str]
    bytes: int
    keep_autocast_dtype: bool = field(default=False, kw_only=True)

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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Autocast's dtype for ``device``'s type where autocast is on there, else None."""
    on = torch.is_autocast_enabled(device.type)
    return torch.get_autocast_dtype(device.type) if on else None


def kept_dtypes(
    graph: Graph,
    nodes: Sequence[int],
    *,
    dtype: torch.dtype,
    autocast: torch.dtype | None,
    keep_autocast_dtype: bool,
) -> dict[int, torch.dtype]:
    """Rule KM7: the dtype the map of each of ``nodes`` is kept in; ``dtype`` is the plan's,
    ``autocast`` autocast's (None: off) on the device of the module's parameters."""
    computed = _computed_dtypes(graph, autocast, dtype) if nodes else {}
    kept = {}
    for n in nodes:
        made = computed.get(n, dtype)
        narrow = keep_autocast_dtype and made == autocast
        kept[n] = made if narrow else torch.promote_types(made, dtype)
    return kept


def _computed_dtypes(
    graph: Graph, autocast: torch.dtype | None, dtype: torch.dtype
) -> dict[int, torch.dtype]:
    """Rule KM7: the dtype of every node's map, from fake tensors, under autocast where it is on;
    empty if the module does not run on them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    first = next(itertools.chain(graph.gm.parameters(), graph.gm.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    index = {node.name: i for i, node in enumerate(graph.nodes)}
    reductions = {graph.nodes[r].name for r in graph.reductions}
    found: dict[int, torch.dtype] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if n.name in reductions and isinstance(result, torch.Tensor):
                result = result.to(autocast or dtype)  # as the engine finalizes statistics
            if n.name in index and isinstance(result, torch.Tensor):
                found[index[n.name]] = result.dtype
            return result

    mode = FakeTensorMode()
    memo: dict[int, Any] = {}  # a copy on fake tensors: buffers written in place stay unchanged
    for t in itertools.chain(graph.gm.parameters(), graph.gm.buffers()):
        fake = mode.from_tensor(t)
        memo[id(t)] = nn.Parameter(fake, t.requires_grad) if isinstance(t, nn.Parameter) else fake
    try:
        fake_gm = copy.deepcopy(graph.gm, memo)
        amp = torch.autocast(device.type, dtype=autocast, enabled=autocast is not None)
        with mode, torch.no_grad(), amp:
            Recorder(fake_gm).run(torch.empty(graph.input_shape, dtype=dtype, device=device))
    except Exception:  # noqa: BLE001 - Rule KM7: unknown dtypes keep the plan's
        return {}
    return found


class KeptMaps:
    """One call's kept maps and their gradients (Rules KM1, KM6, KM7)."""

    def __init__(self, cache: Cache, dtypes: dict[int, torch.dtype]) -> None:
        self.cache = cache
        self.dtypes = dtypes  # what each map is kept in (Rule KM7)
        self.computed: dict[int, torch.dtype] = {}  # what each map's tiles came in
        self.maps: dict[int, torch.Tensor] = {}
        self.grads: dict[int, torch.Tensor] = {}
        self.complete: set[int] = set()
        self.files: list[IO[bytes]] = []
        self.released = False

    def writable(
        self, node: int, like: torch.Tensor, shape: Sequence[int], path: str
    ) -> torch.Tensor:
        """The map of ``node`` (at module ``path``), made on its pass's first tile ``like``."""
        if node not in self.maps:
            kept = self.dtypes[node]
            if torch.promote_types(like.dtype, kept) != kept:  # Rule KM7: never rounded
                raise StreamcheckError(
                    f"streamcheck: the kept map at '{path}' is computed in {like.dtype}, but the "
                    f"plan keeps it in {kept} (the dtypes traced before any work did not foresee "
                    f"it), which would round it. Fix: give the image in {kept}, or stream without cache="
                )
            self.computed[node] = like.dtype
            self.maps[node] = self._array(tuple(shape), kept)
        return self.maps[node]

    def finish(self, node: int) -> None:
        self.complete.add(node)

    def read(self, node: int) -> tuple[torch.Tensor, torch.dtype]:
        """The map of ``node`` and the dtype its tiles were computed in (Rule KM7: what a tile
        read from it is narrowed back to)."""
        self._check_live()
        if node not in self.complete:
            raise internal_error(f"kept map of node {node} read before its pass finished")
        return self.maps[node], self.computed[node]

    def gradient(self, node: int) -> torch.Tensor:
        """The gradient map of ``node``, zeros when first asked for (Rule KM4)."""
        self._check_live()
        if node not in self.grads:
            kept, _ = self.read(node)  # overlapping tiles add into it: float32 at least
            dtype = torch.promote_types(kept.dtype, torch.float32)
            self.grads[node] = self._array(tuple(kept.shape), dtype, zero=True)
        return self.grads[node]

    @property
    def nbytes(self) -> int:
        """What the maps and gradients made so far take."""
        return sum(t.nbytes for t in (*self.maps.values(), *self.grads.values()))

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
        self, shape: tuple[int, ...], dtype: torch.dtype, *, zero: bool = False
    ) -> torch.Tensor:
        """Pageable host memory or a file (Rule KM8): copies to and from a CUDA device go
        through pinned staging (feed Rules F2, F7), so the map itself is not pinned."""
        if isinstance(self.cache, HostCache):
            return torch.zeros(shape, dtype=dtype) if zero else torch.empty(shape, dtype=dtype)
        import numpy as np  # only a DiskCache needs it

        # NumPy has no bfloat16: such a map is stored as int16 and viewed as bfloat16
        stored = torch.int16 if dtype == torch.bfloat16 else dtype
        try:
            np_dtype = torch.empty((), dtype=stored).numpy().dtype
        except TypeError as error:
            raise StreamcheckError(
                f"streamcheck: DiskCache keeps maps in NumPy dtypes; the maps are {dtype}. Fix: "
                "HostCache(bytes=...)"
            ) from error
        file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed by release()
            dir=self.cache.path, prefix="streamcheck-", suffix=".kept"
        )
        self.files.append(file)
        array = np.memmap(file, dtype=np_dtype, mode="w+", shape=shape)  # a new file reads zeros
        return torch.from_numpy(array).view(dtype)


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
