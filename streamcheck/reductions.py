"""Statistics over a whole feature map, accumulated over the boxes the tiles own.

NOTE [ Global statistics ]
Rule R1. A *reduction* reduces a feature map over every one of its spatial axes (and maybe its
         batch and channel axes): ``sum``, ``mean``, ``norm``, ``var``/``std``, ``amax``, global
         average and max pooling, and the mean and variance that BatchNorm in training mode,
         GroupNorm and InstanceNorm (input statistics) normalise with. Its result has no spatial
         axis: it is a *global* value, and so is everything computed from global values and
         constants alone (a squeeze-excite MLP, a classifier head): global nodes run once, on the
         whole (small) tensors, outside tiles. A reduction over only some spatial axes is not
         one: it stays refused (locality Rule L4).
Rule R1b. Adaptive average pooling to a grid (``AdaptiveAvgPool2d(7)``, VGG's and AlexNet's heads) is
         a reduction to one mean per grid cell ("grid_mean"): cell i of an axis of length L covers
         positions floor(i L / k) to ceil((i + 1) L / k), as PyTorch's kernel bins them, so that
         neighbouring cells may share a position. A position's weight in cell (i, j, ...) is the
         product over the axes of [position in bin] / (bin length): the total is the cell means
         directly, accumulated exactly as a sum (Rule R2), and the weights are the gradient's
         share (Rule R3). Adaptive *max* pooling to a grid stays refused.
Rule R2. Forward: every tile adds the partial statistic of the box it *owns* of the reduction's
         input (owned boxes partition the map, program Rule P6: each position counts once, the
         halo never) to a float64 accumulator. Sums add; moments merge pairwise (Chan, Golub and
         LeVeque), so that E[x^2] - E[x]^2 never cancels; maxima keep their ties (``amax``) or
         their first position in row-major order (global max pooling), as PyTorch's backward
         needs. The total P becomes the value S = finalize(P) through differentiable torch
         operations, cast to the dtype the map was computed in.
Rule R3. Backward: P is a leaf; the global subgraph's VJP gives dL/dP once, on small tensors. What
         a reduction sends back to its input is the VJP of a per-tile *target* T_t with the
         cotangent dL/dP, where sum_t T_t equals P and has P's derivative: the partial sum itself
         for sums, (sum a, sum (a - mu)^2) with the final mean mu held constant for moments (the
         derivative of sum (a - mu)^2 through mu is -2 sum (a - mu) = 0), and
         sum a * [a = max] / ties (or the one first position) for maxima.
Rule R4. Norm layers become explicit reductions before anything else is derived from the trace:
         ``y = norm(x)`` is rewritten as ``S = moments(x)`` (a reduction) and
         ``y = normalize(x, S, weight, bias)`` (pointwise, reading S), for BatchNorm in training
         mode (or without running statistics), ``F.batch_norm(training=True)``, GroupNorm and
         ``F.group_norm``, InstanceNorm with input statistics and ``F.instance_norm``. SyncBatchNorm
         stays refused (its statistics span processes).
Rule R5. Running statistics are updated once per forward, from S, as PyTorch does: momentum, or
         1 / num_batches_tracked when momentum is None; the variance unbiased (M / (M - 1));
         InstanceNorm the batch mean of its per-instance statistics; ``num_batches_tracked``
         incremented once. Never per tile, per pass, or in backward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import StreamcheckError

__all__ = ["Accumulator", "Reduction", "desugar_norms", "moments", "normalize", "update_running"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


@dataclass(frozen=True)
class Running:
    """Which running statistics a ``moments`` node updates (Rule R5)."""

    mean: str  # buffer paths (fx ``get_attr`` targets)
    var: str
    kind: str  # "batch" or "instance"
    module: str | None = None  # a BatchNorm/InstanceNorm module: momentum and count read live
    momentum: float | None = 0.1  # F.batch_norm's, fixed in the trace


def moments(
    x: torch.Tensor, *, kind: str, groups: int = 0, running: Running | None = None
) -> torch.Tensor:
    """``stack((mean, biased variance))`` of ``x`` as a norm layer of ``kind`` computes them
    (Rule R4): per channel ("batch"), per image and channel ("instance"), per image and group
    ("group", ``x`` viewed as ``(N, groups, C // groups, *spatial)``). ``running`` says which
    running statistics the engine updates from them (Rule R5); this function changes nothing.

    >>> x = torch.arange(8.0).reshape(2, 1, 2, 2)
    >>> moments(x, kind="batch")   # mean 3.5, variance 5.25 over the 8 values of the channel
    tensor([[3.5000],
            [5.2500]])
    """
    if groups:
        x = x.reshape(x.shape[0], groups, x.shape[1] // groups, *x.shape[2:])
    var, mean = torch.var_mean(x, dim=stat_dims(kind, x.dim() - (1 if groups else 0)), correction=0)
    return torch.stack((mean, var))


def normalize(
    x: torch.Tensor,
    stats: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    eps: float,
    kind: str,
    groups: int = 0,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with ``stats = moments(x, ...)``: per
    channel (``kind="batch"``), per image and channel (``"instance"``) or per image and group
    (``"group"``)."""
    n, c, rest = x.shape[0], x.shape[1], (1,) * (x.dim() - 2)
    mean, var = stats[0], stats[1]
    if kind == "group":
        grouped = x.reshape(n, groups, c // groups, *x.shape[2:])
        at = (n, groups, 1, *rest)
        y = ((grouped - mean.reshape(at)) * torch.rsqrt(var.reshape(at) + eps)).reshape(x.shape)
    else:
        at = (1, c, *rest) if kind == "batch" else (n, c, *rest)
        y = (x - mean.reshape(at)) * torch.rsqrt(var.reshape(at) + eps)
    if weight is not None:
        y = y * weight.reshape(1, c, *rest)
    if bias is not None:
        y = y + bias.reshape(1, c, *rest)
    return y


@dataclass(frozen=True)
class Reduction:
    """A statistic over every spatial axis of a map (Rule R1).

    ``op``: "sum", "mean", "norm" (``p``), "var"/"std" (``correction``), "moments" (mean and biased
    variance, stacked), "amax" (ties share the gradient), "max_pool" (the first maximum takes
    it) or "grid_mean" (``grid``: cells per reduced axis, Rule R1b). ``dims``: the tensor
    dimensions reduced, of the input (of its ``groups`` view).
    """

    op: str
    dims: tuple[int, ...]
    keepdim: bool = False
    groups: int = 0
    p: float = 2.0
    correction: int = 0
    running: Running | None = None
    norm: str = ""  # moments: the norm layer's kind ("batch", "instance", "group")
    grid: tuple[int, ...] = ()  # grid_mean: the output size of each reduced axis

    def view(self, a: torch.Tensor) -> torch.Tensor:
        if self.groups:
            return a.reshape(a.shape[0], self.groups, a.shape[1] // self.groups, *a.shape[2:])
        return a

    def count(self, shape: tuple[int, ...]) -> int:
        """Positions reduced into each value, for an input of ``shape``."""
        if self.groups:
            shape = (shape[0], self.groups, shape[1] // self.groups, *shape[2:])
        return prod(shape[d] for d in self.dims)

    def finalize(self, total: torch.Tensor, count: int, dtype: torch.dtype) -> torch.Tensor:
        """S from P (Rule R2), differentiable in ``total``."""
        if self.op in ("moments", "var", "std"):
            mean, m2 = total[0] / count, total[1]
            if self.op == "moments":
                value = torch.stack((mean, m2 / count))
                return value.squeeze(tuple(d + 1 for d in self.dims)).to(dtype)
            var = m2 / max(count - self.correction, 0)
            value = var.sqrt() if self.op == "std" else var
        elif self.op == "grid_mean":
            return total.to(dtype)  # the cell means already (Rule R1b)
        elif self.op == "mean":
            value = total / count
        elif self.op == "norm":
            value = total.pow(1 / self.p)
        else:
            value = total
        return (value if self.keepdim else value.squeeze(self.dims)).to(dtype)

    def target(self, a: torch.Tensor, total: torch.Tensor, count: int, extra: Any) -> torch.Tensor:
        """T_t (Rule R3): a tensor shaped like P whose VJP with dL/dP is this tile's share of the
        reduction's gradient. ``a`` is the owned crop; ``extra`` the tile's max mask (maxima)."""
        v = self.view(a)
        if self.op in ("moments", "var", "std"):
            mean = (total[0] / count).detach()
            centred = v.double() - mean
            return torch.stack(
                (v.double().sum(self.dims, keepdim=True), centred.square().sum(self.dims, True))
            )
        if self.op in ("sum", "mean"):
            return v.double().sum(self.dims, keepdim=True)
        if self.op == "grid_mean":
            return _pool_to_grid(v.double(), self.dims, extra)
        if self.op == "norm":
            return v.double().abs().pow(self.p).sum(self.dims, keepdim=True)
        return (v * extra).double().sum(self.dims, keepdim=True)


class Accumulator:
    """The running total of one reduction over the tiles (Rule R2)."""

    def __init__(self, reduction: Reduction, shape: tuple[int, ...], layout: tuple[int, ...]):
        self.reduction = reduction
        self.shape = shape  # the whole input's
        self.layout = layout  # its spatial dims
        self.total: torch.Tensor | None = None
        self.n = 0  # moments: positions so far
        self.ties: torch.Tensor | None = None  # amax: how many positions hold the maximum
        self.first: torch.Tensor | None = None  # max_pool: the first maximum's flat position

    def add(self, a: torch.Tensor, box: tuple[tuple[int, int], ...]) -> None:
        r = self.reduction
        v = r.view(a)
        if r.op in ("moments", "var", "std"):  # Chan's pairwise merge, float64
            n_t = r.count(tuple(a.shape))
            v64 = v.double()
            mean_t = v64.mean(r.dims, keepdim=True)
            m2_t = (v64 - mean_t).square().sum(r.dims, keepdim=True)
            if self.total is None:
                self.n, self.total = n_t, torch.stack((mean_t, m2_t))
                return
            mean, m2 = self.total[0], self.total[1]
            n = self.n + n_t
            delta = mean_t - mean
            self.total = torch.stack(
                (mean + delta * (n_t / n), m2 + m2_t + delta.square() * (self.n * n_t / n))
            )
            self.n = n
            return
        if r.op in ("amax", "max_pool"):
            self._add_max(v, box)
            return
        if r.op == "grid_mean":
            part = _pool_to_grid(v.double(), r.dims, self.mask(a, box))
            self.total = part if self.total is None else self.total + part
            return
        part = v.double().abs().pow(r.p) if r.op == "norm" else v.double()
        part = part.sum(r.dims, keepdim=True)
        self.total = part if self.total is None else self.total + part

    def _add_max(self, v: torch.Tensor, box: tuple[tuple[int, int], ...]) -> None:
        r = self.reduction
        top = v.amax(r.dims, keepdim=True)
        if r.op == "amax":
            ties = (v == top).sum(r.dims, keepdim=True)
            if self.total is None or self.ties is None:
                self.total, self.ties = top, ties
                return
            best = torch.maximum(self.total, top)
            self.ties = self.ties * (self.total == best) + ties * (top == best)
            self.total = best
            return
        flat = _flat_positions(v, box, self.shape, self.layout)
        big = torch.iinfo(torch.int64).max
        first = torch.where(v == top, flat, big).amin(r.dims, keepdim=True)
        if self.total is None or self.first is None:
            self.total, self.first = top, first
            return
        better = top > self.total
        tie = top == self.total
        self.first = torch.where(
            better, first, torch.where(tie, self.first.minimum(first), self.first)
        )
        self.total = torch.maximum(self.total, top)

    def result(self) -> torch.Tensor:
        """P (Rule R2): moments as (sum a, sum (a - mean)^2)."""
        if self.total is None:
            raise StreamcheckError("streamcheck: a statistic that no tile computed")
        if self.reduction.op in ("moments", "var", "std"):
            return torch.stack((self.total[0] * self.n, self.total[1]))
        return self.total

    def mask(self, a: torch.Tensor, box: tuple[tuple[int, int], ...]) -> Any:
        """For maxima: where in this owned crop the gradient goes, weighted (Rule R3); for grid
        means: the crop's weights per reduced axis (Rule R1b)."""
        r = self.reduction
        if r.op == "grid_mean":
            return _grid_weights(r, box, self.shape, self.layout, a.device)
        if r.op == "amax":
            assert self.total is not None and self.ties is not None
            v = r.view(a)
            return (v == self.total).to(v.dtype) / self.ties.to(v.dtype)
        if r.op == "max_pool":
            assert self.first is not None
            v = r.view(a)
            return (_flat_positions(v, box, self.shape, self.layout) == self.first).to(v.dtype)
        return None


def _grid_weights(
    reduction: Reduction,
    box: tuple[tuple[int, int], ...],
    shape: tuple[int, ...],
    layout: tuple[int, ...],
    device: torch.device,
) -> list[torch.Tensor]:
    """Rule R1b: per reduced axis, a float64 ``(cells, crop length)`` matrix of bin membership over
    bin length, for the crop at ``box`` (one range per spatial dim of ``layout``)."""
    ranges = dict(zip(layout, box, strict=True))
    weights = []
    for dim, k in zip(reduction.dims, reduction.grid, strict=True):
        length, (start, stop) = shape[dim], ranges[dim]
        cell = torch.arange(k, device=device).unsqueeze(1)
        first, last = (cell * length) // k, -((-(cell + 1) * length) // k)
        at = torch.arange(start, stop, device=device).unsqueeze(0)
        inside = (at >= first) & (at < last)
        weights.append(inside.double() / (last - first).double())
    return weights


def _pool_to_grid(
    v: torch.Tensor, dims: tuple[int, ...], weights: list[torch.Tensor]
) -> torch.Tensor:
    """The crop's share of every cell mean: ``v`` contracted with each axis's weights."""
    for dim, w in zip(dims, weights, strict=True):
        v = (v.movedim(dim, -1) @ w.T).movedim(-1, dim)
    return v


def _flat_positions(
    v: torch.Tensor,
    box: tuple[tuple[int, int], ...],
    shape: tuple[int, ...],
    layout: tuple[int, ...],
) -> torch.Tensor:
    """Row-major position over the whole map's spatial axes of every element of the crop ``v``."""
    flat = torch.zeros((), dtype=torch.int64, device=v.device)
    for dim, (start, stop) in zip(layout, box, strict=True):
        at = [1] * v.dim()
        at[dim] = stop - start
        coords = torch.arange(start, stop, device=v.device).reshape(at)
        flat = flat * shape[dim] + coords
    return flat


def check_count(reduction: Reduction, shape: tuple[int, ...]) -> None:
    """PyTorch's own refusal of batch statistics of one value (BatchNorm in training mode) or of
    one spatial element (InstanceNorm with input statistics), before any work."""
    count = reduction.count(shape)
    if reduction.norm == "batch" and count <= 1:
        raise StreamcheckError(
            "streamcheck: expected more than 1 value per channel when training, got input size "
            f"{tuple(shape)} (as PyTorch's BatchNorm says). Fix: a larger batch or image, or "
            ".eval() on the BatchNorm"
        )
    if reduction.norm == "instance" and count <= 1:
        raise StreamcheckError(
            "streamcheck: expected more than 1 spatial element when training, got input size "
            f"{tuple(shape)} (as PyTorch's InstanceNorm says). Fix: a larger image"
        )


def update_running(root: nn.Module, running: Running, stats: torch.Tensor, count: int) -> None:
    """Rule R5: the running statistics after one forward with batch statistics ``stats``."""
    if count <= 1:
        raise StreamcheckError(
            f"streamcheck: expected more than 1 value per channel when training (got {count}); "
            "a batch statistic of one value has no variance"
        )
    mean_buffer = root.get_buffer(running.mean)
    var_buffer = root.get_buffer(running.var)
    momentum = running.momentum
    if running.module is not None:
        module = root.get_submodule(running.module)
        tracked = getattr(module, "num_batches_tracked", None)
        if tracked is not None:
            tracked.add_(1)
        momentum = module.momentum  # type: ignore[assignment]
        if momentum is None:
            momentum = 1.0 / float(tracked) if tracked is not None else 0.0
    assert momentum is not None
    mean, var = stats[0].double(), stats[1].double() * (count / (count - 1))
    if running.kind == "instance":
        mean, var = mean.mean(0), var.mean(0)
    with torch.no_grad():
        for buffer, value in ((mean_buffer, mean), (var_buffer, var)):
            buffer.copy_(momentum * value + (1 - momentum) * buffer.double())


def desugar_norms(gm: fx.GraphModule) -> None:
    """Rule R4: rewrite norm layers that normalise with statistics of their input into
    ``moments`` and ``normalize`` nodes (in place)."""
    graph = gm.graph
    for node in list(graph.nodes):
        rewrite = _norm_call(gm, node)
        if rewrite is None:
            continue
        x, weight, bias, eps, kind, groups, running = rewrite
        with graph.inserting_before(node):
            stats = graph.call_function(
                moments, (x,), {"kind": kind, "groups": groups, "running": running}
            )
            stats.meta = dict(node.meta)
            y = graph.call_function(
                normalize,
                (x, stats, weight, bias),
                {"eps": eps, "kind": kind, "groups": groups},
            )
            y.meta = dict(node.meta)
        node.replace_all_uses_with(y)
        graph.erase_node(node)
    graph.lint()


def stat_dims(kind: str, ndim: int) -> tuple[int, ...]:
    """The dims a norm layer of ``kind`` reduces, for an input of rank ``ndim`` (of the grouped
    view, for "group")."""
    if kind == "batch":
        return (0, *range(2, ndim))
    if kind == "instance":
        return tuple(range(2, ndim))
    return tuple(range(2, ndim + 1))  # group: of the (N, G, C // G, *spatial) view


def _norm_call(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, ...] | None:
    """(x, weight, bias, eps, kind, groups, running) for a norm layer that uses its input's
    statistics, else None."""
    graph = gm.graph
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))  # a leaf: torch.nn's own forward (Rule G1)
        path = str(node.target)

        def attr(name: str) -> Any:
            with graph.inserting_before(node):
                return graph.get_attr(f"{path}.{name}") if getattr(m, name) is not None else None

        if isinstance(m, _BATCH_NORMS + _INSTANCE_NORMS):
            if not (m.training or m.running_mean is None):
                return None  # running statistics: pointwise (locality Rule L3)
            kind = "batch" if isinstance(m, _BATCH_NORMS) else "instance"
            running = (
                Running(f"{path}.running_mean", f"{path}.running_var", kind, module=path)
                if m.training and m.running_mean is not None
                else None
            )
            return node.args[0], attr("weight"), attr("bias"), m.eps, kind, 0, running
        if isinstance(m, nn.GroupNorm):
            return node.args[0], attr("weight"), attr("bias"), m.eps, "group", m.num_groups, None
        return None
    if node.op != "call_function":
        return None
    args, kwargs = node.args, node.kwargs

    def arg(position: int, name: str, default: Any) -> Any:
        return (
            kwargs[name] if name in kwargs else args[position] if len(args) > position else default
        )

    if node.target is F.batch_norm:
        rm, rv = arg(1, "running_mean", None), arg(2, "running_var", None)
        if not arg(5, "training", False) and rm is not None:
            return None
        running = None
        if isinstance(rm, fx.Node) and isinstance(rv, fx.Node) and rm.op == rv.op == "get_attr":
            running = Running(
                str(rm.target), str(rv.target), "batch", momentum=arg(6, "momentum", 0.1)
            )
        elif rm is not None:
            return None  # running statistics that are not buffers: left to the locality check
        eps = arg(7, "eps", 1e-5)
        return args[0], arg(3, "weight", None), arg(4, "bias", None), eps, "batch", 0, running
    if node.target is F.instance_norm:
        if not arg(5, "use_input_stats", True):
            return None
        if arg(1, "running_mean", None) is not None:
            return None  # running statistics updated by a functional call: left refused
        eps = arg(7, "eps", 1e-5)
        return args[0], arg(3, "weight", None), arg(4, "bias", None), eps, "instance", 0, None
    if node.target is F.group_norm:
        groups = arg(1, "num_groups", None)
        if not isinstance(groups, int):
            return None
        eps = arg(4, "eps", 1e-5)
        return args[0], arg(2, "weight", None), arg(3, "bias", None), eps, "group", groups, None
    return None


_SPATIAL_OPS = {
    "sum": "sum",
    "mean": "mean",
    "amax": "amax",
    "norm": "norm",
    "var": "var",
    "std": "std",
}


def reduction_of(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], ndim: int
) -> Reduction | str:
    """The reduction a ``torch.<name>``/``Tensor.<name>`` call makes (dims normalised for an
    input of rank ``ndim``), or why it is not one the engine accumulates."""
    op = _SPATIAL_OPS.get(name)
    if op is None:
        return f"{name}() over spatial axes has no exact merge over tiles"

    def arg(position: int, key: str, default: Any) -> Any:
        return kwargs[key] if key in kwargs else args[position] if len(args) > position else default

    if kwargs.get("dtype") is not None or kwargs.get("out") is not None:
        return f"{name}() with dtype= or out="
    p, correction = 2.0, 0
    if op == "norm":
        p_arg = arg(1, "p", "fro")
        p = 2.0 if p_arg == "fro" else float(p_arg)
        if not 0 < p < float("inf"):
            return f"norm() with p={p_arg!r}"
        dim, keepdim = arg(2, "dim", None), arg(3, "keepdim", False)
    elif op in ("var", "std"):
        dim = arg(1, "dim", None)
        unbiased = kwargs.get("unbiased", True)
        second = args[2] if len(args) > 2 else None
        if isinstance(second, bool):
            unbiased = second
        correction = kwargs.get("correction", 1 if unbiased else 0)
        if isinstance(correction, bool) or not isinstance(correction, (int, float)):
            return f"{name}() with correction={correction!r}"
        keepdim = kwargs.get("keepdim", args[3] if len(args) > 3 else False)
        correction = int(correction)
    else:
        dim, keepdim = arg(1, "dim", None), arg(2, "keepdim", False)
    if isinstance(dim, int):
        dims: tuple[int, ...] = (dim,)
    elif dim is None or (isinstance(dim, (tuple, list)) and not dim):
        dims = tuple(range(ndim))
    else:
        dims = tuple(int(d) for d in dim)
    dims = tuple(sorted({d % ndim for d in dims}))
    return Reduction(op, dims, bool(keepdim), p=p, correction=correction)


def pooling_reduction(kind: str, ndim: int, grid: tuple[int, ...] = ()) -> Reduction:
    """Global average (``kind="avg"``) or max pooling to size 1 over the last ``ndim`` axes, or
    average pooling to the ``grid`` of cells (Rule R1b)."""
    dims = tuple(range(-ndim, 0))
    if grid and any(k != 1 for k in grid):
        return Reduction("grid_mean", dims, keepdim=True, grid=tuple(grid))
    return Reduction("mean" if kind == "avg" else "max_pool", dims, keepdim=True)


def with_rank(reduction: Reduction, rank: int) -> Reduction:
    """``reduction`` with negative dims made absolute for an input of ``rank`` dimensions."""
    rank += 1 if reduction.groups else 0
    return replace(reduction, dims=tuple(sorted(d % rank for d in reduction.dims)))


def spatial_dims_of(reduction: Reduction, layout: tuple[int, ...]) -> tuple[int, ...]:
    """The reduced dims that hold spatial axes, in the input's own numbering."""
    shift = 1 if reduction.groups else 0
    return tuple(d - shift for d in reduction.dims if d - shift in layout)
