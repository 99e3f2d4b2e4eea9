"""What each layer does to space: window layers (conv, pool) and pointwise layers.

NOTE [ Locality ]
Rule L1. A layer may be streamed when each output pixel depends only on a bounded window of input
         pixels at the same place, with weights that do not depend on where the window is.
Rule L2. Window layers (ConvNd, MaxPoolNd, AvgPoolNd, and the functions ``F.conv*d``,
         ``F.max_pool*d``, ``F.avg_pool*d`` and ``F.pad``) are run by the engine itself with padding
         0 on an explicitly padded tile (see geometry Rules 3 and 5). A function's window is read
         from its arguments: the kernel from the weight's shape (a constant: a parameter, buffer or
         something computed from them, such as a standardised weight or a blur filter), stride,
         padding (``'same'``, asymmetric, reflect, replicate) and dilation from the call. ``F.pad``
         is a window of one pixel with the padding; negative padding crops.
Rule L3. Pointwise layers (activations, eval-mode BatchNorm and ``F.batch_norm``, LayerNorm or
         Linear over channels, residual additions, ...) need the same box as they produce. They are
         local as long as the tensor dimensions they mix or index parameters by hold no spatial
         axis (`Pointwise.mixed_dims`), and constants they broadcast with have size 1 along spatial
         axes. Splitting (``split``, ``chunk``, ``unbind``) is pointwise along the dimension it
         cuts; reshapes and indexing are pointwise when they leave every spatial axis whole (graph
         Rules G8-G9).
Rule L4. Anything else is rejected before any work, by module path, with the reason and the fix:
         a layer with statistics over space (train-mode BatchNorm, GroupNorm, InstanceNorm),
         global or adaptive pooling, Linear/Flatten over space, randomness that a recomputation
         would not repeat (Dropout in training), or anything the engine does not know.
Rule L5. Layers that change scale are `resampling.Rescale` layers (geometry Rules MS1-MS4):
         ConvTranspose{1,2,3}d and ``F.conv_transpose*d``, nn.Upsample and ``F.interpolate``,
         PixelShuffle / PixelUnshuffle (and their functions), timm's SpaceToDepth and
         DepthToSpace. timm's ``pad_same`` is a window of one pixel whose padding is computed from
         the whole image's size (geometry Rule MS8).
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import internal_error
from .geometry import Interval, avg_pool_divisors, window_input
from .reductions import Reduction, moments, normalize, pooling_reduction, stat_dims
from .resampling import Rescale

__all__ = [
    "Pointwise",
    "Rejected",
    "Window",
    "classify_function",
    "classify_method",
    "classify_module",
    "foreign_functions",
    "foreign_leaves",
]


@dataclass(frozen=True)
class Rejected:
    """Why a layer cannot be streamed and how to fix it (Rule L4)."""

    reason: str
    fix: str


@dataclass(frozen=True)
class Pointwise:
    """A layer that maps each spatial position on its own (Rule L3).

    ``mixed_dims`` lists tensor dimensions the layer mixes or indexes parameters by, as a function
    of the input's rank; ``permutation`` is set for permutes and transposes, which move dimensions
    around (a function of the call's arguments and the input's rank). ``broadcast`` is False for
    layers that index their constants by a dimension instead of broadcasting them (batch norm's
    statistics along channels). ``reshape`` marks reshapes (graph Rule G8), ``splits`` layers that
    return a tuple of pieces (split, chunk).
    """

    mixed_dims: Callable[[int], tuple[int, ...]] = lambda ndim: ()
    permutation: Callable[[tuple[Any, ...], dict[str, Any], int], tuple[int, ...]] | None = None
    broadcast: bool = True
    reshape: bool = False
    splits: bool = False
    stacks: bool = False  # torch.stack: ``permutation`` gives where each input dim goes
    reduction: bool = False  # sums, means, maxima over the dimensions it mixes
    reduces: bool = False  # and removes them (no keepdim)


_NO_DIMS = Pointwise()
_CHANNEL_DIM = Pointwise(mixed_dims=lambda ndim: (1,))
_LAST_DIM = Pointwise(mixed_dims=lambda ndim: (ndim - 1,))
_RESHAPE = Pointwise(reshape=True)
_INDEXED_BY_CHANNEL = Pointwise(mixed_dims=lambda ndim: (1,), broadcast=False)
_INDEXED_BY_IMAGE_AND_CHANNEL = Pointwise(mixed_dims=lambda ndim: (0, 1), broadcast=False)


@dataclass(frozen=True)
class Window:
    """A conv or pooling layer, described by its per-axis geometry (Rule L2)."""

    kind: str  # "conv" (a module), "conv_function" (F.conv*d), "max", "avg" or "pad" (F.pad)
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pad_left: tuple[int, ...]
    pad_right: tuple[int, ...]
    pad_mode: str  # "constant", "reflect" or "replicate"
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None
    groups: int = 1  # of a conv_function
    value: float = 0.0  # what F.pad fills in (constant mode)

    @property
    def ndim(self) -> int:
        return len(self.kernel)

    def input_interval(self, axis: int, out: Interval) -> Interval:
        return window_input(
            out,
            kernel=self.kernel[axis],
            stride=self.stride[axis],
            dilation=self.dilation[axis],
            pad_left=self.pad_left[axis],
        )

    def pad(
        self,
        x: torch.Tensor,
        pads: Sequence[tuple[int, int]],
        gathers: Sequence[tuple[int, ...] | None] = (),
    ) -> torch.Tensor:
        """Recreate the layer's own padding where the tile touches the image border (Rule 3).

        Constant padding is added (``pads``); reflect and replicate padding index the pixels they
        copy (``gathers``: per axis, the source index of every padded position, or None).
        """
        for axis, gather in enumerate(gathers):
            if gather is not None:
                dim = x.dim() - self.ndim + axis
                x = x.index_select(dim, torch.tensor(gather, device=x.device))
        if not any(left or right for left, right in pads):
            return x
        flat = [amount for pair in reversed(pads) for amount in pair]
        return F.pad(
            x, flat, mode="constant", value=float("-inf") if self.kind == "max" else self.value
        )

    def run(
        self,
        x: torch.Tensor,
        pads: Sequence[tuple[int, int]],
        gathers: Sequence[tuple[int, ...] | None],
        out_box: tuple[Interval, ...],
        in_sizes: tuple[int, ...],
        weights: tuple[torch.Tensor, torch.Tensor | None, int] | None = None,
    ) -> torch.Tensor:
        """Apply the layer to tile ``x`` (whose missing border is ``pads``) with padding 0.

        ``weights`` is a convolution's (weight, bias, groups), read live on every tile.
        """
        x = self.pad(x, pads, gathers)
        if self.kind == "pad":
            return x
        if self.kind in ("conv", "conv_function"):
            if weights is None:
                raise internal_error("a convolution run without its weight")
            weight, bias, groups = weights
            return _CONV[self.ndim](x, weight, bias, self.stride, 0, self.dilation, groups)
        if self.kind == "max":
            return _MAX_POOL[self.ndim](x, self.kernel, self.stride, 0, self.dilation)
        summed = _sum_pool(x, self.kernel, self.stride)
        if self.divisor_override is not None:
            return summed / self.divisor_override
        return summed / self._divisors(out_box, in_sizes, summed)

    def _divisors(
        self, out_box: tuple[Interval, ...], in_sizes: tuple[int, ...], like: torch.Tensor
    ) -> torch.Tensor:
        divisor = torch.ones((), dtype=like.dtype, device=like.device)
        for axis, out in enumerate(out_box):
            counts = avg_pool_divisors(
                out,
                size=in_sizes[axis],
                kernel=self.kernel[axis],
                stride=self.stride[axis],
                padding=self.pad_left[axis],
                count_include_pad=self.count_include_pad,
            )
            shape = [1] * self.ndim
            shape[axis] = len(counts)
            divisor = divisor * torch.tensor(counts, dtype=like.dtype).view(shape).to(like.device)
        return divisor


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _sum_pool(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    if len(kernel) == 1:  # avg_pool1d has no divisor_override: go through 2-D
        return F.avg_pool2d(
            x.unsqueeze(-2), (1, *kernel), (1, *stride), divisor_override=1
        ).squeeze(-2)
    pool = F.avg_pool2d if len(kernel) == 2 else F.avg_pool3d
    return pool(x, kernel, stride, 0, False, True, 1)


def _tuple(value: Any, ndim: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * ndim


def _conv_window(m: nn.modules.conv._ConvNd) -> Window | Rescale | Rejected:
    if m.transposed:
        return _transposed(m)
    if m.padding_mode == "circular":
        return Rejected(
            "circular padding wraps the image around, so border pixels depend on the far side",
            "use padding_mode='zeros', 'reflect' or 'replicate'",
        )
    ndim = len(m.kernel_size)
    reach = [m.dilation[a] * (m.kernel_size[a] - 1) for a in range(ndim)]
    pads = _conv_pads(m, reach)
    if m.padding_mode == "zeros" and any(max(p) > reach[a] for a, p in enumerate(pads)):
        return Rejected(
            f"padding {m.padding} exceeds the kernel's reach {tuple(reach)}, so border outputs see "
            "no pixel at all",
            "use padding <= dilation * (kernel_size - 1)",
        )
    return Window(
        kind="conv",
        kernel=tuple(m.kernel_size),
        stride=tuple(m.stride),
        dilation=tuple(m.dilation),
        pad_left=tuple(p[0] for p in pads),
        pad_right=tuple(p[1] for p in pads),
        pad_mode="constant" if m.padding_mode == "zeros" else m.padding_mode,
    )


def _transposed(m: nn.modules.conv._ConvNd) -> Rescale | Rejected:
    """ConvTranspose{1,2,3}d (geometry Rule MS2): zero padding is the only mode PyTorch allows."""
    ndim = len(m.kernel_size)
    if not isinstance(m.padding, tuple):
        return Rejected(f"transposed convolution with padding {m.padding!r}", "use int padding")
    return Rescale(
        kind="transposed",
        ndim=ndim,
        kernel=tuple(m.kernel_size),
        stride=tuple(m.stride),
        dilation=tuple(m.dilation),
        pad_left=tuple(int(p) for p in m.padding),
        groups=m.groups,
    )


def _conv_transpose_function(
    ndim: int, args: tuple[Any, ...], kwargs: dict[str, Any], shape_of: ShapeOf
) -> Rescale | Rejected:
    """``F.conv_transpose*d(input, weight, bias, stride, padding, output_padding, groups,
    dilation)`` (geometry Rule MS2)."""
    weight = shape_of(_arg(args, kwargs, 1, "weight", None))
    if weight is None or len(weight) != ndim + 2:
        return Rejected(
            f"conv_transpose{ndim}d() with a weight that is not a constant of the module",
            "compute the weight from parameters and buffers only",
        )
    return Rescale(
        kind="transposed",
        ndim=ndim,
        kernel=tuple(weight[2:]),
        stride=_tuple(_arg(args, kwargs, 3, "stride", 1), ndim),
        dilation=_tuple(_arg(args, kwargs, 7, "dilation", 1), ndim),
        pad_left=_tuple(_arg(args, kwargs, 4, "padding", 0), ndim),
        groups=int(_arg(args, kwargs, 6, "groups", 1)),
    )


_RESAMPLE_FIX = (
    "upsample by an integer factor with mode 'nearest', 'nearest-exact', 'linear', 'bilinear' or "
    "'trilinear' and antialias=False, or move it into the head"
)


def _resample(
    ndim: int,
    *,
    size: Any = None,
    scale_factor: Any = None,
    mode: str = "nearest",
    align_corners: Any = None,
    recompute_scale_factor: Any = None,
    antialias: bool = False,
) -> Rescale | Rejected:
    """nn.Upsample and ``F.interpolate`` (geometry Rule MS3; sizes are checked in `fitted`)."""
    if mode not in _RESAMPLE_MODES:
        return Rejected(f"interpolation mode {mode!r} is not supported", _RESAMPLE_FIX)
    if antialias:
        return Rejected("antialias=True filters with a size-dependent kernel", _RESAMPLE_FIX)
    return Rescale(
        kind="resample",
        ndim=ndim,
        mode=mode,
        align_corners=bool(align_corners),
        scale_factor=None if size is not None else scale_factor,
        recompute_scale_factor=recompute_scale_factor,
    )


_RESAMPLE_MODES = {"nearest", "nearest-exact", "linear", "bilinear", "trilinear"}
_INTERPOLATE_ARGS = (
    "size",
    "scale_factor",
    "mode",
    "align_corners",
    "recompute_scale_factor",
    "antialias",
)


def _interpolate(
    args: tuple[Any, ...], kwargs: dict[str, Any], spatial_axes: int
) -> Rescale | Rejected:
    named = dict(zip(_INTERPOLATE_ARGS, args[1:], strict=False))
    named.update({k: v for k, v in kwargs.items() if k in _INTERPOLATE_ARGS})
    return _resample(spatial_axes, **named)


def _shuffle(kind: str, block: int, ndim: int, function: Callable[..., Any]) -> Rescale:
    """Depth-to-space and space-to-depth by ``block`` (geometry Rule MS4)."""
    return Rescale(kind=kind, ndim=ndim, block=int(block), function=function)


def _pad_same(
    args: tuple[Any, ...], kwargs: dict[str, Any], shape_of: ShapeOf, padding: Any
) -> Window | Rejected:
    """timm's ``pad_same(x, kernel_size, stride, dilation, value)``: TF 'SAME' padding computed
    from the whole image's size with timm's formula, then a fixed pad (geometry Rule MS8)."""
    shape = shape_of(args[0] if args else kwargs.get("x"))
    if shape is None or len(shape) < 4:
        return Rejected("pad_same() on an input of unknown size", "report this model")
    kernel = _tuple(_arg(args, kwargs, 1, "kernel_size", 1), 2)
    stride = _tuple(_arg(args, kwargs, 2, "stride", 1), 2)
    dilation = _tuple(_arg(args, kwargs, 3, "dilation", 1), 2)
    value = float(_arg(args, kwargs, 4, "value", 0))
    pads = [
        int(padding.get_same_padding(int(shape[-2 + a]), kernel[a], stride[a], dilation[a]))
        for a in range(2)
    ]
    return Window(
        kind="pad",
        kernel=(1, 1),
        stride=(1, 1),
        dilation=(1, 1),
        pad_left=tuple(p // 2 for p in pads),
        pad_right=tuple(p - p // 2 for p in pads),
        pad_mode="constant",
        value=value,
    )


def foreign_leaves() -> tuple[type[nn.Module], ...]:
    """Modules of other libraries the engine understands whole: timm's SpaceToDepth and
    DepthToSpace (geometry Rule MS4), if timm is imported (it is never imported here)."""
    found = sys.modules.get("timm.layers.space_to_depth")
    return tuple(
        getattr(found, name)
        for name in ("SpaceToDepth", "DepthToSpace")
        if found is not None and hasattr(found, name)
    )


def foreign_functions() -> tuple[Callable[..., Any], ...]:
    """Functions of other libraries fx keeps as one call: timm's ``pad_same`` (Rule MS8)."""
    found = sys.modules.get("timm.layers.padding")
    return (found.pad_same,) if found is not None and hasattr(found, "pad_same") else ()


def _conv_function_window(
    ndim: int, args: tuple[Any, ...], kwargs: dict[str, Any], shape_of: ShapeOf
) -> Window | Rejected:
    """``F.conv*d(input, weight, bias, stride, padding, dilation, groups)`` (Rule L2)."""
    weight = shape_of(_arg(args, kwargs, 1, "weight", None))
    if weight is None or len(weight) != ndim + 2:
        return Rejected(
            f"conv{ndim}d() with a weight that is not a constant of the module",
            "compute the weight from parameters and buffers only",
        )
    kernel = tuple(weight[2:])
    dilation = _tuple(_arg(args, kwargs, 5, "dilation", 1), ndim)
    reach = [dilation[a] * (kernel[a] - 1) for a in range(ndim)]
    padding = _arg(args, kwargs, 4, "padding", 0)
    pads = _padding_pairs(padding, reach)
    if any(max(p) > reach[a] for a, p in enumerate(pads)):
        return Rejected(
            f"padding {padding} exceeds the kernel's reach {tuple(reach)}, so border outputs see "
            "no pixel at all",
            "use padding <= dilation * (kernel_size - 1)",
        )
    return Window(
        kind="conv_function",
        kernel=kernel,
        stride=_tuple(_arg(args, kwargs, 3, "stride", 1), ndim),
        dilation=dilation,
        pad_left=tuple(p[0] for p in pads),
        pad_right=tuple(p[1] for p in pads),
        pad_mode="constant",
        groups=int(_arg(args, kwargs, 6, "groups", 1)),
    )


def _pad_window(
    args: tuple[Any, ...], kwargs: dict[str, Any], spatial_axes: int
) -> Window | Rejected:
    """``F.pad(input, pad, mode, value)``: a window of one pixel with that padding (Rule L2)."""
    flat = list(_arg(args, kwargs, 1, "pad", ()))
    mode = _arg(args, kwargs, 2, "mode", "constant")
    value = _arg(args, kwargs, 3, "value", None)
    pairs = [(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)][
        ::-1
    ]  # first dim first
    beyond = pairs[: max(len(pairs) - spatial_axes, 0)]
    if any(any(pair) for pair in beyond):
        return Rejected(
            f"pad() pads dimensions that hold no spatial axis ({flat})",
            "pad channels after the streamed part",
        )
    if mode not in ("constant", "reflect", "replicate"):
        return Rejected(
            f"pad() in {mode!r} mode wraps the image around",
            "use 'constant', 'reflect' or 'replicate'",
        )
    pairs = [(0, 0)] * (spatial_axes - len(pairs)) + pairs[-spatial_axes:]
    ones = (1,) * spatial_axes
    return Window(
        kind="pad",
        kernel=ones,
        stride=ones,
        dilation=ones,
        pad_left=tuple(p[0] for p in pairs),
        pad_right=tuple(p[1] for p in pairs),
        pad_mode=mode,
        value=float(value or 0.0),
    )


def _conv_pads(m: nn.modules.conv._ConvNd, reach: list[int]) -> list[tuple[int, int]]:
    """(left, right) padding per axis, read as ``m.forward`` reads it.

    PyTorch's ``forward`` passes ``m.padding`` to the convolution for zero padding, and pads by
    ``m._reversed_padding_repeated_twice`` (computed once, in ``__init__``) for the other modes.
    """
    ndim = len(reach)
    if m.padding_mode != "zeros":
        rev = m._reversed_padding_repeated_twice
        return [(rev[2 * (ndim - 1 - a)], rev[2 * (ndim - 1 - a) + 1]) for a in range(ndim)]
    return _padding_pairs(m.padding, reach)


def _padding_pairs(padding: Any, reach: Sequence[int]) -> list[tuple[int, int]]:
    """(left, right) zero padding per axis of a convolution's ``padding`` argument."""
    if padding == "valid":
        return [(0, 0)] * len(reach)
    if padding == "same":  # the convolution puts the odd pixel on the right
        return [(r // 2, r - r // 2) for r in reach]
    return [(int(p), int(p)) for p in _tuple(padding, len(reach))]


def _pool_window(m: nn.Module, ndim: int) -> Window | Rejected:
    return _pool(
        "max" if isinstance(m, _MAX_POOLS) else "avg",
        ndim,
        kernel_size=m.kernel_size,
        stride=m.stride,
        padding=m.padding,
        dilation=getattr(m, "dilation", 1),
        ceil_mode=bool(m.ceil_mode),
        return_indices=getattr(m, "return_indices", False),
        count_include_pad=getattr(m, "count_include_pad", True),
        divisor_override=getattr(m, "divisor_override", None),
    )


def _pool(
    kind: str,
    ndim: int,
    *,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> Window | Rejected:
    """A pooling window from a module's attributes or a function's arguments (Rule L2)."""
    kernel = _tuple(kernel_size, ndim)
    strides = _tuple(stride if stride else kernel, ndim)
    pads = _tuple(padding, ndim)
    if return_indices:
        return Rejected("returning pooling indices is not supported", "set return_indices=False")
    return Window(
        kind=kind,
        kernel=kernel,
        stride=strides,
        dilation=_tuple(dilation, ndim) if kind == "max" else (1,) * ndim,
        pad_left=pads,
        pad_right=pads,
        pad_mode="constant",
        ceil_mode=bool(ceil_mode),
        count_include_pad=bool(count_include_pad),
        divisor_override=divisor_override,
    )


_POOL_ARGS = {
    "max": ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "avg": (
        "kernel_size",
        "stride",
        "padding",
        "ceil_mode",
        "count_include_pad",
        "divisor_override",
    ),
}


def _pool_function_window(
    kind: str, ndim: int, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Window | Rejected:
    named = dict(zip(_POOL_ARGS[kind], args[1:], strict=False))
    named.update({k: v for k, v in kwargs.items() if k in _POOL_ARGS[kind]})
    return _pool(kind, ndim, **named)


_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_POOL_NDIM = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
}

ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Hardshrink, nn.Softshrink,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Identity,
)  # fmt: skip
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_DROPOUTS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_SOFTMAXES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)
_ADAPTIVE = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip

#: Module types the engine understands as a whole (fx does not trace into them).
KNOWN_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, *_MAX_POOLS, *_AVG_POOLS, *ELEMENTWISE_MODULES, *_BATCH_NORMS,
    *_INSTANCE_NORMS, *_DROPOUTS, *_SOFTMAXES, *_ADAPTIVE, nn.PReLU, nn.LayerNorm, nn.GroupNorm,
    nn.Linear, nn.Flatten, nn.Unflatten, nn.LocalResponseNorm, nn.MultiheadAttention, nn.Upsample,
    nn.PixelShuffle, nn.PixelUnshuffle,
)  # fmt: skip

_STATS_FIX = (
    "call .eval() on it so it uses its running statistics, or move it after the streamed part"
)
_AFTER = "move it after the streamed part (into the head)"


def _adaptive(kind: str, size: Any, ndim: int, indices: bool) -> Reduction | Rejected:
    """Adaptive pooling to size 1 is a global pooling (reductions Rule R1); average pooling to a
    grid of cells is a grid of means (Rule R1b); max pooling to more than one cell, refused."""
    sizes = tuple(size) if isinstance(size, (tuple, list)) else (size,) * ndim
    average = "Avg" in kind or "avg" in kind
    if indices or None in sizes or (not average and any(s != 1 for s in sizes)):
        return Rejected(
            f"{kind} pools to {size!r} with windows that depend on the image size"
            + (" and returns indices" if indices else "")
            + (" (None keeps an axis unpooled)" if None in sizes else ""),
            "pool to size 1 or use average pooling (both stream exactly), or " + _AFTER,
        )
    return pooling_reduction("avg" if average else "max", ndim, sizes)


def classify_module(
    m: nn.Module, ndim: int = 2
) -> Window | Pointwise | Rescale | Reduction | Rejected:
    """How a leaf module acts on space (``ndim``: spatial axes of the input, for Upsample)."""
    kind = type(m).__name__
    if isinstance(m, nn.modules.conv._ConvNd):
        return _conv_window(m)
    if isinstance(m, nn.Upsample):
        if m.size is None and m.scale_factor is None:
            return Rejected("Upsample without size or scale_factor", _RESAMPLE_FIX)
        return _resample(
            ndim,
            size=m.size,
            scale_factor=m.scale_factor,
            mode=m.mode,
            align_corners=m.align_corners,
            recompute_scale_factor=m.recompute_scale_factor,
        )
    if isinstance(m, nn.PixelShuffle):
        return _shuffle("shuffle", m.upscale_factor, 2, m)
    if isinstance(m, nn.PixelUnshuffle):
        return _shuffle("unshuffle", m.downscale_factor, 2, m)
    if isinstance(m, foreign_leaves()):
        kind = "unshuffle" if type(m).__name__ == "SpaceToDepth" else "shuffle"
        return _shuffle(kind, getattr(m, "bs", 1), 2, m)
    if isinstance(m, _MAX_POOLS + _AVG_POOLS):
        return _pool_window(m, _POOL_NDIM.get(type(m), 2))
    if isinstance(m, ELEMENTWISE_MODULES):
        return _NO_DIMS
    if isinstance(m, _BATCH_NORMS):
        if m.training or m.running_mean is None:
            return Rejected(
                f"{kind} in training mode normalises with statistics over the whole batch and image, "
                "which a tile cannot see",
                _STATS_FIX,
            )
        return _CHANNEL_DIM
    if isinstance(m, _INSTANCE_NORMS):
        if m.training or m.running_mean is None:
            return Rejected(f"{kind} normalises each image with statistics over space", _STATS_FIX)
        return _CHANNEL_DIM
    if isinstance(m, nn.GroupNorm):
        return Rejected("GroupNorm normalises with statistics over space", _AFTER)
    if isinstance(m, _DROPOUTS):
        if m.training and m.p > 0:
            return Rejected(
                f"{kind} in training mode draws a random mask that the backward recomputation "
                "would not repeat, and tiles would share no mask",
                f"call .eval() on it, or {_AFTER}",
            )
        return _NO_DIMS
    if isinstance(m, nn.PReLU):
        return _CHANNEL_DIM if m.num_parameters > 1 else _NO_DIMS
    if isinstance(m, nn.LayerNorm):
        count = len(m.normalized_shape)
        return Pointwise(mixed_dims=lambda ndim: tuple(range(ndim - count, ndim)))
    if isinstance(m, nn.Linear):
        return _LAST_DIM
    if isinstance(m, _SOFTMAXES):
        if m.dim is None:
            return Rejected(f"{kind} without an explicit dim", "pass dim=1 (channels)")
        dim = m.dim
        return Pointwise(mixed_dims=lambda ndim: (dim % ndim,))
    if isinstance(m, _ADAPTIVE):
        return _adaptive(
            kind, m.output_size, _POOL_NDIM.get(type(m), 2), getattr(m, "return_indices", False)
        )
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        return _RESHAPE  # graph Rule G8 decides from the shapes
    if isinstance(m, nn.MultiheadAttention):
        return Rejected("attention mixes every position with every other", _AFTER)
    return Rejected(
        f"{kind} is not a layer streamcheck can prove local",
        f"{_AFTER}, or build it from supported layers",
    )


ShapeOf = Callable[[Any], "tuple[int, ...] | None"]
"""The whole-image shape of a call argument when it is a tensor, else None."""


def _arg(
    args: tuple[Any, ...], kwargs: dict[str, Any], position: int, name: str, default: Any
) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else default


def _ints(value: Any) -> tuple[int, ...]:
    if len(value) == 1 and isinstance(value[0], (tuple, list)):
        value = value[0]
    return tuple(int(d) for d in value)


def _permute_dims(args: tuple[Any, ...], kwargs: dict[str, Any], ndim: int) -> tuple[int, ...]:
    return _ints(kwargs.get("dims", args[1:] if len(args) > 1 else ()))


def _transpose_dims(args: tuple[Any, ...], kwargs: dict[str, Any], ndim: int) -> tuple[int, ...]:
    a = int(_arg(args, kwargs, 1, "dim0", 0)) % ndim
    b = int(_arg(args, kwargs, 2, "dim1", 1)) % ndim
    dims = list(range(ndim))
    dims[a], dims[b] = b, a
    return tuple(dims)


def _movedim_dims(args: tuple[Any, ...], kwargs: dict[str, Any], ndim: int) -> tuple[int, ...]:
    source = _arg(args, kwargs, 1, "source", 0)
    destination = _arg(args, kwargs, 2, "destination", 0)
    sources = [int(d) % ndim for d in (source if isinstance(source, (tuple, list)) else [source])]
    targets = [
        int(d) % ndim
        for d in (destination if isinstance(destination, (tuple, list)) else [destination])
    ]
    rest = iter(d for d in range(ndim) if d not in sources)
    placed = dict(zip(targets, sources, strict=True))
    return tuple(placed[d] if d in placed else next(rest) for d in range(ndim))


def _reduction(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Pointwise:
    """``x.sum(dim, keepdim)`` and friends: mixes the dimensions it reduces (all, without dim)."""
    dim = _arg(args, kwargs, 1, "dim", None)
    keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
    dims = None if dim is None else (dim if isinstance(dim, (tuple, list)) else (dim,))

    def mixed(ndim: int) -> tuple[int, ...]:
        return tuple(range(ndim)) if dims is None else tuple(int(d) % ndim for d in dims)

    return Pointwise(mixed_dims=mixed, reduction=True, reduces=not keepdim)


def _repeat(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Pointwise:
    """``x.repeat(*sizes)``: mixes the dimensions it repeats (and all, when it adds dimensions)."""
    sizes = _ints(args[1:])

    def mixed(ndim: int) -> tuple[int, ...]:
        if len(sizes) != ndim:
            return tuple(range(ndim))
        return tuple(d for d, k in enumerate(sizes) if k != 1)

    return Pointwise(mixed_dims=mixed)


_PERMUTE = Pointwise(permutation=_permute_dims)
_TRANSPOSE = Pointwise(permutation=_transpose_dims)
_MOVEDIM = Pointwise(permutation=_movedim_dims)


def _dim_arg(
    position: int, *, default: int = 0, splits: bool = False, stacks: bool = False
) -> Callable[[tuple[Any, ...], dict[str, Any]], Pointwise]:
    def pointwise(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Pointwise:
        dim = int(_arg(args, kwargs, position, "dim", default))
        if stacks:  # a new dimension at ``dim`` of the result: the inputs' dims from there move
            return Pointwise(
                permutation=lambda a, k, ndim: tuple(
                    d for d in range(ndim + 1) if d != dim % (ndim + 1)
                ),
                stacks=True,
            )
        return Pointwise(mixed_dims=lambda ndim: (dim % ndim,), splits=splits)

    return pointwise


def _layer_norm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Pointwise:
    count = len(_arg(args, kwargs, 1, "normalized_shape", ()))
    return Pointwise(mixed_dims=lambda ndim: tuple(range(ndim - count, ndim)), broadcast=False)


def _batch_norm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Pointwise | Rejected:
    """``F.batch_norm(input, running_mean, running_var, weight, bias, training, ...)`` (Rule L3)."""
    if (
        _arg(args, kwargs, 5, "training", False)
        or _arg(args, kwargs, 1, "running_mean", None) is None
    ):
        return Rejected(
            "batch_norm() in training mode (or without running statistics) normalises with "
            "statistics over the whole batch and image, which a tile cannot see",
            _STATS_FIX,
        )
    return _INDEXED_BY_CHANNEL


def _instance_norm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Pointwise | Rejected:
    if _arg(args, kwargs, 5, "use_input_stats", True):
        return Rejected(
            "instance_norm() normalises each image with statistics over space", _STATS_FIX
        )
    return _INDEXED_BY_CHANNEL


def _random(
    training_position: int,
) -> Callable[[tuple[Any, ...], dict[str, Any]], Pointwise | Rejected]:
    def check(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Pointwise | Rejected:
        p = _arg(args, kwargs, 1, "p", 0.5)
        if _arg(args, kwargs, training_position, "training", True) and p > 0:
            return Rejected(
                "random dropping in training mode would not be repeated by the backward "
                "recomputation",
                f"call .eval() on its module, or {_AFTER}",
            )
        return _NO_DIMS

    return check


_ELEMENTWISE_FUNCTIONS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.iadd, operator.imul, operator.floordiv,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.relu, torch.sigmoid, torch.tanh,
    torch.clamp, torch.clamp_min, torch.clamp_max, torch.exp, torch.abs, torch.sqrt, torch.rsqrt,
    torch.pow, torch.square, torch.erf, torch.log, torch.maximum, torch.minimum, torch.where,
    torch.addcmul, torch.sign, torch.floor, torch.round, torch.reciprocal,
    F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.selu, F.celu, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.mish, F.softplus, F.sigmoid, F.tanh, F.prelu, F.hardshrink,
    F.softsign, F.tanhshrink, F.logsigmoid, F.threshold,
}  # fmt: skip
ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "add", "add_", "sub", "sub_", "mul",
    "mul_", "div", "div_", "neg", "clamp", "clamp_", "clamp_min", "clamp_min_", "contiguous", "exp",
    "abs", "sqrt", "rsqrt", "pow", "square", "float", "double", "half", "bfloat16", "to", "type_as",
    "addcmul", "addcmul_", "clone", "detach", "erf", "log", "sign", "reciprocal", "expand_as",
}  # fmt: skip
_REDUCTIONS = ("sum", "mean", "amax", "amin", "prod", "std", "var", "logsumexp", "norm")
_SPLIT_FUNCTIONS: dict[Any, Any] = {
    torch.split: _dim_arg(2, splits=True),
    torch.chunk: _dim_arg(2, splits=True),
    torch.tensor_split: _dim_arg(2, splits=True),
    torch.unbind: _dim_arg(1, splits=True),
}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"}
_FUNCTIONS_WITH_ARGS: dict[
    Any, Callable[[tuple[Any, ...], dict[str, Any]], Pointwise | Rejected]
] = {
    torch.cat: _dim_arg(1),
    torch.concat: _dim_arg(1),
    torch.stack: _dim_arg(1, stacks=True),
    F.softmax: _dim_arg(1),
    F.log_softmax: _dim_arg(1),
    F.normalize: _dim_arg(2, default=1),
    F.layer_norm: _layer_norm,
    F.batch_norm: _batch_norm,
    F.instance_norm: _instance_norm,
    F.dropout: _random(2),
    F.dropout2d: _random(2),
    torch.permute: lambda args, kwargs: _PERMUTE,
    torch.transpose: lambda args, kwargs: _TRANSPOSE,
    torch.swapaxes: lambda args, kwargs: _TRANSPOSE,
    torch.swapdims: lambda args, kwargs: _TRANSPOSE,
    torch.movedim: lambda args, kwargs: _MOVEDIM,
    **_SPLIT_FUNCTIONS,
    **{getattr(torch, name): _reduction for name in _REDUCTIONS},
}
_METHODS_WITH_ARGS: dict[str, Callable[[tuple[Any, ...], dict[str, Any]], Pointwise | Rejected]] = {
    "permute": lambda args, kwargs: _PERMUTE,
    "transpose": lambda args, kwargs: _TRANSPOSE,
    "swapaxes": lambda args, kwargs: _TRANSPOSE,
    "swapdims": lambda args, kwargs: _TRANSPOSE,
    "movedim": lambda args, kwargs: _MOVEDIM,
    "softmax": _dim_arg(1),
    "log_softmax": _dim_arg(1),
    "split": _dim_arg(2, splits=True),
    "split_with_sizes": _dim_arg(2, splits=True),
    "chunk": _dim_arg(2, splits=True),
    "tensor_split": _dim_arg(2, splits=True),
    "unbind": _dim_arg(1, splits=True),
    "repeat": _repeat,
    **{name: _reduction for name in _REDUCTIONS},
}
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_ADAPTIVE_FUNCTIONS: dict[Any, tuple[str, int]] = {
    F.adaptive_avg_pool1d: ("adaptive_avg_pool1d", 1),
    F.adaptive_avg_pool2d: ("adaptive_avg_pool2d", 2),
    F.adaptive_avg_pool3d: ("adaptive_avg_pool3d", 3),
    F.adaptive_max_pool1d: ("adaptive_max_pool1d", 1),
    F.adaptive_max_pool2d: ("adaptive_max_pool2d", 2),
    F.adaptive_max_pool3d: ("adaptive_max_pool3d", 3),
}
_CONV_TRANSPOSE_FUNCTIONS = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}
_POOL_FUNCTIONS = {
    F.max_pool1d: ("max", 1), F.max_pool2d: ("max", 2), F.max_pool3d: ("max", 3),
    F.avg_pool1d: ("avg", 1), F.avg_pool2d: ("avg", 2), F.avg_pool3d: ("avg", 3),
}  # fmt: skip
_REJECTED_FUNCTIONS = {
    "flatten": "reshapes spatial axes into features",
    "view": "reshapes spatial axes",
    "reshape": "reshapes spatial axes",
    "size": "depends on the tensor's spatial size, which differs per tile",
    "linear": "is not known to act over channels only",
}


def classify_function(
    target: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    shape_of: ShapeOf = lambda arg: None,
    spatial_axes: int = 2,
) -> Window | Pointwise | Rescale | Reduction | Rejected:
    """How a called function (an fx ``call_function`` node) acts on space.

    ``args`` hold the call's arguments, with values fixed when the graph is built (shape reads)
    filled in; ``shape_of`` gives the shape of tensor arguments (a convolution's weight).
    """
    if target in _ELEMENTWISE_FUNCTIONS:
        return _NO_DIMS
    if target is moments:  # reductions Rule R4
        shape = shape_of(args[0]) if args else None
        groups, running = kwargs.get("groups", 0), kwargs.get("running")
        if shape is None:
            return Rejected("moments() of an input of unknown shape", "report this model")
        dims = stat_dims(str(kwargs["kind"]), len(shape))
        kind = str(kwargs["kind"])
        return Reduction("moments", dims, groups=groups, running=running, norm=kind)
    if target is normalize:
        return _INDEXED_BY_IMAGE_AND_CHANNEL
    if target in _ADAPTIVE_FUNCTIONS:
        name, ndim = _ADAPTIVE_FUNCTIONS[target]
        return _adaptive(f"{name}()", _arg(args, kwargs, 1, "output_size", None), ndim, False)
    if target in _FUNCTIONS_WITH_ARGS:
        return _FUNCTIONS_WITH_ARGS[target](args, kwargs)
    if target in _RESHAPE_FUNCTIONS:
        return _RESHAPE
    if target in _CONV_FUNCTIONS:
        return _conv_function_window(_CONV_FUNCTIONS[target], args, kwargs, shape_of)
    if target in _POOL_FUNCTIONS:
        return _pool_function_window(*_POOL_FUNCTIONS[target], args, kwargs)
    if target is F.pad:
        return _pad_window(args, kwargs, spatial_axes)
    if target is F.interpolate:
        return _interpolate(args, kwargs, spatial_axes)
    if target in _CONV_TRANSPOSE_FUNCTIONS:
        return _conv_transpose_function(_CONV_TRANSPOSE_FUNCTIONS[target], args, kwargs, shape_of)
    if target is F.pixel_shuffle or target is F.pixel_unshuffle:
        block = int(
            _arg(args, kwargs, 1, "upscale_factor", _arg(args, kwargs, 1, "downscale_factor", 1))
        )
        kind = "shuffle" if target is F.pixel_shuffle else "unshuffle"
        return _shuffle(kind, block, 2, lambda x: target(x, block))
    if target in foreign_functions():
        return _pad_same(args, kwargs, shape_of, sys.modules["timm.layers.padding"])
    name = getattr(target, "__name__", repr(target))
    if name == "stochastic_depth" and getattr(target, "__module__", "").startswith("torchvision"):
        return _random(3)(args, kwargs)
    reason = _REJECTED_FUNCTIONS.get(name, "is not a function streamcheck can prove local")
    return Rejected(f"{name}() {reason}", f"{_AFTER}, or build it from supported layers")


def classify_method(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Pointwise | Rejected:
    """How a tensor method (an fx ``call_method`` node) acts on space."""
    if name in ELEMENTWISE_METHODS:
        return _NO_DIMS
    if name in _METHODS_WITH_ARGS:
        return _METHODS_WITH_ARGS[name](args, kwargs)
    if name in _RESHAPE_METHODS:
        return _RESHAPE
    reason = _REJECTED_FUNCTIONS.get(name, "is not a method streamcheck can prove local")
    return Rejected(f".{name}() {reason}", f"{_AFTER}, or build it from supported layers")


def reshaped_layout(
    before: Sequence[int], after: Sequence[int], layout: Sequence[int]
) -> tuple[int, ...] | None:
    """Where the spatial dimensions ``layout`` of shape ``before`` are after a reshape to ``after``.

    A reshape keeps the elements in row-major order, so it splits and merges runs of dimensions
    whose sizes multiply to the same number. It is local when every spatial dimension is a run of
    its own on both sides (graph Rule G8); otherwise None.

    >>> reshaped_layout((2, 8, 5, 7), (2, 4, 2, 5, 7), (2, 3))  # channel shuffle: C -> (g, C/g)
    (3, 4)
    >>> reshaped_layout((2, 8, 5, 7), (2, 8, 35), (2, 3)) is None  # H and W merged
    True
    """
    runs: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(before) and j < len(after):
        ins, outs = [i], [j]
        size_in, size_out = before[i], after[j]
        i, j = i + 1, j + 1
        while size_in != size_out:
            if size_in < size_out and i < len(before):
                size_in, i = size_in * before[i], i + 1
                ins.append(i - 1)
            elif size_out < size_in and j < len(after):
                size_out, j = size_out * after[j], j + 1
                outs.append(j - 1)
            else:
                return None
        runs.append((ins, outs))
    runs += [([d], []) for d in range(i, len(before))] + [([], [d]) for d in range(j, len(after))]
    if any(d >= len(before) for d in layout):
        return None
    moved = {}
    for ins, outs in runs:
        spatial = [d for d in ins if d in layout]
        if not spatial:
            continue
        others = [d for d in ins if d not in layout and before[d] != 1]
        big = [e for e in outs if after[e] != 1] if before[spatial[0]] != 1 else outs
        if len(spatial) != 1 or others or len(big) != 1:
            return None  # a spatial axis merged with or split into other dimensions
        moved[spatial[0]] = big[0]
    return tuple(moved[d] for d in layout)


def indexed_layout(index: Any, ndim: int, layout: Sequence[int]) -> tuple[int, ...] | str:
    """Where the spatial dimensions ``layout`` are after ``tensor[index]``, or why it is not local.

    Indexing may select, slice or add non-spatial dimensions; spatial ones must be taken whole
    (graph Rule G9).

    >>> indexed_layout((slice(None), slice(0, 4)), 4, (2, 3))       # x[:, :4]
    (2, 3)
    >>> indexed_layout((0, Ellipsis, None), 4, (2, 3))              # x[0, ..., None]
    (1, 2)
    >>> indexed_layout((Ellipsis, slice(None, None, 2)), 4, (2, 3))
    'slices spatial dimension 3'
    """
    items = index if isinstance(index, tuple) else (index,)
    consumed = sum(1 for item in items if item is not None and item is not Ellipsis)
    moved: dict[int, int] = {}
    dim = out = 0
    for item in items:
        if item is Ellipsis:
            for _ in range(ndim - consumed):
                moved[dim] = out
                dim, out = dim + 1, out + 1
        elif item is None:
            out += 1
        elif isinstance(item, bool) or not isinstance(item, (int, slice)):
            return f"indexes dimension {dim} with {type(item).__name__}"
        elif isinstance(item, int):
            if dim in layout:
                return f"selects one position of spatial dimension {dim}"
            dim += 1
        else:
            whole = item.start in (None, 0) and item.stop is None and item.step in (None, 1)
            if dim in layout and not whole:
                return f"slices spatial dimension {dim}"
            moved[dim] = out
            dim, out = dim + 1, out + 1
    while dim < ndim:
        moved[dim] = out
        dim, out = dim + 1, out + 1
    return tuple(moved[d] for d in layout)
