"""Choosing a tile shape: the fewest pixels computed whose training step fits a memory budget.

NOTE [ Choosing tiles ]
Rule CT1. Along each spatial axis, a tile count n is reached by a smallest input-tile edge (plans
          are cut axis by axis, so an axis's count depends on its own edge only); a larger edge
          with the same count only adds overlap. The candidates per axis are those smallest
          edges, for every count up to 16 and then counts about 10 % apart, down to the
          smallest tile that plans or 256 tiles along the axis.
Rule CT2. Pixels computed are separable: a pass's tiles form a grid, so the input pixels they
          read are the product over axes of the interval lengths along each axis. Each axis's
          candidates carry their ratio per pass (from a plan one tile wide along the other
          axes), so every shape's ``sum(plan.pixels_computed)`` (plan Rule PL5) is known before
          it is planned.
Rule CT3. Shapes are planned in order of that sum (ties: fewer tiles), and the first whose
          ``peak_bytes_estimate`` (NOTE [ Memory estimate ]) is at most the budget is chosen: it
          computes the fewest pixels of those that fit. A shape whose edges are all at least
          those of a shape that did not fit is skipped unplanned (the estimate grows with every
          edge).
Rule CT4. Nothing fits: a ``StreamcheckError`` with the smallest estimate found and the fixes.
Rule CT5. ``device="cuda"`` takes the budget from what a new allocation can use on the card now:
          the driver's free memory plus what PyTorch's caching allocator holds unused; whether a
          given plan fits is ``plan.fits("cuda")`` (with headroom). Only a CUDA device: its
          allocator counts what the estimate models. (No GPU has checked the estimate yet: cuDNN
          may choose workspaces that the CPU-measured Rule PM2 does not model.)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import prod

import torch
from torch import nn

from .errors import StreamcheckError
from .graph import build_graph
from .planning import MAX_LEVELS, StreamPlan, free_bytes, make_plan

__all__ = ["choose_tile", "free_bytes"]

_DENSE_COUNTS = 16  # Rule CT1
_MOST = 256  # tiles per axis at most (Rule CT1)
_STEP = 1.1


def choose_tile(
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    budget_bytes: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    max_levels: int | None = MAX_LEVELS,
) -> StreamPlan:
    """The plan with the fewest pixels computed whose peak estimate fits ``budget_bytes``, or
    what a CUDA ``device`` has free now (Rule CT5).

    Pass its ``tile_px_used`` to ``Streamed(module, tile=...)``.

    >>> import torch.nn as nn
    >>> trunk = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
    >>> p = choose_tile(trunk, (1, 3, 256, 192), budget_bytes=6 * 2**20)
    >>> p.grid, p.tile_px_used, p.peak_bytes_estimate <= 6 * 2**20   # one tile would take 22.6 MiB
    ((4, 2), (68, 100), True)
    >>> round(p.pixels_computed[0], 3)        # input boxes (clipped at the border) / 256 * 192
    1.069
    """
    budget_bytes = _budget(budget_bytes, device)
    first = next(iter(module.parameters()), None)
    if dtype is None:
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    graph = build_graph(module, tuple(input_shape), dtype=dtype)
    ndim = len(input_shape) - 2
    whole = make_plan(graph, (_HUGE,) * ndim, max_levels=max_levels)  # plan Rule PL2 raises here

    def planned(edges: Sequence[int]) -> StreamPlan | None:
        try:
            return make_plan(graph, tuple(edges), max_levels=max_levels)
        except StreamcheckError:
            return None  # a tile too small to plan

    axes = [_axis_candidates(whole, axis, planned) for axis in range(ndim)]
    shapes = sorted(itertools.product(*axes), key=_cost)  # Rule CT3
    failed: list[tuple[int, ...]] = []
    smallest = float("inf")
    for shape in shapes:
        edges = tuple(c.edge for c in shape)
        if any(all(e >= f for e, f in zip(edges, bad, strict=True)) for bad in failed):
            continue
        p = planned(edges)
        if p is not None and p.peak_bytes_estimate <= budget_bytes:
            return p
        smallest = min(smallest, p.peak_bytes_estimate if p is not None else smallest)
        failed.append(edges)
    raise StreamcheckError(  # Rule CT4
        f"streamcheck: no tile fits budget_bytes={budget_bytes} ({budget_bytes / 2**20:.1f} MiB): "
        f"the smallest peak estimate of the tiles tried is {smallest / 2**20:.1f} MiB. Fix: raise "
        "the budget, stream fewer layers (streamcheck.split), or use a lower precision"
    )


def _budget(budget_bytes: int | None, device: torch.device | str | None) -> int:
    if (budget_bytes is None) == (device is None):
        raise StreamcheckError(
            "streamcheck: choose_tile takes budget_bytes=... or device='cuda' (its free memory), "
            f"exactly one; got budget_bytes={budget_bytes!r}, device={device!r}"
        )
    return budget_bytes if budget_bytes is not None else free_bytes(device)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Candidate:
    """One edge along one axis: its tile count and, per pass, its pixels-read ratio."""

    edge: int
    count: int
    ratios: tuple[float, ...]


def _cost(shape: Sequence[_Candidate]) -> tuple[float, int]:
    """Rule CT2: pixels computed over every pass, then tiles."""
    passes = zip(*(c.ratios for c in shape), strict=True)
    return sum(prod(ratios) for ratios in passes), prod(c.count for c in shape)


def _axis_candidates(
    whole: StreamPlan, axis: int, planned: Callable[[Sequence[int]], StreamPlan | None]
) -> list[_Candidate]:
    """Rule CT1: the smallest edge for each candidate count along ``axis``."""
    wide = list(whole.tile_px_used)
    lowest = int((whole.min_tile_px or whole.receptive_field_px)[axis])  # none plans below

    def plan_at(edge: int) -> StreamPlan | None:
        return planned([*wide[:axis], edge, *wide[axis + 1 :]])

    def count(edge: int) -> int | None:
        p = plan_at(edge)
        return None if p is None else p.grid[axis]

    def smallest_edge(fits: Callable[[int | None], bool]) -> int:
        """The smallest edge whose count passes ``fits`` (counts fall as edges grow)."""
        low, high = lowest, wide[axis]
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if fits(count(middle)) else (middle + 1, high)
        return low

    finest = min(count(smallest_edge(lambda c: c is not None)) or 1, _MOST)
    counts = {*range(1, min(finest, _DENSE_COUNTS) + 1)}
    counts |= {min(finest, round(_DENSE_COUNTS * _STEP**k)) for k in range(200)}
    candidates = []
    for edge in sorted({smallest_edge(_at_most(n)) for n in counts}):
        p = plan_at(edge)
        if p is not None:
            candidates.append(_Candidate(edge, p.grid[axis], p.pixels_computed))
    return candidates


def _at_most(n: int) -> Callable[[int | None], bool]:
    return lambda c: c is not None and c <= n


_HUGE = 2**40
