"""Hypothesis strategies for streamable DAG networks: residuals, concatenations, shared layers.

``conv_stacks`` draws chains; the strategies here draw graphs that the engine must trace and
schedule as graphs: residual additions and multiplications, concatenation along channels, two
branches that rejoin, one submodule used twice, and permute + LayerNorm / Linear over channels
(permute back). Networks are ``nn.Sequential`` chains of such blocks and ``conv_stacks`` segments,
so strides and padding happen before, inside and after the branches. The blocks are module-level
classes (they pickle, and fx traces through them).

NOTE [ DAG strategies ]
Rule D1. Sizes and receptive fields are the geometry oracle's (``_geometry.py``, NOTE [ Geometry
         oracle ]): a ``Residual`` merges its body with its input, ``Branches`` merge their
         branches (the join reads the hull of what they read), a shared layer used twice is a
         chain of two; a join is valid only when all its branches give the same size.
Rule D2. Residual and rejoined bodies are size-preserving by construction (stride 1, total
         padding ``d*(k-1)``), except that reflect padding needs an input larger than the
         padding: the smallest valid input is searched for by the oracle.
Rule D3. Draws stay within ``max_receptive_field_px``: a segment whose addition would exceed it is
         drawn and dropped (the network stays valid and the bound holds).
Rule D4. Parameters and buffers are initialised under a drawn seed (strategies Rule 5).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

from streamcheck.testing.strategies import (
    _AVG_POOL,
    _CONV,
    _MAX_POOL,
    ACTIVATIONS,
    StreamingCase,
    _case_bounds,
    _draw_case,
    _eval_layer,
    _tuple_or_int,
    conv_stacks,
)

from ._blocks import Branches, ChannelMix, FrozenBatchNorm, Residual, SharedTwice
from ._geometry import _windows, geometry_of
from .statistics import statistic_layers

__all__ = ["BLOCKS", "dag_cases", "dag_networks", "out_channels"]

BLOCKS = ("residual_add", "residual_mul", "concat", "rejoin_add", "rejoin_mul", "shared", "mix")


# ------------------------------------------------------------------------------------ channels
def out_channels(module: nn.Module, channels: int) -> int:
    """Channels ``module`` produces from ``channels`` input channels."""
    if isinstance(module, nn.Sequential | SharedTwice):
        for child in module.children():
            channels = out_channels(child, channels)
        return channels
    if isinstance(module, Residual):
        return channels
    if isinstance(module, Branches):
        outs = [out_channels(b, channels) for b in module.branches]
        return sum(outs) if module.merge == "cat" else outs[0]
    if isinstance(module, ChannelMix):
        inner = module.inner
        return int(inner.out_features) if isinstance(inner, nn.Linear) else channels
    if isinstance(module, nn.modules.conv._ConvNd):
        return int(module.out_channels)
    return channels


# ----------------------------------------------------------------------------------- strategies
def _size_preserving_conv(
    draw: st.DrawFn,
    *,
    ndim: int,
    channels: int,
    out: int,
    budget: Sequence[int],
    max_kernel: int,
    max_dilation: int,
    padding_modes: Sequence[str],
) -> nn.Module:
    """A stride-1 conv whose total padding is its reach: output size = input size (Rule D2)."""
    kernel, dilation = [], []
    for b in budget:
        k = draw(st.integers(1, max(1, min(max_kernel, b + 1))))
        d = draw(st.integers(1, max(1, min(max_dilation, b // (k - 1))))) if k > 1 else 1
        kernel.append(k)
        dilation.append(d)
    reach = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
    padding: str | int | tuple[int, ...] = "same"
    if all(r % 2 == 0 for r in reach) and draw(st.booleans()):
        padding = _tuple_or_int(draw, [r // 2 for r in reach])
    common = math.gcd(channels, out)
    groups = draw(st.sampled_from([g for g in range(1, common + 1) if common % g == 0]))
    return _CONV[ndim](
        channels,
        out,
        _tuple_or_int(draw, kernel),
        padding=padding,
        dilation=_tuple_or_int(draw, dilation),
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(padding_modes)),
    )


def _pointwise(
    draw: st.DrawFn,
    *,
    ndim: int,
    channels: int,
    activations: Sequence[Callable[[], nn.Module]],
    statistics: bool = False,
) -> nn.Module:
    """An activation, an eval BatchNorm or Dropout, a FrozenBatchNorm, or a LayerNorm over
    channels (keeps the channel count); with ``statistics`` also a layer with statistics over
    the whole map (``statistics.statistic_layers``)."""
    # LayerNorm over one channel is degenerate: x - mean is rounding noise, amplified 1/sqrt(eps).
    kinds = ["activation", "activation", "eval", "frozen"] + (["norm"] if channels > 1 else [])
    kinds += ["statistic", "statistic"] if statistics else []
    kind = draw(st.sampled_from(kinds))
    if kind == "statistic":
        return draw(statistic_layers(ndim=ndim, channels=channels))
    if kind == "activation":
        return draw(st.sampled_from(activations))()
    if kind == "eval":
        return _eval_layer(draw, ndim=ndim, channels=channels)
    if kind == "frozen":
        frozen = FrozenBatchNorm(channels, ndim=ndim)
        with torch.no_grad():
            frozen.weight.normal_()
            frozen.bias.normal_()
            frozen.running_mean.normal_()
            frozen.running_var.uniform_(0.5, 2.0)
        return frozen
    norm = nn.LayerNorm(channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    return ChannelMix(norm, ndim=ndim)


def _body(
    draw: st.DrawFn,
    *,
    ndim: int,
    channels: int,
    out: int,
    budget: Sequence[int],
    options: dict[str, Any],
) -> nn.Module:
    """A size-preserving path from ``channels`` to ``out`` channels: convs (and stride-1 pools)
    with pointwise layers between, within the receptive-field ``budget`` (px at this depth)."""
    layers: list[nn.Module] = []
    left = list(budget)
    n_convs = draw(st.integers(1, 2))
    for i in range(n_convs):
        mid = out if i == n_convs - 1 else draw(st.integers(1, options["max_channels"]))
        conv = _size_preserving_conv(
            draw,
            ndim=ndim,
            channels=channels,
            out=mid,
            budget=[b // (n_convs - i) for b in left],
            max_kernel=options["max_kernel"],
            max_dilation=options["max_dilation"],
            padding_modes=options["padding_modes"],
        )
        windows = _windows(conv, ndim) or ()
        left = [b - w.dilation * (w.kernel - 1) for b, w in zip(left, windows, strict=True)]
        layers.append(conv)
        channels = mid
        if draw(st.booleans()):
            layers.append(
                _pointwise(
                    draw,
                    ndim=ndim,
                    channels=channels,
                    activations=options["activations"],
                    statistics=options["statistics"],
                )
            )
    if min(left) >= 2 and options["pools"] and draw(st.booleans()):  # 3-wide, stride 1, padding 1
        kind = draw(st.sampled_from(options["pools"]))
        pool = _MAX_POOL[ndim](3, 1, 1) if kind == "max" else _AVG_POOL[ndim](3, 1, 1)
        layers.insert(draw(st.integers(0, len(layers))), pool)
    return layers[0] if len(layers) == 1 and draw(st.booleans()) else nn.Sequential(*layers)


def _block(
    draw: st.DrawFn,
    kind: str,
    *,
    ndim: int,
    channels: int,
    budget: Sequence[int],
    options: dict[str, Any],
) -> nn.Module:
    body = functools.partial(_body, draw, ndim=ndim, channels=channels, options=options)
    if kind in ("residual_add", "residual_mul"):
        return Residual(body(out=channels, budget=budget), merge=kind.split("_")[1])
    if kind == "concat":
        n = draw(st.integers(2, 3))
        outs = [draw(st.integers(1, options["max_channels"])) for _ in range(n)]
        return Branches(*(body(out=c, budget=budget) for c in outs), merge="cat")
    if kind in ("rejoin_add", "rejoin_mul"):
        out = draw(st.integers(1, options["max_channels"]))
        return Branches(
            body(out=out, budget=budget), body(out=out, budget=budget), merge=kind.split("_")[1]
        )
    if kind == "shared":
        conv = _size_preserving_conv(
            draw,
            ndim=ndim,
            channels=channels,
            out=channels,
            budget=[b // 2 for b in budget],
            max_kernel=options["max_kernel"],
            max_dilation=options["max_dilation"],
            padding_modes=options["padding_modes"],
        )
        return SharedTwice(conv, draw(st.sampled_from(options["activations"]))())
    assert kind == "mix", kind
    if draw(st.booleans()):
        return ChannelMix(
            nn.Linear(channels, draw(st.integers(1, options["max_channels"]))), ndim=ndim
        )
    return _pointwise(
        draw,
        ndim=ndim,
        channels=channels,
        activations=options["activations"],
        statistics=options["statistics"],
    )


@st.composite
def dag_networks(
    draw: st.DrawFn,
    /,
    *,
    ndim: int = 2,
    in_channels: int | None = None,
    min_blocks: int = 1,
    max_blocks: int = 3,
    blocks: Sequence[str] = BLOCKS,
    max_channels: int = 4,
    max_kernel: int = 5,
    max_dilation: int = 2,
    max_receptive_field_px: int = 24,
    pools: Sequence[str] = ("max", "avg"),
    activations: Sequence[Callable[[], nn.Module]] = ACTIVATIONS,
    padding_modes: Sequence[str] = ("zeros", "reflect", "replicate"),
    statistics: bool = False,
) -> nn.Sequential:
    """Networks with joins: ``conv_stacks`` segments (strides, pools, any padding) and blocks.

    ``blocks`` picks among ``BLOCKS``: residual add or multiply (``Residual``), concatenation
    along channels and two branches that rejoin by add or multiply (``Branches``), one conv used
    twice (``SharedTwice``), and ``"mix"``: a Linear, LayerNorm or FrozenBatchNorm over channels
    (``ChannelMix`` permutes channels last and back). Block bodies are drawn size-preserving, so
    the branches always rejoin; strided layers sit in the segments between blocks. The
    receptive field stays within ``max_receptive_field_px`` (Rule D3); parameters are float32.
    ``statistics`` also draws layers with statistics over the map (in segments and bodies).

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, deadline=None, database=None)
    ... @given(dag_networks(ndim=1, max_receptive_field_px=9))
    ... def check(net):
    ...     assert max(geometry_of(net, ndim=1).receptive_field_px) <= 9
    >>> check()
    """
    options = {
        "max_channels": max_channels,
        "max_kernel": max_kernel,
        "max_dilation": max_dilation,
        "pools": tuple(pools),
        "activations": tuple(activations),
        "padding_modes": tuple(padding_modes),
        "statistics": statistics,
    }
    seed = draw(st.integers(0, 2**32 - 1))
    channels = in_channels if in_channels is not None else draw(st.integers(1, max_channels))
    segments: list[nn.Module] = []
    n_blocks = draw(st.integers(min_blocks, max_blocks))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # Rule D4
        for i in range(2 * n_blocks + 1):
            geometry = geometry_of(nn.Sequential(*segments), ndim=ndim)
            budget = [
                (max_receptive_field_px - f) // s
                for f, s in zip(geometry.receptive_field_px, geometry.total_stride, strict=True)
            ]
            if i % 2 == 0:  # a chain segment (may be empty)
                segment: nn.Module = draw(
                    conv_stacks(
                        ndim=ndim,
                        min_layers=0,
                        max_layers=2,
                        in_channels=channels,
                        max_channels=max_channels,
                        max_kernel=max_kernel,
                        max_dilation=max_dilation,
                        max_receptive_field_px=max(1, min(budget) + 1),
                        pools=pools,
                        activations=activations,
                        padding_modes=padding_modes,
                        statistics=statistics,
                        nested=False,
                    )
                )
            else:
                kind = draw(st.sampled_from(blocks))
                segment = _block(
                    draw, kind, ndim=ndim, channels=channels, budget=budget, options=options
                )
            candidate = nn.Sequential(*segments, segment)
            fields = geometry_of(candidate, ndim=ndim).receptive_field_px
            if max(fields) <= max_receptive_field_px:  # Rule D3
                segments.append(segment)
                channels = out_channels(segment, channels)
    return nn.Sequential(*segments)


_DEFAULT_SIZES = {1: (64, 32, 16), 2: (40, 20, 16), 3: (16, 8, 8)}  # max_px, max_rf, max_tiles


@st.composite
def dag_cases(
    draw: st.DrawFn,
    /,
    *,
    ndim: int = 2,
    max_px: int | None = None,
    max_receptive_field_px: int | None = None,
    max_tiles: int | None = None,
    min_batch: int = 1,
    max_batch: int = 2,
    **network_options: Any,
) -> StreamingCase:
    """A DAG network, an image shape it accepts and a legal tile (``StreamingCase``).

    ``network_options`` go to ``dag_networks``; the defaults keep one example fast on a CPU core.

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, deadline=None, database=None)
    ... @given(dag_cases(ndim=2))
    ... def check(case):
    ...     assert len(case.image_shape) == 4 and max(case.image_shape[2:]) <= 40
    >>> check()
    """
    px, rf, tiles = _case_bounds(_DEFAULT_SIZES[ndim], max_px, max_receptive_field_px, max_tiles)
    channels = network_options.pop("in_channels", None) or draw(st.integers(1, 3))
    network = draw(
        dag_networks(ndim=ndim, in_channels=channels, max_receptive_field_px=rf, **network_options)
    )
    return _draw_case(
        draw,
        network,
        ndim=ndim,
        channels=channels,
        min_batch=min_batch,
        max_batch=max_batch,
        max_px=px,
        max_tiles=tiles,
    )
