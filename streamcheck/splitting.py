"""``split``: cut a classifier into a streamable trunk and the head that holds the rest.

NOTE [ Split ]
Rule SP1. The model is traced with torch.fx at module granularity: the root and every module whose
          ``forward`` is ``nn.Sequential``'s are *opened* (their calls become nodes), every other
          module is one node that runs its own ``forward`` at call time. Trunk and head (``Part``)
          run the traced code over the model's own submodules, parameters and buffers (the same
          objects, not copies), at the model's module paths, so ``head(trunk(x))`` runs exactly
          the operations ``model(x)`` runs, in the same order: the results are equal bit for bit,
          and training the pair trains the model.
Rule SP2. The code of opened modules is fixed when ``split`` runs, and may depend on the mode
          (``F.dropout(x, training=self.training)`` in a head): it is traced in train and in eval
          mode, cuts are the nodes that are cuts in both, and each part keeps both codes and runs
          the one of its own mode (``Part``). Modules that are not opened follow ``train()`` /
          ``eval()`` and any other change at call time; what opened code reads from other plain
          attributes is fixed.
Rule SP3. A cut is a node through which everything flows: no value computed before it (other than
          from parameters and buffers alone, which either side re-reads) is used after it, so no
          skip connection crosses it. A cut is named by the outermost module that ends there.
Rule SP4. Whether a prefix streams is decided by the engine itself: ``build_graph`` and
          ``make_plan`` on the trunk, as ``Streamed(trunk, tile=tile)`` would (with no tile, only
          locality is checked). A prefix of a streamable prefix is streamable (each refusal is of
          one layer, or of the receptive field, which only grows), so the longest one is found by
          bisection, and the one after it gives the refusal that ended it, in the engine's words.
Rule SP5. A cut's total stride comes from two meta-device runs whose spatial sizes differ by
          ``_PROBE_STEP`` px: a stride-s map grows by ``_PROBE_STEP / s`` along each spatial axis,
          whatever the layout. A node whose size does not follow the input is not a *map*.
Rule SP6. When the search ends before a module that is not opened, that module is opened (if fx
          traces it) and the search continues inside it, so the prefix ends at the deepest cut;
          when there is no cut inside, the module stays whole (the engine then names refused
          layers inside it by their paths).
Rule SP8. Statistics over space stream (reductions Rules R1-R5), so a prefix may hold squeeze-
          excite blocks and train-mode BatchNorm, within the engine's ``max_levels`` (plan Rule
          PL2); but a trunk ends in a feature map: the cut after a global pooling is refused
          (``Streamed(model)`` streams a whole classifier to its logits instead).
Rule SP7. The default prefix *ends early* when a later cut is still a map: the head computes on
          space, not only on pooled features. ``split`` then warns, naming the refused layers by
          path; ``Split.stopped_by`` holds the same message in every case where the prefix stopped
          at a refusal.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph_module import _copy_attr

from .errors import Problem, StreamcheckError, internal_error
from .graph import Graph, _meta_values, build_graph
from .planning import _param_dtype, make_plan, normalize_tile

__all__ = ["Part", "Split", "split"]

#: Rule SP5: divisible by every total stride a classifier uses (2^6 * 3^2 * 5 * 7).
_PROBE_STEP = 20160
_UNLIMITED_TILE = 10**9


@dataclass(frozen=True)
class Split:
    """What ``split`` returns; unpacks as ``trunk, head = split(model)``.

    ``cut`` names the module the trunk ends with, ``total_stride`` is the trunk's total stride per
    spatial axis (the engine's), and ``stopped_by`` is the engine's refusal of the next longer
    prefix when the default search stopped at one (Rule SP7), else ``None``.
    """

    trunk: Part
    head: Part
    cut: str
    total_stride: tuple[int, ...]
    stopped_by: str | None = None

    def __iter__(self) -> Iterator[Part]:
        return iter((self.trunk, self.head))

    def modules(self, part: nn.Module) -> list[str]:
        """The outermost modules (and root-level functions) ``part`` runs, in order."""
        names: list[str] = []
        for node in part.graph.nodes:  # type: ignore[union-attr]
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            stack = list(node.meta.get("nn_module_stack") or ())
            name = stack[0] if stack else f"{node.name}()"
            if not names or names[-1] != name:
                names.append(name)
        return names


def split(
    model: nn.Module,
    *,
    until: str | None = None,
    stride: int | None = None,
    input_shape: Sequence[int] = (1, 3, 224, 224),
    tile: int | Sequence[int] | None = None,
) -> Split:
    """Cut ``model`` into ``(trunk, head)`` with ``head(trunk(x)) == model(x)``, trunk streamable.

    By default the trunk is the longest streamable prefix; ``until`` cuts after the named module
    (a path in ``model.named_modules()``), ``stride`` at the deepest cut of total stride <= it.
    ``input_shape`` and ``tile`` are what the trunk is checked for, as ``Streamed(trunk,
    tile=tile)`` would check it (no tile: locality only). Rules SP1-SP7 say how.

    >>> import torch, torchvision, streamcheck
    >>> model = torchvision.models.resnet18().eval().double()
    >>> trunk, head = streamcheck.split(model, until="layer3")
    >>> streamcheck.split(model, stride=8).cut    # layer2's output has stride 8 = 2 * 2 * 2
    'layer2'
    >>> x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    >>> torch.equal(head(trunk(x)), model(x))
    True
    >>> streamed = streamcheck.Streamed(trunk, tile=480)
    >>> torch.equal(head(streamed(x)), model(x))  # 64 px is one tile: the same operations
    True
    """
    if until is not None and stride is not None:
        raise StreamcheckError("streamcheck.split: pass until= or stride=, not both")
    if stride is not None and (not isinstance(stride, int) or stride < 1):
        raise StreamcheckError(f"streamcheck.split: stride={stride!r} must be a positive int")
    shape = tuple(input_shape)
    if len(shape) not in (3, 4, 5):
        raise StreamcheckError(
            f"streamcheck.split: input_shape {shape} is not (N, C, *spatial) with 1 to 3 spatial "
            "axes"
        )
    edges = normalize_tile(tile if tile is not None else _UNLIMITED_TILE, len(shape) - 2)
    if until is not None and until not in {p for p, _ in model.named_modules() if p}:
        raise StreamcheckError(
            f"streamcheck.split: {type(model).__name__} has no module {until!r}; it can be cut "
            f"after: {', '.join(_Cuts(model, shape, set()).names())}"
        )
    opened: set[int] = set()
    if until is not None:  # Rule SP6 for a named module: open the modules around it
        parts = until.split(".")
        for i in range(1, len(parts)):
            ancestor = model.get_submodule(".".join(parts[:i]))
            if _openable(ancestor, opened | {id(model)}):
                opened.add(id(ancestor))
    cuts = _Cuts(model, shape, opened)
    if until is not None:
        return _until(cuts, until, edges)
    found = _search(cuts, edges, stride)
    while True:  # Rule SP6
        inner = cuts.leaf_after(found.index)
        if inner is None or not _openable(inner, cuts.opened):
            return found.result(cuts, stride)
        deeper = _Cuts(model, shape, cuts.opened | {id(inner)})
        inside = _search(deeper, edges, stride)
        if deeper.names()[: inside.index + 1] == cuts.names()[: found.index + 1]:
            return found.result(cuts, stride)  # no cut inside: keep it whole
        cuts, found = deeper, inside


@dataclass(frozen=True)
class _Found:
    index: int  # position of the cut in cuts.points; -1 for none
    refusal: StreamcheckError | None  # the engine's refusal of the next cut

    def result(self, cuts: _Cuts, stride: int | None) -> Split:
        if self.index < 0:
            assert self.refusal is not None
            raise StreamcheckError(
                f"streamcheck.split: no prefix of {type(cuts.model).__name__} streams; the "
                f"shortest one is refused:\n{self.refusal}"
            )
        stopped_by = None
        if self.refusal is not None:
            stopped_by = (
                f"the prefix up to '{cuts.names()[self.index + 1]}' is refused: {self.refusal}"
            )
        result = cuts.split(self.index, stopped_by=stopped_by)
        if stride is None and self.refusal is not None and cuts.is_map_after(self.index):
            warnings.warn(
                f"streamcheck.split: the streamable prefix of {type(cuts.model).__name__} ends "
                f"early, after '{result.cut}' (total stride {_axes(result.total_stride)}): the "
                f"head still computes on feature maps, because {stopped_by}\nPass "
                "until= or stride= to choose the cut yourself (Split.stopped_by keeps this).",
                stacklevel=3,
            )
        return result


def _search(cuts: _Cuts, edges: tuple[int, ...], stride: int | None) -> _Found:
    """Rule SP4 (default) or the deepest cut of total stride <= ``stride``."""
    if stride is not None:
        within = [i for i, s in enumerate(cuts.strides) if s is not None and max(s) <= stride]
        if not within:
            raise StreamcheckError(
                f"streamcheck.split: no cut of {type(cuts.model).__name__} has total stride <= "
                f"{stride}; the cuts' strides: {cuts.stride_list()}"
            )
        refusal = cuts.refusal(within[-1], edges)
        if refusal is not None:
            best = _longest(cuts, edges, within[-1])
            raise StreamcheckError(
                f"streamcheck.split: the deepest cut of total stride <= {stride}, after "
                f"'{cuts.names()[within[-1]]}', is not streamable:\n{refusal}\nFix: "
                + _fix(cuts, best.index)
            )
        return _Found(within[-1], None)
    return _longest(cuts, edges, len(cuts.points) - 1)


def _longest(cuts: _Cuts, edges: tuple[int, ...], last: int) -> _Found:
    """Rule SP4: bisection for the longest streamable prefix among cuts ``0..last``; the first
    probe is the last map (a classifier whose features all stream needs two engine checks)."""
    lo, hi = -1, last + 1  # cut lo streams (or is none), cut hi is refused (or is past the end)
    refusal: StreamcheckError | None = None
    maps = [i for i in range(last + 1) if cuts.strides[i] is not None]
    first = maps[-1] if maps else None
    while hi - lo > 1:
        mid, first = (first, None) if first is not None else ((lo + hi) // 2, None)
        error = cuts.refusal(mid, edges)
        if error is None:
            lo = mid
        else:
            hi, refusal = mid, error
    if hi == last + 1:
        refusal = cuts.refusal(hi, edges) if hi < len(cuts.points) else None
    return _Found(lo, refusal)


def _until(cuts: _Cuts, until: str, edges: tuple[int, ...]) -> Split:
    names = cuts.names()
    index = next((i for i, ending in enumerate(cuts.endings) if until in ending), None)
    if index is None:
        raise StreamcheckError(
            f"streamcheck.split: cannot cut after {until!r}: a value computed before its end is "
            "used after it (a skip connection), or fx cannot trace the module around it. It can "
            f"be cut after: {', '.join(names)}"
        )
    refusal = cuts.refusal(index, edges)
    if refusal is not None:
        best = _longest(cuts, edges, index)
        raise StreamcheckError(
            f"streamcheck.split: the prefix up to {until!r} is not streamable:\n"
            f"{refusal}\nFix: " + _fix(cuts, best.index)
        )
    return cuts.split(index, stopped_by=None)


def _fix(cuts: _Cuts, best: int) -> str:
    if best < 0:
        return "no prefix streams at this granularity; replace the layers named above."
    stride = cuts.strides[best]
    return (
        f"cut earlier, until={cuts.names()[best]!r}"
        + (f" (total stride {_axes(stride)})" if stride else "")
        + ", or replace the layers named above with local ones."
    )


class _Cuts:
    """The model traced at module granularity in both modes (Rules SP1-SP2) and its cuts (Rule
    SP3), with the meta values of Rule SP5."""

    def __init__(self, model: nn.Module, shape: tuple[int, ...], opened: set[int]) -> None:
        self.model = model
        self.shape = shape
        self.opened = {id(model)} | opened
        try:
            self.graphs = _in_both_modes(model, lambda: _trace(model, self.opened))
        except Exception as error:  # fx raises many kinds
            raise StreamcheckError(
                f"streamcheck.split: cannot trace {type(model).__name__} with torch.fx ({error}); "
                "split needs a forward without control flow on tensor values"
            ) from error
        self.graph = self.graphs[model.training]  # the mode the engine checks (Rule SP4)
        self.nodes = [n for n in self.graph.nodes if n.op != "output"]
        if sum(n.op == "placeholder" for n in self.nodes) != 1:
            raise StreamcheckError(
                f"streamcheck.split: {type(model).__name__}.forward must take one input (the image)"
            )
        dtype = _param_dtype(model)
        gm = fx.GraphModule(model, self.graph)
        small, _ = _meta_values(gm, shape, dtype)
        big, _ = _meta_values(gm, (*shape[:2], *(s + _PROBE_STEP for s in shape[2:])), dtype)
        self.values = small
        self.free = _free(self.nodes)
        in_every_mode = set.intersection(*(set(_cut_names(g, small)) for g in self.graphs.values()))
        self.points = [
            i for i in _cut_positions(self.nodes, self.free, small)
            if self.nodes[i].name in in_every_mode
        ]  # fmt: skip
        axes = len(shape) - 2
        self.strides = [
            _stride(small.get(self.nodes[i].name), big.get(self.nodes[i].name), axes)
            for i in self.points
        ]
        last: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for p in n.meta.get("nn_module_stack") or ():
                last[p] = i
        self.endings = [_endings(self.nodes[i], i, last) for i in self.points]
        self._refusals: dict[int, StreamcheckError | None] = {}
        self._engine_strides: dict[int, tuple[Any, ...]] = {}

    def names(self) -> list[str]:
        return [ending[0] for ending in self.endings]

    def stride_list(self) -> str:
        return ", ".join(
            f"{name} {_axes(s) if s else '(not a map)'}"
            for name, s in zip(self.names(), self.strides, strict=True)
        )

    def leaf_after(self, k: int) -> nn.Module | None:
        """Rule SP6: the one module that runs between cut ``k`` and the next, if there is one."""
        start = self.points[k] + 1 if k >= 0 else 1
        stop = self.points[k + 1] + 1 if k + 1 < len(self.points) else len(self.nodes)
        calls = [n for n in self.nodes[start:stop] if n not in self.free]
        if len(calls) == 1 and calls[0].op == "call_module":
            return self.model.get_submodule(str(calls[0].target))
        return None

    def is_map_after(self, k: int) -> bool:
        return any(s is not None for s in self.strides[k + 1 :])

    def parts(self, k: int) -> tuple[Part, Part]:
        """Rule SP1: trunk and head for cut ``k``, over the model's own submodules."""
        cut = self.nodes[self.points[k]].name
        pieces = {mode: _cut_graph(g, cut) for mode, g in self.graphs.items()}
        name = type(self.model).__name__
        return (
            Part(self.model, {mode: p[0] for mode, p in pieces.items()}, f"{name}Trunk"),
            Part(self.model, {mode: p[1] for mode, p in pieces.items()}, f"{name}Head"),
        )

    def refusal(self, k: int, edges: tuple[int, ...]) -> StreamcheckError | None:
        """Rule SP4: the engine's refusal of the prefix up to cut ``k``, or None."""
        if k not in self._refusals:
            trunk, _ = self.parts(k)
            try:
                graph = build_graph(trunk, self.shape, dtype=_param_dtype(self.model))
                _check_spatial_output(graph)
                self._engine_strides[k] = make_plan(graph, edges).total_stride
                self._refusals[k] = None
            except StreamcheckError as error:
                self._refusals[k] = _with_paths(error, trunk.graph)
        return self._refusals[k]

    def split(self, k: int, *, stopped_by: str | None) -> Split:
        if self.refusal(k, (_UNLIMITED_TILE,) * (len(self.shape) - 2)) is not None:
            raise internal_error(f"split: the cut {self.names()[k]!r} chosen is refused")
        trunk, head = self.parts(k)
        engine = self._engine_strides[k]
        if any(s != int(s) for s in engine):
            raise StreamcheckError(
                f"streamcheck.split: the prefix up to {self.names()[k]!r} has total stride "
                f"{engine}, not whole pixels; cut where the output is a downsampled map"
            )
        total = tuple(int(s) for s in engine)
        if self.strides[k] is not None and self.strides[k] != total:
            raise internal_error(
                f"split: cut {self.names()[k]!r} has stride {self.strides[k]} by Rule SP5 but "
                f"{total} by the engine"
            )
        return Split(trunk, head, self.names()[k], total, stopped_by)


def _trace(root: nn.Module, opened: set[int]) -> fx.Graph:
    """Rule SP1: ``root`` traced with the modules ``opened`` (by id) and Sequentials opened."""

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return id(m) not in opened and type(m).forward is not nn.Sequential.forward

    return Tracer().trace(root)


def _openable(module: nn.Module, opened: set[int]) -> bool:
    """Rule SP6: a module the search may open is traceable in both modes."""
    if type(module).__module__.startswith("torch.nn"):
        return False  # a torch layer: nothing inside to cut
    inner = opened | {id(module)}
    try:
        _in_both_modes(module, lambda: _trace(module, inner))
    except Exception:  # not traceable: it stays one node
        return False
    return True


def _endings(node: fx.Node, i: int, last: dict[str, int]) -> list[str]:
    """Rule SP3: the modules whose last node is ``node`` (at position ``i``), outermost first; else
    the node itself, by the module it runs in: ``'layer1.0 (add)'``, or ``'flatten()'``."""
    stack = list(node.meta.get("nn_module_stack") or ())
    ending = [p for p in stack if last[p] == i]
    return ending or [f"{stack[-1]} ({node.name})" if stack else f"{node.name}()"]


def _free(nodes: Sequence[fx.Node]) -> set[fx.Node]:
    """Nodes computed from parameters and buffers alone (Rule SP3)."""
    free: set[fx.Node] = set()
    for n in nodes:
        if n.op == "get_attr" or (
            n.op not in ("placeholder", "output") and all(a in free for a in n.all_input_nodes)
        ):
            free.add(n)
    return free


def _cut_positions(
    nodes: Sequence[fx.Node], free: set[fx.Node], values: dict[str, Any]
) -> list[int]:
    """Rule SP3: positions of the nodes that are cuts, in order (``values``: the meta run's)."""
    position = {n: i for i, n in enumerate(nodes)}
    reach = 0  # the furthest position a value computed so far is used at
    points = []
    for i, n in enumerate(nodes):
        if n in free:
            continue
        if i > 0 and reach <= i and isinstance(values.get(n.name), torch.Tensor):
            points.append(i)
        uses = [position.get(u, len(nodes)) for u in n.users]
        reach = max(reach, *uses) if uses else reach
    return points


def _cut_names(graph: fx.Graph, values: dict[str, Any]) -> list[str]:
    nodes = [n for n in graph.nodes if n.op != "output"]
    return [nodes[i].name for i in _cut_positions(nodes, _free(nodes), values)]


def _cut_graph(graph: fx.Graph, cut: str) -> tuple[fx.Graph, fx.Graph]:
    """Rule SP1: the graphs before and after the cut node named ``cut`` (free nodes go to the
    side that uses them, to both when both do)."""
    nodes = [n for n in graph.nodes if n.op != "output"]
    at = next(i for i, n in enumerate(nodes) if n.name == cut)
    free = _free(nodes)
    trunk, head = fx.Graph(), fx.Graph()
    into_trunk: dict[fx.Node, fx.Node] = {}
    into_head: dict[fx.Node, fx.Node] = {}
    before, after = set(nodes[: at + 1]), set(nodes[at + 1 :])
    for i, n in enumerate(nodes[: at + 1]):
        if i == 0:
            into_trunk[n] = trunk.placeholder("x")
        elif n not in free or any(u in before for u in n.users):
            into_trunk[n] = trunk.node_copy(n, into_trunk.__getitem__)
    trunk.output(into_trunk[nodes[at]])
    into_head[nodes[at]] = head.placeholder("x")
    needed = _free_inputs(after, free)
    for n in graph.nodes:
        if (n in needed and n not in after) or n in after or n.op == "output":
            into_head[n] = head.node_copy(n, into_head.__getitem__)
    return trunk, head


class Part(nn.Module):
    """The trunk or the head ``split`` returns: the model's own submodules, parameters and buffers
    at their paths in the model, running the model's code traced in the part's current mode (Rules
    SP1-SP2). ``graph`` and ``code`` show that code."""

    def __init__(self, model: nn.Module, graphs: dict[bool, fx.Graph], name: str) -> None:
        super().__init__()
        for graph in graphs.values():
            for n in graph.nodes:
                if n.op in ("call_module", "get_attr"):
                    _copy_attr(model, self, str(n.target))
        # Not submodules: the code of each mode, run with this module as ``self``.
        self.__dict__["_modes"] = {
            mode: fx.GraphModule(self, graph, class_name=name) for mode, graph in graphs.items()
        }
        self.train(model.training)

    def _code(self) -> fx.GraphModule:
        modes: dict[bool, fx.GraphModule] = self.__dict__["_modes"]
        return modes[self.training]

    @property
    def graph(self) -> fx.Graph:
        return self._code().graph

    @property
    def code(self) -> str:
        return self._code().code

    def forward(self, x: Any) -> Any:
        return type(self._code()).forward(self, x)


def _free_inputs(nodes: Iterable[fx.Node], free: set[fx.Node]) -> set[fx.Node]:
    """The free nodes that ``nodes`` use, directly or through other free nodes."""
    needed: set[fx.Node] = set()
    todo = [a for n in nodes for a in n.all_input_nodes if a in free]
    while todo:
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo.extend(a for a in n.all_input_nodes if a in free)
    return needed


def _in_both_modes(module: nn.Module, trace: Callable[[], fx.Graph]) -> dict[bool, fx.Graph]:
    """``trace()`` with ``module`` in train mode (key True) and in eval mode; flags restored."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.train(True)
        in_train = trace()
        module.train(False)
        return {True: in_train, False: trace()}
    finally:
        for m, flag in flags:
            m.training = flag


def _check_spatial_output(graph: Graph) -> None:
    """Rule SP8: a trunk ends in a feature map, not in a statistic over it."""
    nodes = graph.nodes
    for o in graph.outputs or (graph.output,):
        if not nodes[o].spatial:
            last = nodes[graph.reductions[-1]]
            raise StreamcheckError.of(
                [
                    Problem(
                        last.path,
                        "reduces over every spatial axis, so what follows has no feature map to "
                        "stream: the trunk ends before it",
                        "stream the whole model with Streamed(model), which computes its outputs "
                        "exactly through the statistic",
                    )
                ]
            )


def _stride(small: Any, big: Any, axes: int) -> tuple[int, ...] | None:
    """Rule SP5: the total stride of a node from its sizes in the two meta runs, or None."""
    if not isinstance(small, torch.Tensor) or not isinstance(big, torch.Tensor):
        return None
    if small.ndim != big.ndim:
        return None
    grown = [b - s for s, b in zip(small.shape, big.shape, strict=True) if b != s]
    if len(grown) != axes or any(g <= 0 or _PROBE_STEP % g for g in grown):
        return None
    return tuple(_PROBE_STEP // g for g in grown)


def _axes(values: Sequence[int] | None) -> str:
    return " x ".join(str(v) for v in values or ())


def _with_paths(error: StreamcheckError, graph: fx.Graph) -> StreamcheckError:
    """The engine names a layer traced in the trunk's own code (the code of an opened module) by
    its node alone; put the path of the module it comes from in front, as for other layers."""
    if not error.problems:
        return error
    stacks = {
        n.name: list(n.meta.get("nn_module_stack") or ())
        for n in graph.nodes
        if n.op != "call_module"  # named by its path already
    }

    def named(problem: Problem) -> Problem:
        stack = stacks.get(problem.path)
        return replace(problem, path=f"{stack[-1]} ({problem.path})") if stack else problem

    return StreamcheckError.of([named(p) for p in error.problems])
