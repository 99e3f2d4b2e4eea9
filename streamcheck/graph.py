"""The streamed module as a graph of window, pointwise and constant nodes, checked for locality.

NOTE [ Graph ]
Rule G1. The module is traced with torch.fx. Known torch.nn layers (`layers.KNOWN_MODULES`, when
         their ``forward`` is not overridden) stay whole; everything else is traced through, so a
         subclass with its own ``forward`` (timm's BatchNormAct2d, ScaledStdConv2d) is understood
         from the functions it calls (``F.batch_norm``, ``F.conv2d``, an activation).
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
Rule G5b. An in-place elementwise method (``out.mul_(gain)``, NFNet's skip-init gain) on a map that
          other layers read after it is rewritten into its out-of-place form, and the later
          readers read the rewritten node, when the map's storage is provably its own: the map
          comes from an operation that allocates its result, passed on only through layers that
          return their input (``nn.Identity``, dropout in eval mode, in-place activations) each
          read by the next alone, and no reader of the map aliases it. Readers before the write
          keep the value before it, as in PyTorch. Anything else stays refused by Rule G5.
Rule G6. Every violation is collected first, then all are raised together in one StreamcheckError
         naming each layer by its module path: before any computation happens. What every node
         computes for the whole image is known first, from one run on the meta device; if the
         module fails there, the violations found before the failing node are raised, else the
         failure.
Rule G7. Shape reads (``x.shape``, ``x.size(d)``, ``x.ndim``, ``x.dim()``) take their value from the
         meta run. The rank and the sizes of non-spatial dimensions are the same on every tile:
         they, and plain values computed from them, are *fixed* constants. A spatial size differs
         per tile, so it may only reach a reshape (Rule G8) or the amounts of an ``F.pad`` (a
         window built for the whole image, layers Rule L2) or decide a branch (Rule G17); any
         other use is an error naming the source line (found by tracing again with stack traces,
         only then).
Rule G8. A reshape (view, reshape, flatten, unflatten, squeeze, unsqueeze, nn.Flatten) is understood
         from its whole-image shapes in and out (`layers.reshaped_layout`): it is local when every
         spatial axis stays a dimension of its own, of the same size (channel shuffle splits and
         merges channel dimensions only). On a tile it runs as the whole-image target shape with
         the tile's spatial sizes put in, whatever its arguments say.
Rule G9. Indexing (``x[:, a:b]``, ``x[:, None, 0]``) may select, slice or add non-spatial dimensions
         and must take spatial ones whole (`layers.indexed_layout`); ``split``, ``chunk`` and
         ``unbind`` cut one non-spatial dimension into pieces that share the source's layout.
Rule G10. Layers that change scale (``resampling.Rescale``: transposed convolutions, upsampling,
          shuffles) need their spatial axes last, like window layers, and are fitted to the whole
          image's sizes in and out (resampling Rule RS1); ``F.interpolate(size=...)`` may read
          spatial sizes (Rule G7), since its sizes are the whole image's. Every spatial node gets
          its scale (geometry Rule MS1); merging maps of different scale is refused.
Rule G11. The module may return one tensor, or a tuple, list or dict (nested) of them: the outputs
          are the leaves of that structure (``torch.utils._pytree``), each a spatial node, and
          ``Streamed`` returns the same structure (geometry Rules MS5-MS7).
Rule G12. Code of other libraries that fx cannot trace but that is local: timm's ``pad_same``
          (TF 'SAME' padding, whose amounts depend on the input size through Python arithmetic) is
          kept as one call and becomes a fixed pad computed from the whole image (geometry Rule
          MS8); timm's SpaceToDepth and DepthToSpace stay whole (Rule MS4). Nothing is imported
          for this: only what the model's own code already imported is recognised.
Rule G16. A *cut point* is a spatial node that every later spatial node reaches the image through
          (no spatial node after it reads one before it; reductions are the passes' concern, plan
          Rule KM3). A pass may start there and read a kept stitched map of it instead of the image
          (``Graph.cut(taps, source=...)``): its nodes are the same objects at the same indices,
          the ones before the cut are simply not computed.
Rule G17. Python control flow on a traced value (``if x.shape[-2] < 7:`` in timm's VGG head) is
          decided while tracing: the module traced so far runs on the meta device for the whole
          image, and a plain ``bool`` (from shapes, ranks and sizes: the whole image's) takes its
          branch, the one the plain module takes on that image. The graph then holds for that
          input shape only: every graph is built for one input shape, and every plan is cached
          under it (NOTE [ Plan cache ], Rule K1). A condition on a tensor's values has no such
          bool and stays a trace error naming the module it is in.
"""

from __future__ import annotations

import copy
import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx import _symbolic_trace
from torch.fx.immutable_collections import immutable_dict
from torch.utils import _pytree as pytree

from .errors import Problem, StreamcheckError, internal_error
from .geometry import scale_after
from .layers import (
    ELEMENTWISE_METHODS,
    KNOWN_MODULES,
    Pointwise,
    Rejected,
    Window,
    classify_function,
    classify_method,
    classify_module,
    foreign_functions,
    foreign_leaves,
    indexed_layout,
    reshaped_layout,
)
from .reductions import (
    Reduction,
    check_count,
    desugar_norms,
    reduction_of,
    spatial_dims_of,
    with_rank,
)
from .resampling import Rescale

__all__ = ["Graph", "Node", "build_graph", "unflatten"]


@dataclass
class Node:
    """One step of the streamed computation."""

    name: str
    path: str  # module path, for messages
    fx_node: fx.Node
    #: "input", "window", "rescale", "pointwise" (spatial: computed in tiles), "constant",
    #: "reduction", "global" (Rules G13-G14), "once" (Rule G15) or "rejected"
    kind: str
    layer: Window | Pointwise | Rescale | Reduction | None = None
    module: nn.Module | None = None
    sources: list[int] = field(default_factory=list)  # spatial tensor inputs, as node indices
    consumers: list[int] = field(default_factory=list)
    layout: tuple[int, ...] = ()  # tensor dim of each spatial axis (Rule G3)
    shape: tuple[int, ...] = ()  # tensor shape for the whole image
    inplace: bool = False
    splits: bool = False  # the value is a tuple of pieces (split, chunk)
    fixed: bool = False  # a shape read fixed when the graph is built: ``value`` (Rule G7)
    value: Any = None
    entries: frozenset[int] = frozenset()  # which entries of a shape read are spatial sizes
    scale: tuple[Fraction, ...] = ()  # per spatial axis, relative to the input (Rule G10)
    reads: list[int] = field(default_factory=list)  # global and reduction inputs (Rule G13)
    #: Rule G14: for a reduction, its level; for a global, the highest level it reads; for a
    #: spatial node, the highest level of the statistics it depends on (computed in later passes)
    level: int = 0

    @property
    def spatial(self) -> bool:
        return self.kind in _SPATIAL

    @property
    def sizes(self) -> tuple[int, ...]:
        """Spatial sizes for the whole image, in axis order."""
        return tuple(self.shape[d] for d in self.layout)


@dataclass
class Graph:
    """Nodes in execution order; ``output`` is the last output node (the only one unless the module
    returns a structure, Rule G11)."""

    root: nn.Module
    gm: fx.GraphModule  # shares parameters and submodules with ``root``
    nodes: list[Node]
    output: int
    outputs: tuple[int, ...] = ()  # every output, in the order of the returned structure
    spec: Any = None  # the returned structure, outputs by position (`unflatten`); None: one tensor
    #: Whether the plan needs geometry Rules MS5-MS6: several outputs or a layer that rescales;
    #: plain downsampling chains and DAGs keep geometry Rule 6.
    multiscale: bool = False
    source: int = 0  # the node tiles read (Rule G16): the image, or a cut point's kept map

    def __post_init__(self) -> None:
        self.multiscale = self.spec is not None or any(n.kind == "rescale" for n in self.nodes)

    @property
    def reductions(self) -> tuple[int, ...]:
        """The reduction nodes (Rule G13), in execution order."""
        return tuple(i for i, n in enumerate(self.nodes) if n.kind == "reduction")

    @property
    def levels(self) -> int:
        """How many statistic levels depend on each other (Rule G14); 0 for a local module."""
        return max((self.nodes[r].level for r in self.reductions), default=0)

    def cut(self, taps: Sequence[int], *, source: int = 0) -> Graph:
        """This graph with ``taps`` (spatial nodes) as its outputs: what one tile pass computes
        (Rule G14). One tap keeps geometry Rule 6; several are outputs of Rule G11. A pass
        that reads a kept map starts at its cut point ``source`` (Rule G16) instead of the image."""
        taps = tuple(taps)
        spec = None if len(taps) == 1 else tuple(range(len(taps)))
        if source and (source not in self.cut_points() or source >= min(taps)):
            raise internal_error(f"node {source} is no cut point before {taps}")
        return Graph(self.root, self.gm, self.nodes, max(taps), taps, spec, source=source)

    def cut_points(self) -> tuple[int, ...]:
        """Rule G16: the spatial nodes every later spatial node reaches the image through."""
        nodes = self.nodes
        lowest = len(nodes)  # the lowest source read by a spatial node after the candidate
        found = []
        for i in range(len(nodes) - 1, 0, -1):
            node = nodes[i]
            if node.spatial and node.kind != "rejected" and not node.splits and lowest >= i:
                found.append(i)
            if node.spatial and node.sources:
                lowest = min(lowest, *node.sources)
        return tuple(reversed(found))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.nodes[0].shape

    @property
    def source_node(self) -> Node:
        """What the tiles of this graph read: the image, or a kept map (Rule G16)."""
        return self.nodes[self.source]

    @property
    def output_node(self) -> Node:
        return self.nodes[self.output]


#: The whole image a module is traced for (Rule G17): its shape and dtype.
Whole = tuple[tuple[int, ...], torch.dtype]
#: Runs a block while fx traces as if it did not (Rule G17); private to fx, so looked up.
_unpatched = getattr(_symbolic_trace, "_maybe_revert_all_patches", None)


class _Tracer(fx.Tracer):
    proxy_buffer_attributes = True  # Rule G4

    def __init__(self, whole: Whole) -> None:
        super().__init__(autowrap_functions=foreign_functions())  # Rule G12
        self.foreign = foreign_leaves()
        self.whole = whole

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # A subclass that overrides forward is not the layer we know (Rule G1).
        if self.foreign and type(m) in self.foreign:
            return True
        return isinstance(m, KNOWN_MODULES) and type(m).forward.__module__.startswith("torch.nn")

    def to_bool(self, obj: fx.Proxy) -> bool:
        """Rule G17: the branch the whole image takes, when the condition is a plain bool."""
        graph = fx.Graph()
        copies: dict[fx.Node, fx.Node] = {}
        graph.graph_copy(self.graph, copies)
        graph.output(copies[obj.node])
        if _unpatched is None:
            return super().to_bool(obj)
        with _unpatched():  # fx's patches (Module.__call__ among them) off meanwhile
            values, failure = _meta_values(fx.GraphModule(self.root, graph), *self.whole)
        value = values.get(copies[obj.node].name)
        if type(value) is bool:
            return value
        where = next(reversed(self.module_stack.values()), ("",))[0]
        what = "a tensor's values" if failure is None else f"a value that fails on meta: {failure}"
        raise fx.proxy.TraceError(
            f"{repr(where) if where else 'the module'} branches on {what} "
            f"({obj.node.format_node()})"
        )


def _path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = next(reversed(stack.values()))
        owner = last[0] if isinstance(last, tuple) else str(next(reversed(stack.keys())))
        return f"{owner} ({node.name})" if owner else node.name
    return node.name


def _trace(module: nn.Module, whole: Whole) -> fx.GraphModule:
    try:
        graph = _Tracer(whole).trace(module)
    except Exception as error:  # fx raises many kinds
        raise StreamcheckError(
            f"streamcheck: cannot trace {type(module).__name__} with torch.fx ({error}); "
            "streamed modules must be traceable: no control flow that depends on tensor values"
        ) from error
    return fx.GraphModule(module, graph)


def _meta_values(
    gm: fx.GraphModule, input_shape: Sequence[int], dtype: torch.dtype
) -> tuple[dict[str, Any], StreamcheckError | None]:
    """What every node computes for the whole image, without computing anything (meta device):
    meta tensors (for shapes), tuples of them, and plain values such as shape reads; and the
    error if the module fails on the way (values up to there are kept)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(gm.parameters(), gm.buffers()):
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    meta_gm = copy.deepcopy(gm, memo)
    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            values[n.name] = result
            return result

    try:
        Recorder(meta_gm).run(torch.empty(tuple(input_shape), device="meta", dtype=dtype))
    except Exception as error:
        failure = StreamcheckError(
            f"streamcheck: the module fails on an input of shape {tuple(input_shape)}: {error}"
        )
        failure.__cause__ = error
        return values, failure
    return values, None


def _shape(value: Any) -> tuple[int, ...]:
    """The shape of a tensor, or of the first piece of a split (all pieces share spatial sizes)."""
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        value = value[0]
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _classify(
    fxn: fx.Node,
    gm: fx.GraphModule,
    fixed: dict[str, Any],
    metas: dict[str, Any],
    spatial_axes: int,
) -> tuple[Window | Pointwise | Rescale | Reduction | Rejected, nn.Module | None]:
    if fxn.op == "call_module":
        module = gm.get_submodule(str(fxn.target))
        return classify_module(module, spatial_axes), module
    # Shape reads fixed at build time fill in the arguments (Rule G7).
    args = fx.node.map_arg(fxn.args, lambda n: fixed.get(n.name, n))
    kwargs = dict(fx.node.map_arg(fxn.kwargs, lambda n: fixed.get(n.name, n)))
    if fxn.op == "call_function":

        def shape_of(arg: Any) -> tuple[int, ...] | None:
            meta = metas.get(arg.name) if isinstance(arg, fx.Node) else None
            return tuple(meta.shape) if isinstance(meta, torch.Tensor) else None

        return (
            classify_function(
                fxn.target, args, kwargs, shape_of=shape_of, spatial_axes=spatial_axes
            ),
            None,
        )
    return classify_method(str(fxn.target), args, kwargs), None


def _is_inplace(fxn: fx.Node, module: nn.Module | None) -> bool:
    if module is not None:
        return bool(getattr(module, "inplace", False))
    if fxn.op == "call_method":
        return str(fxn.target).endswith("_")
    return bool(fxn.kwargs.get("inplace", False))


_SHAPE_ATTRIBUTES = {"shape", "ndim"}
_SHAPE_METHODS = {"size", "dim", "ndimension"}


def _is_shape_read(fxn: fx.Node) -> bool:
    if fxn.op == "call_function" and fxn.target is getattr:
        return fxn.args[1] in _SHAPE_ATTRIBUTES
    return fxn.op == "call_method" and fxn.target in _SHAPE_METHODS


def _spatial_entries(value: Any, source: Node, fxn: fx.Node) -> frozenset[int]:
    """Which entries of a shape read are spatial sizes (Rule G7): indices into a torch.Size, or
    {0} for a single size."""
    if fxn.op == "call_function" or fxn.target in ("dim", "ndimension"):
        return frozenset(source.layout) if isinstance(value, tuple) else frozenset()
    dim = fxn.args[1] if len(fxn.args) > 1 else fxn.kwargs.get("dim")
    if dim is None:
        return frozenset(source.layout)
    return frozenset({0}) if int(dim) % len(source.shape) in source.layout else frozenset()  # type: ignore[arg-type]


def _indexed_entries(entries: frozenset[int], value: Any, index: Any) -> frozenset[int]:
    """The spatial entries of ``shape[index]``."""
    positions = range(len(value))
    if isinstance(index, slice):
        return frozenset(i for i, p in enumerate(positions[index]) if p in entries)
    return frozenset({0}) if positions[index] in entries else frozenset()


def build_graph(module: nn.Module, input_shape: Sequence[int], *, dtype: torch.dtype) -> Graph:
    """Trace ``module``, check that it is local, and attach shapes and layouts for ``input_shape``."""
    if len(input_shape) not in (3, 4, 5):
        raise StreamcheckError(
            f"streamcheck: input of shape {tuple(input_shape)} is not (N, C, *spatial) with 1 to 3 "
            "spatial axes"
        )
    root = nn.Sequential(module) if isinstance(module, KNOWN_MODULES) else module
    whole = (tuple(input_shape), dtype)
    gm = _trace(root, whole)
    desugar_norms(gm)  # reductions Rule R4
    _functionalize_inplace(gm)  # Rule G5b
    _check_rank(gm, input_shape)
    metas, failure = _meta_values(gm, input_shape, dtype)
    spatial_axes = len(input_shape) - 2
    problems: list[Problem] = []
    nodes: list[Node] = []
    index: dict[str, int] = {}
    fixed: dict[str, Any] = {}  # values fixed at build time (Rule G7), by node name
    known: dict[str, Any] = {}  # those and the whole image's spatial sizes
    lines = _Lines(root, whole)
    output: int | None = None
    outputs: tuple[int, ...] = ()
    output_spec: Any = None

    def add(node: Node) -> None:
        index[node.name] = len(nodes)
        nodes.append(node)

    for fxn in gm.graph.nodes:
        if failure is not None and fxn.name not in metas:
            # The module fails here: report what was found before and whether this layer is
            # itself non-local (train-mode BatchNorm fails on meta for a 1-pixel map), else the
            # failure.
            if fxn.op == "call_module":
                verdict = classify_module(gm.get_submodule(str(fxn.target)))
                if isinstance(verdict, Rejected):
                    problems.append(Problem(f"{_path(fxn)}", f"{verdict.reason}", f"{verdict.fix}"))
            break
        if fxn.op == "placeholder":
            if nodes:
                problems.append(
                    Problem("", f"the module takes several inputs ({fxn.name})", "pass one image")
                )
                continue
            add(Node(fxn.name, "input", fxn, "input", shape=tuple(input_shape)))
            nodes[0].layout = tuple(range(2, 2 + spatial_axes))
            nodes[0].scale = (Fraction(1),) * spatial_axes
            continue
        if fxn.op == "output":  # Rule G11
            result = fxn.args[0]
            leaves = pytree.tree_leaves(result)
            spec = (
                None
                if isinstance(result, fx.Node)
                else _structure(result, iter(range(len(leaves))))
            )
            if not leaves or not all(
                isinstance(leaf, fx.Node)
                and leaf.name in index
                and nodes[index[leaf.name]].kind != "constant"
                and (spec is None or index[leaf.name] != 0)
                for leaf in leaves
            ):
                problems.append(
                    Problem(
                        "",
                        "the module must return one tensor computed from its input, or a "
                        "tuple, list or dict of them",
                        "return the feature maps",
                    )
                )
            else:
                outputs = tuple(index[leaf.name] for leaf in leaves)
                output, output_spec = max(outputs), spec
            continue
        inputs = [nodes[index[a.name]] for a in fxn.all_input_nodes if a.name in index]
        streamed = [n for n in inputs if n.spatial]
        reads = [index[n.name] for n in inputs if n.kind in ("global", "reduction")]
        sizes = [n for n in inputs if n.entries]
        path = _path(fxn)
        meta = metas.get(fxn.name)
        if fxn.op == "get_attr" or (not streamed and not sizes and not reads):
            if fxn.op != "get_attr" and _is_plain(meta):  # shapes, ranks: fixed (Rule G7)
                _add_size(
                    add, known, fixed, Node(fxn.name, path, fxn, "constant"), meta, frozenset()
                )
                continue
            kind = "once" if _writes_buffer(fxn) else "constant"  # Rule G15
            written = str(getattr(fxn.args[0], "target", "")) if fxn.args else ""
            if kind == "once" and not written.endswith("num_batches_tracked"):
                problems.append(
                    Problem(
                        path,
                        f"writes the buffer '{written}' in place during forward, "
                        "which tiles and passes would repeat",
                        "update it outside forward, or move the layer into the head",
                    )
                )
            add(Node(fxn.name, path, fxn, kind, shape=_shape(meta)))
            continue
        if not streamed and reads:  # computed once, outside tiles (Rule G13)
            if _is_plain(meta):
                _add_size(
                    add, known, fixed, Node(fxn.name, path, fxn, "constant"), meta, frozenset()
                )
                continue
            add(Node(fxn.name, path, fxn, "global", shape=_shape(meta), reads=reads))
            continue
        if not streamed:  # arithmetic on spatial sizes: still a spatial size (Rule G7)
            if isinstance(meta, torch.Tensor):
                problems.append(_spatial_size_problem(fxn, path, sizes[0], lines))
                add(Node(fxn.name, path, fxn, "constant"))
                continue
            entries = (
                _indexed_entries(sizes[0].entries, metas[sizes[0].name], fxn.args[1])
                if fxn.target is operator.getitem and fxn.args[0] is sizes[0].fx_node
                else frozenset({0})
            )
            _add_size(add, known, fixed, Node(fxn.name, path, fxn, "constant"), meta, entries)
            continue
        if _is_shape_read(fxn):
            entries = _spatial_entries(meta, streamed[0], fxn)
            _add_size(add, known, fixed, Node(fxn.name, path, fxn, "constant"), meta, entries)
            continue
        if fxn.op == "call_function" and fxn.target is operator.getitem:
            layer: Window | Pointwise | Rescale | Reduction | Rejected = (
                Pointwise()
            )  # Rule G9 in _attach_layout
            submodule = None
        else:
            layer, submodule = _classify(fxn, gm, known, metas, spatial_axes)
            layer = _as_reduction(fxn, layer, streamed[0], known)
        if isinstance(layer, Reduction):  # Rule G13
            check_count(layer, streamed[0].shape)
            add(
                Node(
                    fxn.name,
                    path,
                    fxn,
                    "reduction",
                    layer,
                    submodule,
                    sources=[index[streamed[0].name]],
                    shape=_shape(meta),
                    reads=reads,
                )
            )
            continue
        if isinstance(layer, Rejected):
            problems.append(Problem(f"{path}", f"{layer.reason}", f"{layer.fix}"))
            kind = "rejected"  # kept with a layout: later layers are checked too
        else:
            kind = {Window: "window", Rescale: "rescale"}.get(type(layer), "pointwise")
        node = Node(
            fxn.name,
            path,
            fxn,
            kind,
            None if isinstance(layer, Rejected) else layer,
            submodule,
            sources=[index[n.name] for n in streamed],
            shape=_shape(meta),
            inplace=_is_inplace(fxn, submodule),
            splits=isinstance(layer, Pointwise) and layer.splits,
            reads=reads,
        )
        if sizes and not _reads_sizes_as_geometry(node):
            problems.append(_spatial_size_problem(fxn, path, sizes[0], lines))
        else:
            found = len(problems)
            _attach_layout(node, nodes, spatial_axes, fixed, problems)
            if len(problems) > found:
                node.kind = "rejected"
        if node.kind in ("pointwise", "rejected") and not _keeps_sizes(node, nodes):
            if node.kind == "pointwise":  # a safety net: pointwise layers keep spatial sizes
                problems.append(
                    Problem(
                        f"{path}",
                        f"changes the spatial sizes {nodes[node.sources[0]].sizes} (shape {node.shape}, spatial axes in dimensions {node.layout}), which a layer applied per position cannot",
                        "move it into the head",
                    )
                )
            rank = len(node.shape)
            node.layout = tuple(range(rank - spatial_axes, rank)) if rank >= spatial_axes else ()
        if not _attach_scale(node, nodes, problems):
            node.kind = "rejected"
        add(node)
    _raise(problems)
    if failure is not None:
        raise failure
    if output is None:
        raise StreamcheckError("streamcheck: the module returns nothing streamable")
    if all(n.kind == "constant" for n in nodes[output + 1 :]):
        nodes = nodes[: output + 1]
    for i, node in enumerate(nodes):
        for s in node.sources:
            nodes[s].consumers.append(i)
    _check_inplace_and_hooks(module, nodes, problems)
    _raise(problems)
    _attach_levels(nodes)
    return Graph(module, gm, nodes, output, outputs, output_spec)


def _writes_buffer(fxn: fx.Node) -> bool:
    """An in-place method on a parameter or buffer (Rule G15)."""
    return (
        fxn.op == "call_method"
        and str(fxn.target).endswith("_")
        and bool(fxn.args)
        and isinstance(fxn.args[0], fx.Node)
        and fxn.args[0].op == "get_attr"
    )


def _as_reduction(
    fxn: fx.Node, layer: Any, source: Node, known: dict[str, Any]
) -> Window | Pointwise | Rescale | Reduction | Rejected:
    """A layer that reduces over spatial axes as a reduction (Rule G13), or refused when it
    reduces over only some of them."""
    rank = len(source.shape)
    if isinstance(layer, Pointwise) and layer.reduction:
        mixed = {d % rank for d in layer.mixed_dims(rank)}
        if not mixed & set(source.layout):
            return layer
        name = str(fxn.target) if fxn.op == "call_method" else getattr(fxn.target, "__name__", "")
        args = fx.node.map_arg(fxn.args, lambda n: known.get(n.name, n))
        kwargs = dict(fx.node.map_arg(fxn.kwargs, lambda n: known.get(n.name, n)))
        found = reduction_of(name, args, kwargs, rank)
        if isinstance(found, str):
            return Rejected(found, f"move it into the head, or {_REDUCE_FIX}")
        layer = found
    if not isinstance(layer, Reduction):
        return layer
    layer = with_rank(layer, rank)
    missing = sorted(set(source.layout) - set(spatial_dims_of(layer, source.layout)))
    if missing:
        return Rejected(
            f"reduces over only some spatial axes (not tensor dimension(s) {missing}), which is "
            "not a statistic of the whole map",
            f"reduce over every spatial axis, or {_REDUCE_FIX}",
        )
    return layer


_REDUCE_FIX = "stream only the layers before it (streamcheck.split)"


def _attach_levels(nodes: list[Node]) -> None:
    """Rule G14: a reduction's level is one more than the highest level its input depends on;
    a global's and a spatial node's, the highest level of what they read."""
    for node in nodes:
        below = [nodes[i].level for i in (*node.sources, *node.reads)]
        node.level = max(below, default=0) + (1 if node.kind == "reduction" else 0)


def _structure(result: Any, positions: Any) -> Any:
    """The returned structure with each output replaced by its position (Rule G11); fx turns dicts
    and lists into immutable ones, which this undoes."""
    if isinstance(result, fx.Node):
        return next(positions)
    if isinstance(result, dict):  # OrderedDict stays one; fx's immutable_dict becomes a dict
        kind: Any = dict if isinstance(result, immutable_dict) else type(result)
        return kind((k, _structure(v, positions)) for k, v in result.items())
    if isinstance(result, tuple) and hasattr(result, "_fields"):  # a named tuple
        return type(result)(*(_structure(v, positions) for v in result))
    if isinstance(result, (tuple, list)):
        kind = tuple if isinstance(result, tuple) else list
        return kind(_structure(v, positions) for v in result)
    return next(positions)  # not a node: refused with the other leaves


def unflatten(structure: Any, values: Sequence[Any]) -> Any:
    """``structure`` (from `_structure`) with position i replaced by ``values[i]``.

    >>> unflatten({"a": 0, "b": [1, (2,)]}, ["x", "y", "z"])
    {'a': 'x', 'b': ['y', ('z',)]}
    """
    if isinstance(structure, int):
        return values[structure]
    if isinstance(structure, dict):
        return type(structure)((k, unflatten(v, values)) for k, v in structure.items())
    if isinstance(structure, tuple) and hasattr(structure, "_fields"):
        return type(structure)(*(unflatten(v, values) for v in structure))
    return type(structure)(unflatten(v, values) for v in structure)


def _keeps_sizes(node: Node, nodes: list[Node]) -> bool:
    """Whether the node's layout fits its shape and gives its first source's spatial sizes."""
    first = nodes[node.sources[0]] if node.sources else node
    if any(not 0 <= d < len(n.shape) for n in (node, first) for d in n.layout):
        return False
    return node.splits or node.sizes == first.sizes


def _is_plain(value: Any) -> bool:
    """A value without tensors: meta runs compute shapes and ranks, never tensor contents."""
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, (int, float, bool, str, type(None), slice, torch.dtype))


def _add_size(
    add: Any,
    known: dict[str, Any],
    fixed: dict[str, Any],
    node: Node,
    value: Any,
    entries: frozenset[int],
) -> None:
    """A shape read (Rule G7): a constant fixed now, or a spatial size that only geometry may read."""
    node.value, node.entries, node.fixed = value, entries, not entries
    known[node.name] = value
    if node.fixed:
        fixed[node.name] = value
    add(node)


def _reads_sizes_as_geometry(node: Node) -> bool:
    """Reshapes, F.pad and F.interpolate read spatial sizes as whole-image geometry (Rules G7,
    G10)."""
    layer = node.layer
    return (
        (isinstance(layer, Pointwise) and layer.reshape)
        or (isinstance(layer, Window) and layer.kind == "pad")
        or isinstance(layer, Rescale)
    )


def _attach_scale(node: Node, nodes: list[Node], problems: list[Problem]) -> bool:
    """The node's scale from its sources' (geometry Rule MS1); False, with a problem, when it
    merges maps of different scale."""
    first = nodes[node.sources[0]]
    layer = node.layer
    if node.kind == "rejected" or len(first.scale) != len(first.layout):
        node.scale = first.scale  # after a rejected layer: its problem is reported already
        return True
    if isinstance(layer, Window):
        node.scale = tuple(
            scale_after(s, down=k) for s, k in zip(first.scale, layer.stride, strict=True)
        )
        return True
    if isinstance(layer, Rescale):  # factors are whole or 1/b (space-to-depth)
        node.scale = tuple(
            scale_after(s, up=f.numerator, down=f.denominator)
            for s, f in zip(first.scale, layer.factor, strict=True)
        )
        return True
    node.scale = first.scale
    for s in node.sources[1:]:
        other = nodes[s]
        if other.scale != first.scale and other.sizes == first.sizes:
            problems.append(
                Problem(
                    f"{node.path}",
                    f"merges feature maps at different scales ({_scales(first.scale)} of the input from '{first.path}', {_scales(other.scale)} from '{other.path}'), whose pixels are not at the same places",
                    "only merge maps reached by the same total stride and upsampling",
                )
            )
            return False
    return True


def _scales(scale: tuple[Fraction, ...]) -> str:
    return " x ".join(str(s) for s in scale)


def _spatial_size_problem(fxn: fx.Node, path: str, size: Node, lines: _Lines) -> Problem:
    line = lines(fxn.name) or lines(size.name)
    return Problem(
        path,
        f"computes with the spatial size read at '{size.path}'{line}, which differs per tile",
        "use only the channel and batch sizes (x.shape[1], x.size(0), x.ndim) in the streamed "
        "part, or move this layer into the head",
    )


class _Lines:
    """Source lines of traced nodes, for messages: the module is traced again with stack traces
    only when a message needs one (recording them on every trace would slow plan building)."""

    def __init__(self, module: nn.Module, whole: Whole) -> None:
        self.module = module
        self.whole = whole
        self.traces: dict[str, str] | None = None

    def __call__(self, name: str) -> str:
        if self.traces is None:
            tracer = _Tracer(self.whole)
            tracer.record_stack_traces = True
            try:
                graph = tracer.trace(self.module)
            except Exception:  # the first trace succeeded; this one is only for the message
                graph = fx.Graph()
            self.traces = {n.name: n.meta.get("stack_trace") or "" for n in graph.nodes}
        lines = [t.strip() for t in self.traces.get(name, "").splitlines() if t.strip()]
        frames = [(a, b) for a, b in zip(lines, lines[1:], strict=False) if a.startswith("File ")]
        user = [(a, b) for a, b in frames if "/torch/fx/" not in a]
        return f" ({user[0][0]}: {user[0][1]})" if user else ""


_AXES = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


def _check_rank(gm: fx.GraphModule, input_shape: Sequence[int]) -> None:
    """An input whose rank does not fit the module's window layers (say, no batch axis)."""
    windows = []
    for fxn in gm.graph.nodes:
        if fxn.op == "call_module":
            layer = classify_module(gm.get_submodule(str(fxn.target)))
            if isinstance(layer, Window):
                windows.append((str(fxn.target), layer.ndim))
    ranks = {rank for _, rank in windows}
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
        f"streamcheck: the module's window layers ('{windows[0][0]}', ...) are {rank}-D, so the "
        f"input must be {_AXES[rank]}; got shape {tuple(input_shape)} ({len(input_shape)} "
        f"dimensions). Fix: {fix}"
    )


_ALLOCATING_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.cat,
    torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d,
}  # fmt: skip
_ALLOCATING_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_PASSING_METHODS = {"contiguous", "to", "float", "double", "half", "bfloat16", "type_as"}


def _passes_input_on(gm: fx.GraphModule, fxn: fx.Node) -> bool:
    """Whether ``fxn`` may return its input tensor itself (Rule G5b)."""
    if fxn.op == "call_module":
        module = gm.get_submodule(str(fxn.target))
        dropout = isinstance(module, nn.modules.dropout._DropoutNd) and not module.training
        return isinstance(module, nn.Identity) or dropout or bool(getattr(module, "inplace", False))
    if fxn.op == "call_method":
        name = str(fxn.target)
        return name in _PASSING_METHODS or name.endswith("_")
    return False


def _owns_storage(gm: fx.GraphModule, fxn: fx.Node) -> bool:
    """Rule G5b: ``fxn``'s result is a tensor no other node's value shares."""
    while _passes_input_on(gm, fxn):
        source = fxn.args[0] if fxn.args else None
        if not isinstance(source, fx.Node) or len(source.users) != 1:
            return False
        fxn = source
    if fxn.op == "call_module":
        module = gm.get_submodule(str(fxn.target))
        return isinstance(module, _ALLOCATING_MODULES)
    return fxn.op == "call_function" and fxn.target in _ALLOCATING_FUNCTIONS


def _functionalize_inplace(gm: fx.GraphModule) -> None:
    """Rule G5b (in place on ``gm``)."""
    order = {fxn: i for i, fxn in enumerate(gm.graph.nodes)}
    changed = False
    for fxn in list(gm.graph.nodes):
        name = str(fxn.target)
        if not (fxn.op == "call_method" and name.endswith("_")) or not fxn.args:
            continue
        target = fxn.args[0]
        if name[:-1] not in ELEMENTWISE_METHODS or not isinstance(target, fx.Node):
            continue
        later = [u for u in target.users if u is not fxn and order[u] > order[fxn]]
        if not later or not _owns_storage(gm, target):
            continue
        if any(_passes_input_on(gm, u) for u in target.users if u is not fxn):
            continue
        fxn.target = name[:-1]
        for user in later:
            user.replace_input_with(target, fxn)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _check_inplace_and_hooks(module: nn.Module, nodes: list[Node], problems: list[Problem]) -> None:
    """Rule G5."""
    for node in nodes:
        if node.inplace and node.sources and len(nodes[node.sources[0]].consumers) > 1:
            problems.append(
                Problem(
                    f"{node.path}",
                    "works in place on a feature map that other layers also read, so the result depends on the order of reads and writes",
                    "use the out-of-place form (inplace=False, or assign the result)",
                )
            )
    for name, m in module.named_modules():
        hooks = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
        if any(hooks):
            problems.append(
                Problem(
                    f"{name or type(module).__name__}",
                    "has forward or backward hooks, which would run on tiles instead of the image",
                    "remove them from the streamed part, or register them on the Streamed wrapper or the head",
                )
            )


def _attach_layout(
    node: Node, nodes: list[Node], spatial_axes: int, fixed: dict[str, Any], problems: list[Problem]
) -> None:
    """Which tensor dimension holds each spatial axis after ``node`` (Rule G3), and whether the
    node keeps them apart (Rules G4, G8, G9, locality Rule L3)."""
    first = nodes[node.sources[0]]
    node.layout = first.layout
    fxn = node.fx_node
    ndim = len(first.shape)
    if node.kind == "rejected":
        return
    if node.kind in ("window", "rescale"):
        assert isinstance(node.layer, (Window, Rescale))
        expected = tuple(range(ndim - spatial_axes, ndim))
        if first.layout != expected or node.layer.ndim != spatial_axes:
            problems.append(
                Problem(
                    f"{node.path}",
                    f"a {node.layer.ndim}-D window layer applied to tensor dimensions {first.layout} that hold the {spatial_axes} spatial axes",
                    "keep spatial axes last (undo permutes) before conv and pooling layers",
                )
            )
            return
        if isinstance(node.layer, Rescale):  # Rule G10
            fitted = node.layer.fitted(first.sizes, node.sizes)
            if isinstance(fitted, str):
                problems.append(Problem(f"{node.path}", f"{fitted}", f"{_RESAMPLE_FIX}"))
                return
            node.layer = fitted
        if len(node.sources) > 1 or node.reads:
            problems.append(
                Problem(
                    f"{node.path}",
                    "a convolution whose weight is computed from the image",
                    "compute weights from parameters and buffers only",
                )
            )
        return
    assert isinstance(node.layer, Pointwise)
    if node.layer.reshape:  # Rule G8
        moved = reshaped_layout(first.shape, node.shape, first.layout)
        if moved is None:
            what = type(node.module).__name__ if node.module is not None else _op_name(fxn)
            problems.append(
                Problem(
                    f"{node.path}",
                    f"{what} reshapes spatial axes (shape {first.shape} to {node.shape}, spatial axes in dimensions {first.layout}): merges or splits them with other dimensions",
                    "only split or merge channel dimensions, or move it into the head",
                )
            )
            return
        node.layout = moved
        return
    if fxn.target is operator.getitem and not first.splits:  # Rule G9
        position = fx.node.map_arg(fxn.args[1], lambda n: fixed.get(n.name, n))
        moved_or_why = indexed_layout(position, ndim, first.layout)
        if isinstance(moved_or_why, str):
            problems.append(
                Problem(
                    f"{node.path}",
                    f"{moved_or_why}, which holds a spatial axis",
                    "index channels only, or move it into the head",
                )
            )
            return
        node.layout = moved_or_why
        return
    if node.layer.stacks:
        assert node.layer.permutation is not None
        moved = node.layer.permutation(fxn.args, dict(fxn.kwargs), ndim)
        node.layout = tuple(moved[d] for d in first.layout)
    elif node.layer.permutation is not None:
        dims = [d % ndim for d in node.layer.permutation(fxn.args, dict(fxn.kwargs), ndim)]
        node.layout = tuple(dims.index(d) for d in first.layout)
    mixed = {d % max(ndim, 1) for d in node.layer.mixed_dims(ndim)}
    clash = sorted(mixed & set(first.layout))
    if clash and node.layer.reduction:
        problems.append(
            Problem(
                f"{node.path}",
                f"{_op_name(fxn)} reduces over tensor dimension(s) {clash}, which hold spatial axes here: a global pooling, which needs the whole image",
                "move it into the head, or reduce over channels only",
            )
        )
        return
    if clash:
        problems.append(
            Problem(
                f"{node.path}",
                f"mixes or indexes parameters by tensor dimension(s) {clash}, which hold spatial axes here",
                "apply it over channels only (permute spatial axes out of those dimensions)",
            )
        )
        return
    if node.layer.reduces:
        node.layout = tuple(d - sum(m < d for m in mixed) for d in node.layout)
    for s in node.sources[1:]:
        other = nodes[s]
        if "rejected" in (first.kind, other.kind):  # reported already
            continue
        if other.layout != first.layout or other.sizes != first.sizes:
            problems.append(
                Problem(
                    f"{node.path}",
                    f"combines feature maps of different spatial layout or size ({first.sizes} and {other.sizes})",
                    "only combine maps of equal size",
                )
            )
    if not node.layer.broadcast:
        return
    out_ndim = len(node.shape)
    for arg in fxn.all_input_nodes:
        const = next(
            (
                n
                for n in nodes
                if n.name == arg.name and n.kind in ("constant", "global", "reduction")
            ),
            None,
        )
        if const is None or not const.shape:
            continue
        offset = out_ndim - len(const.shape)
        if any(d - offset >= 0 and const.shape[d - offset] != 1 for d in node.layout):
            problems.append(
                Problem(
                    f"{node.path}",
                    f"combines the feature map with the constant '{const.path}' of shape {const.shape}, which varies along a spatial axis",
                    "only use per-channel constants in the streamed part",
                )
            )


_SPATIAL = frozenset({"input", "window", "rescale", "pointwise", "rejected"})

_RESAMPLE_FIX = (
    "upsample by an integer factor (scale_factor=2, or size= an integer multiple of the input's "
    "size), or move it into the head"
)


def _op_name(fxn: fx.Node) -> str:
    if fxn.op == "call_method":
        return f".{fxn.target}()"
    return f"{getattr(fxn.target, '__name__', fxn.target)}()"


def _raise(problems: list[Problem]) -> None:
    if problems:
        raise StreamcheckError.of(problems)
