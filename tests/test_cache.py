"""Kept stitched maps at cut points (kept Rules KM1-KM6, graph Rule G16, plan Rule PL4).

The oracle is the plain module in float64 (``check_streamed``: outputs, the input gradient, every
parameter gradient, the running statistics), for the statistic networks of the property suite
with random budgets and with cuts forced at random subsets of the cut points (every one, none).
The choice of cuts is checked against an exhaustive search of the same cost model, computed here
from the passes it implies rather than by the dynamic programme.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import streamcheck
from streamcheck import kept as kept_module
from streamcheck import planning
from streamcheck.graph import build_graph
from streamcheck.kept import Candidate, KeptMaps, Target, choose_cuts
from streamcheck.testing.checker import check_streamed
from streamcheck.testing.graphs import dag_cases
from streamcheck.testing.statistics import SqueezeExcite
from streamcheck.testing.strategies import streaming_cases
from streamcheck.testing.unets import unet_cases

pytestmark = pytest.mark.usefixtures("one_thread")


def train_bn_chain() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 6, 3, padding=1)]
    for stride in (1, 2, 1, 2):
        layers += [nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=stride, padding=1)]
    layers.append(nn.BatchNorm2d(6))
    return nn.Sequential(*layers).double().train()


SHAPE = (2, 3, 48, 40)


def assert_exact(streamed: streamcheck.Streamed, shape: tuple[int, ...], seed: int = 0) -> None:
    """``streamed`` equals its plain module. Where it does not, the same wrapper without a cache
    must not either (a kink or an exact zero the checker's tolerance cannot take: drawn cases
    outside this file's concern are rejected), else the cuts are to blame."""
    with warnings.catch_warnings():  # a drawn tile may cover the image: still a valid check
        warnings.filterwarnings("ignore", "streamcheck: tile .* covers the whole")
        report = check_streamed(streamed, shape, seed=seed)
        if not report.passed:
            plain = streamcheck.Streamed(streamed.module, tile=streamed.tile)
            assume(check_streamed(plain, shape, seed=seed).passed)
    assert report.passed, str(report)


# ------------------------------------------------------------------------- the engine, exact


@pytest.mark.parametrize("kind", ["host", "disk"])
def test_kept_maps_give_the_plain_module_with_fewer_passes_from_the_image(
    kind: str, tmp_path: object
) -> None:
    module = train_bn_chain()
    cache = (
        streamcheck.HostCache(bytes=2**24)
        if kind == "host"
        else streamcheck.DiskCache(tmp_path, bytes=2**24)  # type: ignore[arg-type]
    )
    streamed = streamcheck.Streamed(module, tile=20, cache=cache)
    p = streamed.plan(SHAPE)
    plain = streamcheck.plan(module, SHAPE, tile=20)
    assert p.cuts and p.cache_bytes <= 2**24
    assert p.time_factor < plain.time_factor
    from_image = [q for q in p.passes if not q.graph.source]  # type: ignore[union-attr]
    assert len(from_image) < len(plain.passes)
    assert "kept maps" in str(p)
    assert_exact(streamed, SHAPE)
    if kind == "disk":  # Rule KM6: the files go with the call's backward
        assert list(tmp_path.iterdir()) == []  # type: ignore[attr-defined]


class ConvWork(TorchDispatchMode):
    """Multiply-accumulates of every convolution run, counted from its operands (the oracle)."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default:
            weight = args[1]
            self.macs += out.numel() * weight.shape[1] * math.prod(weight.shape[2:])
        return out


def planned_conv_work(p: streamcheck.StreamPlan) -> int:
    """The convolutions' multiply-accumulates of the boxes the plan's tile passes compute."""
    total = 0
    for q in p.tile_passes:
        assert q.graph is not None
        for schedule in q.schedules:
            for node, box in zip(q.graph.nodes, schedule.boxes, strict=True):
                conv = node.module
                if box is None or not isinstance(conv, nn.Conv2d) or node.kind != "window":
                    continue
                per_value = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
                total += (
                    math.prod(b - a for a, b in box) * node.shape[0] * conv.out_channels * per_value
                )
    return total


@pytest.mark.parametrize("budget", [None, 2**17, 2**18, 2**20])
def test_forward_runs_the_convolution_work_the_plan_counts(budget: int | None) -> None:
    """Kept maps measured at 512² gained less than estimated (levels Rule LV4 under load): the
    engine runs no pass, tile or box that the plan does not count, with or without kept maps;
    the measured gap was the shared cores (CPU time agrees with the estimate)."""
    module = train_bn_chain()
    cache = None if budget is None else streamcheck.HostCache(bytes=budget)
    streamed = streamcheck.Streamed(module, tile=20, cache=cache)
    p = streamed.plan(SHAPE)
    assert bool(p.cuts) == (budget is not None)
    counter = ConvWork()
    with torch.no_grad(), counter:
        streamed(torch.randn(SHAPE, dtype=torch.float64))
    assert counter.macs == planned_conv_work(p) > 0


def test_no_budget_and_a_zero_budget_plan_the_passes_of_plain_multi_pass() -> None:
    module = train_bn_chain()
    plain = streamcheck.plan(module, SHAPE, tile=20)
    empty = streamcheck.plan(module, SHAPE, tile=20, cache=streamcheck.HostCache(bytes=0))
    assert plain.cuts == empty.cuts == ()
    assert [q.n_tiles for q in plain.passes] == [q.n_tiles for q in empty.passes]
    assert plain.time_factor == empty.time_factor


def test_a_larger_budget_never_raises_the_estimate() -> None:
    module = train_bn_chain()
    factors = [
        streamcheck.plan(module, SHAPE, tile=20, cache=streamcheck.HostCache(bytes=b)).time_factor
        for b in (0, 2**14, 2**15, 2**16, 2**17, 2**20)
    ]
    assert factors == sorted(factors, reverse=True)
    assert factors[-1] < factors[0]


def test_changing_the_budget_between_calls_replans_and_stays_exact() -> None:
    streamed = streamcheck.Streamed(train_bn_chain(), tile=20)
    seen = set()
    for budget in (2**24, None, 0, 2**15, 2**24):
        streamed.cache = None if budget is None else streamcheck.HostCache(bytes=budget)
        p = streamed.plan(SHAPE)
        assert p.cache_bytes <= (budget or 0)
        seen.add(p.cuts)
        assert_exact(streamed, SHAPE)
    assert len(seen) >= 2
    with pytest.raises(streamcheck.StreamcheckError, match="HostCache"):
        streamed.cache = 2**20  # type: ignore[assignment]


def test_a_second_backward_through_one_forward_is_an_error_not_stale_maps() -> None:
    module = train_bn_chain()
    streamed = streamcheck.Streamed(module, tile=20, cache=streamcheck.HostCache(bytes=2**24))
    y = streamed(torch.randn(SHAPE, dtype=torch.float64, requires_grad=True))
    y.sum().backward(retain_graph=True)
    with pytest.raises(streamcheck.StreamcheckError, match="released by its first backward"):
        y.sum().backward()


def test_inference_releases_the_kept_maps_at_once(tmp_path: object) -> None:
    module = train_bn_chain()
    plain = copy.deepcopy(module)
    cache = streamcheck.DiskCache(tmp_path, bytes=2**24)  # type: ignore[arg-type]
    streamed = streamcheck.Streamed(module, tile=20, cache=cache)
    assert streamed.plan(SHAPE).cuts
    x = torch.randn(SHAPE, dtype=torch.float64)
    with torch.no_grad():
        y = streamed(x)
        assert list(tmp_path.iterdir()) == []  # type: ignore[attr-defined]
        torch.testing.assert_close(y, plain(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "cache",
    [
        lambda tmp: streamcheck.HostCache(bytes=-1),
        lambda tmp: streamcheck.HostCache(bytes=1.5),
        lambda tmp: streamcheck.DiskCache(tmp / "missing", bytes=10),
    ],
)
def test_bad_caches_are_refused_with_the_fix(cache: object, tmp_path: object) -> None:
    with pytest.raises(streamcheck.StreamcheckError, match="Fix"):
        cache(tmp_path)  # type: ignore[operator]


def test_a_cache_that_is_not_one_is_refused() -> None:
    with pytest.raises(streamcheck.StreamcheckError, match="HostCache"):
        streamcheck.Streamed(nn.Conv2d(1, 1, 3), tile=8, cache=2**20)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- properties


EXAMPLES = max(5, settings.default.max_examples // 4)


def _cut_points(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    return build_graph(module, shape, dtype=torch.float64).cut_points()


def with_statistics(module: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """``module``, then a train-mode BatchNorm, a 1 x 1 convolution and a squeeze-excite block
    (the receptive field, so the drawn tile, stays valid): at least two levels and cut points
    between them, whatever the drawn module holds."""
    ndim = len(shape) - 2
    with torch.no_grad():
        channels = module.double()(torch.zeros(shape, dtype=torch.float64)).shape[1]
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[ndim]
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[ndim]
    torch.manual_seed(0)
    tail = [  # smooth: a ReLU after a BatchNorm of equal values sits on its kink
        norm(channels),
        conv(channels, channels, 1),
        SqueezeExcite(channels, ndim=ndim, squeeze="mean"),
    ]
    return nn.Sequential(module, *tail).double()  # the drawn modes kept, the tail trains


def _forced_exact(module: nn.Module, shape: tuple[int, ...], tile: object, data: object) -> None:
    """Streamed with cuts at a drawn subset of the cut points (every one, none, any) equals the
    plain module: the engine is exact whatever the choice (Rules KM2-KM4)."""
    module = module.double()
    try:
        streamcheck.plan(module, shape, tile=tile)  # type: ignore[arg-type]
    except streamcheck.StreamcheckError as error:  # PyTorch refuses it too
        assert "more than 1" in str(error), str(error)
        return
    points = _cut_points(module, shape)
    chosen = data.draw(  # type: ignore[attr-defined]
        st.one_of(st.just(points), st.just(()), st.lists(st.sampled_from(points or (0,))))
    )
    chosen = tuple(sorted(set(chosen) & set(points)))

    def forced(  # type: ignore[no-untyped-def]
        graph: object, targets: object, budget: int, excluded: set[int], dtypes
    ) -> tuple[int, ...]:
        return tuple(c for c in chosen if c not in excluded)

    with mock.patch.object(planning, "_choose", forced):
        streamed = streamcheck.Streamed(
            module,
            tile=tile,
            cache=streamcheck.HostCache(bytes=2**40),  # type: ignore[arg-type]
        )
        event(f"kept maps: {len(streamed.plan(shape).cuts)} of {len(points)} cut points")
        assert_exact(streamed, shape)


def _budget_exact(module: nn.Module, shape: tuple[int, ...], tile: object, data: object) -> None:
    """Streamed with a drawn budget equals the plain module, and holds the budget."""
    module = module.double()
    try:
        full = streamcheck.plan(module, shape, tile=tile)  # type: ignore[arg-type]
    except streamcheck.StreamcheckError as error:  # PyTorch refuses it too
        assert "more than 1" in str(error), str(error)
        return
    points = _cut_points(module, shape)
    most = 2 * 8 * sum(int(torch.Size(full.graph.nodes[c].shape).numel()) for c in points)  # type: ignore[union-attr]
    fraction = data.draw(st.sampled_from([0.0, 1.0]) | st.floats(0, 1))  # type: ignore[attr-defined]
    budget = int(fraction * most)
    streamed = streamcheck.Streamed(
        module,
        tile=tile,
        cache=streamcheck.HostCache(bytes=budget),  # type: ignore[arg-type]
    )
    p = streamed.plan(shape)
    assert p.cache_bytes <= budget
    event(f"kept maps: {len(p.cuts)}")
    assert_exact(streamed, shape)


@settings(max_examples=EXAMPLES)
@given(case=streaming_cases(ndim=2, statistics=True, min_batch=2), data=st.data())
def test_chains_with_forced_cuts_equal_the_plain_module(case, data) -> None:  # type: ignore[no-untyped-def]
    module = with_statistics(case.module, case.image_shape)
    _forced_exact(module, case.image_shape, case.tile, data)


@settings(max_examples=EXAMPLES)
@given(case=streaming_cases(ndim=2, statistics=True, min_batch=2), data=st.data())
def test_chains_with_random_budgets_equal_the_plain_module(case, data) -> None:  # type: ignore[no-untyped-def]
    _budget_exact(with_statistics(case.module, case.image_shape), case.image_shape, case.tile, data)


@settings(max_examples=EXAMPLES)
@given(
    case=st.integers(1, 3).flatmap(lambda n: streaming_cases(ndim=n, statistics=True, min_batch=2)),
    data=st.data(),
)
def test_chains_in_1d_to_3d_with_forced_cuts_equal_the_plain_module(case, data) -> None:  # type: ignore[no-untyped-def]
    module = with_statistics(case.module, case.image_shape)
    _forced_exact(module, case.image_shape, case.tile, data)


@settings(max_examples=EXAMPLES)
@given(case=dag_cases(ndim=2, statistics=True, min_batch=2), data=st.data())
def test_dags_with_forced_cuts_equal_the_plain_module(case, data) -> None:  # type: ignore[no-untyped-def]
    module = with_statistics(case.module, case.image_shape)
    _forced_exact(module, case.image_shape, case.tile, data)


@settings(max_examples=max(5, EXAMPLES // 2))
@given(case=unet_cases(ndim=2, statistics=True), data=st.data())
def test_unets_with_forced_cuts_equal_the_plain_module(case, data) -> None:  # type: ignore[no-untyped-def]
    _forced_exact(case.module, case.image_shape, case.tile, data)


def test_several_training_steps_with_a_cache_match_plain_training() -> None:
    module = train_bn_chain()
    plain = copy.deepcopy(module)
    streamed = streamcheck.Streamed(module, tile=20, cache=streamcheck.HostCache(bytes=2**24))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (module, plain)]
    torch.manual_seed(1)
    for _ in range(3):
        x = torch.randn(SHAPE, dtype=torch.float64)
        for run, optimizer in zip((streamed, plain), optimizers, strict=True):
            optimizer.zero_grad()
            run(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(module.state_dict().values(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------ the choice of cuts


def _cost(candidates: list[Candidate], passes: list[Target], chosen: tuple[int, ...]) -> int:
    """The work of Rule KM5 by simulating the passes: each pass from the latest chosen cut it may
    start at, each kept map made from the previous chosen cut."""
    total = 0
    for p in passes:
        sources = [
            candidates[k]
            for k in chosen
            if candidates[k].node < p.first and candidates[k].level < p.level
        ]
        total += p.macs - (sources[-1].macs if sources else 0)
    previous = 0
    for k in chosen:
        total += candidates[k].macs - previous
        previous = candidates[k].macs
    return total


@settings(max_examples=200)
@given(data=st.data())
def test_the_chosen_cuts_are_the_cheapest_within_the_budget(data) -> None:  # type: ignore[no-untyped-def]
    n = data.draw(st.integers(0, 6))
    levels = sorted(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)))
    work = sorted(data.draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n, unique=True)))
    candidates = [
        Candidate(2 * k + 1, levels[k], data.draw(st.integers(0, 50)), work[k]) for k in range(n)
    ]
    passes = [
        Target(level, data.draw(st.integers(1, 2 * n + 2)), data.draw(st.integers(1000, 5000)))
        for level in range(1, data.draw(st.integers(1, 6)))
    ]
    budget = data.draw(st.integers(0, 120))
    chosen = choose_cuts(candidates, passes, budget=budget)
    assert sum(candidates[k].bytes for k in chosen) <= budget
    best = min(
        _cost(candidates, passes, subset)
        for r in range(n + 1)
        for subset in itertools.combinations(range(n), r)
        if sum(candidates[k].bytes for k in subset) <= budget
    )
    assert _cost(candidates, passes, chosen) == best


# ------------------------------------------------------------------ precision (Rule KM7)


def _all_cuts(graph: object, targets: object, budget: int, excluded: set[int], dtypes: object):  # type: ignore[no-untyped-def]
    return tuple(c for c in graph.cut_points() if c not in excluded)  # type: ignore[attr-defined]


def _autocast_step(
    streamed: streamcheck.Streamed,
    x: torch.Tensor,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[list[torch.Tensor], list[tuple[dict[str, torch.dtype], int]]]:
    """One bf16 autocast training step: output, input and parameter gradients, running
    statistics; and per call the dtypes and bytes of the kept maps (read at their release)."""
    module = streamed.module
    for p in module.parameters():
        p.grad = None
    kept: list[tuple[dict[str, torch.dtype], int]] = []
    release = KeptMaps.release

    def recording(self: KeptMaps) -> None:
        graph = streamed.plan(x.shape).graph
        assert graph is not None
        kept.append(({graph.nodes[n].path: m.dtype for n, m in self.maps.items()}, self.nbytes))
        release(self)

    x = x.detach().requires_grad_()
    with mock.patch.object(KeptMaps, "release", recording):
        with torch.autocast(device, dtype=dtype):
            y = streamed(x)
        (y.float() * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    buffers = [b.clone() for b in module.buffers()]
    return [y.detach(), x.grad, *(p.grad for p in module.parameters()), *buffers], kept  # type: ignore[list-item]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_maps_kept_in_autocast_dtype_lose_nothing_and_take_half(dtype: torch.dtype) -> None:
    """Rule KM7 under CPU bf16 (fp16) autocast, with a cut at every cut point: the convolutions'
    maps are computed in bf16 (kept in bf16 with the option, in float32 without it); the
    normalised maps in float32 (kept in float32 either way). The plan counts and names each
    map's dtype, the kept maps take exactly what it counts, and the option changes no bit of the
    output, the gradients or the running statistics. Against no cache the output is the same
    bits; the gradients are summed at the cut (Rule KM4) instead of per pass, so they agree to
    the low precision only (float64 equality is the rest of this file's)."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    runs = {}
    with mock.patch.object(planning, "_choose", _all_cuts):
        for option in (False, True):
            module = train_bn_chain().float()
            cache = streamcheck.HostCache(bytes=2**30, keep_autocast_dtype=option)
            streamed = streamcheck.Streamed(module, tile=20, cache=cache)
            with torch.autocast("cpu", dtype=dtype):
                p = streamed.plan(SHAPE)
            numels = [math.prod(p.graph.nodes[c].shape) for c in p.cuts]  # type: ignore[union-attr]
            convs = [isinstance(module[int(path.split()[0])], nn.Conv2d) for path in p.cut_paths]
            assert any(convs) and not all(convs)
            want = [dtype if option and conv else torch.float32 for conv in convs]
            assert list(p.cut_dtypes) == want
            assert p.cache_bytes == sum(
                n * (d.itemsize + 4) for n, d in zip(numels, want, strict=True)
            )
            named = f"'0' ({str(dtype).removeprefix('torch.')})"
            assert (named in str(p)) == option and "'2' (float32)" in str(p)
            if not option:  # without autocast the plan is unchanged: float32 maps
                assert streamed.plan(SHAPE).cut_dtypes == p.cut_dtypes
            runs[option], kept = _autocast_step(streamed, x, dtype=dtype)
            ((dtypes, nbytes),) = kept
            assert nbytes == p.cache_bytes
            assert list(dtypes.values()) == want
    plain = streamcheck.Streamed(train_bn_chain().float(), tile=20)
    uncached, _ = _autocast_step(plain, x, dtype=dtype)
    for a, b in zip(runs[True], runs[False], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(runs[True][0], uncached[0])
    # a conv bias before a train-mode BatchNorm has gradient 0 and rounding noise: compare all
    # gradients at once
    a, b = (torch.cat([t.flatten() for t in run[1:]]) for run in (runs[True], uncached))
    assert (a - b).norm() <= 2**-5 * b.norm()


def test_a_disk_cache_keeps_bfloat16_maps_as_int16_files(tmp_path: object) -> None:
    """Rule KM7 with NumPy, which has no bfloat16: the same bits as a HostCache."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    runs = []
    with mock.patch.object(planning, "_choose", _all_cuts):
        for cache in (
            streamcheck.HostCache(bytes=2**30, keep_autocast_dtype=True),
            streamcheck.DiskCache(tmp_path, bytes=2**30, keep_autocast_dtype=True),  # type: ignore[arg-type]
        ):
            streamed = streamcheck.Streamed(train_bn_chain().float(), tile=20, cache=cache)
            result, kept = _autocast_step(streamed, x)
            assert torch.bfloat16 in kept[0][0].values()
            runs.append(result)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    assert list(tmp_path.iterdir()) == []  # type: ignore[attr-defined]


class Widen(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def test_a_map_computed_wider_than_the_module_is_kept_wide_or_refused() -> None:
    """Rule KM7 without autocast: a float32 module that widens to float64 keeps those maps in
    float64, counted so, and streams as it does without a cache; where the trace of dtypes
    fails, the plan assumes float32, and the first float64 tile is refused, not rounded."""
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        Widen(),
        nn.ReLU(),
        nn.BatchNorm2d(4, affine=False, track_running_stats=False),
    )
    x = torch.randn(SHAPE)
    with mock.patch.object(planning, "_choose", _all_cuts):
        streamed = streamcheck.Streamed(module, tile=20, cache=streamcheck.HostCache(bytes=2**30))
        p = streamed.plan(SHAPE)
        assert p.cut_dtypes == (torch.float32, torch.float64, torch.float64, torch.float64)
        assert "'2' (float64)" in str(p)
        torch.testing.assert_close(
            streamed(x), streamcheck.Streamed(module, tile=20)(x), rtol=1e-12, atol=1e-12
        )
        with mock.patch.object(kept_module, "_computed_dtypes", lambda *args: {}):
            streamed.cache = streamcheck.HostCache(bytes=2**29)  # a new plan
            assert streamed.plan(SHAPE).cut_dtypes == (torch.float32,) * 4
            with pytest.raises(
                streamcheck.StreamcheckError, match="'1 .*' is computed in torch.float64"
            ):
                streamed(x)


# ------------------------------------------------------------------ placement (Rule KM8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_kept_maps_live_in_host_memory_and_the_step_equals_the_plain_module() -> None:
    """Rule KM8 (and feed Rules F2, F7) on a GPU, in float64: every cut kept, in pageable host
    memory; outputs, input and parameter gradients, running statistics equal the plain module."""
    module = train_bn_chain().cuda()
    places: list[set[tuple[str, bool]]] = []
    release = KeptMaps.release

    def recording(self: KeptMaps) -> None:
        held = [*self.maps.values(), *self.grads.values()]
        places.append({(t.device.type, t.is_pinned()) for t in held})
        release(self)

    with (
        mock.patch.object(planning, "_choose", _all_cuts),
        mock.patch.object(KeptMaps, "release", recording),
    ):
        streamed = streamcheck.Streamed(module, tile=20, cache=streamcheck.HostCache(bytes=2**30))
        assert len(streamed.plan(SHAPE).cuts) > 2
        report = check_streamed(streamed, SHAPE)
    assert report.passed, str(report)
    assert places and all(p == {("cpu", False)} for p in places), places


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_bfloat16_maps_lose_nothing() -> None:
    """Rule KM7 under CUDA bf16 autocast: keeping bf16 maps in bf16 changes no bit."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)).cuda()
    runs = []
    with mock.patch.object(planning, "_choose", _all_cuts):
        for option in (False, True):
            module = train_bn_chain().float().cuda()
            cache = streamcheck.HostCache(bytes=2**30, keep_autocast_dtype=option)
            streamed = streamcheck.Streamed(module, tile=20, cache=cache)
            result, kept = _autocast_step(streamed, x, device="cuda")
            assert (torch.bfloat16 in kept[0][0].values()) == option
            runs.append(result)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
