"""Per-tile schedules (which box every node computes) and the execution of one tile.

NOTE [ Tile programs ]
Rule P1. A schedule is computed once per tile from its output box by walking the graph backwards
         (geometry Rules 2-4): every node gets the clipped box it must produce, every edge the crop
         its consumer takes and the padding the consumer must recreate at the image border.
Rule P2. Executing a tile walks the graph forwards and frees each feature map as soon as its last
         consumer has read it, so only the live frontier of one tile is held in memory.
Rule P3. A layer that works in place gets a private copy when the tensor it would overwrite is the
         caller's image or a kept map (graph Rule G5 refuses in-place writes to maps that others
         read).
Rule P6. With several outputs (graph Rule G11) the walk of Rule P1 starts from every output's box
         (geometry Rule MS6); the tile returns, per output, the crop of that node's box it owns, or
         None where it owns nothing. Output nodes are kept until the tile ends.
Rule P8. Global values (graph Rule G13: statistics and what is computed from them) are inputs of
         a tile program, bound by name like constants; they are computed outside tiles
         (`run_globals`), once per pass in forward and once, differentiably, in backward. Nodes
         a tile does not compute (beyond the pass's cut, graph Rule G14) do not keep maps alive:
         a map is freed when the consumers this tile computes have read it.
Rule P7. A rescaling layer (``resampling.Rescale``) reads the clipped box of Rule P1 and is told
         which absolute box it holds and which it must produce (resampling Rule RS2): it never
         recreates padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .errors import internal_error
from .geometry import Box, Interval, clip, hull, mirror
from .graph import Graph, Node
from .layers import Pointwise, Window
from .resampling import Rescale

__all__ = [
    "Edge",
    "Schedule",
    "axis_walk",
    "needed_interval",
    "run_globals",
    "run_once",
    "run_tile",
    "schedule_tile",
]


@dataclass(frozen=True)
class Edge:
    """How one consumer reads one source on one tile."""

    crop: tuple[Interval, ...]  # relative to the source's computed box, per axis
    pads: tuple[tuple[int, int], ...]  # constant padding to recreate on each side, per axis
    gathers: tuple[tuple[int, ...] | None, ...]  # reflect/replicate padding, per axis (Rule 3)


@dataclass(frozen=True)
class Schedule:
    """What every node computes for one tile (Rule P1)."""

    output_box: Box
    boxes: tuple[Box | None, ...]  # clipped, per node; None when the tile does not need the node
    edges: dict[tuple[int, int], Edge]  # (consumer, source) -> edge
    output_boxes: tuple[Box | None, ...] = ()  # per output (Rule P6); () for one output
    output_crops: tuple[tuple[Interval, ...] | None, ...] = ()  # relative to the node's box
    source: int = 0  # the node the tile reads (graph Rule G16)

    @property
    def input_box(self) -> Box:
        """The box of what the tile reads: the image's, or a kept map's (graph Rule G16)."""
        box = self.boxes[self.source]
        if box is None:
            raise internal_error("a tile that reads no input")
        return box


def _required(node: Node, box: Box) -> Box:
    """The unclipped box a node needs from its sources to produce ``box`` (Rule 2)."""
    if node.kind in ("window", "rescale"):
        assert isinstance(node.layer, (Window, Rescale))
        return tuple(node.layer.input_interval(a, interval) for a, interval in enumerate(box))
    return box


def _available(node: Node, wanted: Box, sizes: tuple[int, ...]) -> tuple[Box, tuple[Any, ...]]:
    """The clipped box a consumer reads, and the mirrored indices of reflect/replicate padding."""
    mode = node.layer.pad_mode if isinstance(node.layer, Window) else "constant"
    boxes: list[Interval] = []
    gathers: list[tuple[int, ...] | None] = []
    for (start, stop), size in zip(wanted, sizes, strict=True):
        if mode == "constant" or (start >= 0 and stop <= size):
            low, high = clip((start, stop), size)
            if low >= high:  # outputs no input reaches (geometry Rule MS2): read one pixel
                low = min(max(start, 0), size - 1)
                high = low + 1
            boxes.append((low, high))
            gathers.append(None)
            continue
        mapped = [mirror(p, size, mode) for p in range(start, stop)]
        low = min(mapped)
        boxes.append((low, max(mapped) + 1))
        gathers.append(tuple(p - low for p in mapped))
    return tuple(boxes), tuple(gathers)


def schedule_tile(
    graph: Graph, output_box: Box, *, output_boxes: tuple[Box | None, ...] = ()
) -> Schedule:
    """Walk the graph backwards from one output box (Rule P1), or from every output's box
    (``output_boxes``, one per output, None where the tile owns nothing: Rule P6)."""
    nodes = graph.nodes
    boxes: list[Box | None] = [None] * len(nodes)
    requests: list[list[Box]] = [[] for _ in nodes]
    unclipped: dict[tuple[int, int], tuple[Box, Box, tuple[Any, ...]]] = {}
    if output_boxes:
        for o, owned in zip(graph.outputs, output_boxes, strict=True):
            if owned is not None:
                requests[o].append(owned)
    else:
        boxes[graph.output] = output_box
    for i in range(graph.output, graph.source - 1, -1):
        node = nodes[i]
        if node.kind == "constant":
            continue
        if i != graph.output or output_boxes:
            if not requests[i]:
                continue
            boxes[i] = tuple(hull(axis) for axis in zip(*requests[i], strict=True))
        box = boxes[i]
        assert box is not None
        for s in node.sources if i != graph.source else ():  # graph Rule G16: read, not computed
            wanted = _required(node, box)
            available, gathers = _available(node, wanted, nodes[s].sizes)
            unclipped[(i, s)] = (wanted, available, gathers)
            requests[s].append(available)
    edges = {}
    for (i, s), (wanted, available, gathers) in unclipped.items():
        source_box = boxes[s]
        assert source_box is not None
        edges[(i, s)] = Edge(
            crop=tuple(
                (a[0] - b[0], a[1] - b[0]) for a, b in zip(available, source_box, strict=True)
            ),
            pads=tuple(
                (0, 0) if g is not None else (a[0] - w[0], w[1] - a[1])
                for a, w, g in zip(available, wanted, gathers, strict=True)
            ),
            gathers=gathers,
        )
    crops: list[tuple[Interval, ...] | None] = []
    for o, owned in zip(graph.outputs if output_boxes else (), output_boxes, strict=True):
        computed = boxes[o]
        crops.append(
            None
            if owned is None or computed is None
            else tuple((a - c, b - c) for (a, b), (c, _) in zip(owned, computed, strict=True))
        )
    return Schedule(
        output_box, tuple(boxes), edges, tuple(output_boxes), tuple(crops), graph.source
    )


def axis_walk(graph: Graph, axis: int, owned: Sequence[Interval | None]) -> Interval:
    """The clipped input interval that tiles owning ``owned`` of every output read along ``axis``
    (Rule P1 along one axis, for planning: geometry Rule MS6)."""
    nodes = graph.nodes
    requests: list[list[Interval]] = [[] for _ in nodes]
    for o, interval in zip(graph.outputs, owned, strict=True):
        if interval is not None:
            requests[o].append(interval)
    for i in range(graph.output, graph.source, -1):
        node = nodes[i]
        if node.kind == "constant" or not requests[i]:
            continue
        own = hull(requests[i])
        for s in node.sources:
            wanted = own
            if node.kind in ("window", "rescale"):
                assert isinstance(node.layer, (Window, Rescale))
                wanted = node.layer.input_interval(axis, own)
            single = _available(node, (wanted,), (nodes[s].sizes[axis],))[0][0]
            requests[s].append(single)
    if not requests[graph.source]:
        raise internal_error("a tile that reads no input")
    return hull(requests[graph.source])


def needed_interval(graph: Graph, node_index: int, axis: int, interval: Interval) -> Interval:
    """Unclipped input interval that ``interval`` of node ``node_index`` depends on, along ``axis``."""
    nodes = graph.nodes
    requests: list[list[Interval]] = [[] for _ in nodes]
    requests[node_index].append(interval)
    for i in range(node_index, graph.source, -1):
        node = nodes[i]
        if node.kind == "constant" or not requests[i]:
            continue
        own = hull(requests[i])
        for s in node.sources:
            if node.kind == "window":
                assert isinstance(node.layer, Window)
                requests[s].append(node.layer.input_interval(axis, own))
            else:
                requests[s].append(own)
    return hull(requests[graph.source])


def _crop(tensor: Any, layout: tuple[int, ...], crop: tuple[Interval, ...]) -> Any:
    if isinstance(tensor, (tuple, list)):  # the pieces of a split
        return tuple(_crop(piece, layout, crop) for piece in tensor)
    index: list[Any] = [slice(None)] * tensor.dim()
    for dim, (start, stop) in zip(layout, crop, strict=True):
        index[dim] = slice(start, stop)
    return tensor[tuple(index)]


def _fetch(graph: Graph, target: str) -> Any:
    """A constant from the live module (so replaced parameters are seen), else from the trace."""
    for owner in (graph.root, graph.gm):
        value: Any = owner
        try:
            for part in target.split("."):
                value = getattr(value, part)
        except AttributeError:
            continue
        return value
    raise internal_error(f"constant {target!r} vanished from the module")


def _evaluate(graph: Graph, fxn: fx.Node, values: dict[str, Any]) -> Any:
    args = fx.node.map_arg(fxn.args, lambda n: values[n.name])
    kwargs = fx.node.map_arg(fxn.kwargs, lambda n: values[n.name])
    if fxn.op == "get_attr":
        return _fetch(graph, str(fxn.target))
    if fxn.op == "call_module":
        return graph.gm.get_submodule(str(fxn.target))(*args, **kwargs)
    if fxn.op == "call_function":
        return fxn.target(*args, **kwargs)  # type: ignore[operator]
    self_arg, *rest = args
    return getattr(self_arg, str(fxn.target))(*rest, **kwargs)


def _weights(node: Node, values: dict[str, Any]) -> tuple[Any, Any, int] | None:
    """A convolution's weight, bias and groups, read live: from its module, or from the call."""
    layer = node.layer
    assert isinstance(layer, (Window, Rescale))
    if node.module is not None and layer.kind in ("conv", "transposed"):
        m = node.module
        return m.weight, m.bias, m.groups  # type: ignore[return-value]
    if layer.kind not in ("conv_function", "transposed"):
        return None
    fxn = node.fx_node
    args = fx.node.map_arg(fxn.args, lambda n: values[n.name])
    kwargs = fx.node.map_arg(fxn.kwargs, lambda n: values[n.name])
    weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
    bias = kwargs.get("bias", args[2] if len(args) > 2 else None)
    return weight, bias, layer.groups


def run_tile(
    graph: Graph,
    schedule: Schedule,
    x: torch.Tensor,
    *,
    stop_at_output_input: bool = False,
    globals: dict[str, Any] | None = None,
) -> Any:
    """Compute the output tile from input tile ``x`` (Rule P2): a tensor, or for a module that
    returns a structure a tuple with one crop (or None) per output (Rule P6). ``globals`` holds
    the global values the tile reads, by node name (Rule P8).

    With ``stop_at_output_input`` the last layer is not run; the padded tile it would read is
    returned instead (the backward pass uses this for a trailing conv).
    """
    nodes = graph.nodes
    env: dict[int, torch.Tensor] = {graph.source: x}  # graph Rule G16
    constants: dict[str, Any] = dict(globals or {})
    unread = [0] * len(nodes)
    for i, node in enumerate(nodes[: graph.output + 1]):
        if schedule.boxes[i] is not None and i != graph.source:  # Rule P8: computed here
            for s in node.sources:
                unread[s] += 1
    for o in graph.outputs if schedule.output_boxes else ():
        unread[o] += 1  # Rule P6
    for i in range(1, graph.output + 1):
        node = nodes[i]
        if node.kind == "constant":
            _constant(graph, node, constants)
            continue
        if not node.spatial:  # once, global and reduction nodes: outside tiles (Rule P8)
            continue
        box = schedule.boxes[i]
        if box is None or i <= graph.source:  # graph Rule G16: the source is read
            continue
        values = dict(constants)
        inputs = []
        for s in node.sources:
            edge = schedule.edges[(i, s)]
            tensor = _crop(env[s], nodes[s].layout, edge.crop)
            if node.inplace and s == graph.source:
                tensor = tensor.clone()  # Rule P3
            values[nodes[s].name] = tensor
            inputs.append((tensor, edge))
        if i == graph.output and stop_at_output_input:
            assert isinstance(node.layer, Window)
            tensor, edge = inputs[0]
            return node.layer.pad(tensor, edge.pads, edge.gathers)
        if node.kind == "window":
            assert isinstance(node.layer, Window)
            tensor, edge = inputs[0]
            sizes = nodes[node.sources[0]].sizes
            weights = _weights(node, values)
            env[i] = node.layer.run(tensor, edge.pads, edge.gathers, box, sizes, weights)
        elif node.kind == "rescale":  # Rule P7
            assert isinstance(node.layer, Rescale)
            tensor, edge = inputs[0]
            held = schedule.boxes[node.sources[0]]
            assert held is not None
            in_box = tuple((h[0] + c[0], h[0] + c[1]) for h, c in zip(held, edge.crop, strict=True))
            env[i] = node.layer.run(tensor, in_box, box, _weights(node, values))
        elif isinstance(node.layer, Pointwise) and node.layer.reshape:  # graph Rule G8
            target = list(node.shape)
            for dim, (start, stop) in zip(node.layout, box, strict=True):
                target[dim] = stop - start
            env[i] = inputs[0][0].reshape(target)
        else:
            env[i] = _evaluate(graph, node.fx_node, values)
        for s in node.sources:
            unread[s] -= 1
            if unread[s] == 0:
                del env[s]
    if not schedule.output_boxes:
        return env[graph.output]
    crops = tuple(
        None if crop is None else _crop(env[o], nodes[o].layout, crop)
        for o, crop in zip(graph.outputs, schedule.output_crops, strict=True)
    )
    return crops if graph.spec is not None else crops[0]


def _constant(graph: Graph, node: Node, values: dict[str, Any]) -> None:
    """A constant's value (graph Rules G4, G7): read live, or fixed when the graph was built."""
    if node.fixed:  # graph Rule G7
        values[node.name] = node.value
    elif not node.entries:  # spatial sizes are read only as geometry (Rule G7)
        values[node.name] = _evaluate(graph, node.fx_node, values)


def run_globals(graph: Graph, values: dict[str, Any], *, level: int | None = None) -> list[int]:
    """Compute the global nodes (graph Rule G13) of ``level`` (all when None) into ``values``,
    which holds the reductions' values; return the nodes computed. Spatial sizes read here are
    the whole image's. Nothing here updates running statistics (reductions Rule R5)."""
    done = []
    for i, node in enumerate(graph.nodes):
        if node.kind == "constant":
            if node.entries:  # a spatial size: the whole image's (Rule P8)
                values[node.name] = node.value
            else:
                _constant(graph, node, values)
        elif node.kind == "global" and (level is None or node.level == level):
            values[node.name] = _evaluate(graph, node.fx_node, values)
            done.append(i)
    return done


def run_once(graph: Graph) -> None:
    """The in-place buffer writes a forward makes (graph Rule G15), once per forward call."""
    values: dict[str, Any] = {}
    for node in graph.nodes:
        if node.kind == "constant":
            _constant(graph, node, values)
        elif node.kind == "once":
            values[node.name] = _evaluate(graph, node.fx_node, values)
