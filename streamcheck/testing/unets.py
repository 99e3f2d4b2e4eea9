"""Hypothesis strategies for networks at several resolutions: U-Nets and feature pyramids.

``unet_cases`` draws encoder-decoder networks (``UNet``): a stem, 1-3 levels down (strided conv,
max or average pool), a bottom, as many levels up (ConvTranspose with any stride-matching kernel,
padding, output_padding, dilation and groups; ``nn.Upsample`` or ``F.interpolate`` by an integer
factor, nearest or (bi/tri)linear with ``align_corners`` False or True), each merged with the
encoder's map of the same scale by concatenation or addition, and a 1x1 head: full-resolution
logits. ``pyramid_cases`` draws FPN-like networks (``Pyramid``): backbone stages, lateral 1x1
convs, a top-down path of upsampling and addition, one output per level, returned as a tuple, a
list or a dict. Every draw comes with an image shape (odd, non-square sizes) and a tile valid for
it. The geometry they need is computed here from PyTorch's shape formulas, independently of the
engine.

NOTE [ Multi-scale strategy geometry ]
Rules U1-U5 (how a network is described, its sizes, what a tile reads, scales and periods) are
NOTE [ Geometry oracle ] in ``_geometry.py``, the one oracle of every strategy.
Rule U6. The sizes of the merged maps depend on the image size only modulo ``L`` (strategies Rule
         3 is affine in ``n`` with slope ``1/s``). A network is drawn for an image size, then the
         image may grow by multiples of ``L``: every merge stays valid (checked again).
Rule U7. Upsampled maps that miss their skip's size by a few pixels (odd sizes) get a size-fixing
         conv after the upsampling (kernel ``k``, padding ``p`` with ``u + 2p - k + 1 = m``), as
         real U-Nets crop or pad.
Rule U8. Parameters and buffers are initialised under a drawn seed (strategies Rule 5).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

from streamcheck.testing.strategies import (
    _AVG_POOL,
    _CONV,
    _MAX_POOL,
    ACTIVATIONS,
    _Case,
    _eval_layer,
)

from ._blocks import OUTPUT_STRUCTURES, Interpolate, Pyramid, UNet
from ._geometry import MultiScaleGeometry, _layer_size, _Resample, multiscale_geometry
from .statistics import statistic_layers

__all__ = [
    "DOWNSAMPLINGS",
    "MERGES",
    "UPSAMPLINGS",
    "MultiScaleCase",
    "pyramid_cases",
    "pyramid_networks",
    "unet_cases",
    "unet_networks",
]

DOWNSAMPLINGS = ("conv", "max_pool", "avg_pool")
UPSAMPLINGS = ("transpose", "nearest", "linear", "linear_corners")
MERGES = ("cat", "add")

_CONV_T: dict[int, Any] = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_LINEAR_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}


# ------------------------------------------------------------------------------------- modules
# ---------------------------------------------------------------------------------- strategies
@dataclass(frozen=True)
class MultiScaleCase(_Case):
    """A ``UNet`` or ``Pyramid``, an image shape it accepts, a legal tile and a seed for the data
    (the fields of ``StreamingCase``, so the equivalence record runs both alike)."""

    @property
    def geometry(self) -> MultiScaleGeometry:
        return multiscale_geometry(self.module, spatial_shape=self.image_shape[2:])


@dataclass
class _Drawing:
    """What the network drawing needs at hand: the options and every axis' current size."""

    draw: st.DrawFn
    ndim: int
    max_channels: int
    max_kernel: int
    max_fix_kernel: int
    activations: tuple[Callable[[], nn.Module], ...]
    padding_modes: tuple[str, ...]
    eval_layers: bool
    statistics: bool = False

    def channels(self) -> int:
        return self.draw(st.integers(1, self.max_channels))

    def groups(self, c_in: int, c_out: int) -> int:
        common = math.gcd(c_in, c_out)
        return self.draw(st.sampled_from([g for g in range(1, common + 1) if common % g == 0]))

    def pointwise(self, channels: int) -> list[nn.Module]:
        """Nothing, an activation, or (``eval_layers``) an eval-mode BatchNorm or Dropout."""
        kinds = ["none", "activation", "activation", "eval"] + (["stat"] if self.statistics else [])
        kind = self.draw(st.sampled_from(kinds))
        if kind == "stat":
            return [self.draw(statistic_layers(ndim=self.ndim, channels=channels))]
        if kind == "activation" or (kind == "eval" and not self.eval_layers):
            return [self.draw(st.sampled_from(self.activations))()]
        if kind == "eval":
            return [_eval_layer(self.draw, ndim=self.ndim, channels=channels)]
        return []

    def block(self, c_in: int, c_out: int, size: Sequence[int]) -> list[nn.Module]:
        """A size-preserving conv (Rule U6: sizes change in sampling layers only) and a
        pointwise layer."""
        kernel = [self.draw(st.integers(1, self.max_kernel)) for _ in range(self.ndim)]
        padding: str | tuple[int, ...] = "same"
        if all(k % 2 for k in kernel) and self.draw(st.booleans()):
            padding = tuple((k - 1) // 2 for k in kernel)
        reach = max((k - 1) // 2 + 1 for k in kernel)
        conv = _CONV[self.ndim](
            c_in,
            c_out,
            tuple(kernel),
            padding=padding,
            groups=self.groups(c_in, c_out),
            bias=self.draw(st.booleans()),
            padding_mode=self.padding_mode(reach, size),
        )
        return [conv, *self.pointwise(c_out)]

    def padding_mode(self, padding: int, size: Sequence[int]) -> str:
        """A drawn padding mode; reflect only where the map is larger than the padding."""
        modes = [m for m in self.padding_modes if m != "reflect" or padding < min(size)]
        return self.draw(st.sampled_from(modes or ["zeros"]))

    def down(self, kind: str, factor: int, c_in: int, c_out: int) -> list[nn.Module]:
        """One sampling layer down by ``factor`` (kernel ``factor`` or one more, any legal
        padding) and, after a pool, a conv to ``c_out`` channels."""
        kernel = [self.draw(st.integers(factor, factor + 1)) for _ in range(self.ndim)]
        padding = tuple(self.draw(st.integers(0, k // 2)) for k in kernel)
        if kind == "conv":
            return [
                _CONV[self.ndim](
                    c_in,
                    c_out,
                    tuple(kernel),
                    stride=factor,
                    padding=padding,
                    groups=self.groups(c_in, c_out),
                    bias=self.draw(st.booleans()),
                ),
                *self.pointwise(c_out),
            ]
        ceil_mode = self.draw(st.booleans())
        if kind == "max_pool":
            pool = _MAX_POOL[self.ndim](tuple(kernel), factor, padding, ceil_mode=ceil_mode)
        else:
            pool = _AVG_POOL[self.ndim](
                tuple(kernel),
                factor,
                padding,
                ceil_mode=ceil_mode,
                count_include_pad=self.draw(st.booleans()),
            )
        conv = _CONV[self.ndim](c_in, c_out, 1, groups=self.groups(c_in, c_out))
        return [pool, conv, *self.pointwise(c_out)]

    def stage(
        self, kinds: Sequence[str], factor: int, c_in: int, size: Sequence[int]
    ) -> tuple[nn.Sequential, int, list[int]]:
        """A level down from a map of size ``size``: ``down`` (a kind from ``kinds``) to drawn
        channels and, drawn, a ``block``; returns it, its channels and its output size."""
        c_out = self.channels()
        layers = self.down(self.draw(st.sampled_from(kinds)), factor, c_in, c_out)
        size = _sizes_after(layers, self.ndim, size)
        if self.draw(st.booleans()):
            layers += self.block(c_out, c_out, size)
        return nn.Sequential(*layers), c_out, size

    def up_module(
        self,
        kinds: Sequence[str],
        factor: int,
        c_in: int,
        c_out: int | None,
        low: Sequence[int],
        target: Sequence[int],
    ) -> tuple[nn.Module, int]:
        """``up`` with a kind from ``kinds``, as one module (the layer itself when it is one)."""
        layers, channels = self.up(
            self.draw(st.sampled_from(kinds)), factor, c_in, c_out, low, target
        )
        return (layers[0] if len(layers) == 1 else nn.Sequential(*layers)), channels

    def up(
        self,
        kind: str,
        factor: int,
        c_in: int,
        c_out: int | None,
        low: Sequence[int],
        target: Sequence[int],
    ) -> tuple[list[nn.Module], int]:
        """Layers from a map of size ``low`` (``c_in`` channels) up by ``factor`` to exactly
        ``target`` (Rule U7) with ``c_out`` channels (None: any); returns them and the channels."""
        layers: list[nn.Module] = []
        channels = c_in
        if kind == "transpose":
            options = [
                self._transpose_options(factor, n, m) for n, m in zip(low, target, strict=True)
            ]
            per_axis = [self.draw(st.sampled_from(o)) for o in options]
            out = c_out if c_out is not None and self.draw(st.booleans()) else self.channels()
            k, d, p, op = (tuple(a) for a in zip(*per_axis, strict=True))
            layers.append(
                _CONV_T[self.ndim](
                    c_in,
                    out,
                    k,
                    stride=factor,
                    padding=p,
                    output_padding=op,
                    dilation=d,
                    groups=self.groups(c_in, out),
                    bias=self.draw(st.booleans()),
                )
            )
            channels = out
        else:
            mode = "nearest" if kind == "nearest" else _LINEAR_MODE[self.ndim]
            corners = None if kind == "nearest" else kind == "linear_corners"
            if self.draw(st.booleans()):
                layers.append(nn.Upsample(scale_factor=factor, mode=mode, align_corners=corners))
            else:
                layers.append(Interpolate(factor, mode=mode, align_corners=corners))
        size = [_layer_size(layers[0], self.ndim, axis, n) for axis, n in enumerate(low)]
        if (
            list(size) != list(target)
            or (c_out is not None and c_out != channels)
            or (self.draw(st.integers(0, 3)) == 0)
        ):
            out = c_out if c_out is not None else self.channels()
            fixes = [self._fix_options(u, m) for u, m in zip(size, target, strict=True)]
            kernel, padding = zip(*(self.draw(st.sampled_from(f)) for f in fixes), strict=True)
            layers.append(
                _CONV[self.ndim](
                    channels,
                    out,
                    kernel,
                    padding=padding,
                    groups=self.groups(channels, out),
                    bias=self.draw(st.booleans()),
                    padding_mode=self.padding_mode(max(padding), size),
                )
            )
            channels = out
        return layers, channels

    def _fix_options(self, u: int, m: int) -> list[tuple[int, int]]:
        """Rule U7: (kernel, padding) with ``u + 2p - k + 1 = m``."""
        return [
            (k, p)
            for k in range(1, self.max_fix_kernel + 1)
            for p in range(k)
            if u + 2 * p - k + 1 == m
        ]

    def _transpose_options(self, factor: int, n: int, m: int) -> list[tuple[int, int, int, int]]:
        """(kernel, dilation, padding, output_padding) of a ConvTranspose by ``factor`` from
        ``n`` px whose output a fix conv can bring to ``m`` px (Rules U2, U7)."""
        options = []
        for k, d in itertools.product(range(1, factor + 3), (1, 2)):
            if k == 1 and d > 1:
                continue
            for p in range(d * (k - 1) + 1):
                for op in range(max(factor, d)):
                    u = _Resample("transpose", factor, k, d, p, op).output_px(n)
                    if u >= 1 and self._fix_options(u, m):
                        options.append((k, d, p, op))
        return options


def _factors(
    draw: st.DrawFn, *, depth: int, min_depth: int, factors: Sequence[int], max_period: int
) -> list[int]:
    """Per level sampling factors whose product (the period, Rule U4) is at most ``max_period``;
    fewer levels than ``depth`` where no factor fits any more, never fewer than ``min_depth``
    while the smallest factor fits."""
    out: list[int] = []
    for level in range(depth):
        room = min(factors) ** max(0, min_depth - level - 1)  # for the levels still required
        allowed = [f for f in factors if math.prod(out) * f * room <= max_period]
        if not allowed:
            break
        out.append(draw(st.sampled_from(allowed)))
    return out or [min(factors)]


def _sizes_after(layers: Sequence[nn.Module], ndim: int, size: Sequence[int]) -> list[int]:
    size = list(size)
    for layer in layers:
        size = [_layer_size(layer, ndim, axis, n) for axis, n in enumerate(size)]
    return size


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Rule U8: parameters drawn under ``seed``, the global generator left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


_DEFAULTS = {  # ndim: (max_depth, max_kernel, max_period, max_channels)
    1: (3, 3, 8, 4),
    2: (3, 3, 8, 4),
    3: (2, 2, 4, 3),
}


def _start(
    draw: st.DrawFn,
    ndim: int,
    /,
    *,
    depth: int,
    min_depth: int,
    factors: Sequence[int],
    max_period: int | None,
    max_channels: int | None,
    max_kernel: int | None,
    max_fix_kernel: int,
    activations: Sequence[Callable[[], nn.Module]],
    padding_modes: Sequence[str],
    eval_layers: bool,
    statistics: bool = False,
) -> tuple[list[int], _Drawing]:
    """What ``unet_networks`` and ``pyramid_networks`` start from: the per-level sampling factors
    (``_factors``, up to ``depth`` levels) and the drawing state, unset bounds from ``_DEFAULTS``."""
    _, default_kernel, default_period, default_channels = _DEFAULTS[ndim]
    levels = _factors(
        draw,
        depth=depth,
        min_depth=min_depth,
        factors=factors,
        max_period=max_period or default_period,
    )
    d = _Drawing(
        draw,
        ndim,
        max_channels or default_channels,
        max_kernel or default_kernel,
        max_fix_kernel,
        tuple(activations),
        tuple(padding_modes),
        eval_layers,
        statistics,
    )
    return levels, d


@st.composite
def unet_networks(
    draw: st.DrawFn,
    /,
    *,
    spatial_shape: Sequence[int],
    in_channels: int = 1,
    min_depth: int = 1,
    max_depth: int | None = None,
    factors: Sequence[int] = (2, 2, 3),
    max_period: int | None = None,
    max_channels: int | None = None,
    max_kernel: int | None = None,
    max_fix_kernel: int = 5,
    max_classes: int = 3,
    downsamplings: Sequence[str] = DOWNSAMPLINGS,
    upsamplings: Sequence[str] = UPSAMPLINGS,
    merges: Sequence[str] = MERGES,
    activations: Sequence[Callable[[], nn.Module]] = ACTIVATIONS,
    padding_modes: Sequence[str] = ("zeros", "replicate", "reflect"),
    eval_layers: bool = True,
    statistics: bool = False,
) -> UNet:
    """Random U-Nets for an image of ``spatial_shape`` (the merges need its sizes, Rule U7).

    Depth ``min_depth``..``max_depth`` (less where the period bound leaves no room); per level a
    sampling factor from ``factors`` (the period, their product, at most ``max_period``), a down kind from ``downsamplings`` (strided conv,
    "max_pool", "avg_pool": kernel factor or factor + 1, any legal padding, ceil_mode), an up kind
    from ``upsamplings`` ("transpose": any kernel, dilation, padding and output_padding a
    size-fixing conv can bring to the skip's size; "nearest"; "linear" and "linear_corners":
    (bi/tri)linear with align_corners False and True, as ``nn.Upsample`` or ``F.interpolate``)
    and a skip merge from ``merges`` (``"cat"``, ``"add"``); size-preserving convs up to
    ``max_kernel`` in between; a head to 1..``max_classes`` channels at full resolution.
    Parameters are float32.

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, deadline=None, database=None)
    ... @given(unet_networks(spatial_shape=(37, 20)))
    ... def check(net):
    ...     assert net(torch.zeros(1, 1, 37, 20)).shape[2:] == (37, 20)
    >>> check()
    """
    ndim = len(spatial_shape)
    depth = draw(st.integers(min_depth, max_depth or _DEFAULTS[ndim][0]))
    levels, d = _start(
        draw,
        ndim,
        depth=depth,
        min_depth=min_depth,
        factors=factors,
        max_period=max_period,
        max_channels=max_channels,
        max_kernel=max_kernel,
        max_fix_kernel=max_fix_kernel,
        activations=activations,
        padding_modes=padding_modes,
        eval_layers=eval_layers,
        statistics=statistics,
    )
    with _seeded(draw(st.integers(0, 2**32 - 1))):  # Rule U8
        c = d.channels()
        stem = d.block(in_channels, c, spatial_shape)  # full resolution throughout
        size = list(spatial_shape)
        skips: list[tuple[list[int], int]] = []
        downs: list[nn.Module] = []
        for factor in levels:
            skips.append((size, c))
            down, c, size = d.stage(downsamplings, factor, c, size)
            downs.append(down)
        bottom = nn.Sequential(*d.block(c, c, size)) if draw(st.booleans()) else nn.Identity()
        ups: list[nn.Module] = []
        decoders: list[nn.Module] = []
        merge_kinds = []
        for factor, (skip_size, skip_c) in zip(reversed(levels), reversed(skips), strict=True):
            merge = draw(st.sampled_from(merges))
            up, c_up = d.up_module(
                upsamplings, factor, c, skip_c if merge == "add" else None, size, skip_size
            )
            ups.append(up)
            merge_kinds.append(merge)
            c_merged = skip_c + c_up if merge == "cat" else skip_c
            c = d.channels()
            decoders.append(nn.Sequential(*d.block(c_merged, c, skip_size)))
            size = skip_size
        head = _CONV[ndim](c, draw(st.integers(1, max_classes)), 1)
    return UNet(
        stem=nn.Sequential(*stem),
        downs=downs,
        bottom=bottom,
        ups=ups,
        merges=merge_kinds,
        decoders=decoders,
        head=head,
    )


@st.composite
def pyramid_networks(
    draw: st.DrawFn,
    /,
    *,
    spatial_shape: Sequence[int],
    in_channels: int = 1,
    min_levels: int = 2,
    max_levels: int = 3,
    factors: Sequence[int] = (2, 2, 3),
    max_period: int | None = None,
    max_channels: int | None = None,
    max_kernel: int | None = None,
    max_fix_kernel: int = 5,
    downsamplings: Sequence[str] = DOWNSAMPLINGS,
    upsamplings: Sequence[str] = UPSAMPLINGS,
    structures: Sequence[str] = OUTPUT_STRUCTURES,
    activations: Sequence[Callable[[], nn.Module]] = ACTIVATIONS,
    padding_modes: Sequence[str] = ("zeros", "replicate", "reflect"),
    eval_layers: bool = True,
    statistics: bool = False,
) -> Pyramid:
    """Random FPN-like pyramids for an image of ``spatial_shape``: ``min_levels``..``max_levels``
    backbone stages (each down by a factor from ``factors``, kinds as ``unet_networks``), lateral
    1x1 convs to a common width, a top-down path (up kinds from ``upsamplings``, a size-fixing
    conv where the sizes differ, Rule U7) added to each lateral, an optional smoothing conv per
    level; one output per level, returned as one of ``structures`` ("tuple", "list", "dict").

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, deadline=None, database=None)
    ... @given(pyramid_networks(spatial_shape=(29, 40), structures=["dict"]))
    ... def check(net):
    ...     assert len(net(torch.zeros(1, 1, 29, 40))) >= 2
    >>> check()
    """
    ndim = len(spatial_shape)
    levels, d = _start(
        draw,
        ndim,
        depth=draw(st.integers(min_levels, max_levels)),
        min_depth=min_levels,
        factors=factors,
        max_period=max_period,
        max_channels=max_channels,
        max_kernel=max_kernel,
        max_fix_kernel=max_fix_kernel,
        activations=activations,
        padding_modes=padding_modes,
        eval_layers=eval_layers,
        statistics=statistics,
    )
    n_levels = len(levels)
    returns = draw(st.sampled_from(structures))
    names = draw(st.permutations(["p1", "p2", "p3", "p4", "p5", "fine", "coarse"]))[:n_levels]
    with _seeded(draw(st.integers(0, 2**32 - 1))):  # Rule U8
        c = d.channels()
        stem: list[nn.Module] = []
        if draw(st.booleans()):
            k = draw(st.integers(1, d.max_kernel))
            stem = [_CONV[ndim](in_channels, c, k, padding=draw(st.integers(0, k - 1)))]
            stem += d.pointwise(c)
        else:
            c = in_channels
        size = _sizes_after(stem, ndim, spatial_shape)
        stages: list[nn.Module] = []
        level_sizes: list[list[int]] = []
        level_channels: list[int] = []
        for factor in levels:
            stage, c, size = d.stage(downsamplings, factor, c, size)
            stages.append(stage)
            level_sizes.append(size)
            level_channels.append(c)
        width = d.channels()
        laterals = [_CONV[ndim](ci, width, 1) for ci in level_channels]
        ups: list[nn.Module] = []
        for i in range(n_levels - 1):
            up, _ = d.up_module(
                upsamplings, levels[i + 1], width, width, level_sizes[i + 1], level_sizes[i]
            )
            ups.append(up)
        smooths = [
            nn.Sequential(*d.block(width, width, s)) if draw(st.booleans()) else nn.Identity()
            for s in level_sizes
        ]
    return Pyramid(
        stem=nn.Sequential(*stem),
        stages=stages,
        laterals=laterals,
        ups=ups,
        smooths=smooths,
        returns=returns,
        names=names,
    )


_CASE_SIZES = {  # ndim: (smallest drawn image px, tiles per streamed axis at most)
    1: (20, 4),
    2: (20, 3),
    3: (12, 2),
}


def _tile_period_input_px(geometry: MultiScaleGeometry, axis: int) -> int:
    """The tile period in input pixels: ``P`` finest-output pixels times their scale."""
    finest = min(scale[axis] for scale in geometry.output_scale)
    return math.ceil(geometry.tile_period_px[axis] * finest)


def _room(geometry: MultiScaleGeometry, axis: int) -> int:
    """The smallest input tile that leaves room for two tiles along ``axis`` or more: the
    smallest legal tile, and the overlap plus two periods."""
    low = geometry.min_tile_px[axis]
    period = _tile_period_input_px(geometry, axis)
    return max(low + period, 2 * max(0, low - period) + 2 * period + 1)


@st.composite
def _multiscale_case(
    draw: st.DrawFn,
    networks: Callable[..., st.SearchStrategy[nn.Module]],
    /,
    *,
    ndim: int = 2,
    max_tiles_per_axis: int | None = None,
    min_batch: int = 1,
    max_batch: int = 2,
    max_extra_periods: int = 2,
    **network_options: Any,
) -> MultiScaleCase:
    """Rule U6: a network drawn for a small image, the image grown by whole periods until every
    streamed axis has room for two tiles or more, and a tile (Rule U5)."""
    smallest, default_tiles = _CASE_SIZES[ndim]
    per_axis = max_tiles_per_axis or default_tiles
    channels = network_options.pop("in_channels", None) or draw(st.integers(1, 3))
    period_bound = network_options.get("max_period") or _DEFAULTS[ndim][2]
    small = [draw(st.integers(smallest, smallest + 2 * period_bound)) for _ in range(ndim)]
    module = draw(networks(spatial_shape=small, in_channels=channels, **network_options))
    streamed_axis = draw(st.integers(0, ndim - 1))
    streamed = [axis == streamed_axis or draw(st.booleans()) for axis in range(ndim)]
    extra = [draw(st.integers(0, max_extra_periods)) for _ in range(ndim)]
    spatial = list(small)
    for _ in range(100):  # grow streamed axes by whole periods until two tiles fit (Rule U6)
        geometry = multiscale_geometry(module, spatial_shape=spatial)
        short = [
            axis
            for axis in range(ndim)
            if streamed[axis] and spatial[axis] - 1 < _room(geometry, axis)
        ]
        if not short:
            break
        for axis in short:
            spatial[axis] += geometry.period_px[axis]
    else:
        raise AssertionError(f"no image size streams {module}: this is a strategy bug")
    spatial = [n + geometry.period_px[axis] * extra[axis] for axis, n in enumerate(spatial)]
    geometry = multiscale_geometry(module, spatial_shape=spatial)
    if not geometry.valid:
        raise AssertionError(f"grown image {spatial} breaks a merge: this is a strategy bug")
    tile = []
    for axis, n in enumerate(spatial):
        low = geometry.min_tile_px[axis]
        if not streamed[axis] or n - 1 < _room(geometry, axis):  # one tile along this axis
            tile.append(max(low, n))
            continue
        overlap = max(0, low - _tile_period_input_px(geometry, axis))
        low = max(low, min(n - 1, overlap + math.ceil(n / per_axis)))  # at most per_axis tiles
        tile.append(draw(st.integers(low, n - 1)))
    batch = draw(st.integers(min_batch, max_batch))
    return MultiScaleCase(
        module,
        (batch, channels, *spatial),
        tile[0] if len(set(tile)) == 1 and draw(st.booleans()) else tuple(tile),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def unet_cases(*, ndim: int = 2, **options: Any) -> st.SearchStrategy[MultiScaleCase]:
    """A U-Net (``unet_networks``), an image shape it accepts and a legal tile: every streamed
    axis has 2..``max_tiles_per_axis`` tiles (one axis always is). ``options`` are
    ``max_tiles_per_axis``, ``min_batch``, ``max_batch``, ``max_extra_periods`` (how many whole
    periods an image may grow beyond the smallest that streams) and ``unet_networks``' own.

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, deadline=None, database=None)
    ... @given(unet_cases(ndim=2))
    ... def check(case):
    ...     assert case.module(torch.zeros(case.image_shape)).shape[2:] == case.image_shape[2:]
    >>> check()
    """
    return _multiscale_case(unet_networks, ndim=ndim, **options)


def pyramid_cases(*, ndim: int = 2, **options: Any) -> st.SearchStrategy[MultiScaleCase]:
    """A pyramid (``pyramid_networks``), an image shape it accepts and a legal tile, with the
    options of ``unet_cases`` (``pyramid_networks``' own for the network).

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, deadline=None, database=None)
    ... @given(pyramid_cases(ndim=2, structures=["tuple"]))
    ... def check(case):
    ...     assert isinstance(case.module(torch.zeros(case.image_shape)), tuple)
    >>> check()
    """
    return _multiscale_case(pyramid_networks, ndim=ndim, **options)
