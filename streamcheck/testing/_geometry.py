"""The one geometry oracle of the strategies: sizes, scales and receptive fields of any network
they draw, from PyTorch's documented shape formulas, independently of the engine.

One layer along one axis is NOTE [ Strategy geometry ] Rules 1-3 (``strategies.py``); a network:

NOTE [ Geometry oracle ]
Rule U1. A network is described by its nodes (``network_nodes``): chains of leaf layers and merges
         (add, multiply or concatenate) of nodes; outputs are nodes. Axes are independent. A
         ``UNet`` and a ``Pyramid`` give their levels; any other module is a chain of its leaves
         (``nn.Sequential`` opened, ``SharedTwice`` as its layer twice), where a ``Residual``
         merges its body with its input and ``Branches`` merge their branches.
Rule U2. Sizes follow PyTorch per layer: windows as strategies Rule 3; ``ConvTransposeNd``
         ``(n - 1)*s - 2p + d*(k - 1) + output_padding + 1``; upsampling by ``f`` gives ``n*f``.
         A merge is valid only when its inputs have the same size.
Rule U3. What a layer reads for output ``[a, b)`` (unclipped, as geometry Rule 2): a window
         ``[a*s - p, (b - 1)*s - p + d*(k - 1) + 1)``; a ConvTranspose (output ``o = i*s - p +
         j*d``) ``[ceil((a + p - d*(k - 1)) / s), floor((b - 1 + p) / s) + 1)``; nearest ``[floor(a
         / f), floor((b - 1) / f) + 1)``; linear at source position ``x(o)`` (``(o + 0.5)/f - 0.5``,
         or ``o*(n - 1)/(n*f - 1)`` with align_corners) ``[ceil(x(a)) - 1, floor(x(b - 1)) + 2)``
         (where ``x`` is whole, PyTorch's float arithmetic may land just below it). A
         merge reads the hull of what its inputs read; a node read by several consumers is needed
         on the hull of their needs.
Rule U4. A node's scale is input pixels per node pixel: the product of the window strides over
         the upsampling factors on its path (every path to a merge has the same scale). The
         network's period ``L`` is the product of all sampling factors: shifting the input by ``L``
         shifts every node by a whole number of pixels, so what a tile reads depends on its start
         modulo ``L`` only (and, with align_corners, slightly on the image size).
Rule U5. Tiles follow the engine's documented rule (geometry Rules MS5-MS6): they are cut in the
         finest output, in multiples of the tile period ``P`` (finest-output pixels after which
         every node is at the same phase again); tile ``k`` owns ``[k*P/q, (k+1)*P/q)`` of an
         output ``q`` times coarser, the last tile to its end. The smallest legal tile
         (``min_tile_px``) is the widest input, clipped to the image, that any such tile of one
         period reads (the hull over the outputs), computed here with Rule U3.
Rule U9. ``geometry_of`` summarises a network for the chain and DAG strategies: the smallest
         input size for which every node has a pixel (per axis), the total stride (the first
         output's scale), and the receptive field: the widest input one output pixel reads
         (Rule U3), over the starts of one period (Rule U4), on an image large enough that every
         output has them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from torch import nn

from ._blocks import Branches, Interpolate, Pyramid, Residual, SharedTwice, UNet

__all__ = ["Geometry", "MultiScaleGeometry", "geometry_of", "multiscale_geometry", "network_nodes"]


# ------------------------------------------------------------------------------- one layer
@dataclass(frozen=True)
class _Window:
    """One window layer along one axis (Rule 1)."""

    kernel: int
    stride: int
    dilation: int
    pad_left: int
    pad_right: int
    ceil_mode: bool = False
    is_pool: bool = False
    reflect: bool = False
    min_input_px: int = 1

    def output_px(self, n: int) -> int:
        """Output size for input size ``n`` (Rule 3); < 1 means invalid."""
        if n < self.min_input_px or (self.reflect and max(self.pad_left, self.pad_right) >= n):
            return 0
        span = n + self.pad_left + self.pad_right - self.dilation * (self.kernel - 1) - 1
        if not self.is_pool:
            return span // self.stride + 1
        out = (span + (self.stride - 1 if self.ceil_mode else 0)) // self.stride + 1
        if self.ceil_mode and (out - 1) * self.stride >= n + self.pad_left:
            out -= 1
        if self.dilation > 1 and any(  # Rule 3: a window wholly in the padding
            not any(0 <= t < n for t in range(o * self.stride - self.pad_left, n + self.pad_right,
                                               self.dilation)[: self.kernel])
            for o in range(out)
        ):  # fmt: skip
            return 0
        return out


def _per_axis(value: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    return (value,) * ndim if isinstance(value, int) else tuple(value)


def _leaves(module: nn.Module) -> Iterator[nn.Module]:
    """Leaf layers of a (nested) ``nn.Sequential`` in execution order."""
    if isinstance(module, nn.Sequential):
        for child in module:
            yield from _leaves(child)
    else:
        yield module


def _windows(layer: nn.Module, ndim: int) -> tuple[_Window, ...] | None:
    """Per-axis window description of ``layer``; None for a pointwise layer."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
        pads: list[tuple[int, int]]
        if layer.padding == "valid":
            pads = [(0, 0)] * ndim
        elif layer.padding == "same":
            pads = [
                (d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                for k, d in zip(kernel, dilation, strict=True)
            ]
        else:
            pads = [(int(p), int(p)) for p in layer.padding]
        reflect = layer.padding_mode == "reflect"
        return tuple(
            _Window(k, s, d, pl, pr, reflect=reflect)
            for k, s, d, (pl, pr) in zip(kernel, stride, dilation, pads, strict=True)
        )
    if isinstance(layer, nn.modules.pooling._MaxPoolNd | nn.modules.pooling._AvgPoolNd):
        pool: Any = layer  # torch types these attributes loosely
        kernel = _per_axis(pool.kernel_size, ndim)
        stride = _per_axis(pool.stride, ndim)
        padding = _per_axis(pool.padding, ndim)
        dilation = _per_axis(getattr(pool, "dilation", 1), ndim)
        # AvgPool3d alone also refuses inputs smaller than its kernel, padding notwithstanding.
        strict = isinstance(layer, nn.AvgPool3d)
        return tuple(
            _Window(
                k,
                s,
                d,
                p,
                p,
                ceil_mode=bool(pool.ceil_mode),
                is_pool=True,
                min_input_px=k if strict else 1,
            )
            for k, s, d, p in zip(kernel, stride, dilation, padding, strict=True)
        )
    return None


# ---------------------------------------------------------------------------------- network
@dataclass(frozen=True)
class Node:
    """Rule U1: a node of the network description; ``merge`` is None for a chain of ``layers``."""

    name: str
    inputs: tuple[str, ...]
    layers: tuple[nn.Module, ...] = ()
    merge: str | None = None  # "add" | "mul" | "cat"


def network_nodes(module: nn.Module) -> tuple[list[Node], Any]:
    """The nodes of a network (Rule U1), in execution order, and the output: a node name, or a
    tuple / list / dict of node names (the module's return structure)."""
    if isinstance(module, UNet):
        nodes = [Node("stem", ("input",), tuple(_leaves(module.stem)))]
        skips = []
        for i, down in enumerate(module.downs):
            skips.append(nodes[-1].name)
            nodes.append(Node(f"down{i}", (nodes[-1].name,), tuple(_leaves(down))))
        nodes.append(Node("bottom", (nodes[-1].name,), tuple(_leaves(module.bottom))))
        for j, (up, merge, decode) in enumerate(
            zip(module.ups, module.merges, module.decoders, strict=True)
        ):
            level = len(skips) - 1 - j
            nodes.append(Node(f"up{level}", (nodes[-1].name,), tuple(_leaves(up))))
            nodes.append(Node(f"merge{level}", (skips[level], f"up{level}"), merge=merge))
            nodes.append(Node(f"decode{level}", (f"merge{level}",), tuple(_leaves(decode))))
        nodes.append(Node("head", (nodes[-1].name,), tuple(_leaves(module.head))))
        return nodes, "head"
    if isinstance(module, Pyramid):
        nodes = [Node("stem", ("input",), tuple(_leaves(module.stem)))]
        for i, stage in enumerate(module.stages):
            nodes.append(Node(f"stage{i}", (nodes[-1].name,), tuple(_leaves(stage))))
        top = len(module.stages) - 1
        for i, lateral in enumerate(module.laterals):
            nodes.append(Node(f"lateral{i}", (f"stage{i}",), tuple(_leaves(lateral))))
        above = f"lateral{top}"
        for i in range(top - 1, -1, -1):
            nodes.append(Node(f"up{i}", (above,), tuple(_leaves(module.ups[i]))))
            nodes.append(Node(f"sum{i}", (f"lateral{i}", f"up{i}"), merge="add"))
            above = f"sum{i}"
        for i, smooth in enumerate(module.smooths):
            source = f"lateral{top}" if i == top else f"sum{i}"
            nodes.append(Node(f"out{i}", (source,), tuple(_leaves(smooth))))
        names = [f"out{i}" for i in range(len(module.stages))]
        output: Any = (
            tuple(names)
            if module.returns == "tuple"
            else names
            if module.returns == "list"
            else dict(zip(module.names, names, strict=True))
        )
        return nodes, output
    nodes = []
    end = _describe(module, "input", nodes)
    if not nodes:  # no layer at all: one empty chain
        nodes.append(Node("chain", ("input",)))
        end = "chain"
    return nodes, end


def _parts(module: nn.Module) -> Iterator[nn.Module]:
    """Rule U1: the leaves and joining blocks of ``module`` in execution order."""
    if isinstance(module, nn.Sequential):
        for child in module:
            yield from _parts(child)
    elif isinstance(module, SharedTwice):
        for child in (module.layer, module.activation, module.layer):
            yield from _parts(child)
    else:
        yield module


def _describe(module: nn.Module, source: str, nodes: list[Node]) -> str:
    """Rule U1: append the nodes of ``module`` reading node ``source``; the name of its last."""
    chain: list[nn.Module] = []

    def close() -> str:
        if chain:
            nodes.append(Node(f"chain{len(nodes)}", (source,), tuple(chain)))
            chain.clear()
            return nodes[-1].name
        return source

    for part in _parts(module):
        if not isinstance(part, Residual | Branches):
            chain.append(part)
            continue
        source = close()
        paths = [nn.Identity(), part.body] if isinstance(part, Residual) else list(part.branches)
        ends = tuple(_describe(path, source, nodes) for path in paths)
        nodes.append(Node(f"merge{len(nodes)}", ends, merge=part.merge))
        source = nodes[-1].name
    return close()


def output_names(output: Any) -> list[str]:
    """The node names of an output structure, in the order the module returns them."""
    if isinstance(output, str):
        return [output]
    return list(output.values() if isinstance(output, dict) else output)


@dataclass(frozen=True)
class _Resample:
    """One axis of a ConvTranspose or an upsampling (Rules U2, U3)."""

    kind: str  # "transpose" | "nearest" | "linear" | "linear_corners"
    factor: int
    kernel: int = 1
    dilation: int = 1
    padding: int = 0
    output_padding: int = 0

    def output_px(self, n: int) -> int:
        if self.kind != "transpose":
            return n * self.factor
        s, k, d, p = self.factor, self.kernel, self.dilation, self.padding
        return (n - 1) * s - 2 * p + d * (k - 1) + self.output_padding + 1

    def needs(self, out: tuple[int, int], n: int) -> tuple[int, int]:
        a, b = out
        f = self.factor
        if self.kind == "transpose":
            reach = self.dilation * (self.kernel - 1)
            return (-((reach - a - self.padding) // f), (b - 1 + self.padding) // f + 1)
        if self.kind == "nearest":
            return (a // f, (b - 1) // f + 1)
        # linear: source position x(o); x(a) may round below a whole number in PyTorch's float
        # arithmetic, so the pixel before is read too (with a tiny weight): ceil(x) - 1
        if self.kind == "linear":

            def x(o: int) -> Fraction:
                return Fraction(2 * o + 1, 2 * f) - Fraction(1, 2)
        else:
            out_n = n * f  # align_corners: x(o) = o (n - 1) / (n f - 1)
            scale = Fraction(n - 1, out_n - 1) if out_n > 1 else Fraction(0)

            def x(o: int) -> Fraction:
                return o * scale

        return (math.ceil(x(a)) - 1, math.floor(x(b - 1)) + 2)


def _resample(layer: nn.Module, ndim: int) -> tuple[_Resample, ...] | None:
    """Per-axis description of a ConvTranspose or an upsampling layer; None otherwise."""
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        padding: Any = layer.padding  # typed loosely by torch (a tuple of ints here)
        return tuple(
            _Resample("transpose", s, k, d, p, op)
            for s, k, d, p, op in zip(
                layer.stride,
                layer.kernel_size,
                layer.dilation,
                padding,
                layer.output_padding,
                strict=True,
            )
        )
    if isinstance(layer, nn.Upsample | Interpolate):
        factor = layer.scale_factor  # nn.Upsample keeps it as a float
        if not isinstance(factor, int | float) or factor != int(factor) or factor < 1:
            raise ValueError(f"the strategies draw integer scale factors only, got {factor!r}")
        factor = int(factor)
        mode = str(layer.mode)
        kind = "nearest" if mode == "nearest" else "linear"
        kind += "_corners" if kind == "linear" and layer.align_corners else ""
        return (_Resample(kind, factor),) * ndim
    return None


def _layer_scale(layer: nn.Module, ndim: int) -> tuple[Fraction, ...]:
    """Input pixels per output pixel of one layer, per axis (Rule U4)."""
    resample = _resample(layer, ndim)
    if resample is not None:
        return tuple(Fraction(1, r.factor) for r in resample)
    windows = _windows(layer, ndim)
    return tuple(Fraction(w.stride) for w in windows) if windows else (Fraction(1),) * ndim


def _layer_size(layer: nn.Module, ndim: int, axis: int, n: int) -> int:
    if n < 1:
        return 0
    resample = _resample(layer, ndim)
    if resample is not None:
        return resample[axis].output_px(n)
    windows = _windows(layer, ndim)
    return n if windows is None else windows[axis].output_px(n)


def _layer_needs(
    layer: nn.Module, ndim: int, axis: int, out: tuple[int, int], n: int
) -> tuple[int, int]:
    """Rule U3: the unclipped input interval ``layer`` (input size ``n``) reads for ``out``."""
    resample = _resample(layer, ndim)
    if resample is not None:
        return resample[axis].needs(out, n)
    windows = _windows(layer, ndim)
    if windows is None:
        return out
    w = windows[axis]
    a, b = out
    return (
        a * w.stride - w.pad_left,
        (b - 1) * w.stride - w.pad_left + w.dilation * (w.kernel - 1) + 1,
    )


@dataclass(frozen=True)
class MultiScaleGeometry:
    """Per output (in the order the module returns them): spatial size, scale and what a tile must read
    (Rules U2-U5); independent of the engine."""

    output_names: tuple[str, ...]
    output_px: tuple[tuple[int, ...], ...]
    output_scale: tuple[tuple[Fraction, ...], ...]  # input px per output px (Rule U4)
    period_px: tuple[int, ...]  # L per axis, input px (Rule U4)
    tile_period_px: tuple[int, ...]  # finest-output px after which every node's phase repeats
    min_tile_px: tuple[int, ...]  # Rule U5
    node_px: dict[str, tuple[int, ...]]  # every node's spatial size (0: invalid)

    @property
    def receptive_field_px(self) -> tuple[int, ...]:
        """The widest input one output pixel reads, over outputs and starts (per axis)."""
        return self._receptive_field

    _receptive_field: tuple[int, ...] = ()

    @property
    def valid(self) -> bool:
        return all(min(px) >= 1 for px in self.node_px.values())


def _node_sizes(nodes: list[Node], ndim: int, spatial: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Rule U2: spatial size of every node (an axis of 0: invalid)."""
    sizes: dict[str, tuple[int, ...]] = {"input": tuple(spatial)}
    for node in nodes:
        ins = [sizes[i] for i in node.inputs]
        if node.merge is not None:
            sizes[node.name] = tuple(  # axis by axis (Rule U1: axes are independent)
                n if all(s[axis] == n for s in ins) else 0 for axis, n in enumerate(ins[0])
            )
            continue
        size = list(ins[0])
        for layer in node.layers:
            size = [_layer_size(layer, ndim, axis, n) for axis, n in enumerate(size)]
        sizes[node.name] = tuple(size)
    return sizes


def _node_scales(nodes: list[Node], ndim: int) -> dict[str, tuple[Fraction, ...]]:
    """Rule U4: every node's scale (input px per node px); merged inputs must agree."""
    scales: dict[str, tuple[Fraction, ...]] = {"input": (Fraction(1),) * ndim}
    for node in nodes:
        scale = scales[node.inputs[0]]
        if node.merge is not None and any(scales[i] != scale for i in node.inputs):
            raise ValueError(f"the inputs of {node.name} have different scales")
        for layer in node.layers:
            scale = tuple(s * f for s, f in zip(scale, _layer_scale(layer, ndim), strict=True))
        scales[node.name] = scale
    return scales


def _all_scales(nodes: list[Node], ndim: int) -> Iterator[tuple[Fraction, ...]]:
    """The scale after every layer of every node (Rule U4)."""
    scales = _node_scales(nodes, ndim)
    yield scales["input"]
    for node in nodes:
        scale = scales[node.inputs[0]]
        for layer in node.layers:
            scale = tuple(s * f for s, f in zip(scale, _layer_scale(layer, ndim), strict=True))
            yield scale


def _needs(
    nodes: list[Node],
    sizes: dict[str, tuple[int, ...]],
    ndim: int,
    axis: int,
    output: str,
    out: tuple[int, int],
) -> tuple[int, int]:
    """Rule U3: the unclipped input interval that output ``output``'s pixels ``out`` read."""
    need: dict[str, tuple[int, int]] = {output: out}
    for node in reversed(nodes):
        if node.name not in need:
            continue
        interval = need.pop(node.name)
        if node.merge is None:
            inputs_size = [sizes[node.inputs[0]][axis]]
            size_per_layer = []
            n = inputs_size[0]
            for layer in node.layers:
                size_per_layer.append(n)
                n = _layer_size(layer, ndim, axis, n)
            for layer, n_in in zip(reversed(node.layers), reversed(size_per_layer), strict=True):
                interval = _layer_needs(layer, ndim, axis, interval, n_in)
        for source in node.inputs:
            old = need.get(source)
            need[source] = (
                interval if old is None else (min(old[0], interval[0]), max(old[1], interval[1]))
            )
    return need["input"]


def multiscale_geometry(module: nn.Module, *, spatial_shape: Sequence[int]) -> MultiScaleGeometry:
    """Sizes, scales, period and smallest tile of ``module`` on an image of ``spatial_shape``.

    >>> net = UNet(stem=nn.Identity(), downs=[nn.MaxPool1d(2)], bottom=nn.Conv1d(1, 1, 3, padding=1),
    ...            ups=[nn.Upsample(scale_factor=2)], merges=["add"], decoders=[nn.Identity()],
    ...            head=nn.Identity())
    >>> g = multiscale_geometry(net, spatial_shape=(20,))
    >>> g.output_px, g.period_px, g.receptive_field_px  # 6 = 2 * 3: the bottom conv at scale 2
    (((20,),), (2,), (6,))
    >>> g.tile_period_px, g.min_tile_px  # tiles of 2 px start at even pixels: 6 = 2 * 3
    ((2,), (6,))
    """
    ndim = len(spatial_shape)
    nodes, output = network_nodes(module)
    names = output_names(output)
    sizes = _node_sizes(nodes, ndim, spatial_shape)
    scales = _node_scales(nodes, ndim)
    period = _period(nodes, ndim)
    tiles, tile_periods = [], []
    for axis in range(ndim):
        n_in = spatial_shape[axis]
        # Rule U5: tiles of one period of the finest output, each output's piece of them
        ref = min(scales[name][axis] for name in names)
        tile_period = math.lcm(
            *(int((ref / s[axis]).denominator) for s in _all_scales(nodes, ndim))
        )
        tile_periods.append(tile_period)
        n_ref = min(sizes[name][axis] for name in names if scales[name][axis] == ref)
        count = max(1, -(-n_ref // tile_period))
        widest = 1
        for k in range(count):
            reads = []
            for name in names:
                q = scales[name][axis] / ref
                if q.denominator != 1 or tile_period % q.numerator:
                    raise ValueError(
                        f"output {name} is not coarser than the finest by a whole factor"
                    )
                piece = tile_period // q.numerator
                n_out = sizes[name][axis]
                start, stop = k * piece, n_out if k == count - 1 else min((k + 1) * piece, n_out)
                if start < stop:
                    a, b = _needs(nodes, sizes, ndim, axis, name, (start, stop))
                    reads.append((max(a, 0), min(b, n_in)))
            if reads:
                widest = max(widest, max(b for _, b in reads) - min(a for a, _ in reads))
        tiles.append(widest)
    return MultiScaleGeometry(
        output_names=tuple(names),
        output_px=tuple(sizes[name] for name in names),
        output_scale=tuple(scales[name] for name in names),
        period_px=tuple(period),
        tile_period_px=tuple(tile_periods),
        min_tile_px=tuple(tiles),
        node_px={k: v for k, v in sizes.items() if k != "input"},
        _receptive_field=_widest_pixel(nodes, sizes, ndim, names, period),
    )


def _widest_pixel(
    nodes: list[Node],
    sizes: dict[str, tuple[int, ...]],
    ndim: int,
    names: Sequence[str],
    period: Sequence[int],
) -> tuple[int, ...]:
    """The widest input one output pixel reads (Rule U3), over the outputs and the starts of one
    period (Rule U4: every other start repeats one of them), per axis."""
    fields = []
    for axis in range(ndim):
        widest = 1
        for name in names:
            for start in range(min(sizes[name][axis], 2 * period[axis] + 1)):
                a, b = _needs(nodes, sizes, ndim, axis, name, (start, start + 1))
                widest = max(widest, b - a)
        fields.append(widest)
    return tuple(fields)


def _period(nodes: list[Node], ndim: int) -> list[int]:
    """Rule U4: L shifts every node (and every layer's output) by whole pixels."""
    return [
        math.lcm(*(scale[axis].numerator for scale in _all_scales(nodes, ndim)))
        for axis in range(ndim)
    ]


@dataclass(frozen=True)
class Geometry:
    """Rule U9: a network's receptive field, total stride and smallest valid input, per axis."""

    receptive_field_px: tuple[int, ...]
    total_stride: tuple[int, ...]
    min_input_px: tuple[int, ...]  # smallest input size for which every node has >= 1 px

    @staticmethod
    def output_px(module: nn.Module, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial shape of ``module``'s (first) output for ``spatial_shape`` (an entry < 1:
        invalid), Rule U2."""
        nodes, output = network_nodes(module)
        return _node_sizes(nodes, len(spatial_shape), spatial_shape)[output_names(output)[0]]


def geometry_of(module: nn.Module, *, ndim: int) -> Geometry:
    """Rule U9: receptive field, total stride and smallest valid input of any network the
    strategies draw (chains, DAG blocks, U-Nets, pyramids), independent of the engine.

    >>> stack = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, dilation=2))
    >>> g = geometry_of(stack, ndim=2)
    >>> g.receptive_field_px  # 1 + 2*1 + 1*1 + (2*2)*2 = 12
    (12, 12)
    >>> g.total_stride, g.min_input_px  # 12 px -> conv 10 -> pool 5 -> dilated conv 1
    ((2, 2), (12, 12))
    >>> same = nn.Conv2d(2, 2, 3, padding=1)  # F 3, left padding 1
    >>> wide = nn.Conv2d(2, 2, 5, padding=2)  # F 5, left padding 2
    >>> g = geometry_of(nn.Sequential(nn.MaxPool2d(2), Branches(same, wide)), ndim=2)
    >>> g.receptive_field_px, g.min_input_px  # 2 + (5 - 1) * 2 = 10: the wider branch decides
    ((10, 10), (2, 2))
    """
    nodes, output = network_nodes(module)
    names = output_names(output)
    period = _period(nodes, ndim)
    smallest: list[int | None] = [None] * ndim
    n = 0
    while None in smallest:
        n += 1
        if n > 100_000:
            raise ValueError(f"no input size up to {n} gives output for {module}")
        sizes = _node_sizes(nodes, ndim, (n,) * ndim)
        for axis in range(ndim):
            if smallest[axis] is None and all(s[axis] >= 1 for s in sizes.values()):
                smallest[axis] = n
    found = tuple(int(s or 1) for s in smallest)
    # Rule U4: at this size every output has a pixel at each start of one period
    spatial = tuple(s + p * (2 * p + 1) for s, p in zip(found, period, strict=True))
    sizes = _node_sizes(nodes, ndim, spatial)
    scale = _node_scales(nodes, ndim)[names[0]]
    return Geometry(
        receptive_field_px=_widest_pixel(nodes, sizes, ndim, names, period),
        total_stride=tuple(max(1, int(s)) for s in scale),
        min_input_px=found,
    )
