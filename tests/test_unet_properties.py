"""The proof at several resolutions: streamed U-Nets equal the plain network in float64.

U-Nets come from ``streamcheck.testing.unets``: encoder-decoders (strided conv, max and average
pool down; ConvTranspose, nearest and (bi/tri)linear upsampling with align_corners False and True
up; skips concatenated or added; odd, non-square images; full-resolution logits). Each case is
checked by the equivalence checker (every output, input gradient, every parameter gradient and
the buffers; float64, rtol 1e-10), and the engine's output shapes and tile period must equal the
strategies' own arithmetic (NOTE [ Multi-scale strategy geometry ]). Pyramids (``pyramid_cases``:
backbone stages, lateral 1x1 convs, top-down upsampling and addition, outputs as a tuple, list or
dict) are checked the same way, output by output. The strategies are tested here too: every
draw runs with the computed sizes, bounds hold, the kinds they claim are drawn, and Rule U3's
intervals contain what PyTorch's autograd says each output pixel depends on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_strategies import _unseen
from torch import nn

import streamcheck
from streamcheck.testing import assert_streaming_equivalent, check_streaming_equivalence
from streamcheck.testing._blocks import Interpolate, Pyramid, UNet
from streamcheck.testing._geometry import _needs, _node_sizes, multiscale_geometry, network_nodes
from streamcheck.testing.unets import (
    DOWNSAMPLINGS,
    UPSAMPLINGS,
    MultiScaleCase,
    pyramid_cases,
    unet_cases,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
]

# A U-Net example costs a few DAG examples: 2D gets a quarter of the profile, 1D and 3D an eighth.
QUARTER = settings(max_examples=max(8, settings.default.max_examples // 4))
EIGHTH = settings(max_examples=max(4, settings.default.max_examples // 8))

CONV_T = nn.modules.conv._ConvTransposeNd


def _tile(case: MultiScaleCase) -> tuple[int, ...]:
    return (case.tile,) * case.ndim if isinstance(case.tile, int) else case.tile


# ------------------------------------------------------------------------------ the property
def check_case(case: MultiScaleCase) -> None:
    plan = streamcheck.plan(case.module, case.image_shape, tile=case.tile)
    geometry = case.geometry
    assert tuple(shape[2:] for shape in plan.output_shapes) == geometry.output_px
    assert plan.period_px == geometry.tile_period_px
    assert plan.min_tile_px <= geometry.min_tile_px  # Rule U5 reads at least what the engine does
    if plan.n_tiles < 2:
        return  # nothing streamed: the checker would warn and compare a single tile
    assert_streaming_equivalent(case.module, case.image_shape, tile=case.tile, seed=case.seed)


@pytest.mark.property
@QUARTER
@given(unet_cases(ndim=2))
def test_unet_outputs_and_gradients_equal_plain_2d(case: MultiScaleCase) -> None:
    assert case.geometry.output_px == (case.image_shape[2:],)  # full-resolution logits
    check_case(case)


@pytest.mark.property
@EIGHTH
@given(unet_cases(ndim=1))
def test_unet_outputs_and_gradients_equal_plain_1d(case: MultiScaleCase) -> None:
    check_case(case)


@pytest.mark.property
@EIGHTH
@given(unet_cases(ndim=3))
def test_unet_outputs_and_gradients_equal_plain_3d(case: MultiScaleCase) -> None:
    check_case(case)


@pytest.mark.property
@QUARTER
@given(pyramid_cases(ndim=2))
def test_pyramid_outputs_and_gradients_equal_plain_2d(case: MultiScaleCase) -> None:
    check_case(case)


@pytest.mark.property
@EIGHTH
@given(pyramid_cases(ndim=3))
def test_pyramid_outputs_and_gradients_equal_plain_3d(case: MultiScaleCase) -> None:
    check_case(case)


# ------------------------------------------------------------------------- the strategies
def _has(predicate: Callable[[nn.Module], bool]) -> Callable[[MultiScaleCase], bool]:
    return lambda case: any(predicate(m) for m in case.module.modules())


def _upsample(kind: str) -> Callable[[nn.Module], bool]:
    def matches(m: nn.Module) -> bool:
        if kind == "transpose":
            return isinstance(m, CONV_T)
        if not isinstance(m, nn.Upsample | Interpolate):
            return False
        if kind == "nearest":
            return m.mode == "nearest"
        return m.mode != "nearest" and bool(m.align_corners) == (kind == "linear_corners")

    return matches


def _down(kind: str) -> Callable[[MultiScaleCase], bool]:
    types = {"conv": nn.modules.conv._ConvNd, "max_pool": nn.modules.pooling._MaxPoolNd}
    wanted = types.get(kind, nn.modules.pooling._AvgPoolNd)

    def matches(case: MultiScaleCase) -> bool:
        downs = case.module.downs if isinstance(case.module, UNet) else case.module.stages
        return any(isinstance(d[0], wanted) and not isinstance(d[0], CONV_T) for d in downs)

    return matches


UNET_FEATURES: dict[str, Callable[[MultiScaleCase], bool]] = {
    **{f"down: {kind}": _down(kind) for kind in DOWNSAMPLINGS},
    **{f"up: {kind}": _has(_upsample(kind)) for kind in UPSAMPLINGS},
    "depth 3": lambda c: isinstance(c.module, UNet) and len(c.module.downs) == 3,
    "factor 3": lambda c: 3 in c.geometry.period_px or 6 in c.geometry.period_px,
    "concatenated skip": lambda c: isinstance(c.module, UNet) and "cat" in c.module.merges,
    "added skip": lambda c: isinstance(c.module, UNet) and "add" in c.module.merges,
    "nn.Upsample": _has(lambda m: isinstance(m, nn.Upsample)),
    "F.interpolate": _has(lambda m: isinstance(m, Interpolate)),
    "ConvTranspose output_padding": _has(
        lambda m: isinstance(m, CONV_T) and max(m.output_padding) > 0
    ),
    "ConvTranspose dilation": _has(lambda m: isinstance(m, CONV_T) and max(m.dilation) > 1),
    "ConvTranspose groups": _has(lambda m: isinstance(m, CONV_T) and m.groups > 1),
    "ConvTranspose padding": _has(lambda m: isinstance(m, CONV_T) and max(m.padding) > 0),
    "size-fixing conv": _has(
        lambda m: isinstance(m, nn.Sequential) and len(m) == 2 and _upsample_any(m[0])
    ),
    "odd non-square image": lambda c: (
        len(set(c.image_shape[2:])) > 1 and any(n % 2 for n in c.image_shape[2:])
    ),
    "ceil-mode pool": _has(lambda m: isinstance(m, nn.MaxPool2d | nn.AvgPool2d) and m.ceil_mode),
    "reflect padding": _has(lambda m: isinstance(m, nn.Conv2d) and m.padding_mode == "reflect"),
    "batch of 2": lambda c: c.image_shape[0] == 2,
    "several tiles on both axes": lambda c: all(
        t < n for t, n in zip(_tile(c), c.image_shape[2:], strict=True)
    ),
}
PYRAMID_FEATURES: dict[str, Callable[[MultiScaleCase], bool]] = {
    **{f"returns a {s}": (lambda c, s=s: c.module.returns == s) for s in ("tuple", "list", "dict")},
    **{f"up: {kind}": _has(_upsample(kind)) for kind in UPSAMPLINGS},
    "three levels": lambda c: len(c.module.stages) == 3,
    "an output that also feeds the top-down path": lambda c: isinstance(
        c.module.smooths[-1], nn.Identity
    ),
}


def _upsample_any(m: nn.Module) -> bool:
    return isinstance(m, CONV_T | nn.Upsample | Interpolate)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@settings(max_examples=max(10, settings.default.max_examples // 4))
@given(data=st.data())
def test_every_draw_runs_with_the_computed_geometry(ndim: int, data: st.DataObject) -> None:
    strategy = data.draw(st.sampled_from([unet_cases, pyramid_cases]))
    case = data.draw(strategy(ndim=ndim))
    geometry = case.geometry
    assert geometry.valid
    with torch.no_grad():
        y = case.module.double()(torch.randn(case.image_shape, dtype=torch.float64))
    nodes, output = network_nodes(case.module)
    if isinstance(case.module, UNet):
        assert isinstance(y, torch.Tensor) and y.shape[2:] == case.image_shape[2:]
        outputs = [y]
    else:
        assert type(y).__name__ == case.module.returns
        outputs = list(y.values()) if isinstance(y, dict) else list(y)
        if isinstance(y, dict):
            assert list(y) == list(case.module.names) == list(output)
    assert [tuple(o.shape[2:]) for o in outputs] == list(geometry.output_px)
    assert all(o.isfinite().all() for o in outputs)
    # the tile is legal (Rule U5) and something is streamed (one axis at least)
    tile = _tile(case)
    assert all(t >= low for t, low in zip(tile, geometry.min_tile_px, strict=True))
    assert any(t < n for t, n in zip(tile, case.image_shape[2:], strict=True))


@settings(max_examples=max(10, settings.default.max_examples // 4))
@given(data=st.data())
def test_bounds_are_respected(data: st.DataObject) -> None:
    bounds = {
        "max_depth": data.draw(st.integers(1, 3)),
        "max_channels": data.draw(st.integers(1, 3)),
        "max_kernel": data.draw(st.integers(1, 3)),
        "factors": data.draw(st.sampled_from([(2,), (3,), (2, 3)])),
        "upsamplings": data.draw(st.sampled_from([("nearest",), ("transpose", "linear")])),
        "merges": data.draw(st.sampled_from([("cat",), ("add",)])),
    }
    case = data.draw(unet_cases(ndim=2, max_period=9, **bounds))
    net = case.module
    assert isinstance(net, UNet)
    assert 1 <= len(net.downs) <= bounds["max_depth"]
    assert set(net.merges) <= set(bounds["merges"])
    assert max(case.geometry.period_px) <= 9
    assert math.prod(case.geometry.period_px) >= 2 ** (2 * len(net.downs))
    for m in net.modules():
        if isinstance(m, nn.Upsample | Interpolate):
            assert m.scale_factor in bounds["factors"]
        if isinstance(m, CONV_T):
            assert "transpose" in bounds["upsamplings"] and m.stride[0] in bounds["factors"]
    drawn = {kind for kind in UPSAMPLINGS for m in net.modules() if _upsample(kind)(m)}
    assert drawn <= set(bounds["upsamplings"])
    for m in net.modules():  # the head's classes are not a width
        if isinstance(m, nn.Conv2d) and m is not net.head:
            assert m.out_channels <= bounds["max_channels"]


def test_unet_edge_cases_are_reachable() -> None:
    assert _unseen(unet_cases(ndim=2), UNET_FEATURES) == set()


def test_pyramid_edge_cases_are_reachable() -> None:
    assert _unseen(pyramid_cases(ndim=2), PYRAMID_FEATURES) == set()


@settings(max_examples=max(10, settings.default.max_examples // 4))
@given(data=st.data())
def test_rule_u3_contains_what_each_output_pixel_depends_on(data: st.DataObject) -> None:
    """An independent oracle for the geometry: autograd's dependencies of single output pixels
    (1-D, float64) lie inside the intervals of Rule U3, clipped to the image."""
    strategy = data.draw(st.sampled_from([unet_cases, pyramid_cases]))
    case = data.draw(strategy(ndim=1, max_batch=1))
    module = case.module.double()
    nodes, output = network_nodes(module)
    names = (
        [output]
        if isinstance(output, str)
        else list(output.values() if isinstance(output, dict) else output)
    )
    n = case.image_shape[2]
    sizes = _node_sizes(nodes, 1, (n,))
    x = torch.randn(case.image_shape, dtype=torch.float64, requires_grad=True)
    y = module(x)
    outputs = [y] if isinstance(y, torch.Tensor) else list(y.values() if isinstance(y, dict) else y)
    index = data.draw(st.integers(0, len(outputs) - 1))
    out = outputs[index]
    o = data.draw(st.integers(0, out.shape[2] - 1))
    (grad,) = torch.autograd.grad(out[:, :, o].sum(), x)
    depends = grad.abs().sum(dim=(0, 1)).nonzero().flatten().tolist()
    a, b = _needs(nodes, sizes, 1, 0, names[index], (o, o + 1))
    assert all(max(a, 0) <= i < min(b, n) for i in depends), (o, (a, b), depends)


def test_geometry_of_a_known_unet() -> None:
    """Rules U2-U5 by hand: one level of max-pool 2 and a 3-wide conv at scale 2, a 4-wide
    ConvTranspose (stride 2, padding 1) back up, an added skip."""
    net = UNet(
        stem=nn.Identity(),
        downs=[nn.MaxPool1d(2)],
        bottom=nn.Conv1d(1, 1, 3, padding=1),
        ups=[nn.ConvTranspose1d(1, 1, 4, stride=2, padding=1)],
        merges=["add"],
        decoders=[nn.Identity()],
        head=nn.Identity(),
    )
    g = multiscale_geometry(net, spatial_shape=(11,))
    # pool 11 -> 5, ConvTranspose (5 - 1)*2 - 2 + 3 + 1 = 10: the merge fails at 11 px
    assert not g.valid and g.node_px["up0"] == (10,)
    g = multiscale_geometry(net, spatial_shape=(12,))
    assert g.valid and g.output_px == ((12,),) and g.period_px == (2,)
    # output o in [4, 6): ConvTranspose reads [ceil((4 + 1 - 3)/2), floor((5 + 1)/2) + 1) = [1, 4),
    # the conv [0, 5), the pool [0, 10): 10 px (the skip reads [4, 6), inside)
    assert g.tile_period_px == (2,) and g.min_tile_px == (10,)
    x = torch.zeros(1, 1, 12)
    assert net(x).shape == x.shape


def test_pyramid_outputs_keep_their_structure() -> None:
    net = Pyramid(
        stem=nn.Identity(),
        stages=[nn.MaxPool2d(2), nn.AvgPool2d(3)],
        laterals=[nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 1)],
        ups=[nn.Upsample(scale_factor=3)],
        smooths=[nn.Identity(), nn.Identity()],
        returns="dict",
        names=["fine", "coarse"],
    )
    g = multiscale_geometry(net, spatial_shape=(18, 12))
    # 18 x 12 -> 9 x 6 -> 3 x 2; the finest output (scale 2) is the reference: a period of 3 px
    assert g.output_px == ((9, 6), (3, 2)) and g.tile_period_px == (3, 3)
    assert {k: tuple(v.shape[2:]) for k, v in net(torch.zeros(1, 1, 18, 12)).items()} == {
        "fine": (9, 6),
        "coarse": (3, 2),
    }


# ------------------------------------------------------------- the checker on several outputs
def _small_pyramid() -> Pyramid:
    torch.manual_seed(0)
    return Pyramid(
        stem=nn.Conv2d(1, 2, 3, padding=1),
        stages=[nn.Conv2d(2, 2, 3, stride=2, padding=1), nn.MaxPool2d(2)],
        laterals=[nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)],
        ups=[nn.Upsample(scale_factor=2, mode="bilinear")],
        smooths=[nn.Conv2d(2, 2, 3, padding=1), nn.Identity()],
        returns="dict",
        names=["fine", "coarse"],
    )


def test_the_checker_compares_every_output_of_a_pyramid() -> None:
    report = assert_streaming_equivalent(_small_pyramid(), (1, 1, 40, 36), tile=24)
    names = [row.name for row in report.rows if row.kind == "output"]
    assert names == ["output['fine']", "output['coarse']"] and report.n_tiles > 1


def test_the_checker_fails_an_output_the_stream_gets_wrong(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checker Rule 2b can fail: one output off by 1e-6 fails its own row only."""
    streamed_forward = streamcheck.Streamed.forward

    def off(self: streamcheck.Streamed, x: torch.Tensor, **options: object) -> object:
        out = streamed_forward(self, x, **options)
        return {**out, "coarse": out["coarse"] + 1e-6}

    monkeypatch.setattr(streamcheck.Streamed, "forward", off)
    report = check_streaming_equivalence(_small_pyramid(), (1, 1, 40, 36), tile=24)
    failed = [row.name for row in report.rows if not row.passed]
    assert failed == ["output['coarse']"]


# ------------------------------------------------------------------ docs/SEGMENTATION.md runs
def _doc_blocks() -> tuple[str, str, str]:
    """The recipe, the plan it prints and the checker snippet of docs/SEGMENTATION.md."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "SEGMENTATION.md").read_text()
    (recipe,) = re.findall(r"## The recipe\n\n```python\n(.*?)```", text, flags=re.S)
    (plan,) = re.findall(r"The printed plan of the recipe:\n\n```\n(.*?)```", text, flags=re.S)
    (check,) = re.findall(
        r"## Checking it on your own model.*?```python\n(.*?)```", text, flags=re.S
    )
    return recipe, plan, check


def test_the_segmentation_docs_run_and_show_the_plan_they_print(
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipe, shown_plan, check = _doc_blocks()
    # the plan shown is the one the recipe prints (plans cost no compute: the real sizes)
    steps = recipe.split("image = torch.randn")[0]
    namespace: dict[str, object] = {}
    exec(compile(steps, "docs/SEGMENTATION.md", "exec"), namespace)
    assert capsys.readouterr().out == shown_plan
    # the training step, on a smaller image (its sizes scaled down, nothing else)
    small = recipe.replace("1024, 768", "72, 56").replace("tile=128", "tile=40")
    assert small.count("72, 56") == 4 and "tile=40" in small
    torch.manual_seed(0)
    exec(compile(small, "docs/SEGMENTATION.md", "exec"), namespace)
    model = namespace["model"]
    assert isinstance(model, nn.Module) and all(p.grad is not None for p in model.parameters())
    assert namespace["streamed"].plan((1, 3, 72, 56)).n_tiles > 1  # type: ignore[attr-defined]
    exec(compile(check, "docs/SEGMENTATION.md", "exec"), namespace)
    report = namespace["report"]
    assert report.passed and report.n_tiles > 1  # type: ignore[attr-defined]


# --------------------------------------------------------------------- the U-Net benchmark grid
@pytest.mark.parametrize("mode", ["full", "quick"])
def test_unet_benchmark_points_pair_up_and_stream(mode: str) -> None:
    """suites/unet: every size has a conventional and a streamed point, and the streamed one
    really streams (several tiles, plans only: no compute)."""
    from suites.benchmark.workload import build_inputs
    from suites.unet.__main__ import points

    chosen = points(mode)
    keys = {(p.name.rsplit("_", 1)[0], p.input_px) for p in chosen}
    assert len(chosen) == 2 * len(keys)
    for p in chosen:
        if p.tile_px is None:
            continue
        network, image = build_inputs(
            network=p.name.rsplit("_", 1)[0],
            input_px=p.input_px,
            device="cpu",
            dtype=torch.float32,
            seed=0,
        )
        plan = streamcheck.plan(network, tuple(image.shape), tile=p.tile_px)
        assert plan.n_tiles > 1 and plan.output_shape[2:] == image.shape[2:]
