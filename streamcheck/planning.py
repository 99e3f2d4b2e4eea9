"""The tile plan: how an input of a given shape is cut into tiles, and what that costs.

The arithmetic follows NOTE [ Streaming geometry ] in ``geometry.py`` (Rule 6), and NOTE [ Several
scales ] (Rules MS5-MS6) for modules with several outputs or layers that upsample.

NOTE [ Passes ]
Rule PL1. A module without statistics over space streams in one tile pass. One with statistics
          (graph Rules G13-G14) streams in one pass per statistic level j = 1..D, each a plan of
          the graph cut at the inputs of its level's reductions (all reductions of a level, and
          all statistics of one map, share the pass), then one pass for the spatial outputs, if
          the module has any (a classifier's logits are global: its last statistic pass is its
          last pass). Each pass has its own receptive field, so its own tiles for the same tile
          edge. Training runs every pass twice (forward, backward), inference once.
Rule PL2. The plan is refused before any work when the levels exceed ``max_levels`` (default
          ``MAX_LEVELS``), with the count and the fixes, so that a deep network does not
          silently cost many times plain streaming.
Rule PL3. ``time_factor`` estimates the time against plain streaming (the last pass alone, from
          the image, as if the statistics were known): the multiply-accumulates of every pass
          over those of that pass, counted per tile from the boxes each node computes, halo
          included.
Rule PL4. With a cache budget (``cache=``), passes may start at kept maps (NOTE [ Kept maps ] in
          ``kept.py``, Rules KM1-KM5): the plan lists the cuts, their bytes, the passes that make
          them and the passes that read them. A pass from a cut reads tiles of the cut's map of
          the requested edge scaled by the cut's scale (rounded up), so that a tile covers about
          the image region a tile of the image would. No budget: the passes of Rule PL1.
Rule PL5. ``pixels_computed`` says what the overlap costs: the input pixels every tile of a pass
          reads (a pixel read by two tiles counts twice) over the image's pixels, per pass; 1.0
          when tiles do not overlap. Masked tiles (``mask=``) are not known to the plan: it counts
          every tile.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import cached_property
from math import prod

import torch
from torch import nn

from .errors import StreamcheckError
from .footprint import largest_buffer_bytes, peak_bytes
from .geometry import (
    Box,
    Interval,
    chunks,
    input_tile_for,
    output_pieces,
    output_tile_for,
    period,
    volume,
)
from .graph import Graph, Node, build_graph
from .kept import Cache, Candidate, Target, autocast_dtype, choose_cuts, kept_dtypes
from .layers import Window
from .program import Schedule, axis_walk, needed_interval, schedule_tile

__all__ = ["MAX_LEVELS", "StreamPlan", "Tile", "normalize_tile", "plan", "make_plan"]

MAX_LEVELS = 16


@dataclass(frozen=True)
class Tile:
    """One tile: the input pixels it reads (clipped to the image) and the output it owns."""

    index: int
    input_box: Box
    output_box: Box  # in the (reference) output
    output_boxes: tuple[Box | None, ...] = ()  # per output, with several (None: owns nothing)


@dataclass(frozen=True)
class StreamPlan:
    """How ``streamcheck.Streamed`` cuts an input into tiles. ``str(plan)`` is a readable summary."""

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    tile_px: tuple[int, ...]  # requested input-tile edge per spatial axis
    tile_px_used: tuple[int, ...]  # after rounding down to the stride (geometry Rule 6)
    output_tile_px: tuple[int, ...]
    receptive_field_px: tuple[int, ...]
    total_stride: tuple[int | Fraction, ...]  # input px per output px (a fraction if finer)
    overlap_px: tuple[
        tuple[int | Fraction, int | Fraction], ...
    ]  # per axis: pixels read beyond the owned region, each side
    tiles: tuple[Tile, ...]
    peak_bytes_estimate: int
    dtype: torch.dtype
    schedules: tuple[Schedule, ...] = field(repr=False, compare=False, default=())
    graph: Graph | None = field(repr=False, compare=False, default=None)
    output_shapes: tuple[tuple[int, ...], ...] = ()  # every output's, in the returned order
    output_bytes: int = 0  # the stitched outputs and their gradients (a full-resolution map's)
    period_px: tuple[int, ...] = ()  # output tiles are multiples of it (geometry Rule MS5)
    min_tile_px: tuple[int, ...] = ()  # the smallest tile that plans (what one period reads)
    #: Rule PL1: every tile pass in order, for a module with statistics (empty: this plan is
    #: its one pass); a pass's ``graph`` is the module's graph cut at what it computes
    passes: tuple[StreamPlan, ...] = field(repr=False, default=())
    levels: int = 0  # statistic levels (graph Rule G14)
    level: int = 0  # of a statistic pass: the level of its reductions (0: the output pass)
    reductions: tuple[int, ...] = ()  # of a statistic pass: the reduction nodes it accumulates
    time_factor: float = 1.0  # Rule PL3
    macs: int = 0  # Rule PL3: this pass's multiply-accumulates (of all passes, for a plan)
    kept: int | None = None  # of a pass that makes a kept map: its cut point (Rule PL4)
    cuts: tuple[int, ...] = ()  # of a plan: the cut points whose maps are kept (Rule PL4)
    cache_bytes: int = 0  # of a plan: what the kept maps and their gradients take (Rule KM1)
    cut_dtypes: tuple[torch.dtype, ...] = ()  # of a plan: what each cut's map is kept in (KM7)

    @property
    def cut_paths(self) -> tuple[str, ...]:
        """The module paths of the kept cut points (Rule PL4)."""
        assert self.graph is not None
        return tuple(self.graph.nodes[c].path for c in self.cuts)

    @property
    def tile_passes(self) -> tuple[StreamPlan, ...]:
        """The tile passes a forward runs, in order (Rule PL1)."""
        return self.passes or (self,)

    @property
    def passes_training(self) -> int:
        return 2 * len(self.tile_passes)

    @property
    def passes_inference(self) -> int:
        return len(self.tile_passes)

    @property
    def pixels_computed(self) -> tuple[float, ...]:
        """Rule PL5: per tile pass, the input pixels its tiles read over the image's."""
        return tuple(_pixels_computed(p) for p in self.tile_passes)

    @property
    def n_tiles(self) -> int:
        return len(self.tiles)

    @cached_property
    def largest_buffer_bytes(self) -> int:
        """The largest single buffer any tile of any pass computes (defaults Rule FD2)."""
        return max(
            (
                largest_buffer_bytes(p.graph, p.schedules, p.dtype)
                for p in self.tile_passes
                if p.graph is not None
            ),
            default=0,
        )

    def fits(self, device: str | torch.device = "cuda", *, headroom: float = 0.1) -> bool:
        """Whether a training step fits on a CUDA ``device`` now: the peak memory estimate plus
        ``headroom`` (a fraction of it, for what the estimate does not model: convolution
        workspaces, allocator rounding) against the memory a new allocation can use there
        (choose Rule CT5). Parameters, gradients and optimizer state are the caller's, already
        allocated. A CPU is refused, as in ``choose_tile``: its resident memory adds the C
        allocator's slack, which the estimate does not bound.

        >>> import torch.nn as nn
        >>> p = plan(nn.Conv2d(3, 8, 3, padding=1), (1, 3, 8192, 8192), tile=2048)
        >>> p.fits("cuda") if torch.cuda.is_available() else True   # 8192² in 2048² tiles
        True
        """
        return self.peak_bytes_estimate * (1 + headroom) <= free_bytes(device)

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
        outputs = [("output", axes(self.output_shape))]
        if len(self.output_shapes) > 1:
            outputs = [(f"output {i}", axes(s)) for i, s in enumerate(self.output_shapes)]
        rows = [
            ("input", axes(self.input_shape)),
            *outputs,
            ("input tile", f"{axes(self.tile_px_used)} px{rounded}"),
            ("output tile", f"{axes(self.output_tile_px)} px"),
            ("tiles", f"{self.n_tiles} ({axes(self.grid)})"),
            ("receptive field", f"{axes(self.receptive_field_px)} px"),
            ("total stride", axes(self.total_stride)),
            ("overlap (before, after)", axes(f"{_px(a)}/{_px(b)}" for a, b in self.overlap_px)),
            ("pixels computed", _pixels_row(self.pixels_computed)),
            ("outputs and their gradients", f"{self.output_bytes / 2**20:.1f} MiB"),
            ("peak memory estimate", f"{self.peak_bytes_estimate / 2**20:.1f} MiB ({self.dtype})"),
        ]
        if self.passes:  # Rules PL1, PL3, PL4
            rows[3:5] = [
                (f"pass {i + 1} {_role(p)}", f"{axes(p.tile_px_used)} px in, {p.n_tiles} tiles")
                for i, p in enumerate(self.passes)
            ]
            if self.cuts:
                paths = ", ".join(
                    f"'{path}' ({str(dtype).removeprefix('torch.')})"
                    for path, dtype in zip(self.cut_paths, self.cut_dtypes, strict=True)
                )
                mib = self.cache_bytes / 2**20
                rows.append(("kept maps", f"{paths}: {mib:.1f} MiB with their gradients"))
            rows += [
                ("statistic levels", str(self.levels)),
                (
                    "passes",
                    f"{self.passes_training} training, {self.passes_inference} inference",
                ),
                ("time factor estimate", f"{self.time_factor:.2f}x plain streaming"),
            ]
        if self.period_px:
            at = next(i for i, (name, _) in enumerate(rows) if name == "tiles") + 1
            rows.insert(at, ("period", f"{axes(self.period_px)} output px"))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def free_bytes(device: torch.device | str) -> int:
    """Rule CT5: the bytes a new allocation on a CUDA device can use now."""
    where = torch.device(device)
    if where.type != "cuda":
        raise StreamcheckError(
            f"streamcheck: device={str(device)!r}: only a CUDA device's free memory is read (the "
            "estimate bounds live tensors, which a CUDA allocator counts; a CPU process's "
            "resident memory adds the C allocator's slack). Fix: a budget of your own against "
            "plan(...).peak_bytes_estimate (choose_tile: budget_bytes=...)"
        )
    unused = torch.cuda.memory_reserved(where) - torch.cuda.memory_allocated(where)
    return int(torch.cuda.mem_get_info(where)[0] + unused)


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
    for i, node in enumerate(graph.nodes[graph.source + 1 : graph.output + 1], graph.source + 1):
        if not node.spatial:
            continue
        start, stop = needed_interval(graph, i, axis, (0, 1))
        if stop - start > tile:
            return f" (it reaches {stop - start} px at '{node.path}')"
    return ""


def make_plan(
    graph: Graph,
    tile: tuple[int, ...],
    *,
    max_levels: int | None = MAX_LEVELS,
    cache: Cache | None = None,
    autocast: torch.dtype | None = None,
) -> StreamPlan:
    """Plan the tile passes of ``graph`` for a requested input tile edge per axis (Rules PL1,
    PL4); ``autocast`` is autocast's dtype where it is on (kept Rule KM7)."""
    if not graph.reductions:
        return _pass_plan(graph, tile)
    nodes = graph.nodes
    if max_levels is not None and graph.levels > max_levels:  # Rule PL2
        deepest = max(graph.reductions, key=lambda r: nodes[r].level)
        raise StreamcheckError(
            f"streamcheck: this module has {graph.levels} levels of statistics over space that "
            f"depend on each other (the deepest at '{nodes[deepest].path}'), more than "
            f"max_levels={max_levels}: it would stream in {2 * graph.levels + 2} passes per "
            "training step. Fix: call .eval() on its BatchNorm layers (running statistics are "
            "local), stream fewer layers (streamcheck.split(model, until=...)), or raise "
            f"Streamed(..., max_levels={graph.levels})"
        )
    targets = _targets(graph)
    excluded: set[int] = set()
    dtypes = kept_dtypes(
        graph,
        graph.cut_points() if cache is not None else (),
        dtype=_dtype_of(graph),
        autocast=autocast,
        keep_autocast_dtype=cache is not None and cache.keep_autocast_dtype,
    )
    while True:  # kept Rule KM5: a cut whose passes do not plan is left out
        cuts = () if cache is None else _choose(graph, targets, cache.bytes, excluded, dtypes)
        try:
            passes = _passes(graph, tile, targets, cuts)
            break
        except _Unplannable as failed:
            excluded.add(failed.source)
    last = passes[-1]
    plain = last if not last.graph or not last.graph.source else _plain_last(graph, tile, targets)
    outputs = graph.outputs or (graph.output,)
    dtype = _dtype_of(graph)
    return replace(
        last,
        input_shape=graph.input_shape,
        output_shape=nodes[graph.output].shape,
        output_shapes=tuple(nodes[o].shape for o in outputs),
        output_bytes=_output_bytes(graph, dtype),
        peak_bytes_estimate=_passes_peak_bytes(passes, _output_bytes(graph, dtype)),
        graph=graph,
        passes=tuple(passes),
        levels=graph.levels,
        level=0,
        reductions=(),
        time_factor=sum(p.macs for p in passes) / max(plain.macs, 1),
        macs=sum(p.macs for p in passes),
        cuts=cuts,
        cache_bytes=sum(_kept_bytes(graph, c, dtypes[c]) for c in cuts),
        cut_dtypes=tuple(dtypes[c] for c in cuts),
    )


def _pixels_computed(p: StreamPlan) -> float:
    """Rule PL5 for one pass."""
    image = prod(p.input_shape[2:])
    return sum(volume(t.input_box) for t in p.tiles) / image


def _pixels_row(ratios: Sequence[float]) -> str:
    """Rule PL5 in ``str(plan)``: one ratio, or one per pass."""
    listed = ", ".join(f"{r:.2f}x" for r in ratios)
    return f"{listed} the image's" + (" (per pass)" if len(ratios) > 1 else "")


def _passes_peak_bytes(passes: Sequence[StreamPlan], output_bytes: int) -> int:
    """The peak over the passes (memory Rule PM3): a statistic pass's backward runs while the
    stitched outputs and their gradients are held."""
    return max(p.peak_bytes_estimate + (output_bytes if p.level else 0) for p in passes)


def _targets(graph: Graph) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """Per tile pass of Rule PL1: (level, reductions, target nodes); the output pass's level is
    one more than the deepest, its reductions none."""
    nodes = graph.nodes
    found = []
    for level in range(1, graph.levels + 1):
        reductions = tuple(r for r in graph.reductions if nodes[r].level == level)
        found.append((level, reductions, tuple(sorted({nodes[r].sources[0] for r in reductions}))))
    spatial = tuple(o for o in graph.outputs or (graph.output,) if nodes[o].spatial)
    if spatial:
        found.append((graph.levels + 1, (), spatial))
    return found


class _Unplannable(Exception):
    def __init__(self, source: int) -> None:
        self.source = source


def _passes(
    graph: Graph,
    tile: tuple[int, ...],
    targets: list[tuple[int, tuple[int, ...], tuple[int, ...]]],
    cuts: tuple[int, ...],
) -> list[StreamPlan]:
    """The tile passes in forward order (Rule PL1; kept Rules KM2-KM3)."""
    nodes = graph.nodes
    made: list[int] = []

    def one(taps: tuple[int, ...], *, stitched: bool) -> StreamPlan:
        sources = [c for c in made if c < min(taps)]
        source = sources[-1] if sources else 0
        try:
            return _pass_plan(
                graph.cut(taps, source=source), _tile_at(graph, source, tile), stitched=stitched
            )
        except StreamcheckError:
            if not source:
                raise
            raise _Unplannable(source) from None

    def keep(level: int) -> list[StreamPlan]:
        found = []
        for c in cuts:
            if nodes[c].level == level:
                found.append(replace(one((c,), stitched=False), kept=c))
                made.append(c)
        return found

    passes = keep(0)
    for level, reductions, taps in targets:
        if reductions:
            passes.append(replace(one(taps, stitched=False), level=level, reductions=reductions))
            passes += keep(level)
        else:
            passes.append(one(taps, stitched=True))
    return passes


def _tile_at(graph: Graph, source: int, tile: tuple[int, ...]) -> tuple[int, ...]:
    """Rule PL4: the tile edge scaled to the source's pixels, rounded up."""
    scale = graph.nodes[source].scale
    return tuple(max(1, math.ceil(edge * s)) for edge, s in zip(tile, scale, strict=True))


def _plain_last(
    graph: Graph, tile: tuple[int, ...], targets: list[tuple[int, tuple[int, ...], tuple[int, ...]]]
) -> StreamPlan:
    """The last pass from the image: what plain streaming costs (Rule PL3)."""
    return _pass_plan(graph.cut(targets[-1][2]), tile)


def _kept_bytes(graph: Graph, node: int, dtype: torch.dtype) -> int:
    """A kept map in ``dtype`` and its gradient, float32 at least (kept Rules KM1, KM7)."""
    grad = torch.promote_types(dtype, torch.float32)
    itemsize = dtype.itemsize + grad.itemsize
    return itemsize * prod(graph.nodes[node].shape)


def _choose(
    graph: Graph,
    targets: list[tuple[int, tuple[int, ...], tuple[int, ...]]],
    budget: int,
    excluded: set[int],
    dtypes: dict[int, torch.dtype],
) -> tuple[int, ...]:
    """Kept Rule KM5 on this graph: the work of every node's whole map, summed over ancestors."""
    nodes = graph.nodes
    work = [
        volume([(0, n) for n in node.sizes]) * cost if node.spatial else 0
        for node, cost in zip(nodes, _node_costs(graph), strict=True)
    ]
    ancestors: list[int] = []  # bit sets
    for i, node in enumerate(nodes):
        bits = 1 << i
        for s in node.sources if node.spatial else ():
            bits |= ancestors[s]
        ancestors.append(bits)

    def below(bits: int) -> int:
        return sum(w for i, w in enumerate(work) if bits >> i & 1)

    candidates = [
        Candidate(c, nodes[c].level, _kept_bytes(graph, c, dtypes[c]), below(ancestors[c]))
        for c in graph.cut_points()
        if c not in excluded
    ]
    passes = []
    for level, _, taps in targets:
        bits = 0
        for t in taps:
            bits |= ancestors[t]
        passes.append(Target(level, min(taps), below(bits)))
    chosen = choose_cuts(candidates, passes, budget=budget)
    return tuple(candidates[k].node for k in chosen)


def _role(p: StreamPlan) -> str:
    graph = p.graph
    start = f" from '{graph.source_node.path}'" if graph is not None and graph.source else ""
    if p.kept is not None and graph is not None:
        return f"(keeps '{graph.nodes[p.kept].path}'{start})"
    return (f"(level {p.level} statistics" if p.level else "(outputs") + start + ")"


def _pass_plan(graph: Graph, tile: tuple[int, ...], *, stitched: bool = True) -> StreamPlan:
    """One tile pass of ``graph`` (its outputs stitched whole unless ``stitched`` is False: a
    statistic pass only accumulates them)."""
    plan = _multiscale_plan(graph, tile) if graph.multiscale else _single_plan(graph, tile)
    if stitched:
        return plan
    return replace(
        plan,
        output_bytes=0,
        peak_bytes_estimate=peak_bytes(graph, plan.schedules, plan.dtype, stitched=False),
    )


def _single_plan(graph: Graph, tile: tuple[int, ...]) -> StreamPlan:
    """Geometry Rule 6: one output, no rescaling."""
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
        boxes = [box + (piece,) for box in boxes for piece in chunks(out_size, out_tile)]
    schedules = tuple(schedule_tile(graph, box) for box in boxes)
    return _tile_plan(graph, tile, schedules, (out,), fields, strides, lefts, out_tiles, used)


def _tile_plan(
    graph: Graph,
    tile: tuple[int, ...],
    schedules: Sequence[Schedule],
    outputs: Sequence[Node],
    fields: Sequence[int],
    strides: Sequence[int | Fraction],
    lefts: Sequence[int | Fraction],
    out_tiles: Sequence[int],
    used: Sequence[int],
    *,
    period_px: tuple[int, ...] = (),
    min_tile_px: tuple[int, ...] = (),
) -> StreamPlan:
    """The plan of one tile pass from its schedules and per-axis geometry (``outputs[0]`` is the
    reference output the tiles are cut in)."""
    dtype = _dtype_of(graph)
    return StreamPlan(
        input_shape=graph.source_node.shape,
        output_shape=outputs[0].shape,
        tile_px=tile,
        tile_px_used=tuple(used),
        output_tile_px=tuple(out_tiles),
        receptive_field_px=tuple(fields),
        total_stride=tuple(strides),
        overlap_px=tuple(
            (left, f - s - left) for left, f, s in zip(lefts, fields, strides, strict=True)
        ),
        tiles=tuple(
            Tile(i, s.input_box, s.output_box, s.output_boxes) for i, s in enumerate(schedules)
        ),
        peak_bytes_estimate=peak_bytes(graph, schedules, dtype),
        dtype=dtype,
        schedules=tuple(schedules),
        graph=graph,
        output_shapes=tuple(o.shape for o in outputs[1:] or outputs),
        output_bytes=_output_bytes(graph, dtype),
        macs=_macs(graph, schedules),
        period_px=period_px,
        min_tile_px=min_tile_px,
    )


def _output_bytes(graph: Graph, dtype: torch.dtype) -> int:
    """The stitched outputs and their gradients (geometry Rule MS7 keeps both whole)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    outputs = graph.outputs or (graph.output,)
    return 2 * itemsize * sum(prod(graph.nodes[o].shape) for o in outputs if graph.nodes[o].spatial)


def _macs(graph: Graph, schedules: Sequence[Schedule]) -> int:
    """Rule PL3: multiply-accumulates of every tile, from the boxes its nodes compute."""
    costs = _node_costs(graph)
    return sum(
        volume(box) * cost
        for s in schedules
        for box, cost in zip(s.boxes, costs, strict=True)
        if box is not None
    )


def _node_costs(graph: Graph) -> list[int]:
    """Rule PL3: per node, multiply-accumulates per spatial position (a convolution's per output
    value: input channels per group x kernel; others: 1)."""
    costs = []
    for node in graph.nodes:
        cost = 1
        layer, module = node.layer, node.module
        if isinstance(module, nn.modules.conv._ConvNd) and isinstance(layer, Window):
            cost = module.in_channels // module.groups * prod(layer.kernel)
        channels = prod(size for d, size in enumerate(node.shape) if d not in node.layout)
        costs.append(cost * channels)
    return costs


def _multiscale_plan(graph: Graph, tile: tuple[int, ...]) -> StreamPlan:
    """Geometry Rules MS5-MS6: tiles cut in the finest output, multiples of the period."""
    nodes = graph.nodes
    outputs = graph.outputs or (graph.output,)
    ref = max(outputs, key=lambda o: (nodes[o].scale, -o))
    reference = nodes[ref]
    pieces_per_axis: list[list[tuple[Interval | None, ...]]] = []
    fields, strides, lefts, out_tiles, used, periods, smallest = [], [], [], [], [], [], []
    for axis, edge in enumerate(tile):
        quotients = []
        for o in outputs:
            q = reference.scale[axis] / nodes[o].scale[axis]
            if q.denominator != 1:
                raise StreamcheckError(
                    f"streamcheck: output '{nodes[o].path}' is at scale {nodes[o].scale[axis]} "
                    f"along spatial axis {axis}, not an integer factor coarser than the finest "
                    f"output '{reference.path}' ({reference.scale[axis]}); every output must be "
                    "coarser than the finest by an integer factor"
                )
            quotients.append(int(q))
        # a fraction for outputs finer than what the tiles read (graph Rule G16)
        stride = _plain(graph.source_node.scale[axis] / reference.scale[axis])
        relative = [n.scale[axis] / reference.scale[axis] for n in nodes if n.scale]
        p = period([*relative, *(Fraction(1, q) for q in quotients)])
        cut = _AxisCut(
            graph, axis, tuple(nodes[o].sizes[axis] for o in outputs), tuple(quotients), p
        )
        if cut.reads(1) > edge:
            raise StreamcheckError(
                f"streamcheck: tile {edge} px (spatial axis {axis}) is smaller than what one "
                f"period of {p} output px of '{reference.path}' reads, {cut.reads(1)} px; use "
                f"tile >= {cut.reads(1)} or stream fewer layers"
            )
        low, high = 1, cut.most  # the largest m whose tiles fit (geometry Rule MS6)
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if cut.reads(middle) <= edge else (low, middle - 1)
        pieces_per_axis.append(cut.grid(low))
        centre = reference.sizes[axis] // 2
        one = axis_walk(graph, axis, _owning(outputs, ref, (centre, centre + 1)))
        fields.append(_length(one))
        strides.append(stride)
        lefts.append(_plain(Fraction(centre * stride - one[0])))
        out_tiles.append(low * p)
        used.append(cut.reads(low))
        periods.append(p)
        smallest.append(cut.reads(1))
    schedules = []
    for combination in itertools.product(*pieces_per_axis):
        boxes = tuple(
            None
            if any(piece[j] is None for piece in combination)
            else tuple(piece[j] for piece in combination)
            for j in range(len(outputs))
        )
        reference_box = boxes[outputs.index(ref)]
        schedules.append(
            schedule_tile(graph, reference_box or (), output_boxes=boxes)  # type: ignore[arg-type]
        )
    return _tile_plan(
        graph,
        tile,
        schedules,
        (reference, *(nodes[o] for o in outputs)),
        fields,
        strides,
        lefts,
        out_tiles,
        used,
        period_px=tuple(periods),
        min_tile_px=tuple(smallest),
    )


@dataclass(frozen=True)
class _AxisCut:
    """The tiles along one axis for output tiles of m periods (geometry Rules MS5-MS6)."""

    graph: Graph
    axis: int
    sizes: tuple[int, ...]  # of every output along the axis
    quotients: tuple[int, ...]  # how much coarser than the reference each output is
    period: int

    @property
    def most(self) -> int:
        """Periods beyond which one tile covers every output."""
        return max(
            -(-n // (self.period // q)) for n, q in zip(self.sizes, self.quotients, strict=True)
        )

    def grid(self, m: int) -> list[tuple[Interval | None, ...]]:
        """Per tile, the piece of every output it owns."""
        t = m * self.period
        pairs = list(zip(self.sizes, self.quotients, strict=True))
        count = max(-(-n // (t // q)) for n, q in pairs)
        return list(zip(*(output_pieces(n, t // q, count) for n, q in pairs), strict=True))

    memo: dict[int, int] = field(default_factory=dict, compare=False)

    def reads(self, m: int) -> int:
        """The most input pixels a tile reads."""
        if m not in self.memo:
            walks = (axis_walk(self.graph, self.axis, owned) for owned in self.grid(m))
            self.memo[m] = max(_length(interval) for interval in walks)
        return self.memo[m]


def _px(value: int | Fraction) -> str:
    """Pixels for ``str(plan)``: a fraction in parentheses."""
    return str(value) if isinstance(value, int) else f"({value})"


def _plain(value: Fraction) -> int | Fraction:
    """An int where the fraction is whole."""
    return int(value) if value.denominator == 1 else value


def _owning(outputs: Sequence[int], ref: int, interval: Interval) -> list[Interval | None]:
    return [interval if o == ref else None for o in outputs]


def _length(interval: Interval) -> int:
    return interval[1] - interval[0]


def _dtype_of(graph: Graph) -> torch.dtype:
    first = next(iter(graph.root.parameters()), None)
    return first.dtype if first is not None and first.is_floating_point() else torch.float32


def plan(
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    tile: int | Sequence[int],
    dtype: torch.dtype | None = None,
    max_levels: int | None = MAX_LEVELS,
    cache: Cache | None = None,
) -> StreamPlan:
    """Plan how ``Streamed(module, tile=tile, cache=cache)`` would stream an input of
    ``input_shape``.

    Nothing is computed: shapes come from a meta-device trace. Under autocast, the plan is that
    of a call under the same autocast (the dtypes of kept maps, kept Rule KM7).

    >>> import torch.nn as nn
    >>> trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    >>> p = plan(trunk, (1, 3, 1000, 1000), tile=256)
    >>> p.receptive_field_px, p.total_stride   # 4 = 3x3 conv (3 px) + one more for the 2x2 pool
    ((4, 4), (2, 2))
    >>> p.output_tile_px, p.n_tiles            # 127 = (256 - 4) // 2 + 1; 500 / 127 -> 4 x 4 tiles
    ((127, 127), 16)

    A segmentation network's logits are as large as the image: they are stitched whole, with their
    gradient, so a per-pixel loss is an ordinary loss on the streamed output
    (``F.cross_entropy(Streamed(seg, tile=512)(image), labels)``); ``output_bytes`` is what that
    costs (geometry Rules MS5-MS7):

    >>> seg = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
    ...                     nn.ConvTranspose2d(8, 5, 2, stride=2))   # 5 classes, full resolution
    >>> p = plan(seg, (1, 3, 4096, 4096), tile=512)
    >>> p.output_shape, p.output_bytes // 2**20   # 640 MiB = 2 * 5 * 4096 * 4096 * 4 bytes (float32)
    ((1, 5, 4096, 4096), 640)
    """
    edges = normalize_tile(tile, len(input_shape) - 2)
    graph = build_graph(module, input_shape, dtype=dtype or _param_dtype(module))
    first = next(iter(module.parameters()), None)
    amp = autocast_dtype(first.device if first is not None else torch.device("cpu"))
    return make_plan(graph, edges, max_levels=max_levels, cache=cache, autocast=amp)


def _param_dtype(module: nn.Module) -> torch.dtype:
    first = next(iter(module.parameters()), None)
    return first.dtype if first is not None and first.is_floating_point() else torch.float32
