"""The tile plan: how an input of a given shape is cut into tiles, and what that costs.

The arithmetic follows NOTE [ Streaming geometry ] in ``geometry.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from math import prod

import torch
from torch import nn

from .errors import StreamcheckError
from .geometry import Box, input_tile_for, output_tile_for, split, volume
from .graph import Graph, build_graph
from .program import Schedule, needed_interval, schedule_tile

__all__ = ["StreamPlan", "Tile", "normalize_tile", "plan", "make_plan"]


@dataclass(frozen=True)
class Tile:
    """One tile: the input pixels it reads (clipped to the image) and the output it owns."""

    index: int
    input_box: Box
    output_box: Box


@dataclass(frozen=True)
class StreamPlan:
    """How ``streamcheck.Streamed`` cuts an input into tiles. ``str(plan)`` is a readable summary."""

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    tile_px: tuple[int, ...]  # requested input-tile edge per spatial axis
    tile_px_used: tuple[int, ...]  # after rounding down to the stride (geometry Rule 6)
    output_tile_px: tuple[int, ...]
    receptive_field_px: tuple[int, ...]
    total_stride: tuple[int, ...]
    overlap_px: tuple[
        tuple[int, int], ...
    ]  # per axis: pixels read beyond the owned region, each side
    tiles: tuple[Tile, ...]
    peak_bytes_estimate: int
    dtype: torch.dtype
    schedules: tuple[Schedule, ...] = field(repr=False, compare=False, default=())
    graph: Graph | None = field(repr=False, compare=False, default=None)

    @property
    def n_tiles(self) -> int:
        return len(self.tiles)

    @property
    def grid(self) -> tuple[int, ...]:
        """Tiles along each spatial axis."""
        return tuple(
            -(-o // t) for o, t in zip(self.output_shape[2:], self.output_tile_px, strict=True)
        )

    def __str__(self) -> str:
        def axes(values: Iterable[object]) -> str:
            return " x ".join(str(v) for v in values)

        rounded = (
            ""
            if self.tile_px == self.tile_px_used
            else f" (rounded down from {axes(self.tile_px)})"
        )
        rows = [
            ("input", axes(self.input_shape)),
            ("output", axes(self.output_shape)),
            ("input tile", f"{axes(self.tile_px_used)} px{rounded}"),
            ("output tile", f"{axes(self.output_tile_px)} px"),
            ("tiles", f"{self.n_tiles} ({axes(self.grid)})"),
            ("receptive field", f"{axes(self.receptive_field_px)} px"),
            ("total stride", axes(self.total_stride)),
            ("overlap (before, after)", axes(f"{a}/{b}" for a, b in self.overlap_px)),
            ("peak memory estimate", f"{self.peak_bytes_estimate / 2**20:.1f} MiB ({self.dtype})"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def normalize_tile(tile: int | Sequence[int], spatial_axes: int) -> tuple[int, ...]:
    """One tile edge per spatial axis."""
    edges = (tile,) * spatial_axes if not isinstance(tile, Sequence) else tuple(tile)
    if len(edges) != spatial_axes or not all(isinstance(e, int) and e > 0 for e in edges):
        raise StreamcheckError(
            f"streamcheck: tile {tile!r} must be a positive int or {spatial_axes} positive ints "
            f"(one per spatial axis)"
        )
    return edges


def _receptive_field_and_stride(graph: Graph, axis: int) -> tuple[int, int, int]:
    """Receptive field, total stride and left overlap of the module's output along ``axis``."""
    one = needed_interval(graph, graph.output, axis, (0, 1))
    next_one = needed_interval(graph, graph.output, axis, (1, 2))
    two = needed_interval(graph, graph.output, axis, (0, 2))
    field_px, stride = one[1] - one[0], next_one[0] - one[0]
    if stride <= 0 or two[1] - two[0] != field_px + stride:
        raise StreamcheckError(
            f"streamcheck: the module's paths have different strides along spatial axis {axis}; "
            "every branch that is merged must downsample by the same factor"
        )
    return field_px, stride, -one[0]


def _where_field_exceeds(graph: Graph, axis: int, tile: int) -> str:
    for i, node in enumerate(graph.nodes[1:], 1):
        if node.kind == "constant":
            continue
        start, stop = needed_interval(graph, i, axis, (0, 1))
        if stop - start > tile:
            return f" (it reaches {stop - start} px at '{node.path}')"
    return ""


def make_plan(graph: Graph, tile: tuple[int, ...]) -> StreamPlan:
    """Plan the tiles of ``graph``'s input for a requested input tile edge per axis."""
    out = graph.output_node
    fields, strides, lefts, out_tiles, used = [], [], [], [], []
    for axis, (edge, out_size) in enumerate(zip(tile, out.sizes, strict=True)):
        field_px, stride, left = _receptive_field_and_stride(graph, axis)
        if edge < field_px:
            raise StreamcheckError(
                f"streamcheck: tile {edge} px (spatial axis {axis}) is smaller than the receptive "
                f"field of the streamed module, {field_px} px{_where_field_exceeds(graph, axis, edge)}; "
                f"use tile >= {field_px} or stream fewer layers"
            )
        out_tile = min(output_tile_for(edge, receptive_field=field_px, stride=stride), out_size)
        fields.append(field_px)
        strides.append(stride)
        lefts.append(left)
        out_tiles.append(out_tile)
        used.append(input_tile_for(out_tile, receptive_field=field_px, stride=stride))
    boxes = [()]  # type: list[Box]
    for out_size, out_tile in zip(out.sizes, out_tiles, strict=True):
        boxes = [box + (piece,) for box in boxes for piece in split(out_size, out_tile)]
    schedules = tuple(schedule_tile(graph, box) for box in boxes)
    dtype = _dtype_of(graph)
    return StreamPlan(
        input_shape=graph.input_shape,
        output_shape=out.shape,
        tile_px=tile,
        tile_px_used=tuple(used),
        output_tile_px=tuple(out_tiles),
        receptive_field_px=tuple(fields),
        total_stride=tuple(strides),
        overlap_px=tuple(
            (left, f - s - left) for left, f, s in zip(lefts, fields, strides, strict=True)
        ),
        tiles=tuple(Tile(i, s.input_box, s.output_box) for i, s in enumerate(schedules)),
        peak_bytes_estimate=_peak_bytes(graph, schedules, dtype),
        dtype=dtype,
        schedules=schedules,
        graph=graph,
    )


def _dtype_of(graph: Graph) -> torch.dtype:
    first = next(iter(graph.root.parameters()), None)
    return first.dtype if first is not None and first.is_floating_point() else torch.float32


def _peak_bytes(graph: Graph, schedules: Sequence[Schedule], dtype: torch.dtype) -> int:
    """Rough peak: the stitched output and its gradient, plus one tile's activations and gradients."""
    itemsize = torch.empty((), dtype=dtype).element_size()

    def features(shape: tuple[int, ...], layout: tuple[int, ...]) -> int:
        return prod(size for d, size in enumerate(shape) if d not in layout)

    out = graph.output_node
    stitched = volume([(0, n) for n in out.sizes]) * features(out.shape, out.layout)
    tile = max(
        sum(
            volume(box) * features(node.shape, node.layout)
            for node, box in zip(graph.nodes, s.boxes, strict=True)
            if box is not None
        )
        for s in schedules
    )
    return int(2 * (stitched + tile) * itemsize)


def plan(
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    tile: int | Sequence[int],
    dtype: torch.dtype | None = None,
) -> StreamPlan:
    """Plan how ``Streamed(module, tile=tile)`` would stream an input of ``input_shape``.

    Nothing is computed: shapes come from a meta-device trace.

    >>> import torch.nn as nn
    >>> trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    >>> p = plan(trunk, (1, 3, 1000, 1000), tile=256)
    >>> p.receptive_field_px, p.total_stride   # 4 = 3x3 conv (3 px) + one more for the 2x2 pool
    ((4, 4), (2, 2))
    >>> p.output_tile_px, p.n_tiles            # 127 = (256 - 4) // 2 + 1; 500 / 127 -> 4 x 4 tiles
    ((127, 127), 16)
    """
    edges = normalize_tile(tile, len(input_shape) - 2)
    return make_plan(build_graph(module, input_shape, dtype=dtype or _param_dtype(module)), edges)


def _param_dtype(module: nn.Module) -> torch.dtype:
    first = next(iter(module.parameters()), None)
    return first.dtype if first is not None and first.is_floating_point() else torch.float32
