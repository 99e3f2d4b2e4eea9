"""``Streamed(..., compile=True)``: compiled tile programs (NOTE [ Compiled tile programs ]).

Each check compares against the plain module in float64 at rtol 1e-10 (outputs, input gradient,
every parameter gradient), as the property suite does; compilation takes seconds per program on a
CPU, so the networks are small and the tiles few.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from torch import nn

import streamcheck
from streamcheck.compiled import TilePrograms
from streamcheck.testing import check_streamed
from streamcheck.testing.strategies import StreamingCase, streaming_cases

RTOL = 1e-10
# dynamo probes tensors' .grad while tracing; under this suite's warnings-as-errors its own note
# about non-leaf .grad would abort the compilation
pytestmark = pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning"
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _check(module: nn.Module, shape: tuple[int, ...], tile: int, **options: Any) -> Any:
    torch.manual_seed(0)
    module = module.double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    streamed = streamcheck.Streamed(module, tile=tile, compile=True, **options)
    params = list(module.parameters())
    expected = module(x)
    upstream = torch.randn_like(expected)
    want = torch.autograd.grad((expected * upstream).sum(), [x, *params])
    got_out = streamed(x)
    got = torch.autograd.grad((got_out * upstream).sum(), [x, *params])
    assert _rel(got_out, expected) < RTOL
    for g, e in zip(got, want, strict=True):
        assert _rel(g, e) < RTOL
    return streamed


def test_a_compiled_1d_chain_is_exact_and_interior_tiles_share_one_program() -> None:
    net = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2), nn.Conv1d(4, 3, 5, padding=2)
    )
    shape = (1, 2, 200)
    streamed = _check(net, shape, 40)
    plan = streamed.plan(shape)
    records = streamed.compile_report(shape)
    assert plan.n_tiles >= 6
    # first, interior and last tiles: 3 classes (the last may differ again), forward + backward
    assert {r.grad for r in records} == {False, True}
    assert len(records) <= 2 * 4 < 2 * plan.n_tiles
    assert all(r.compiled and r.seconds > 0 for r in records)
    assert sum(r.tiles for r in records if not r.grad) == plan.n_tiles


def test_compiled_programs_see_optimizer_steps_and_model_surgery() -> None:
    """Parameters are read live (Rule C2): a program compiled before a step computes with the
    stepped weights; a replaced layer means a new plan and new programs."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3)).double()
    x = torch.randn(1, 2, 30, 30, dtype=torch.float64)
    streamed = streamcheck.Streamed(net, tile=20, compile=True)
    streamed(x).square().sum().backward()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))  # an in-place optimizer step
    assert _rel(streamed(x), net(x)) < RTOL
    net[1] = nn.Tanh()
    assert _rel(streamed(x), net(x)) < RTOL


def test_position_dependent_layers_compile_exactly() -> None:
    """Averages that exclude padding, reflect padding and bilinear upsampling read absolute
    positions (Rule C1 (d)): their tiles are not shared with tiles elsewhere."""
    net = nn.Sequential(
        nn.Conv1d(1, 2, 3, padding=1, padding_mode="reflect"),
        nn.AvgPool1d(3, stride=2, padding=1, count_include_pad=False),
        nn.Upsample(scale_factor=2, mode="linear", align_corners=False),
        nn.Conv1d(2, 1, 3, padding=1),
    )
    shape = (1, 1, 45)  # 3 tiles
    streamed = _check(net, shape, 24)
    assert streamed._programs.classes(
        streamed.plan(shape).graph, streamed.plan(shape).schedules
    ) == (streamed.plan(shape).n_tiles)


def test_a_failing_compiler_falls_back_with_one_warning_and_the_same_results() -> None:
    def broken(fn: Any, **options: Any) -> Any:
        raise RuntimeError("no C++ compiler found")

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU()).double()
    x = torch.randn(1, 1, 24, 24, dtype=torch.float64, requires_grad=True)
    streamed = streamcheck.Streamed(net, tile=12)
    streamed._programs = TilePrograms(compiler=broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = streamed(x)
        out.sum().backward()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no C++ compiler found" in messages[0]
    assert "compile=False" in messages[0]
    assert _rel(out, net(x)) < RTOL
    assert not any(r.compiled for r in streamed.compile_report(x.shape))


def test_compiled_tiles_under_autocast_match_eager_tiles_under_autocast() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    x = torch.randn(1, 3, 32, 32)
    eager = streamcheck.Streamed(net, tile=20)
    compiled = streamcheck.Streamed(net, tile=20, compile=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = eager(x), compiled(x)
    assert a.dtype == b.dtype == torch.bfloat16
    # the same bf16 products summed in another order: within a few bf16 ulps of the result
    torch.testing.assert_close(b.float(), a.float(), rtol=4 * 2**-8, atol=4 * 2**-8)
    assert "compile=True" in compiled.extra_repr()


@pytest.mark.parametrize("compile_", [False, True])
def test_pickling_a_streamed_module_drops_compiled_programs(compile_: bool) -> None:
    import pickle

    net = nn.Conv2d(1, 1, 3, padding=1).double()
    streamed = streamcheck.Streamed(net, tile=8, compile=compile_)
    x = torch.randn(1, 1, 12, 12, dtype=torch.float64)
    streamed(x)
    again = pickle.loads(pickle.dumps(streamed))
    assert again.compile_report(x.shape) == []
    assert _rel(again(x), again.module(x)) < RTOL


@pytest.mark.property
@settings(max_examples=3, deadline=None)  # each example compiles a few programs: seconds each
@given(streaming_cases(ndim=1, max_tiles=4, padding_modes=("zeros", "replicate", "reflect")))
def test_compiled_streaming_equals_the_plain_module_on_drawn_stacks(case: StreamingCase) -> None:
    """The property suite's drawn stacks (a subset: 1-D, few tiles), with compile=True: the
    checker compares outputs and every gradient with the plain module in float64."""
    streamed = streamcheck.Streamed(case.module.double(), tile=case.tile, compile=True)
    assume(streamed.plan(case.image_shape).n_tiles > 1)  # one tile would compare nothing streamed
    report = check_streamed(streamed, case.image_shape, seed=case.seed)
    assert report.passed, str(report)
    assert streamed.compile_report(case.image_shape)
