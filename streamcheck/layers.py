"""What each layer does to space: window layers (conv, pool) and pointwise layers.

NOTE [ Locality ]
Rule L1. A layer may be streamed when each output pixel depends only on a bounded window of input
         pixels at the same place, with weights that do not depend on where the window is.
Rule L2. Window layers (ConvNd, MaxPoolNd, AvgPoolNd) are run by the engine itself with padding 0 on
         an explicitly padded tile (see geometry Rules 3 and 5).
Rule L3. Pointwise layers (activations, eval-mode BatchNorm, LayerNorm or Linear over channels,
         residual additions, ...) need the same box as they produce. They are local as long as the
         tensor dimensions they mix or index parameters by hold no spatial axis
         (`Pointwise.mixed_dims`), and constants they combine with have size 1 along spatial axes.
Rule L4. Anything else is rejected before any work, by module path, with the reason and the fix:
         a layer with statistics over space (train-mode BatchNorm, GroupNorm, InstanceNorm),
         global or adaptive pooling, Linear/Flatten over space, randomness that a recomputation
         would not repeat (Dropout in training), or anything the engine does not know.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import Interval, avg_pool_divisors, window_input

__all__ = [
    "Pointwise",
    "Rejected",
    "Window",
    "classify_function",
    "classify_method",
    "classify_module",
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
    of the input's rank; ``permutation`` is set for permutes, which move dimensions around.
    """

    mixed_dims: Callable[[int], tuple[int, ...]] = lambda ndim: ()
    permutation: Callable[[tuple[Any, ...], dict[str, Any]], tuple[int, ...]] | None = None


_NO_DIMS = Pointwise()
_CHANNEL_DIM = Pointwise(mixed_dims=lambda ndim: (1,))
_LAST_DIM = Pointwise(mixed_dims=lambda ndim: (ndim - 1,))


@dataclass(frozen=True)
class Window:
    """A conv or pooling layer, described by its per-axis geometry (Rule L2)."""

    kind: str  # "conv", "max" or "avg"
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pad_left: tuple[int, ...]
    pad_right: tuple[int, ...]
    pad_mode: str  # "constant", "reflect" or "replicate"
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None

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
        return F.pad(x, flat, mode="constant", value=float("-inf") if self.kind == "max" else 0.0)

    def run(
        self,
        module: nn.Module,
        x: torch.Tensor,
        pads: Sequence[tuple[int, int]],
        gathers: Sequence[tuple[int, ...] | None],
        out_box: tuple[Interval, ...],
        in_sizes: tuple[int, ...],
    ) -> torch.Tensor:
        """Apply the layer to tile ``x`` (whose missing border is ``pads``) with padding 0."""
        x = self.pad(x, pads, gathers)
        if self.kind == "conv":
            assert isinstance(module, nn.modules.conv._ConvNd)
            conv = _CONV[self.ndim]
            return conv(x, module.weight, module.bias, self.stride, 0, self.dilation, module.groups)
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


def _conv_window(m: nn.modules.conv._ConvNd) -> Window | Rejected:
    if m.transposed:
        return Rejected(
            "transposed convolutions are not supported yet", "stream the layers before it"
        )
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


def _conv_pads(m: nn.modules.conv._ConvNd, reach: list[int]) -> list[tuple[int, int]]:
    """(left, right) padding per axis, read as ``m.forward`` reads it.

    PyTorch's ``forward`` passes ``m.padding`` to the convolution for zero padding, and pads by
    ``m._reversed_padding_repeated_twice`` (computed once, in ``__init__``) for the other modes.
    """
    ndim = len(reach)
    if m.padding_mode != "zeros":
        rev = m._reversed_padding_repeated_twice
        return [(rev[2 * (ndim - 1 - a)], rev[2 * (ndim - 1 - a) + 1]) for a in range(ndim)]
    if m.padding == "valid":
        return [(0, 0)] * ndim
    if m.padding == "same":  # the convolution puts the odd pixel on the right
        return [(r // 2, r - r // 2) for r in reach]
    return [(int(p), int(p)) for p in _tuple(m.padding, ndim)]


def _pool_window(m: nn.Module, ndim: int) -> Window | Rejected:
    kernel = _tuple(m.kernel_size, ndim)
    stride = _tuple(m.stride if m.stride else kernel, ndim)
    padding = _tuple(m.padding, ndim)
    if isinstance(m, _MAX_POOLS):
        if m.return_indices:
            return Rejected(
                "returning pooling indices is not supported", "set return_indices=False"
            )
        return Window(
            kind="max",
            kernel=kernel,
            stride=stride,
            dilation=_tuple(m.dilation, ndim),
            pad_left=padding,
            pad_right=padding,
            pad_mode="constant",
            ceil_mode=bool(m.ceil_mode),
        )
    return Window(
        kind="avg",
        kernel=kernel,
        stride=stride,
        dilation=(1,) * ndim,
        pad_left=padding,
        pad_right=padding,
        pad_mode="constant",
        ceil_mode=bool(m.ceil_mode),
        count_include_pad=bool(m.count_include_pad),
        divisor_override=getattr(m, "divisor_override", None),
    )


_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_POOL_NDIM = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
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
)  # fmt: skip

_STATS_FIX = (
    "call .eval() on it so it uses its running statistics, or move it after the streamed part"
)
_AFTER = "move it after the streamed part (into the head)"


def classify_module(m: nn.Module) -> Window | Pointwise | Rejected:
    """How a leaf module acts on space."""
    kind = type(m).__name__
    if isinstance(m, nn.modules.conv._ConvNd):
        return _conv_window(m)
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
        return Rejected(f"{kind} pools over the whole image (global or adaptive pooling)", _AFTER)
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        return Rejected(f"{kind} reshapes spatial axes into features", _AFTER)
    if isinstance(m, nn.MultiheadAttention):
        return Rejected("attention mixes every position with every other", _AFTER)
    return Rejected(
        f"{kind} is not a layer streamcheck can prove local",
        f"{_AFTER}, or build it from supported layers",
    )


def _permute_dims(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...]:
    dims = kwargs.get("dims", args[1:] if len(args) > 1 else ())
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    return tuple(int(d) for d in dims)


def _dim_arg(position: int) -> Callable[[tuple[Any, ...], dict[str, Any]], Pointwise]:
    def pointwise(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Pointwise:
        dim = kwargs.get("dim", args[position] if len(args) > position else 0)
        return Pointwise(mixed_dims=lambda ndim: (dim % ndim,))

    return pointwise


def _layer_norm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Pointwise:
    shape = kwargs.get("normalized_shape", args[1] if len(args) > 1 else ())
    count = len(shape)
    return Pointwise(mixed_dims=lambda ndim: tuple(range(ndim - count, ndim)))


def _random(
    training_position: int,
) -> Callable[[tuple[Any, ...], dict[str, Any]], Pointwise | Rejected]:
    def check(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Pointwise | Rejected:
        p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
        training = kwargs.get(
            "training", args[training_position] if len(args) > training_position else True
        )
        if training and p > 0:
            return Rejected(
                "random dropping in training mode would not be repeated by the backward "
                "recomputation",
                f"call .eval() on its module, or {_AFTER}",
            )
        return _NO_DIMS

    return check


_ELEMENTWISE_FUNCTIONS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.relu, torch.sigmoid, torch.tanh,
    torch.clamp, torch.exp, torch.abs,
    F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.selu, F.celu, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.mish, F.softplus, F.sigmoid, F.tanh,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "tanh", "add", "add_", "sub", "mul", "mul_", "div", "neg", "clamp",
    "clamp_", "contiguous", "exp", "abs",
}  # fmt: skip
_FUNCTIONS_WITH_ARGS: dict[
    Any, Callable[[tuple[Any, ...], dict[str, Any]], Pointwise | Rejected]
] = {
    torch.cat: _dim_arg(1),
    torch.concat: _dim_arg(1),
    F.softmax: _dim_arg(1),
    F.log_softmax: _dim_arg(1),
    F.layer_norm: _layer_norm,
    F.dropout: _random(2),
    torch.permute: lambda args, kwargs: Pointwise(permutation=_permute_dims),
}
_REJECTED_FUNCTIONS = {
    "flatten": "reshapes spatial axes into features",
    "view": "reshapes spatial axes",
    "reshape": "reshapes spatial axes",
    "mean": "averages over an axis, which may be spatial",
    "sum": "sums over an axis, which may be spatial",
    "size": "depends on the tensor's spatial size, which differs per tile",
    "adaptive_avg_pool2d": "pools over the whole image",
    "adaptive_max_pool2d": "pools over the whole image",
    "interpolate": "resamples space with image-size-dependent coordinates",
    "linear": "is not known to act over channels only",
}


def classify_function(
    target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Pointwise | Rejected:
    """How a called function (an fx ``call_function`` node) acts on space."""
    if target in _ELEMENTWISE_FUNCTIONS:
        return _NO_DIMS
    if target in _FUNCTIONS_WITH_ARGS:
        return _FUNCTIONS_WITH_ARGS[target](args, kwargs)
    name = getattr(target, "__name__", repr(target))
    if name == "stochastic_depth" and getattr(target, "__module__", "").startswith("torchvision"):
        return _random(3)(args, kwargs)
    reason = _REJECTED_FUNCTIONS.get(name, "is not a function streamcheck can prove local")
    return Rejected(f"{name}() {reason}", f"{_AFTER}, or build it from supported layers")


def classify_method(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Pointwise | Rejected:
    """How a tensor method (an fx ``call_method`` node) acts on space."""
    if name in _ELEMENTWISE_METHODS:
        return _NO_DIMS
    if name == "permute":
        return Pointwise(permutation=_permute_dims)
    if name in ("softmax", "log_softmax"):
        return _dim_arg(1)(args, kwargs)
    reason = _REJECTED_FUNCTIONS.get(name, "is not a method streamcheck can prove local")
    return Rejected(f".{name}() {reason}", f"{_AFTER}, or build it from supported layers")
