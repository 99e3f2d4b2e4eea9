"""The proof: streamed outputs and gradients equal those of the un-streamed module.

Every property draws a stack, an image and a legal tile (``streamcheck.testing.streaming_cases``)
and compares ``Streamed(module, tile=tile)`` with ``module`` itself, run plainly in float64.
The loss is ``(y * g).sum()`` with a random fixed ``g``, so every output element carries its own
upstream gradient and errors cannot cancel out.

Properties (the numbering is the project's; 4, the plan oracle, is in test_plan_oracle.py):
  1. the stitched output equals the plain output;
  2. every parameter gradient equals the plain one (relative error <= 1e-10);
  3. the input gradient equals the plain one;
  5. illegal configurations raise StreamcheckError naming the module path before computing
     anything, never return numbers: (a) locality-breaking layers, (b) tiles below the receptive
     field, (c) options PyTorch accepts but the engine may refuse (circular or over-wide padding)
     either stream exactly or are refused that way;
  6. float32 streaming agrees with float64 plain within an accumulation-length bound.
"""

from __future__ import annotations

import copy
import math
import re
from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import streamcheck
from streamcheck.testing import (
    StreamingCase,
    conv_stacks,
    relative_error,
    streaming_cases,
)
from streamcheck.testing._geometry import _leaves, _windows, geometry_of
from streamcheck.testing.strategies import SMOOTH_ACTIVATIONS, image_shapes, tile_sizes

pytestmark = [
    pytest.mark.property,
    # The strategies draw 'same' padding of even kernels on purpose; PyTorch warns about its copy.
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
]

# 1D and 3D stacks share the code paths of 2D ones; they get a quarter of the examples.
FEWER = settings(max_examples=max(10, settings.default.max_examples // 4))

# Padding modes the engine streams (circular is refused: see property 5c).
STACKS = {"padding_modes": ("zeros", "replicate", "reflect")}

# Found while the engine cropped reflect padding to the tile: a border tile narrower than the
# padding crashed in F.pad (fixed in the engine by mirroring beyond the kernel half).
NARROW_REFLECT = StreamingCase(
    nn.Sequential(nn.Conv1d(1, 1, 3, padding=2, padding_mode="reflect", bias=False)),
    (1, 1, 5),
    3,
    0,
)

FLOAT64_RTOL = 1e-10


@dataclass
class Run:
    output: torch.Tensor
    output_requires_grad: bool
    param_grads: dict[str, torch.Tensor]
    input_grad: torch.Tensor | None


def run(
    module: nn.Module,
    x: torch.Tensor,
    *,
    tile: int | tuple[int, ...] | None,
    input_grad: bool,
    backward: bool = True,
    seed: int = 0,
    absolute: bool = False,
    channels_last: bool = False,
) -> Run:
    """Forward ``x`` plainly (``tile=None``) or streamed, then backward ``(y * g).sum()``."""
    x = x.detach().clone().requires_grad_(input_grad)
    module.zero_grad(set_to_none=True)
    if tile is None:
        y = module(x)
    else:
        y = streamcheck.Streamed(module, tile=tile, channels_last=channels_last)(x)
    if not backward or not y.requires_grad:  # a parameter-free stack on an image without grad
        return Run(y.detach(), y.requires_grad, {}, None)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float32)
    g = g.abs() if absolute else g  # the magnitude network's upstream gradient (Rule Q3)
    (y * g.to(y.dtype)).sum().backward()
    grads = {
        name: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        for name, p in module.named_parameters()
    }
    return Run(y.detach(), True, grads, x.grad.detach().clone() if input_grad else None)


def streamed_and_plain(
    case: StreamingCase,
    *,
    input_grad: bool = True,
    backward: bool = True,
    dtype: torch.dtype = torch.float64,
    channels_last: bool = False,
) -> tuple[Run, Run]:
    """The case run streamed in ``dtype`` and plainly in float64, on identical weights and data.

    Weights and data are float32 numbers (the strategies initialise float32 modules, the image is
    drawn in float32), so that a float32 run starts from exactly the reference's inputs.
    """
    generator = torch.Generator().manual_seed(case.seed)
    x = torch.randn(case.image_shape, generator=generator, dtype=torch.float32).double()
    plain = run(
        copy.deepcopy(case.module).double(),
        x,
        tile=None,
        input_grad=input_grad,
        backward=backward,
        seed=case.seed,
    )
    streamed = run(
        copy.deepcopy(case.module).to(dtype),
        x.to(dtype),
        tile=case.tile,
        input_grad=input_grad,
        backward=backward,
        seed=case.seed,
        channels_last=channels_last,
    )
    return streamed, plain


def assert_close(name: str, a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    error = relative_error(a, b)
    assert error <= rtol, f"{name}: relative error {error:.3g} > {rtol:.3g}"


# ------------------------------------------------------------------- properties 1-3 (float64)
def check_output(case: StreamingCase) -> None:
    with torch.no_grad():
        streamed, plain = streamed_and_plain(case, input_grad=False, backward=False)
    assert_close("output", streamed.output, plain.output, FLOAT64_RTOL)


def check_parameter_gradients(
    case: StreamingCase, *, input_grad: bool, channels_last: bool = False
) -> None:
    streamed, plain = streamed_and_plain(case, input_grad=input_grad, channels_last=channels_last)
    assert_close("output", streamed.output, plain.output, FLOAT64_RTOL)
    assert streamed.output_requires_grad == plain.output_requires_grad
    assert streamed.param_grads.keys() == plain.param_grads.keys()
    for name, grad in plain.param_grads.items():
        assert_close(f"grad of {name!r}", streamed.param_grads[name], grad, FLOAT64_RTOL)
    if input_grad:
        assert streamed.input_grad is not None and plain.input_grad is not None
        assert_close("input gradient", streamed.input_grad, plain.input_grad, FLOAT64_RTOL)


@given(streaming_cases(ndim=2, **STACKS))
def test_output_equals_plain_2d(case: StreamingCase) -> None:
    """Property 1."""
    check_output(case)


@given(streaming_cases(ndim=2, **STACKS))
def test_parameter_gradients_equal_plain_2d(case: StreamingCase) -> None:
    """Property 2 (the usual training case: the image needs no gradient)."""
    check_parameter_gradients(case, input_grad=False)


@given(streaming_cases(ndim=2, **STACKS))
def test_input_gradient_equals_plain_2d(case: StreamingCase) -> None:
    """Property 3 (saliency maps), with the parameter gradients of the same backward."""
    check_parameter_gradients(case, input_grad=True)


@example(NARROW_REFLECT)
@FEWER
@given(streaming_cases(ndim=1, **STACKS))
def test_output_and_gradients_equal_plain_1d(case: StreamingCase) -> None:
    """Properties 1-3 for Conv1d / MaxPool1d / AvgPool1d stacks."""
    check_output(case)
    check_parameter_gradients(case, input_grad=True)


@FEWER
@given(streaming_cases(ndim=3, **STACKS))
def test_output_and_gradients_equal_plain_3d(case: StreamingCase) -> None:
    """Properties 1-3 for Conv3d / MaxPool3d / AvgPool3d stacks."""
    check_output(case)
    check_parameter_gradients(case, input_grad=True)


@FEWER
@given(st.integers(2, 3).flatmap(lambda ndim: streaming_cases(ndim=ndim, **STACKS)))
def test_channels_last_option_keeps_outputs_and_gradients_equal(case: StreamingCase) -> None:
    """Properties 1-3 with ``Streamed(..., channels_last=True)`` (feed Rule F4)."""
    check_parameter_gradients(case, input_grad=True, channels_last=True)


# ----------------------------------------------------------------- property 5: illegal configs
def _locality_breakers(ndim: int, channels: int, width: int) -> dict[str, nn.Module]:
    """Layers that mix information across the whole image, so no tile can compute them.

    ``width`` is the last spatial size where the layer sits (Linear acts on that axis).
    """
    # Adaptive *average* pooling to a grid is a reduction and streams (Rule R1b); *max* to a
    # grid is not one.
    adaptive = {1: nn.AdaptiveMaxPool1d, 2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d}[ndim]
    return {
        "sync_batch_norm_train": nn.SyncBatchNorm(channels).train(),
        "softmax_over_space": nn.Softmax(dim=-1),
        "adaptive_max_pool": adaptive(2),
        "flatten": nn.Flatten(),
        "linear_over_space": nn.Linear(width, width),
        "dropout_train": nn.Dropout(0.5).train(),
    }


SHAPE_CHANGING = {"adaptive_max_pool", "flatten"}  # only valid as the last layer


@st.composite
def illegal_cases(draw: st.DrawFn, /) -> tuple[nn.Module, tuple[int, ...], int | tuple, str]:
    """A legal prefix stack, a locality-breaking layer, maybe a legal suffix, nested under names.

    Returns the module, an image shape, a tile legal for the prefix, and the culprit's path.
    """
    ndim = draw(st.integers(1, 3))
    max_px = {1: 64, 2: 48, 3: 20}[ndim]
    prefix = draw(conv_stacks(ndim=ndim, min_layers=0, max_layers=3, max_receptive_field_px=12))
    shape = draw(image_shapes(module=prefix, ndim=ndim, max_px=max_px))
    out = geometry_of(prefix, ndim=ndim).output_px(prefix, shape[2:])
    channels = next(
        (m.out_channels for m in reversed(list(_leaves(prefix))) if hasattr(m, "out_channels")),
        shape[1],
    )
    name = draw(st.sampled_from(sorted(_locality_breakers(ndim, 1, 1))))
    # Flatten of a one-channel 1-D map only drops the channel axis: local, and streamed exactly.
    assume(not (name == "flatten" and ndim == 1 and channels == 1))
    culprit = _locality_breakers(ndim, channels, out[-1])[name]
    block: list[tuple[str, nn.Module]] = [("prefix", prefix), (name, culprit)]
    if name not in SHAPE_CHANGING and draw(st.booleans()):
        block.append(("suffix", nn.Sequential(nn.Identity(), nn.ReLU())))
    module: nn.Module = nn.Sequential(OrderedDict(block))
    path = name
    if draw(st.booleans()):
        module = nn.Sequential(OrderedDict([("trunk", module)]))
        path = f"trunk.{name}"
    tile = draw(tile_sizes(module=prefix, image_shape=shape))
    return module, shape, tile, path


class _LayerOps(TorchDispatchMode):
    """Records the layer computations (convolutions, pooling, norms, matmuls, dropout) that run
    on real data, i.e. not on the meta tensors a shape trace uses."""

    LAYER_OPS = ("convolution", "pool", "batch_norm", "group_norm", "mm", "bernoulli", "dropout")

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        real = any(
            isinstance(t, torch.Tensor) and t.device.type != "meta"
            for t in tree_leaves((args, kwargs))
        )
        if real and any(op in str(func) for op in self.LAYER_OPS):
            self.ops.append(str(func))
        return func(*args, **kwargs)


@given(illegal_cases())
def test_locality_breaking_layers_raise(case: tuple) -> None:
    """Property 5a: SyncBatchNorm (train), softmax over space, adaptive *max* pooling to more
    than one cell, Flatten, Linear over a spatial
    axis and Dropout (train) raise StreamcheckError naming the layer, before computing anything."""
    module, shape, tile, path = case
    x = torch.randn(shape)
    with (
        _LayerOps() as ran,
        pytest.raises(streamcheck.StreamcheckError, match=re.escape(f"'{path}'")),
    ):
        streamcheck.Streamed(module, tile=tile)(x)
    assert ran.ops == [], f"layers ran before the error: {ran.ops}"
    with pytest.raises(streamcheck.StreamcheckError, match=re.escape(f"'{path}'")):
        streamcheck.plan(module, shape, tile=tile)


@given(st.integers(1, 3).flatmap(lambda ndim: streaming_cases(ndim=ndim, **STACKS)), st.data())
def test_tile_smaller_than_receptive_field_raises(case: StreamingCase, data: st.DataObject) -> None:
    """Property 5b: a tile smaller than the receptive field on any axis is refused, with the
    numbers (tile and receptive field) in the message."""
    geometry = case.geometry
    axes = [a for a, rf in enumerate(geometry.receptive_field_px) if rf >= 2]
    assume(axes)  # receptive field 1 everywhere: every positive tile is legal
    axis = data.draw(st.sampled_from(axes))
    rf = geometry.receptive_field_px[axis]
    tiles = list(case.tile) if isinstance(case.tile, tuple) else [case.tile] * case.ndim
    tiles[axis] = data.draw(st.integers(1, rf - 1))
    tile: int | tuple[int, ...] = tuple(tiles)
    if len(set(tiles)) == 1 and data.draw(st.booleans()):
        tile = tiles[0]
    x = torch.randn(case.image_shape)
    with _LayerOps() as ran, pytest.raises(streamcheck.StreamcheckError) as error:
        streamcheck.Streamed(case.module, tile=tile)(x)
    assert ran.ops == [], f"layers ran before the error: {ran.ops}"
    message = str(error.value)
    offending = [
        (t, f) for t, f in zip(tiles, geometry.receptive_field_px, strict=True) if t < f
    ]  # the engine may name any of them
    assert any(
        re.search(rf"\b{t}\b", message) and re.search(rf"\b{f}\b", message) for t, f in offending
    ), message
    with pytest.raises(streamcheck.StreamcheckError):
        streamcheck.plan(case.module, case.image_shape, tile=tile)


@given(
    streaming_cases(
        ndim=2, padding_modes=("zeros", "replicate", "reflect", "circular"), wide_padding=True
    )
)
def test_unsupported_options_refuse_or_stream_exactly(case: StreamingCase) -> None:
    """Property 5c: stacks PyTorch accepts but the engine may not (circular padding, padding wider
    than the kernel's reach) either stream exactly or raise StreamcheckError naming a layer, before
    computing anything. A crash or a wrong number is a bug."""
    x = torch.randn(case.image_shape)
    ran = _LayerOps()
    try:
        with ran:
            streamcheck.Streamed(case.module, tile=case.tile)(x)
    except streamcheck.StreamcheckError as error:
        assert ran.ops == [], f"layers ran before the error: {ran.ops}"
        paths = [name for name, _ in case.module.named_modules() if name]
        assert any(f"'{path}'" in str(error) for path in paths), str(error)
        return
    check_parameter_gradients(case, input_grad=True)


# ------------------------------------------------------------------ property 6: float32 bound
# NOTE [ float32 tolerance ]
# Rule Q1. What differs. Both runs see the same float32 numbers (weights, image, upstream gradient
#          g); the float64 plain run is exact to ~1e-16, so ``a - b`` is the rounding error of the
#          streamed float32 run alone: a different summation order from ordinary float32, not a
#          larger error.
# Rule Q2. One reduction. A float32 sum of n terms t_i has error <= lambda * sqrt(n) * u * sum|t_i|
#          + O(u^2) with probability >= 1 - 2n exp(-lambda^2 (1-u)^2 / 2), u = eps32 / 2 (Higham &
#          Mary, "A new approach to probabilistic rounding error analysis", SISC 2019). The
#          deterministic bound would be n * u * sum|t_i|; rounding errors are not adversarial.
# Rule Q3. The scale is sum|t_i|, not |sum t_i|: with a random g the terms have random signs and
#          a gradient entry may cancel to almost nothing (a one-channel bias gradient summed over
#          10 pixels did, in calibration, at ~10 eps*sqrt(n) relative to max|b|). Normalising by
#          max|b| would fail on such benign cancellation, or need a tolerance loose enough to hide
#          bugs. So each tensor gets the scale of the *magnitude network*: the same stack with
#          every coefficient replaced by its absolute value (|w|, |bias|, average pooling as is,
#          eval BatchNorm as (x + |mean|) / sqrt(var + eps) * |w| + |b|, each activation
#          linearised at the true pre-activation z as x -> |s'(z)| x + |s(z)|),
#          run forward on |x| and backward from |g| in float64. Its output, input gradient and
#          parameter gradients are exactly sum|t_i| of the last reduction of each tensor, with the
#          magnitudes of all earlier reductions propagated through (first-order error analysis of
#          a product of matrices: |error| <= sum_l gamma_{n_l} |A_D|...|A_1| |x|).
# Rule Q4. The chain. Errors of successive reductions add, so n is the accumulation length L of
#          the whole chain behind any tensor, bounded by summing over the window layers: forward
#          fan-in (C_in/groups * kernel volume), backward fan-out (C_out/groups * kernel volume),
#          and the N * (output pixels) products summed into one weight-gradient entry (also for
#          an eval BatchNorm's weight and bias); plus 4 per activation: its value and derivative
#          are composites of up to ~4 rounded operations (Mish is x * tanh(softplus(x))).
# Rule Q5. The bound: max|a - b| <= 8 * eps32 * sqrt(L) * max(scale) per tensor. 8 * eps32 is
#          lambda = 16 in units of u: lambda = 8 already leaves a failure probability below 1e-9
#          per reduction for L < 1e5 (Rule Q2); the other factor 2 covers the second-order terms
#          and the rounding of each stored intermediate (one more u per layer, L >= layers).
# Rule Q6. Only smooth stacks (no max-pool, no ReLU-like kinks): at a kink the gradient jumps, so a
#          rounding error that moves a pre-activation across 0 (or flips a max-pool argmax) changes
#          the gradient by O(1) however small it is. No accumulation bound holds there; the
#          float64 properties cover kinked stacks exactly.
# Calibration (plain float32 vs float64, 310 smooth 1D/2D/3D stacks, before streaming existed):
# max|a - b| / (eps32 * sqrt(L) * max(scale)) had median 0.04 and maximum 1.5, so the bound of 8
# sits ~5x above the worst case seen, while a lost or doubled tile contribution is O(1).
FLOAT32_EPS = torch.finfo(torch.float32).eps
FLOAT32_SAFETY = 8.0  # Rule Q5
POINTWISE_OPS = 4  # Rule Q4


class _Affine(nn.Module):
    """x -> slope * x + offset, elementwise: an activation linearised at its true input."""

    def __init__(self, slope: torch.Tensor, offset: torch.Tensor) -> None:
        super().__init__()
        self.slope, self.offset = slope, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.slope * x + self.offset


def accumulation_length(case: StreamingCase) -> int:
    """L of Rule Q4: an upper bound on the terms behind any output or gradient entry."""
    spatial = list(case.image_shape[2:])
    total = 0
    for layer in _leaves(case.module):
        windows = _windows(layer, case.ndim)
        if windows is None:
            total += POINTWISE_OPS
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):  # its gradients sum N * pixels
                total += case.image_shape[0] * math.prod(spatial)
            continue
        spatial = [w.output_px(n) for w, n in zip(windows, spatial, strict=True)]
        volume = math.prod(w.kernel for w in windows)
        groups = getattr(layer, "groups", 1)
        fan_in = volume * getattr(layer, "in_channels", groups) // groups
        fan_out = volume * getattr(layer, "out_channels", groups) // groups
        total += fan_in + fan_out + case.image_shape[0] * math.prod(spatial)
    return max(total, 1)


def magnitude_scales(case: StreamingCase, x: torch.Tensor, g_seed: int) -> Run:
    """Output, parameter gradients and input gradient of the magnitude network (Rule Q3)."""
    z = x.double()  # the true activations, layer by layer
    layers: list[tuple[str, nn.Module]] = []
    with torch.no_grad():
        for name, layer in _named_leaves(copy.deepcopy(case.module).double()):
            if isinstance(
                layer,
                nn.modules.conv._ConvNd
                | nn.modules.pooling._AvgPoolNd
                | nn.modules.batchnorm._BatchNorm,
            ):
                absolute_layer = copy.deepcopy(layer)
                for parameter in absolute_layer.parameters():
                    parameter.abs_()
                if isinstance(absolute_layer, nn.modules.batchnorm._BatchNorm):
                    # (x + |mean|) / sqrt(var + eps): every term of x - mean taken positive
                    absolute_layer.running_mean.abs_().neg_()
                layers.append((name, absolute_layer))
                z = layer(z)
            else:
                assert not isinstance(layer, nn.modules.pooling._MaxPoolNd), "Rule Q6"
                with torch.enable_grad():
                    zz = z.detach().requires_grad_()
                    out = layer(zz)
                    (slope,) = torch.autograd.grad(out.sum(), zz)  # pointwise: the diagonal
                layers.append((name, _Affine(slope.abs(), out.detach().abs())))
                z = out.detach()
    network = nn.Sequential(OrderedDict((f"l{i}", m) for i, (_, m) in enumerate(layers)))
    magnitude = run(
        network, x.double().abs(), tile=None, input_grad=True, seed=g_seed, absolute=True
    )
    renamed = {
        f"{layers[int(key.split('.')[0][1:])][0]}.{key.split('.', 1)[1]}": grad
        for key, grad in magnitude.param_grads.items()
    }
    return Run(magnitude.output, True, renamed, magnitude.input_grad)


def _named_leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    if not isinstance(module, nn.Sequential):
        return [(prefix, module)]
    return [
        leaf
        for name, child in module.named_children()
        for leaf in _named_leaves(child, f"{prefix}.{name}" if prefix else name)
    ]


def check_float32(case: StreamingCase) -> None:
    streamed, plain = streamed_and_plain(case, dtype=torch.float32)
    if not plain.output_requires_grad:
        return
    generator = torch.Generator().manual_seed(case.seed)
    x = torch.randn(case.image_shape, generator=generator, dtype=torch.float32)
    scale = magnitude_scales(case, x, case.seed)
    rtol = FLOAT32_SAFETY * FLOAT32_EPS * math.sqrt(accumulation_length(case))  # Rule Q5
    pairs = [("output", streamed.output, plain.output, scale.output)]
    pairs.append(("input gradient", streamed.input_grad, plain.input_grad, scale.input_grad))
    for name, grad in plain.param_grads.items():
        pairs.append(
            (f"grad of {name!r}", streamed.param_grads[name], grad, scale.param_grads[name])
        )
    for name, a, b, s in pairs:
        assert a is not None and b is not None and s is not None
        assert a.dtype == torch.float32, f"{name} is {a.dtype}, not float32"
        error = float((a.double() - b).abs().max())
        bound = rtol * float(s.abs().max())
        assert error <= bound, (
            f"{name}: max error {error:.3g} > {bound:.3g} = {rtol:.3g} * magnitude scale "
            f"(relative to max|b|: {relative_error(a, b):.3g})"
        )


@given(streaming_cases(ndim=2, activations=SMOOTH_ACTIVATIONS, pools=("avg",), **STACKS))
def test_float32_within_accumulation_bound_2d(case: StreamingCase) -> None:
    """Property 6: float32 streaming agrees with float64 plain within the bound of Rule Q5."""
    check_float32(case)


@FEWER
@given(streaming_cases(ndim=1, activations=SMOOTH_ACTIVATIONS, pools=("avg",), **STACKS))
def test_float32_within_accumulation_bound_1d(case: StreamingCase) -> None:
    """Property 6 for 1D stacks."""
    check_float32(case)


@FEWER
@given(streaming_cases(ndim=3, activations=SMOOTH_ACTIVATIONS, pools=("avg",), **STACKS))
def test_float32_within_accumulation_bound_3d(case: StreamingCase) -> None:
    """Property 6 for 3D stacks."""
    check_float32(case)
