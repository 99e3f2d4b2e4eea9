"""The strategies are tested themselves: every draw valid, bounds held, edge cases reachable."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from streamcheck.testing import (
    StreamingCase,
    conv_stacks,
    graphs,
    streaming_cases,
)
from streamcheck.testing import _blocks as blocks
from streamcheck.testing._geometry import Geometry, _leaves, geometry_of
from streamcheck.testing.strategies import _in_channels, image_shapes, tile_sizes

# PyTorch warns when 'same' padding of an even kernel needs an asymmetric zero-padded copy; the
# strategies draw that case on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

CONV = nn.modules.conv._ConvNd
MAX_POOL = nn.modules.pooling._MaxPoolNd
AVG_POOL = nn.modules.pooling._AvgPoolNd


def _tile_tuple(case: StreamingCase) -> tuple[int, ...]:
    tile = case.tile
    return (tile,) * case.ndim if isinstance(tile, int) else tile


def _per_axis(value: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return (value,) * ndim if isinstance(value, int) else tuple(value)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@given(data=st.data())
def test_every_draw_runs_and_has_output(ndim: int, data: st.DataObject) -> None:
    case = data.draw(streaming_cases(ndim=ndim))
    x = torch.zeros(case.image_shape, dtype=torch.float64)
    with torch.no_grad():
        y = case.module.double()(x)
    assert y.shape[0] == case.image_shape[0]
    assert min(y.shape[2:]) >= 1
    assert y.isfinite().all()  # no max-pool window wholly in the padding (strategies Rule 3)
    assert tuple(y.shape[2:]) == case.geometry.output_px(case.module, case.image_shape[2:])


def _max_pool_gives_inf(module: nn.Module, x: torch.Tensor) -> bool:
    infinite: list[bool] = []
    handles = [
        layer.register_forward_hook(lambda m, i, out: infinite.append(bool(out.isinf().any())))
        for layer in module.modules()
        if isinstance(layer, MAX_POOL)
    ]
    module(x)
    for handle in handles:
        handle.remove()
    return any(infinite)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@given(data=st.data())
def test_min_input_px_is_the_smallest_valid_input(ndim: int, data: st.DataObject) -> None:
    module = data.draw(conv_stacks(ndim=ndim, max_receptive_field_px=12, max_channels=2))
    geometry = geometry_of(module, ndim=ndim)
    channels = _in_channels(module) or 1
    shape = (1, channels, *geometry.min_input_px)
    with torch.no_grad():
        assert min(module(torch.zeros(shape)).shape[2:]) >= 1
        for axis, n in enumerate(geometry.min_input_px):
            if n > 1:
                smaller = list(shape)
                smaller[2 + axis] = n - 1
                # PyTorch refuses it, or a max-pool window lies wholly in the padding (-inf)
                with contextlib.suppress(RuntimeError):
                    assert _max_pool_gives_inf(module, torch.zeros(smaller))


@given(data=st.data())
def test_stack_bounds_are_respected(data: st.DataObject) -> None:
    ndim = data.draw(st.integers(1, 3))
    bounds = {
        "min_layers": data.draw(st.integers(1, 3)),
        "max_channels": data.draw(st.integers(1, 5)),
        "max_kernel": data.draw(st.integers(1, 5)),
        "max_pool_kernel": data.draw(st.integers(1, 4)),
        "max_stride": data.draw(st.integers(1, 3)),
        "max_dilation": data.draw(st.integers(1, 3)),
        "max_receptive_field_px": data.draw(st.integers(1, 30)),
    }
    bounds["max_layers"] = bounds["min_layers"] + data.draw(st.integers(0, 3))
    module = data.draw(conv_stacks(ndim=ndim, **bounds))
    leaves = list(_leaves(module))
    assert bounds["min_layers"] <= len(leaves) <= bounds["max_layers"]
    geometry = geometry_of(module, ndim=ndim)
    assert max(geometry.receptive_field_px) <= bounds["max_receptive_field_px"]
    for layer in leaves:
        assert not isinstance(layer, nn.Sequential)
        if isinstance(layer, CONV):
            assert layer.out_channels <= bounds["max_channels"]
            assert layer.in_channels % layer.groups == 0 and layer.out_channels % layer.groups == 0
            assert max(layer.kernel_size) <= bounds["max_kernel"]
            assert max(layer.stride) <= bounds["max_stride"]
            assert max(layer.dilation) <= bounds["max_dilation"]
            if layer.padding == "same":
                assert set(layer.stride) == {1}
            elif layer.padding != "valid":  # within the kernel's reach (no wide_padding)
                reach = [
                    d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)
                ]
                assert all(p <= r for p, r in zip(layer.padding, reach, strict=True))
        elif isinstance(layer, MAX_POOL | AVG_POOL):
            kernel = _per_axis(layer.kernel_size, ndim)
            stride = _per_axis(layer.stride, ndim)
            assert max(kernel) <= bounds["max_pool_kernel"]
            assert stride == kernel or max(stride) <= bounds["max_stride"]
            padding = _per_axis(layer.padding, ndim)
            assert all(p <= k // 2 for p, k in zip(padding, kernel, strict=True))
            if isinstance(layer, MAX_POOL):
                assert max(_per_axis(layer.dilation, ndim)) <= bounds["max_dilation"]
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm | nn.Dropout):
            assert not layer.training  # pointwise only in eval mode
        else:
            assert sum(p.numel() for p in layer.parameters()) == 0  # pointwise activations


@given(data=st.data())
def test_image_and_tile_bounds_are_respected(data: st.DataObject) -> None:
    ndim = data.draw(st.integers(1, 3))
    module = data.draw(conv_stacks(ndim=ndim, max_receptive_field_px=12))
    min_batch = data.draw(st.integers(1, 3))
    max_batch = min_batch + data.draw(st.integers(0, 2))
    max_px = data.draw(st.integers(1, 30))
    shape = data.draw(
        image_shapes(
            module=module, ndim=ndim, min_batch=min_batch, max_batch=max_batch, max_px=max_px
        )
    )
    geometry = geometry_of(module, ndim=ndim)
    assert min_batch <= shape[0] <= max_batch
    assert len(shape) == ndim + 2
    for n, lo in zip(shape[2:], geometry.min_input_px, strict=True):
        assert lo <= n <= max(lo, max_px)

    max_tiles = data.draw(st.none() | st.integers(1, 50))
    tile = data.draw(tile_sizes(module=module, image_shape=shape, max_tiles=max_tiles))
    tiles = (tile,) * ndim if isinstance(tile, int) else tile
    out_px = geometry.output_px(module, shape[2:])
    n_tiles = 1
    for t, rf, stride, n, out in zip(
        tiles, geometry.receptive_field_px, geometry.total_stride, shape[2:], out_px, strict=True
    ):
        assert t >= rf
        output_tile = (t - rf) // stride + 1  # streamcheck.geometry Rule 6
        n_tiles *= math.ceil(out / output_tile)
        if max_tiles is None and not isinstance(tile, int):
            assert t <= max(rf, n)
    if max_tiles is None:
        assert max(tiles) <= max(geometry.receptive_field_px + tuple(shape[2:]))
    else:
        assert n_tiles <= max(max_tiles, 1)


def _has(predicate: Callable[[nn.Module], bool]) -> Callable[[StreamingCase], bool]:
    return lambda case: any(predicate(layer) for layer in case.module.modules())


REACHABLE: dict[str, Callable[[StreamingCase], bool]] = {
    "smallest legal tile": lambda case: _tile_tuple(case) == case.geometry.receptive_field_px,
    "tile per axis": lambda case: isinstance(case.tile, tuple) and len(set(case.tile)) > 1,
    "non-square odd image": lambda c: len(set(c.image_shape[2:])) > 1 and c.image_shape[2] % 2 == 1,
    "nested Sequential": lambda c: any(isinstance(m, nn.Sequential) for m in c.module.children()),
    "'same' even kernel": _has(
        lambda m: (
            isinstance(m, CONV) and m.padding == "same" and any(k % 2 == 0 for k in m.kernel_size)
        )
    ),
    "'valid'": _has(lambda m: isinstance(m, CONV) and m.padding == "valid"),
    "groups": _has(lambda m: isinstance(m, CONV) and m.groups > 1),
    "strided dilated conv": _has(
        lambda m: isinstance(m, CONV) and max(m.stride) > 1 and max(m.dilation) > 1
    ),
    "reflect padding": _has(lambda m: isinstance(m, CONV) and m.padding_mode == "reflect"),
    "no bias": _has(lambda m: isinstance(m, CONV) and m.bias is None),
    "dilated ceil-mode max-pool": _has(
        lambda m: isinstance(m, MAX_POOL) and m.ceil_mode and m.dilation != 1
    ),
    "padded avg-pool excluding pad": _has(
        lambda m: isinstance(m, AVG_POOL) and m.padding != 0 and not m.count_include_pad
    ),
    "divisor_override": _has(lambda m: isinstance(m, AVG_POOL) and m.divisor_override),
    "eval batch norm": _has(lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine),
    "eval dropout": _has(lambda m: isinstance(m, nn.Dropout)),
}
WIDE: dict[str, Callable[[StreamingCase], bool]] = {
    "padding wider than the kernel": _has(
        lambda m: (
            isinstance(m, CONV)
            and not isinstance(m.padding, str)
            and any(
                p > d * (k - 1)
                for p, d, k in zip(m.padding, m.dilation, m.kernel_size, strict=True)
            )
        )
    ),
}


class _AllSeen(Exception):
    pass


def _unseen(strategy: st.SearchStrategy[StreamingCase], features: dict) -> set[str]:
    """The features no generated example had, generating until all are seen (no shrinking)."""
    unseen = set(features)

    @settings(max_examples=3000, phases=[Phase.generate], database=None, deadline=None)
    @given(strategy)
    def probe(case: StreamingCase) -> None:
        unseen.difference_update({name for name in unseen if features[name](case)})
        if not unseen:
            raise _AllSeen

    with contextlib.suppress(_AllSeen):
        probe()
    return unseen


def test_edge_cases_are_reachable() -> None:
    assert _unseen(streaming_cases(ndim=2), REACHABLE) == set()


def test_wide_padding_is_reachable_when_asked() -> None:
    assert _unseen(streaming_cases(ndim=2, wide_padding=True), WIDE) == set()


@pytest.mark.parametrize("ndim", [1, 3])
def test_smallest_legal_tile_is_reachable_in_1d_and_3d(ndim: int) -> None:
    smallest = {"smallest legal tile": REACHABLE["smallest legal tile"]}
    assert _unseen(streaming_cases(ndim=ndim), smallest) == set()


# ------------------------------------------------------------------------- DAG networks (graphs)
BLOCK_FEATURES: dict[str, Callable[[StreamingCase], bool]] = {
    "residual add": _has(lambda m: isinstance(m, blocks.Residual) and m.merge == "add"),
    "residual multiply": _has(lambda m: isinstance(m, blocks.Residual) and m.merge == "mul"),
    "concatenation": _has(lambda m: isinstance(m, blocks.Branches) and m.merge == "cat"),
    "rejoin add": _has(lambda m: isinstance(m, blocks.Branches) and m.merge == "add"),
    "rejoin multiply": _has(lambda m: isinstance(m, blocks.Branches) and m.merge == "mul"),
    "three branches": _has(lambda m: isinstance(m, blocks.Branches) and len(m.branches) == 3),
    "shared conv": _has(lambda m: isinstance(m, blocks.SharedTwice)),
    "permute + Linear": _has(
        lambda m: isinstance(m, blocks.ChannelMix) and isinstance(m.inner, nn.Linear)
    ),
    "permute + LayerNorm": _has(
        lambda m: isinstance(m, blocks.ChannelMix) and isinstance(m.inner, nn.LayerNorm)
    ),
    "FrozenBatchNorm": _has(lambda m: isinstance(m, blocks.FrozenBatchNorm)),
    "pool in a branch": lambda c: any(
        isinstance(p, MAX_POOL | AVG_POOL)
        for m in c.module.modules()
        if isinstance(m, blocks.Branches | blocks.Residual)
        for p in m.modules()
    ),
    "stride before a join": lambda c: (
        max(c.geometry.total_stride) > 1
        and any(isinstance(m, blocks.Residual | blocks.Branches) for m in c.module.modules())
    ),
    "even 'same' kernel in a branch": _has(
        lambda m: (
            isinstance(m, blocks.Branches)
            and any(
                isinstance(c, CONV)
                and c.padding == "same"
                and any(k % 2 == 0 for k in c.kernel_size)
                for c in m.modules()
            )
        )
    ),
}


@pytest.mark.parametrize("ndim", [1, 2, 3])
@settings(max_examples=max(10, settings.default.max_examples // 4))
@given(data=st.data())
@pytest.mark.usefixtures("one_thread")
def test_every_dag_draw_runs_with_the_computed_geometry(ndim: int, data: st.DataObject) -> None:
    case = data.draw(graphs.dag_cases(ndim=ndim))
    x = torch.randn(case.image_shape, dtype=torch.float64)
    with torch.no_grad():
        y = case.module.double()(x)
    assert y.isfinite().all()
    geometry = case.geometry
    assert isinstance(geometry, Geometry)
    assert tuple(y.shape[2:]) == geometry.output_px(case.module, case.image_shape[2:])
    assert y.shape[1] == graphs.out_channels(case.module, case.image_shape[1])
    for axis, n in enumerate(geometry.min_input_px):  # the smallest valid input is the smallest
        assert n <= case.image_shape[2 + axis]
        if n > 1:
            smaller = list(case.image_shape)
            smaller[2 + axis] = n - 1
            # PyTorch refuses it, or a max-pool window lies wholly in the padding (-inf)
            with contextlib.suppress(RuntimeError):
                assert _max_pool_gives_inf(case.module, torch.zeros(smaller, dtype=torch.float64))


@given(data=st.data())
def test_dag_bounds_are_respected(data: st.DataObject) -> None:
    ndim = data.draw(st.integers(1, 3))
    bounds = {
        "min_blocks": data.draw(st.integers(0, 2)),
        "max_channels": data.draw(st.integers(1, 5)),
        "max_kernel": data.draw(st.integers(1, 5)),
        "max_dilation": data.draw(st.integers(1, 3)),
        "max_receptive_field_px": data.draw(st.integers(1, 30)),
        "blocks": data.draw(st.lists(st.sampled_from(graphs.BLOCKS), min_size=1, unique=True)),
    }
    bounds["max_blocks"] = bounds["min_blocks"] + data.draw(st.integers(0, 2))
    network = data.draw(graphs.dag_networks(ndim=ndim, **bounds))
    geometry = geometry_of(network, ndim=ndim)
    assert max(geometry.receptive_field_px) <= bounds["max_receptive_field_px"]
    kinds = {
        "residual_add": lambda m: isinstance(m, blocks.Residual) and m.merge == "add",
        "residual_mul": lambda m: isinstance(m, blocks.Residual) and m.merge == "mul",
        "concat": lambda m: isinstance(m, blocks.Branches) and m.merge == "cat",
        "rejoin_add": lambda m: isinstance(m, blocks.Branches) and m.merge == "add",
        "rejoin_mul": lambda m: isinstance(m, blocks.Branches) and m.merge == "mul",
        "shared": lambda m: isinstance(m, blocks.SharedTwice),
    }
    top_blocks = [m for m in network if not isinstance(m, nn.Sequential)]
    assert len(top_blocks) <= bounds["max_blocks"]
    for block in top_blocks:
        drawn = [k for k, is_kind in kinds.items() if is_kind(block)] or ["mix"]
        assert set(drawn) <= set(bounds["blocks"])
    convs = [m for m in network.modules() if isinstance(m, CONV)]
    # A conv draws at most max_channels, or restores a width the network already has (the end of
    # a residual body whose input was a concatenation of several branches).
    widths = {bounds["max_channels"], *(c.in_channels for c in convs)}
    for m in network.modules():
        if isinstance(m, CONV):
            assert m.out_channels <= bounds["max_channels"] or m.out_channels in widths
            assert max(m.kernel_size) <= bounds["max_kernel"]
            assert max(m.dilation) <= bounds["max_dilation"]


def test_dag_edge_cases_are_reachable() -> None:
    assert _unseen(graphs.dag_cases(ndim=2), BLOCK_FEATURES) == set()


def test_dag_geometry_of_a_known_network() -> None:
    """The oracle's DAG rules by hand (geometry Rules U1, U3): a stride-2 conv, then branches
    with 3- and 'same' 4-wide kernels; a path along one axis as (field, stride, left padding)."""
    net = nn.Sequential(
        nn.Conv1d(1, 2, 3, stride=2),  # (3, 2, 0)
        blocks.Branches(nn.Conv1d(2, 1, 3, padding=1), nn.Conv1d(2, 1, 4, padding="same")),
    )
    # branch 1: (3 + 2*2, 2, 0 + 1*2) = (7, 2, 2); branch 2 ('same' 4: left 1): (9, 2, 2)
    geometry = geometry_of(net, ndim=1)
    assert geometry.receptive_field_px == (9,) and geometry.total_stride == (2,)
    assert geometry.output_px(net, (11,)) == (5,) == net(torch.zeros(1, 1, 11)).shape[2:]
