"""Hypothesis strategies for streamable conv stacks, images and tiles.

The strategies draw what streamcheck claims to stream exactly: (possibly nested) ``nn.Sequential``
stacks of ConvNd / MaxPoolNd / AvgPoolNd, pointwise activations and eval-mode BatchNorm / Dropout,
images large enough for them, and legal tiles. The geometry they need comes from the one oracle,
``_geometry.geometry_of`` (independent of the engine: PyTorch's documented shape formulas).

NOTE [ Strategy geometry ]
Rule 1. Axes are independent. Along one axis a window layer has kernel k, stride s, dilation d and
        padding (left, right); its effective kernel is ``d*(k-1) + 1``.
Rule 2. Receptive field and total stride of a chain: ``F = 1 + sum (d*(k-1)) * J`` and
        ``S = J_final``, where J is the product of the strides of the layers before.
        Padding and ceil_mode change the output size, never F or S.
Rule 3. Output sizes follow PyTorch: convolutions ``floor((n + pl + pr - d*(k-1) - 1) / s) + 1``;
        pooling the same with ``pl = pr = p``, rounded up under ceil_mode, minus one when the last
        window would start in the right padding. A draw is valid when every layer's output has
        at least one element, reflect padding is smaller than its input and AvgPool3d's input is
        at least its kernel (both checked by PyTorch), and no dilated max-pool window lies wholly
        in the padding: PyTorch (2.15) accepts that, outputs -inf with an out-of-range index, and
        its backward then writes out of bounds (heap corruption).
Rule 4. Layers are drawn against a receptive-field budget (``max_receptive_field_px``): a layer
        may only grow F up to it, so the smallest legal tile (F) stays within the image sizes
        drawn by default and the number of tiles stays small.
Rule 5. Parameters are initialised under a drawn seed, so a failing example replays exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

from ._geometry import Geometry, _leaves, _windows, geometry_of
from .statistics import statistic_layers

__all__ = [
    "SMOOTH_ACTIVATIONS",
    "ACTIVATIONS",
    "StreamingCase",
    "conv_stacks",
    "image_shapes",
    "streaming_cases",
    "tile_sizes",
]

# Pointwise activations with a continuous derivative: gradients are Lipschitz in the input, so a
# float32 rounding error cannot flip a branch (see tests/test_properties.py, float32 property).
SMOOTH_ACTIVATIONS: tuple[Callable[[], nn.Module], ...] = (
    nn.Identity,
    nn.GELU,
    lambda: nn.GELU(approximate="tanh"),
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.ELU,
    nn.CELU,
    nn.Mish,
)
# All pointwise activations drawn by default: the smooth ones plus kinked ones.
ACTIVATIONS: tuple[Callable[[], nn.Module], ...] = (
    nn.ReLU,
    *SMOOTH_ACTIVATIONS,
    lambda: nn.LeakyReLU(0.1),
    nn.ReLU6,
    nn.Hardtanh,
    nn.Hardswish,
    nn.SELU,
)

# The layer classes by number of spatial axes (the other strategy modules use these too).
_CONV: dict[int, Any] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_MAX_POOL: dict[int, Any] = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVG_POOL: dict[int, Any] = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_BATCH_NORM: dict[int, Any] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


# --------------------------------------------------------------------------------------- geometry
def _in_channels(module: nn.Module) -> int | None:
    """Channels the stack expects: those of its first convolution, norm or statistic layer, if
    any (a statistic layer says them as ``channels``)."""
    for layer in _leaves(module):
        if isinstance(layer, nn.modules.conv._ConvNd):
            return int(layer.in_channels)
        if isinstance(
            layer, nn.modules.batchnorm._BatchNorm | nn.modules.instancenorm._InstanceNorm
        ):
            return int(layer.num_features)
        if isinstance(layer, nn.GroupNorm):
            return int(layer.num_channels)
        if hasattr(layer, "channels"):
            return int(getattr(layer, "channels"))  # noqa: B009
    return None


def _ndim(module: nn.Module) -> int | None:
    for layer in _leaves(module):
        for ndim, types in (
            (1, (nn.Conv1d, nn.MaxPool1d, nn.AvgPool1d)),
            (2, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)),
            (3, (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d)),
        ):
            if isinstance(layer, types):
                return ndim
    return None


# ------------------------------------------------------------------------------------- strategies
def _tuple_or_int(draw: st.DrawFn, values: Sequence[int]) -> int | tuple[int, ...]:
    """An int when all axes agree (and a coin says so), else a tuple: both spellings get tested."""
    if len(set(values)) == 1 and draw(st.booleans()):
        return values[0]
    return tuple(values)


@st.composite
def _conv(
    draw: st.DrawFn,
    /,
    *,
    ndim: int,
    channels: int,
    max_channels: int,
    budget: Sequence[int],
    max_kernel: int,
    max_stride: int,
    max_dilation: int,
    padding_modes: Sequence[str],
    wide_padding: bool,
) -> nn.Module:
    out_channels = draw(st.integers(1, max_channels))
    common = math.gcd(channels, out_channels)
    groups = draw(st.sampled_from([g for g in range(1, common + 1) if common % g == 0]))
    kernel, dilation = [], []
    for b in budget:  # Rule 4: d*(k-1) <= b
        k = draw(st.integers(1, min(max_kernel, b + 1)))
        d = draw(st.integers(1, max_dilation if k == 1 else min(max_dilation, b // (k - 1))))
        kernel.append(k)
        dilation.append(d)
    stride = [draw(st.integers(1, max_stride)) for _ in range(ndim)]
    choices = ["int", "valid"] + (["same"] if all(s == 1 for s in stride) else [])
    padding: str | int | tuple[int, ...] = draw(st.sampled_from(choices))
    if padding == "int":
        pads = [
            draw(st.integers(0, d * (k - 1) + wide_padding))
            for k, d in zip(kernel, dilation, strict=True)
        ]
        padding = _tuple_or_int(draw, pads)
    return _CONV[ndim](
        channels,
        out_channels,
        _tuple_or_int(draw, kernel),
        stride=_tuple_or_int(draw, stride),
        padding=padding,
        dilation=_tuple_or_int(draw, dilation),
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(padding_modes)),
    )


@st.composite
def _pool(
    draw: st.DrawFn,
    /,
    *,
    ndim: int,
    kind: str,
    budget: Sequence[int],
    max_kernel: int,
    max_stride: int,
    max_dilation: int,
) -> nn.Module:
    kernel, dilation = [], []
    for b in budget:
        k = draw(st.integers(1, min(max_kernel, b + 1)))
        d = 1
        if kind == "max" and k > 1:
            d = draw(st.integers(1, min(max_dilation, b // (k - 1))))
        kernel.append(k)
        dilation.append(d)
    stride = None  # PyTorch's default: stride = kernel
    if draw(st.booleans()):
        stride = _tuple_or_int(draw, [draw(st.integers(1, max_stride)) for _ in range(ndim)])
    padding = _tuple_or_int(draw, [draw(st.integers(0, k // 2)) for k in kernel])
    options: dict[str, Any] = {"ceil_mode": draw(st.booleans())}
    if kind == "max":
        options["dilation"] = _tuple_or_int(draw, dilation)
        return _MAX_POOL[ndim](_tuple_or_int(draw, kernel), stride, padding, **options)
    options["count_include_pad"] = draw(st.booleans())
    if ndim > 1 and draw(st.integers(0, 3)) == 0:  # AvgPool1d has no divisor_override
        options["divisor_override"] = draw(st.integers(1, 9))
    return _AVG_POOL[ndim](_tuple_or_int(draw, kernel), stride, padding, **options)


@st.composite
def conv_stacks(
    draw: st.DrawFn,
    /,
    *,
    ndim: int = 2,
    min_layers: int = 1,
    max_layers: int = 4,
    in_channels: int | None = None,
    max_channels: int = 4,
    max_kernel: int = 5,
    max_pool_kernel: int = 3,
    max_stride: int = 2,
    max_dilation: int = 2,
    max_receptive_field_px: int = 24,
    pools: Sequence[str] = ("max", "avg"),
    activations: Sequence[Callable[[], nn.Module]] = ACTIVATIONS,
    padding_modes: Sequence[str] = ("zeros", "reflect", "replicate"),
    wide_padding: bool = False,
    eval_layers: bool = True,
    statistics: bool = False,
    nested: bool = True,
) -> nn.Sequential:
    """Random streamable stacks: ConvNd, MaxPoolNd, AvgPoolNd, pointwise and eval-mode layers.

    Every option PyTorch allows is drawn (kernel, stride, padding as int / tuple / 'valid' / 'same'
    with stride 1, dilation, groups dividing the channels, bias, padding mode; pooling padding up to
    kernel // 2, MaxPool dilation, ceil_mode, count_include_pad, divisor_override). The receptive
    field never exceeds ``max_receptive_field_px`` on any axis. ``pools`` picks among "max" and
    "avg"; ``activations`` are zero-argument factories. Conv padding reaches at most
    ``dilation * (kernel - 1)`` (every output sees a pixel) unless ``wide_padding``, which adds one
    more: outputs at the border then see padding only. ``eval_layers`` adds layers that are
    pointwise in eval mode: BatchNorm (random running statistics, affine or not) and Dropout.
    ``statistics`` adds layers with statistics over the whole map, in training mode
    (``testing.statistics.statistic_layers``). Parameters are float32.

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, deadline=None, database=None)
    ... @given(conv_stacks(ndim=1, max_layers=2, max_receptive_field_px=9))
    ... def check(stack):
    ...     assert max(geometry_of(stack, ndim=1).receptive_field_px) <= 9
    >>> check()
    """
    seed = draw(st.integers(0, 2**32 - 1))
    n_layers = draw(st.integers(min_layers, max_layers))
    kinds = ["conv", "activation"] + [f"{kind}_pool" for kind in pools]
    kinds += ["eval"] if eval_layers else []
    kinds += ["statistic", "statistic"] if statistics else []
    channels = in_channels if in_channels is not None else draw(st.integers(1, max_channels))
    rf, jump = [1] * ndim, [1] * ndim
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # Rule 5
        for _ in range(n_layers):
            kind = draw(st.sampled_from(kinds))
            budget = [
                (max_receptive_field_px - f) // j for f, j in zip(rf, jump, strict=True)
            ]  # Rule 4
            layer: Any
            if kind == "activation":
                layer = draw(st.sampled_from(activations))()
            elif kind == "eval":
                layer = _eval_layer(draw, ndim=ndim, channels=channels)
            elif kind == "statistic":
                layer = draw(statistic_layers(ndim=ndim, channels=channels))
            elif kind == "conv":
                layer = draw(
                    _conv(
                        ndim=ndim,
                        channels=channels,
                        max_channels=max_channels,
                        budget=budget,
                        max_kernel=max_kernel,
                        max_stride=max_stride,
                        max_dilation=max_dilation,
                        padding_modes=padding_modes,
                        wide_padding=wide_padding,
                    )
                )
                channels = layer.out_channels
            else:
                layer = draw(
                    _pool(
                        ndim=ndim,
                        kind=kind.split("_")[0],
                        budget=budget,
                        max_kernel=max_pool_kernel,
                        max_stride=max_stride,
                        max_dilation=max_dilation,
                    )
                )
            windows = _windows(layer, ndim)
            for axis, w in enumerate(windows or ()):
                rf[axis] += w.dilation * (w.kernel - 1) * jump[axis]
                jump[axis] *= w.stride
            layers.append(layer)
    return _nest(draw, layers) if nested else nn.Sequential(*layers)


def _eval_layer(draw: st.DrawFn, *, ndim: int, channels: int) -> nn.Module:
    """BatchNormNd or Dropout in eval mode: per-channel affine maps or identities."""
    if draw(st.booleans()):
        return nn.Dropout(draw(st.sampled_from([0.1, 0.5]))).eval()
    return _random_statistics(_BATCH_NORM[ndim](channels, affine=draw(st.booleans())).eval())


def _random_statistics(norm: Any) -> nn.Module:
    """``norm`` (a BatchNorm) with random running statistics and affine parameters, drawn from
    torch's generator (under the stack's seed, Rule 5)."""
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        if norm.affine:
            norm.weight.normal_()
            norm.bias.normal_()
    return norm


def _nest(draw: st.DrawFn, layers: list[nn.Module]) -> nn.Sequential:
    """Group consecutive layers into sub-Sequentials (up to two levels deep)."""
    children: list[nn.Module] = []
    i = 0
    while i < len(layers):
        size = draw(st.integers(1, len(layers) - i))
        group = layers[i : i + size]
        if size == 1 and not draw(st.booleans()):
            children.append(group[0])
        elif size >= 3 and draw(st.booleans()):
            children.append(nn.Sequential(group[0], nn.Sequential(*group[1:])))
        else:
            children.append(nn.Sequential(*group))
        i += size
    return nn.Sequential(*children)


@st.composite
def image_shapes(
    draw: st.DrawFn,
    /,
    *,
    module: nn.Module | None = None,
    ndim: int | None = None,
    channels: int | None = None,
    min_batch: int = 1,
    max_batch: int = 3,
    max_channels: int = 4,
    max_px: int | None = None,
) -> tuple[int, ...]:
    """Image shapes ``(N, C, *spatial)``, each axis drawn on its own (odd, non-square sizes).

    With ``module`` the channels match its first convolution and every spatial size is at least
    the smallest one for which the module's output has >= 1 element (``geometry_of``).
    ``max_px`` defaults to 64, 48 and 20 px for 1, 2 and 3 spatial axes.

    >>> from hypothesis import given, settings
    >>> stack = nn.Sequential(nn.Conv2d(3, 8, 5), nn.MaxPool2d(2))  # needs >= 6 px per axis
    >>> @settings(max_examples=5, deadline=None, database=None)
    ... @given(image_shapes(module=stack))
    ... def check(shape):
    ...     assert shape[1] == 3 and min(shape[2:]) >= 6 and max(shape[2:]) <= 48
    >>> check()
    """
    if ndim is None:
        ndim = (_ndim(module) if module is not None else None) or 2
    if max_px is None:
        max_px = {1: 64, 2: 48, 3: 20}[ndim]
    min_px = (1,) * ndim
    if module is not None:
        min_px = geometry_of(module, ndim=ndim).min_input_px
        channels = channels if channels is not None else _in_channels(module)
    if channels is None:
        channels = draw(st.integers(1, max_channels))
    batch = draw(st.integers(min_batch, max_batch))
    spatial = tuple(draw(st.integers(lo, max(lo, max_px))) for lo in min_px)
    return (batch, channels, *spatial)


@st.composite
def tile_sizes(
    draw: st.DrawFn,
    /,
    *,
    module: nn.Module,
    image_shape: Sequence[int],
    max_tiles: int | None = None,
) -> int | tuple[int, ...]:
    """Legal tiles (input-tile edge, overlap included): an int, or one int per spatial axis.

    Each axis gets at least the receptive field (the smallest legal tile, which is drawn too) and at
    most ``max(receptive field, image size)``. ``max_tiles`` caps the tile count (keeps examples
    fast): it raises the lower bound so that each axis has at most ``max_tiles ** (1/ndim)`` tiles.

    >>> from hypothesis import given, settings
    >>> stack = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2))  # receptive field 3, stride 2
    >>> @settings(max_examples=5, deadline=None, database=None)
    ... @given(tile_sizes(module=stack, image_shape=(1, 1, 9, 30)))
    ... def check(tile):
    ...     assert all(3 <= t <= 30 for t in (tile if isinstance(tile, tuple) else [tile]))
    >>> check()
    """
    ndim = len(image_shape) - 2
    geometry = geometry_of(module, ndim=ndim)
    out_px = geometry.output_px(module, image_shape[2:])
    lows, highs = [], []
    for rf, stride, n, out in zip(
        geometry.receptive_field_px, geometry.total_stride, image_shape[2:], out_px, strict=True
    ):
        low = rf
        if max_tiles is not None:
            per_axis = max(1, int(math.floor(max_tiles ** (1 / ndim) + 1e-9)))
            low = (math.ceil(out / per_axis) - 1) * stride + rf  # Rule 6 of streamcheck.geometry
        lows.append(low)
        highs.append(max(low, rf, n))
    if draw(st.booleans()):
        low = max(lows)
        return draw(st.integers(low, max(low, max(highs))))
    return tuple(draw(st.integers(lo, hi)) for lo, hi in zip(lows, highs, strict=True))


@dataclass(frozen=True)
class _Case:
    """What every drawn case holds (``StreamingCase``, ``unets.MultiScaleCase``): a module, an
    image shape it accepts, a legal tile and a seed for the data, so the equivalence record runs
    them alike."""

    module: nn.Module
    image_shape: tuple[int, ...]
    tile: int | tuple[int, ...]
    seed: int

    @property
    def ndim(self) -> int:
        return len(self.image_shape) - 2


@dataclass(frozen=True)
class StreamingCase(_Case):
    """A module, an image shape it accepts, a legal tile, and a seed for the data.

    >>> case = StreamingCase(nn.Sequential(nn.Conv2d(1, 1, 3)), (1, 1, 9, 7), tile=5, seed=0)
    >>> case.ndim, case.geometry.receptive_field_px, case.geometry.min_input_px
    (2, (3, 3), (3, 3))
    """

    @property
    def geometry(self) -> Geometry:
        return geometry_of(self.module, ndim=self.ndim)


_DEFAULT_SIZES = {  # ndim: (max_px, max_receptive_field_px, max_tiles)
    1: (64, 32, 24),
    2: (48, 24, 36),
    3: (20, 10, 27),
}


@st.composite
def streaming_cases(
    draw: st.DrawFn,
    /,
    *,
    ndim: int = 2,
    max_px: int | None = None,
    max_receptive_field_px: int | None = None,
    max_tiles: int | None = None,
    min_batch: int = 1,
    max_batch: int = 3,
    networks: st.SearchStrategy[nn.Module] | None = None,
    **stack_options: object,
) -> StreamingCase:
    """A network, an image shape it accepts and a legal tile, drawn together.

    ``networks`` draws the network (by default ``conv_stacks(ndim=ndim, **stack_options)`` with
    the receptive field bounded; any strategy of modules whose geometry the strategies know: the
    stacks of ``conv_stacks``, the blocks of ``graphs``). The defaults keep one example fast on a
    CPU core.

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, deadline=None, database=None)
    ... @given(streaming_cases(ndim=3))
    ... def check(case):
    ...     assert len(case.image_shape) == 5 and max(case.image_shape[2:]) <= 20
    >>> check()
    >>> from hypothesis import strategies as st
    >>> convs = st.sampled_from([nn.Conv1d(1, 2, 3), nn.Conv1d(1, 2, 5, padding=2)])
    >>> @settings(max_examples=5, deadline=None, database=None)
    ... @given(streaming_cases(ndim=1, networks=convs.map(nn.Sequential)))
    ... def check(case):
    ...     assert case.image_shape[1] == 1 and case.module[0].kernel_size[0] in (3, 5)
    >>> check()
    """
    px, rf, tiles = _case_bounds(_DEFAULT_SIZES[ndim], max_px, max_receptive_field_px, max_tiles)
    if networks is not None and stack_options:
        raise ValueError(f"options {sorted(stack_options)} are for conv_stacks, not networks=")
    if networks is None:
        networks = conv_stacks(ndim=ndim, max_receptive_field_px=rf, **stack_options)  # type: ignore[arg-type]
    module = draw(networks)
    return _draw_case(
        draw,
        module,
        ndim=ndim,
        min_batch=min_batch,
        max_batch=max_batch,
        max_px=px,
        max_tiles=tiles,
    )


def _case_bounds(
    defaults: tuple[int, int, int],
    max_px: int | None,
    max_receptive_field_px: int | None,
    max_tiles: int | None,
) -> tuple[int, int, int]:
    """``(max_px, max_receptive_field_px, max_tiles)``, each None replaced by its default."""
    default_px, default_rf, default_tiles = defaults
    return (
        default_px if max_px is None else max_px,
        default_rf if max_receptive_field_px is None else max_receptive_field_px,
        default_tiles if max_tiles is None else max_tiles,
    )


def _draw_case(
    draw: st.DrawFn,
    module: nn.Module,
    /,
    *,
    ndim: int,
    channels: int | None = None,
    min_batch: int,
    max_batch: int,
    max_px: int,
    max_tiles: int,
) -> StreamingCase:
    """The rest of a case for a drawn ``module``: an image shape it accepts, a legal tile and a
    seed for the data, drawn in that order."""
    image_shape = draw(
        image_shapes(
            module=module,
            ndim=ndim,
            channels=channels,
            min_batch=min_batch,
            max_batch=max_batch,
            max_px=max_px,
        )
    )
    tile = draw(tile_sizes(module=module, image_shape=image_shape, max_tiles=max_tiles))
    return StreamingCase(module, image_shape, tile, seed=draw(st.integers(0, 2**32 - 1)))
