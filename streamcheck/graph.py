"""The streamed module as a graph of window, pointwise and constant nodes, checked for locality.

NOTE [ Graph ]
Rule G1. The module is traced with torch.fx. Known torch.nn layers (`layers.KNOWN_MODULES`, when
         their ``forward`` is not overridden) stay whole; everything else is traced through.
Rule G2. fx freezes ``self.training`` and other plain attributes of traced-through modules into the
         graph, so a graph holds only for the module state it was traced from: ``Streamed`` keys
         its plans on that state (NOTE [ Plan cache ] in ``state.py``).
Rule G3. Every tensor node carries a *layout*: which tensor dimension holds each spatial axis. The
         input is ``(N, C, *spatial)``; permutes move axes; window layers need the spatial axes
         last and in order.
Rule G4. ``get_attr`` nodes and nodes computed from them alone are constants (parameters such as
         ConvNeXt's layer scale, buffers such as FrozenBatchNorm2d's statistics, and what
         ``forward`` computes from them). Buffers are traced as ``get_attr`` too
         (``proxy_buffer_attributes``), never baked in as values. Constants are re-read from the
         live module and recomputed on every tile, so their gradients flow and later changes are
         seen, and must have size 1 along every spatial axis they broadcast over.
Rule G5. A layer that works in place may only overwrite a feature map that nothing else reads:
         otherwise the result depends on the order of reads and writes, which tiles do not keep.
         Hooks on streamed modules are refused: they would see tiles (or meta tensors) instead of
         the image.
Rule G6. Every violation is collected first, then all are raised together in one StreamcheckError
         naming each layer by its module path: before any computation happens.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import StreamcheckError
from .layers import (
    KNOWN_MODULES,
    Pointwise,
    Rejected,
    Window,
    classify_function,
    classify_method,
    classify_module,
)

__all__ = ["Graph", "Node", "build_graph"]


@dataclass
class Node:
    """One step of the streamed computation."""

    name: str
    path: str  # module path, for messages
    fx_node: fx.Node
    kind: str  # "input", "window", "pointwise", "constant" (or "rejected" while checking)
    layer: Window | Pointwise | None = None
    module: nn.Module | None = None
    sources: list[int] = field(default_factory=list)  # spatial tensor inputs, as node indices
    consumers: list[int] = field(default_factory=list)
    layout: tuple[int, ...] = ()  # tensor dim of each spatial axis (Rule G3)
    shape: tuple[int, ...] = ()  # tensor shape for the whole image
    inplace: bool = False

    @property
    def sizes(self) -> tuple[int, ...]:
        """Spatial sizes for the whole image, in axis order."""
        return tuple(self.shape[d] for d in self.layout)


@dataclass
class Graph:
    """Nodes in execution order; the last spatial node is the module's output."""

    root: nn.Module
    gm: fx.GraphModule  # shares parameters and submodules with ``root``
    nodes: list[Node]
    output: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.nodes[0].shape

    @property
    def output_node(self) -> Node:
        return self.nodes[self.output]


class _Tracer(fx.Tracer):
    proxy_buffer_attributes = True  # Rule G4

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # A subclass that overrides forward is not the layer we know (Rule G1).
        return isinstance(m, KNOWN_MODULES) and type(m).forward.__module__.startswith("torch.nn")


def _path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = next(reversed(stack.values()))
        owner = last[0] if isinstance(last, tuple) else str(next(reversed(stack.keys())))
        return f"{owner} ({node.name})" if owner else node.name
    return node.name


def _trace(module: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(module)
    except Exception as error:  # fx raises many kinds
        raise StreamcheckError(
            f"streamcheck: cannot trace {type(module).__name__} with torch.fx ({error}); "
            "streamed modules must be traceable: no control flow that depends on tensor values"
        ) from error
    return fx.GraphModule(module, graph)


def _meta_shapes(
    gm: fx.GraphModule, input_shape: Sequence[int], dtype: torch.dtype
) -> dict[str, Any]:
    """Tensor shapes of every node for the whole image, without computing anything (meta device)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(gm.parameters(), gm.buffers()):
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    meta_gm = copy.deepcopy(gm, memo)
    shapes: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            shapes[n.name] = tuple(result.shape) if isinstance(result, torch.Tensor) else None
            return result

    try:
        Recorder(meta_gm).run(torch.empty(tuple(input_shape), device="meta", dtype=dtype))
    except Exception as error:
        raise StreamcheckError(
            f"streamcheck: the module fails on an input of shape {tuple(input_shape)}: {error}"
        ) from error
    return shapes


def _classify(
    fxn: fx.Node, gm: fx.GraphModule
) -> tuple[Window | Pointwise | Rejected, nn.Module | None]:
    if fxn.op == "call_module":
        module = gm.get_submodule(str(fxn.target))
        return classify_module(module), module
    if fxn.op == "call_function":
        return classify_function(fxn.target, fxn.args, dict(fxn.kwargs)), None
    return classify_method(str(fxn.target), fxn.args, dict(fxn.kwargs)), None


def _is_inplace(fxn: fx.Node, module: nn.Module | None) -> bool:
    if module is not None:
        return bool(getattr(module, "inplace", False))
    if fxn.op == "call_method":
        return str(fxn.target).endswith("_")
    return bool(fxn.kwargs.get("inplace", False))


def build_graph(module: nn.Module, input_shape: Sequence[int], *, dtype: torch.dtype) -> Graph:
    """Trace ``module``, check that it is local, and attach shapes and layouts for ``input_shape``."""
    if len(input_shape) not in (3, 4, 5):
        raise StreamcheckError(
            f"streamcheck: input of shape {tuple(input_shape)} is not (N, C, *spatial) with 1 to 3 "
            "spatial axes"
        )
    gm = _trace(nn.Sequential(module) if isinstance(module, KNOWN_MODULES) else module)
    problems: list[str] = []
    nodes: list[Node] = []
    index: dict[str, int] = {}
    constants: set[str] = set()
    output: int | None = None
    for fxn in gm.graph.nodes:
        if fxn.op == "placeholder":
            if nodes:
                problems.append(f"  - the module takes several inputs ({fxn.name}); pass one image")
                continue
            index[fxn.name] = len(nodes)
            nodes.append(Node(fxn.name, "input", fxn, "input"))
            continue
        if fxn.op == "output":
            result = fxn.args[0]
            if not isinstance(result, fx.Node) or result.name not in index:
                problems.append("  - the module must return one tensor computed from its input")
            else:
                output = index[result.name]
            continue
        inputs = [a for a in fxn.all_input_nodes]
        spatial = [index[a.name] for a in inputs if a.name in index and a.name not in constants]
        if fxn.op == "get_attr" or not spatial:
            constants.add(fxn.name)
            index[fxn.name] = len(nodes)
            nodes.append(Node(fxn.name, _path(fxn), fxn, "constant"))
            continue
        layer, submodule = _classify(fxn, gm)
        path = _path(fxn)
        if isinstance(layer, Rejected):
            problems.append(f"  - '{path}': {layer.reason}. Fix: {layer.fix}.")
            index[fxn.name] = len(nodes)  # keep going, so that later layers are checked too
            nodes.append(Node(fxn.name, path, fxn, "rejected"))
            continue
        index[fxn.name] = len(nodes)
        nodes.append(
            Node(
                fxn.name,
                path,
                fxn,
                "window" if isinstance(layer, Window) else "pointwise",
                layer,
                submodule,
                sources=[i for i in spatial if nodes[i].kind != "constant"],
                inplace=_is_inplace(fxn, submodule),
            )
        )
    _check_rank(nodes, input_shape)
    _raise(problems)
    if output is None:
        raise StreamcheckError("streamcheck: the module returns nothing streamable")
    nodes = nodes[: output + 1] if all(n.kind == "constant" for n in nodes[output + 1 :]) else nodes
    shapes = _meta_shapes(gm, input_shape, dtype)
    for i, node in enumerate(nodes):
        node.shape = tuple(shapes[node.name]) if shapes.get(node.name) is not None else ()
        for s in node.sources:
            nodes[s].consumers.append(i)
    _check_inplace_and_hooks(module, nodes, problems)
    _attach_layouts(nodes, len(input_shape) - 2, problems)
    _raise(problems)
    return Graph(module, gm, nodes, output)


_AXES = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


def _check_rank(nodes: list[Node], input_shape: Sequence[int]) -> None:
    """An input whose rank does not fit the module's window layers (say, no batch axis)."""
    windows = [n for n in nodes if n.kind == "window" and isinstance(n.layer, Window)]
    ranks = {n.layer.ndim for n in windows if isinstance(n.layer, Window)}
    spatial = len(input_shape) - 2
    if len(ranks) != 1 or spatial in ranks:
        return
    (rank,) = ranks
    missing = rank + 2 - len(input_shape)
    fix = (
        "add the batch axis: image.unsqueeze(0) (or image[None])"
        if missing == 1
        else f"pass a tensor of shape {_AXES[rank]}"
    )
    raise StreamcheckError(
        f"streamcheck: the module's window layers ('{windows[0].path}', ...) are {rank}-D, so the "
        f"input must be {_AXES[rank]}; got shape {tuple(input_shape)} ({len(input_shape)} "
        f"dimensions). Fix: {fix}"
    )


def _check_inplace_and_hooks(module: nn.Module, nodes: list[Node], problems: list[str]) -> None:
    """Rule G5."""
    for node in nodes:
        if node.inplace and node.sources and len(nodes[node.sources[0]].consumers) > 1:
            problems.append(
                f"  - '{node.path}': works in place on a feature map that other layers also read, "
                "so the result depends on the order of reads and writes. Fix: use the "
                "out-of-place form (inplace=False, or assign the result)."
            )
    for name, m in module.named_modules():
        hooks = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
        if any(hooks):
            problems.append(
                f"  - '{name or type(module).__name__}': has forward or backward hooks, which "
                "would run on tiles instead of the image. Fix: remove them from the streamed "
                "part, or register them on the Streamed wrapper or the head."
            )


def _attach_layouts(nodes: list[Node], spatial_axes: int, problems: list[str]) -> None:
    nodes[0].layout = tuple(range(2, 2 + spatial_axes))
    for node in nodes[1:]:
        if node.kind == "constant":
            continue
        first = nodes[node.sources[0]]
        ndim = len(node.shape)
        if node.kind == "window":
            assert isinstance(node.layer, Window)
            expected = tuple(range(len(first.shape) - spatial_axes, len(first.shape)))
            if first.layout != expected or node.layer.ndim != spatial_axes:
                problems.append(
                    f"  - '{node.path}': a {node.layer.ndim}-D window layer applied to tensor "
                    f"dimensions {first.layout} that hold the {spatial_axes} spatial axes. Fix: "
                    "keep spatial axes last (undo permutes) before conv and pooling layers."
                )
                continue
            node.layout = first.layout
            continue
        assert isinstance(node.layer, Pointwise)
        node.layout = first.layout
        if node.layer.permutation is not None:
            fxn = node.fx_node
            dims = [d % ndim for d in node.layer.permutation(fxn.args, dict(fxn.kwargs))]
            node.layout = tuple(dims.index(d) for d in first.layout)
        mixed = {d % max(len(first.shape), 1) for d in node.layer.mixed_dims(len(first.shape))}
        clash = sorted(mixed & set(first.layout))
        if clash:
            problems.append(
                f"  - '{node.path}': mixes or indexes parameters by tensor dimension(s) {clash}, "
                "which hold spatial axes here. Fix: apply it over channels only (permute spatial "
                "axes out of those dimensions)."
            )
            continue
        for s in node.sources[1:]:
            other = nodes[s]
            if other.layout != first.layout or other.sizes != first.sizes:
                problems.append(
                    f"  - '{node.path}': combines feature maps of different spatial layout or size "
                    f"({first.sizes} and {other.sizes}). Fix: only combine maps of equal size."
                )
        for arg in node.fx_node.all_input_nodes:
            const = next((n for n in nodes if n.name == arg.name and n.kind == "constant"), None)
            if const is None or not const.shape:
                continue
            offset = ndim - len(const.shape)
            if any(d - offset >= 0 and const.shape[d - offset] != 1 for d in node.layout):
                problems.append(
                    f"  - '{node.path}': combines the feature map with the constant "
                    f"'{const.path}' of shape {const.shape}, which varies along a spatial axis. "
                    "Fix: only use per-channel constants in the streamed part."
                )


def _raise(problems: list[str]) -> None:
    if problems:
        raise StreamcheckError(
            "streamcheck: cannot stream this module exactly; these layers break locality:\n"
            + "\n".join(problems)
        )
