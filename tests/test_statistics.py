"""Exact streaming through statistics over the whole map (reductions Rules R1-R5, graph Rules
G13-G15, plan Rules PL1-PL3, streaming Rules S11-S13).

The oracle is the plain module in float64 (a deep copy, in the same mode): outputs, the input
gradient, every parameter gradient and the buffers (running statistics, ``num_batches_tracked``)
after one or several training steps. Ties of maxima are checked against PyTorch's own gradient.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import streamcheck
from streamcheck.testing.checker import check_streamed, check_streaming_equivalence
from streamcheck.testing.graphs import dag_cases
from streamcheck.testing.statistics import (
    REDUCTIONS,
    GlobalHead,
    ResponseNorm,
    SqueezeExcite,
)
from streamcheck.testing.strategies import streaming_cases
from streamcheck.testing.unets import unet_cases

pytestmark = pytest.mark.usefixtures("one_thread")

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SHAPES = {1: (2, 3, 41), 2: (2, 3, 23, 19), 3: (2, 3, 14, 12, 11)}
TILES = {1: 13, 2: 9, 3: 9}


def perturbed(module: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) / 4)
    return module


def assert_exact(module: nn.Module, shape: tuple[int, ...], tile: int, **options: object) -> None:
    report = check_streaming_equivalence(module, shape, tile=tile, **options)  # type: ignore[arg-type]
    assert report.passed, str(report)
    assert report.n_tiles >= 2


def conv(ndim: int, c_in: int, c_out: int, **options: object) -> nn.Module:
    return CONV[ndim](c_in, c_out, 3, padding=1, **options)  # type: ignore[arg-type]


def network(ndim: int, middle: nn.Module, *, head: bool = False) -> nn.Module:
    layers = [conv(ndim, 3, 4), nn.ReLU(), conv(ndim, 4, 4, stride=2), middle, conv(ndim, 4, 3)]
    if head:
        layers.append(GlobalHead(3, ndim=ndim, classes=2, pool="avg"))
    return perturbed(nn.Sequential(*layers)).train()


# ------------------------------------------------------------- every statistic, 1-D to 3-D


@pytest.mark.parametrize(
    ("ndim", "squeeze"),
    [(2, squeeze) for squeeze in REDUCTIONS]
    + [(1, "amax"), (1, "std"), (3, "gem"), (3, "max_pool")],
)
def test_squeeze_excite_with_every_reduction_is_exact(ndim: int, squeeze: str) -> None:
    se = SqueezeExcite(4, ndim=ndim, squeeze=squeeze, eca=squeeze == "mean")
    assert_exact(network(ndim, se), SHAPES[ndim], TILES[ndim])


def test_a_gate_broadcast_with_expand_as_is_exact() -> None:
    """timm's ECA writes ``x * y.expand_as(x)``: the global gate takes the tile's shape."""

    class Gate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * x.mean((2, 3), keepdim=True).sigmoid().expand_as(x)

    assert_exact(network(2, Gate()), SHAPES[2], TILES[2])


NORMS = {
    "batch_train": lambda ndim: BATCH_NORM[ndim](4),
    "batch_cumulative": lambda ndim: BATCH_NORM[ndim](4, momentum=None),
    "batch_untracked": lambda ndim: BATCH_NORM[ndim](4, track_running_stats=False),
    "group": lambda ndim: nn.GroupNorm(2, 4),
    "layer_as_group": lambda ndim: nn.GroupNorm(1, 4, affine=False),
    "instance_tracked": lambda ndim: {
        1: nn.InstanceNorm1d,
        2: nn.InstanceNorm2d,
        3: nn.InstanceNorm3d,
    }[ndim](4, affine=True, track_running_stats=True),
    "response": lambda ndim: ResponseNorm(4, ndim=ndim),
}


@pytest.mark.parametrize(
    ("ndim", "norm"),
    [(2, norm) for norm in sorted(NORMS)]
    + [(1, "batch_cumulative"), (1, "group"), (3, "instance_tracked"), (3, "response")],
)
def test_norm_layers_in_training_mode_are_exact_with_their_running_statistics(
    ndim: int, norm: str
) -> None:
    assert_exact(network(ndim, NORMS[norm](ndim)), SHAPES[ndim], TILES[ndim])


def test_functional_norms_are_exact() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.weight = nn.Parameter(torch.rand(4) + 0.5)
            self.register_buffer("mean", torch.zeros(4))
            self.register_buffer("var", torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            x = F.batch_norm(x, self.mean, self.var, self.weight, None, True, 0.3, 1e-4)
            x = F.group_norm(F.relu(x), 2, self.weight)
            return F.instance_norm(x) + F.adaptive_avg_pool2d(x, 1)

    assert_exact(perturbed(Functional()), (2, 3, 17, 15), 8)


def test_timm_batchnorm_act_in_training_mode_counts_batches_once() -> None:
    layers = pytest.importorskip("timm.layers")
    module = perturbed(
        nn.Sequential(nn.Conv2d(3, 4, 3), layers.BatchNormAct2d(4), nn.Conv2d(4, 2, 3))
    ).train()
    assert_exact(module, (2, 3, 20, 18), 9)
    streamed = streamcheck.Streamed(module, tile=9)
    streamed(torch.randn(2, 3, 20, 18))
    assert int(module[1].num_batches_tracked) == 1  # graph Rule G15: once, not per tile or pass


def test_a_whole_classifier_returns_its_logits_without_a_stitched_map() -> None:
    """Rule PL1: the global pool of the head is the last statistic; the logits are global."""
    model = network(2, nn.BatchNorm2d(4), head=True)
    assert_exact(model, (2, 3, 30, 26), 10)
    plan = streamcheck.plan(model, (2, 3, 30, 26), tile=10)
    assert plan.output_shape == (2, 2) and plan.output_bytes == 0
    assert plan.levels == 2 and plan.passes_training == 4  # BatchNorm, then the pool


def test_a_final_global_pool_costs_no_extra_pass() -> None:
    trunk = perturbed(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)))
    plan = streamcheck.plan(trunk, (1, 3, 64, 64), tile=20)
    assert plan.passes_training == 2 and plan.passes_inference == 1
    assert plan.time_factor == pytest.approx(1.0)
    assert_exact(trunk, (1, 3, 64, 64), 20)


@pytest.mark.parametrize(
    ("ndim", "grid"), [(1, 5), (2, 7), (2, (3, 4)), (2, (6, 1)), (3, (2, 3, 2))]
)
def test_adaptive_average_pooling_to_a_grid_is_exact(ndim: int, grid: object) -> None:
    """reductions Rule R1b: cells of an odd-sized map share positions at their borders (23 into 7
    cells: bins of 4 px overlapping by 1); the flattened grid feeds a Linear, as in VGG's head."""
    cells = (grid,) * ndim if isinstance(grid, int) else grid
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[ndim]
    layers = [
        conv(ndim, 3, 4),
        nn.ReLU(),
        conv(ndim, 4, 4, stride=2),
        nn.BatchNorm2d(4) if ndim == 2 else nn.Identity(),
        pool(grid),
        nn.Flatten(),
        nn.Linear(4 * math.prod(cells), 3),
    ]  # type: ignore[arg-type]
    model = perturbed(nn.Sequential(*layers)).train()
    shape = {1: (2, 3, 47), 2: (2, 3, 46, 31), 3: (2, 3, 18, 14, 12)}[ndim]
    assert_exact(model, shape, TILES[ndim])
    plan = streamcheck.plan(model, shape, tile=TILES[ndim])
    assert plan.output_shape == (2, 3) and plan.output_bytes == 0


# ------------------------------------------------------------------ maxima: where ties go


@pytest.mark.parametrize("squeeze", ["amax", "max_pool"])
def test_maximum_ties_get_the_gradient_pytorch_gives_them(squeeze: str) -> None:
    """A ReLU'd channel that is all zero is all ties: amax shares the gradient among them,
    global max pooling gives it to the first in row-major order (reductions Rule R2)."""
    module = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        SqueezeExcite(3, ndim=2, squeeze=squeeze),
        nn.Conv2d(3, 2, 3),
    ).double()
    with torch.no_grad():
        module[0].weight[1].fill_(-1.0)  # channel 1: negative everywhere, zero after the ReLU
        module[0].bias[1] = -1.0
        module[0].weight[2].zero_()  # channel 2: the constant 0.5 everywhere
        module[0].bias[2] = 0.5
    x = torch.rand(2, 1, 21, 17, dtype=torch.float64)
    assert_exact(module, x, 8)


# ------------------------------------------------------------------- training over steps


def test_several_training_steps_match_plain_training_with_running_statistics() -> None:
    """Rule R5 over steps: running statistics, num_batches_tracked, parameters after SGD."""
    model = network(2, nn.Sequential(nn.BatchNorm2d(4, momentum=None), nn.ReLU()), head=True)
    model = model.double()
    plain = copy.deepcopy(model)
    streamed = streamcheck.Streamed(model, tile=11)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, plain)]
    for step in range(3):
        x = torch.randn(
            3, 3, 24, 21, dtype=torch.float64, generator=torch.Generator().manual_seed(step)
        )
        target = torch.tensor([0, 1, 1])
        for run, optimizer in zip((streamed, plain), optimizers, strict=True):
            optimizer.zero_grad()
            F.cross_entropy(run(x), target).backward()
            optimizer.step()
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        scale = b.double().abs().max().clamp(min=1e-300)
        assert ((a.double() - b.double()).abs().max() / scale).item() <= 1e-10, name


def test_train_and_eval_switch_the_plan_and_eval_uses_running_statistics() -> None:
    model = network(2, nn.BatchNorm2d(4)).double()
    streamed = streamcheck.Streamed(model, tile=9)
    x = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    for mode in (True, False, True):
        model.train(mode)
        assert check_streamed(streamed, x).passed
        assert (streamed.plan(x.shape).levels == 1) is mode


def test_gradient_accumulation_and_options_keep_the_statistics_exact() -> None:
    model = network(2, SqueezeExcite(4, ndim=2, squeeze="mean"), head=True).double()
    x = torch.randn(2, 3, 22, 22, dtype=torch.float64)
    for options in ({"channels_last": True}, {"compile": False}):
        streamed = streamcheck.Streamed(model, tile=10, **options)  # type: ignore[arg-type]
        assert check_streamed(streamed, x).passed, options
    # two backward calls accumulate like the plain module's
    plain = copy.deepcopy(model)
    streamed = streamcheck.Streamed(model, tile=10)
    for m in (model, plain):
        m.zero_grad()
    for run in (streamed, plain):
        for _ in range(2):
            run(x).sum().backward()
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- refused, before work


class RowMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.mean(2, keepdim=True)


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return x


@pytest.mark.parametrize(
    ("layer", "fragment"),
    [
        (RowMean(), "reduces over only some spatial axes"),
        (nn.SyncBatchNorm(4), "SyncBatchNorm in training mode"),
        (nn.Softmax(dim=-1), "mixes or indexes parameters by tensor dimension(s) [3]"),
        (Counter(), "writes the buffer 'block.calls' in place"),
        (nn.AdaptiveMaxPool2d(3), "AdaptiveMaxPool2d pools to 3"),
        (nn.AdaptiveAvgPool2d((None, 3)), "None keeps an axis unpooled"),
    ],
)
def test_what_is_not_a_whole_map_statistic_stays_refused_by_path(
    layer: nn.Module, fragment: str
) -> None:
    module = nn.Sequential()
    module.add_module("stem", nn.Conv2d(3, 4, 3))
    module.add_module("block", layer)
    with pytest.raises(streamcheck.StreamcheckError, match="'block") as error:
        streamcheck.plan(module.train(), (2, 3, 16, 16), tile=8)
    assert fragment in str(error.value)


def test_a_mask_with_a_statistic_is_refused() -> None:
    streamed = streamcheck.Streamed(network(2, nn.GroupNorm(2, 4)), tile=9)
    with pytest.raises(
        streamcheck.StreamcheckError, match=r"mask= with a statistic.*'3 \(moments\)'"
    ):
        streamed(torch.randn(1, 3, 20, 20), mask=torch.ones(4, 4, dtype=torch.bool))


def test_too_many_levels_are_refused_with_the_count_and_the_fixes() -> None:
    layers: list[nn.Module] = [nn.Conv2d(3, 4, 3, padding=1)]
    for _ in range(5):
        layers += [nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)]
    module = nn.Sequential(*layers).train()
    with pytest.raises(streamcheck.StreamcheckError) as error:
        streamcheck.Streamed(module, tile=16, max_levels=4)(torch.randn(1, 3, 32, 32))
    message = str(error.value)
    assert "5 levels" in message and "max_levels=4" in message and ".eval()" in message
    plan = streamcheck.plan(module, (1, 3, 32, 32), tile=16, max_levels=5)
    assert plan.levels == 5 and plan.passes_training == 12
    assert "statistic levels" in str(plan) and "time factor estimate" in str(plan)


def test_batch_statistics_of_one_value_are_refused_like_pytorch_refuses_them() -> None:
    module = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4)).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module(torch.randn(1, 3, 3, 3))
    with pytest.raises(streamcheck.StreamcheckError, match="more than 1 value per channel"):
        streamcheck.plan(module, (1, 3, 3, 3), tile=3)


# ------------------------------------------------------------------------------- properties


def _exact_case(module: nn.Module, shape: tuple[int, ...], tile: object, seed: int) -> None:
    module = module.double()  # the modes as drawn: statistic layers train, eval layers eval
    try:
        streamcheck.plan(module, shape, tile=tile)  # type: ignore[arg-type]
    except streamcheck.StreamcheckError as error:
        # PyTorch refuses the same input (a statistic of one value), nothing else is refused
        assert "more than 1" in str(error), str(error)
        with pytest.raises(ValueError, match="more than 1"):
            module(torch.zeros(shape, dtype=torch.float64))
        return
    with warnings.catch_warnings():  # a drawn tile may cover the image: still a valid check
        warnings.filterwarnings("ignore", "streamcheck: tile .* covers the whole")
        report = check_streaming_equivalence(module, shape, tile=tile, seed=seed)  # type: ignore[arg-type]
    assert report.passed, str(report)


# ci: a quarter of the profile's examples each (10); thorough (nox -s proofs): 250
EXAMPLES = max(5, settings.default.max_examples // 4)


@settings(max_examples=EXAMPLES)
@given(case=streaming_cases(ndim=2, statistics=True, min_batch=2), head=st.booleans())
def test_chains_with_statistics_equal_the_plain_module(case, head: bool) -> None:  # type: ignore[no-untyped-def]
    module = case.module
    if head:
        channels = [m.out_channels for m in module.modules() if isinstance(m, nn.Conv2d)]
        module = nn.Sequential(
            module,
            GlobalHead(
                channels[-1] if channels else case.image_shape[1], ndim=2, classes=3, pool="max"
            ),
        )
    _exact_case(module, case.image_shape, case.tile, case.seed)


@settings(max_examples=EXAMPLES)
@given(
    case=st.integers(1, 3).flatmap(lambda n: streaming_cases(ndim=n, statistics=True, min_batch=2))
)
def test_chains_with_statistics_in_1d_to_3d_equal_the_plain_module(case) -> None:  # type: ignore[no-untyped-def]
    _exact_case(case.module, case.image_shape, case.tile, case.seed)


@settings(max_examples=EXAMPLES)
@given(case=dag_cases(ndim=2, statistics=True, min_batch=2))
def test_dags_with_statistics_equal_the_plain_module(case) -> None:  # type: ignore[no-untyped-def]
    _exact_case(case.module, case.image_shape, case.tile, case.seed)


@settings(max_examples=max(5, EXAMPLES // 2))
@given(case=unet_cases(ndim=2, statistics=True))
def test_unets_with_statistics_equal_the_plain_module(case) -> None:  # type: ignore[no-untyped-def]
    _exact_case(case.module, case.image_shape, case.tile, case.seed)
