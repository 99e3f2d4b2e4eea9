"""Streaming at several resolutions (geometry Rules MS1-MS8): U-Nets, feature pyramids, HRNet-style
fusion, transposed convolutions, upsampling, shuffles, TF 'SAME' padding; several outputs.

Every check compares the streamed module against the plain one in float64 at rtol 1e-10: every
output, the input gradient and every parameter gradient, for one loss over all outputs with a
random gradient per output (or over a subset of them), at odd image sizes and tiles that are
multiples of nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

import streamcheck
from streamcheck import StreamcheckError
from streamcheck.graph import build_graph

RTOL = 1e-10


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def exact(
    module: nn.Module,
    shape: tuple[int, ...],
    tile: int | tuple[int, ...],
    *,
    used: Callable[[int], bool] = lambda j: True,
    min_tiles: int = 4,
) -> streamcheck.StreamPlan:
    """Streamed == plain (float64, rtol 1e-10) for outputs, input gradient, every parameter
    gradient; the loss uses the outputs ``j`` with ``used(j)``."""
    torch.manual_seed(0)
    module = module.double().eval()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    streamed = streamcheck.Streamed(module, tile=tile)
    plan = streamed.plan(shape)
    assert plan.n_tiles >= min_tiles, str(plan)
    plain_out = module(x)
    leaves, spec = pytree.tree_flatten(plain_out)
    upstream = [torch.randn_like(leaf) if used(j) else None for j, leaf in enumerate(leaves)]
    params = [p for p in module.parameters() if p.requires_grad]

    paths = [path for path, _ in pytree.tree_flatten_with_path(plain_out)[0]]

    def grads(out: Any) -> list[torch.Tensor]:
        flat, _ = pytree.tree_flatten(out)  # an OrderedDict comes back as a dict (fx makes it one)
        assert [p for p, _ in pytree.tree_flatten_with_path(out)[0]] == paths, "another structure"
        loss = sum(
            (leaf * g).sum() for leaf, g in zip(flat, upstream, strict=True) if g is not None
        )
        return list(torch.autograd.grad(loss, [x, *params], allow_unused=True))

    plain = grads(plain_out)
    streamed_out = streamed(x)
    for j, (a, b) in enumerate(zip(pytree.tree_leaves(streamed_out), leaves, strict=True)):
        assert a.shape == b.shape
        assert _relative(a, b) <= RTOL, f"output {j}: {_relative(a, b):.2e}"
    for name, a, b in zip(["input", *(n for n, p in module.named_parameters() if p.requires_grad)],
                          grads(streamed_out), plain, strict=True):  # fmt: skip
        if b is None:
            assert a is None or not a.any(), name
            continue
        assert a is not None, name
        assert _relative(a, b) <= RTOL, f"gradient of {name}: {_relative(a, b):.2e}"
    return plan


def boxes_partition(plan: streamcheck.StreamPlan) -> None:
    """Every output element is owned by exactly one tile (geometry Rule MS5), counted directly."""
    for j, shape in enumerate(plan.output_shapes):
        owners = torch.zeros(shape[2:], dtype=torch.int64)
        for tile in plan.tiles:
            box = tile.output_boxes[j] if tile.output_boxes else tile.output_box
            if box is not None:
                owners[tuple(slice(a, b) for a, b in box)] += 1
        assert bool((owners == 1).all()), f"output {j}: owners {owners.unique().tolist()}"


# ------------------------------------------------------------------------------- networks


class UNet(nn.Module):
    """Two levels down (stride-2 conv, max pool), two up (bilinear upsampling, then a transposed
    conv), concatenated skips, logits at full resolution. Odd sizes: the upsampled map is padded
    (or cropped) to its skip with ``F.pad`` amounts from shape reads, as milesial's Pytorch-UNet."""

    def __init__(self, channels: int = 3, classes: int = 2, *, align_corners: bool = False) -> None:
        super().__init__()
        self.enc1 = nn.Conv2d(channels, 4, 3, padding=1)
        self.down1 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.enc2 = nn.Conv2d(6, 6, 3, padding=1)
        self.down2 = nn.MaxPool2d(2)
        self.bottom = nn.Conv2d(6, 8, 3, padding=1)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=align_corners)
        self.dec2 = nn.Conv2d(14, 6, 3, padding=1)
        self.up1 = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1)
        self.dec1 = nn.Conv2d(8, 4, 3, padding=1)
        self.logits = nn.Conv2d(4, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.relu(self.enc1(x))
        x2 = F.relu(self.enc2(self.down1(x1)))
        up = self.up2(F.relu(self.bottom(self.down2(x2))))
        dy, dx = x2.size(2) - up.size(2), x2.size(3) - up.size(3)
        up = F.pad(up, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        y = F.relu(self.dec2(torch.cat([x2, up], 1)))
        y = F.relu(self.dec1(torch.cat([x1, self.up1(y)], 1)))
        return self.logits(y)


class FPN(nn.Module):
    """A three-level feature pyramid: bottom-up stride-2 convs, lateral 1x1 convs, a nearest
    top-down path (F.interpolate with scale_factor) added to the laterals; three outputs."""

    def __init__(self, *, as_dict: bool = True) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.c4 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.lat = nn.ModuleList(nn.Conv2d(c, 5, 1) for c in (4, 6, 8))
        self.smooth = nn.ModuleList(nn.Conv2d(5, 5, 3, padding=1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> Any:
        c2 = F.relu(self.stem(x))
        c3 = F.relu(self.c3(c2))
        c4 = F.relu(self.c4(c3))
        p4 = self.lat[2](c4)
        p3 = self.lat[1](c3) + F.interpolate(p4, scale_factor=2, mode="nearest")
        p2 = self.lat[0](c2) + F.interpolate(p3, scale_factor=2.0, mode="bilinear")
        outs = [s(p) for s, p in zip(self.smooth, (p2, p3, p4), strict=True)]
        return {"p2": outs[0], "p3": outs[1], "p4": outs[2]} if self.as_dict else tuple(outs)


class HRFusion(nn.Module):
    """HRNet's exchange unit: three branches at 1/1, 1/2, 1/4 of the stem; each output sums every
    branch brought to its scale (strided convs down, 1x1 conv + nearest Upsample up); returns the
    list of the three fused maps, as timm's HRNet stages do (so here the outputs are at 1/1, 1/2 and
    1/4 of the stem)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 4, padding=1)  # an odd image to a multiple of 4: 45 -> 44
        self.to2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.to4 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.branches = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
        fuse: list[list[nn.Module]] = []
        for i in range(3):
            row: list[nn.Module] = []
            for j in range(3):
                if j > i:
                    row.append(
                        nn.Sequential(nn.Conv2d(4, 4, 1), nn.Upsample(scale_factor=2 ** (j - i)))
                    )
                elif j < i:
                    row.append(
                        nn.Sequential(
                            *[nn.Conv2d(4, 4, 3, stride=2, padding=1) for _ in range(i - j)]
                        )
                    )
                else:
                    row.append(nn.Identity())
            fuse.append(row)
        self.fuse = nn.ModuleList(nn.ModuleList(r) for r in fuse)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s = F.relu(self.stem(x))
        xs = [s, self.to2(s)]
        xs.append(self.to4(xs[1]))
        xs = [F.relu(b(t)) for b, t in zip(self.branches, xs, strict=True)]
        fused = []
        for i in range(3):
            y = self.fuse[i][0](xs[0])
            for j in range(1, 3):
                y = y + self.fuse[i][j](xs[j])
            fused.append(F.relu(y))
        return fused


# ------------------------------------------------------------------------------------ done when


@pytest.mark.parametrize("align_corners", [False, True])
def test_unet_with_transposed_conv_bilinear_skips_and_full_resolution_logits(
    align_corners: bool,
) -> None:
    plan = exact(UNet(align_corners=align_corners), (1, 3, 71, 57), (45, 41))
    assert plan.output_shape == (1, 2, 71, 57)
    assert plan.output_bytes == 2 * 8 * 2 * 71 * 57  # the logits and their gradient, float64
    assert "outputs and their gradients" in str(plan)
    boxes_partition(plan)


@pytest.mark.parametrize("as_dict", [True, False])
def test_fpn_with_three_outputs(as_dict: bool) -> None:
    plan = exact(FPN(as_dict=as_dict), (1, 3, 79, 63), (39, 45))
    assert len(plan.output_shapes) == 3
    boxes_partition(plan)


def test_torchvision_feature_pyramid_network() -> None:
    """torchvision.ops.FeaturePyramidNetwork over a three-level backbone: it upsamples with
    ``F.interpolate(size=lateral.shape[-2:])``, an integer multiple here (80 x 72 px divides by 8),
    and returns an OrderedDict of three maps."""
    ops = pytest.importorskip("torchvision.ops")

    class Backbone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.b = nn.Conv2d(4, 6, 3, stride=2, padding=1)
            self.c = nn.Conv2d(6, 8, 3, stride=2, padding=1)
            self.fpn = ops.FeaturePyramidNetwork([4, 6, 8], 5)

        def forward(self, x: torch.Tensor) -> Any:
            a = F.relu(self.a(x))
            b = F.relu(self.b(a))
            c = F.relu(self.c(b))
            return self.fpn(OrderedDict([("0", a), ("1", b), ("2", c)]))

    plan = exact(Backbone(), (1, 3, 80, 72), (40, 38))
    assert len(plan.output_shapes) == 3
    boxes_partition(plan)


def test_fpn_loss_over_some_outputs_only() -> None:
    exact(FPN(), (1, 3, 79, 63), (39, 45), used=lambda j: j == 1)


def test_hrnet_style_fusion() -> None:
    plan = exact(HRFusion(), (1, 3, 45, 53), (37, 33))
    boxes_partition(plan)


def test_output_tiles_start_at_a_phase_of_the_period() -> None:
    plan = streamcheck.plan(UNet().double(), (1, 3, 71, 57), tile=(45, 41))
    assert plan.period_px == (4, 4)
    assert all(t % 4 == 0 for t in plan.output_tile_px)
    for tile in plan.tiles:
        assert all(start % 4 == 0 for start, _ in tile.output_box)


# --------------------------------------------------------------- layers, one by one (Rules MS2-MS4)


def around(ndim: int, middle: nn.Module, channels: tuple[int, int] = (2, 2)) -> nn.Module:
    """A conv before (so the input gradient passes a window) and after the layer under test."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[ndim]
    return nn.Sequential(
        conv(2, channels[0], 3, padding=1), middle, conv(channels[1], 2, 3, padding=1)
    )


def check_layer(
    ndim: int, middle: nn.Module, size: int, channels: tuple[int, int] = (2, 2)
) -> None:
    module = around(ndim, middle, channels).double()
    shape = (1, 2, *([size] * ndim))
    smallest = streamcheck.plan(module, shape, tile=size).min_tile_px
    tile = tuple(max(m + 1, size // 2 + 3) for m in smallest)  # a few tiles per axis, at least 2
    exact(module, shape, tile, min_tiles=2**ndim)


TRANSPOSED = {
    "k3 s2 p1 op1": (2, nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), 23, (2, 3)),
    "k4 s3 p2 op2": (2, nn.ConvTranspose2d(2, 2, 4, stride=3, padding=2, output_padding=2), 19, (2, 2)),
    "stride beyond the kernel": (2, nn.ConvTranspose2d(2, 2, 2, stride=3, output_padding=1), 17, (2, 2)),
    "dilated, grouped": (
        2, nn.ConvTranspose2d(4, 6, 3, stride=2, padding=3, dilation=2, groups=2, output_padding=1), 21, (4, 6)
    ),
    "1-D": (1, nn.ConvTranspose1d(2, 3, 5, stride=3, padding=2, output_padding=1), 41, (2, 3)),
    "3-D, per-axis": (
        3, nn.ConvTranspose3d(2, 2, (3, 2, 3), stride=(2, 1, 3), padding=(1, 0, 1), output_padding=(1, 0, 2)), 11, (2, 2)
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(TRANSPOSED))
def test_transposed_convolutions_are_exact(name: str) -> None:
    ndim, layer, size, channels = TRANSPOSED[name]
    check_layer(ndim, layer, size, channels)


def test_a_tile_that_owns_only_outputs_no_input_reaches() -> None:
    """ConvTranspose1d(k=2, s=3, output_padding=2) on 12 px gives 37 outputs; 35 and 36 get the
    bias alone, and with output tiles of 3 the last tile owns only output 36 (Rule MS2)."""
    module = around(1, nn.ConvTranspose1d(2, 2, 2, stride=3, output_padding=2))
    plan = exact(module, (1, 2, 12), 5)
    assert plan.tiles[-1].output_box == ((36, 37),)


class Functional(nn.Module):
    """F.conv_transpose2d with a parameter, F.interpolate with size= from shape reads (an integer
    multiple of the whole image's size) and F.pixel_shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 4, 3, 2))
        self.bias = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose2d(x, self.weight, self.bias, stride=(2, 1), padding=(1, 0))
        y = F.interpolate(
            y, size=(y.shape[2] * 2, y.shape[3] * 3), mode="bilinear", align_corners=True
        )
        return F.pixel_shuffle(y, 2)


RESAMPLE = {
    "nearest x3, 1-D": (1, nn.Upsample(scale_factor=3), 31, (2, 2)),
    "nearest-exact x3": (2, nn.Upsample(scale_factor=3, mode="nearest-exact"), 17, (2, 2)),
    "linear x2 align_corners": (1, nn.Upsample(scale_factor=2, mode="linear", align_corners=True), 33, (2, 2)),
    "bilinear x3 align_corners": (2, nn.UpsamplingBilinear2d(scale_factor=3), 15, (2, 2)),
    "bilinear (2, 3)": (2, nn.Upsample(scale_factor=(2, 3), mode="bilinear"), 15, (2, 2)),
    "trilinear x2": (3, nn.Upsample(scale_factor=2, mode="trilinear"), 9, (2, 2)),
    "nearest 3-D (1, 2, 3)": (3, nn.Upsample(scale_factor=(1, 2, 3)), 9, (2, 2)),
    "pixel shuffle": (2, nn.PixelShuffle(2), 13, (8, 2)),
    "pixel unshuffle": (2, nn.PixelUnshuffle(2), 18, (2, 8)),
    "functional": (2, Functional(), 11, (2, 1)),
    "timm DepthToSpace": (2, "DepthToSpace", 13, (8, 2)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(RESAMPLE))
def test_upsampling_and_shuffles_are_exact(name: str) -> None:
    ndim, layer, size, channels = RESAMPLE[name]
    if isinstance(layer, str):
        layer = getattr(pytest.importorskip("timm.layers"), layer)(2)
    check_layer(ndim, layer, size, channels)


# ------------------------------------------------------------------------------ refusals (RS1)


class InterpolateTo(nn.Module):
    """Upsample the coarse map to the skip's size (torchvision's FPN does this)."""

    def __init__(self, **call: Any) -> None:
        super().__init__()
        self.down = nn.Conv2d(2, 2, 3, stride=2, padding=1)
        self.call = call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.interpolate(self.down(x), size=x.shape[-2:], **self.call)


class Merge(nn.Module):
    """Adds a stride-2 map to a map of the same size at scale 1 (a valid 9-tap conv on 16 px)."""

    def __init__(self) -> None:
        super().__init__()
        self.valid = nn.Conv2d(2, 2, 9)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.valid(x) + self.pool(x)


REFUSED = {
    "non-integer scale factor": (
        nn.Upsample(scale_factor=1.5), (1, 2, 16, 16), ["'1'", "not by an integer factor"]
    ),
    "downsampling by interpolation": (
        nn.Upsample(scale_factor=0.5, mode="bilinear"), (1, 2, 16, 16), ["'1'", "integer factor"]
    ),
    "size= that is no integer multiple": (
        InterpolateTo(mode="nearest"), (1, 2, 17, 17), ["interpolate", "9 px to 17 px"]
    ),
    "antialias": (
        InterpolateTo(mode="bilinear", antialias=True), (1, 2, 16, 16), ["interpolate", "antialias"]
    ),
    "bicubic": (nn.Upsample(scale_factor=2, mode="bicubic"), (1, 2, 16, 16), ["'1'", "'bicubic'"]),
    "area": (InterpolateTo(mode="area"), (1, 2, 16, 16), ["interpolate", "'area'"]),
    "different scales merged": (Merge(), (1, 2, 16, 16), ["add", "different scales", "1/2"]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_rescaling_is_refused_by_path_before_any_work(name: str) -> None:
    layer, shape, fragments = REFUSED[name]
    module = layer if isinstance(layer, (InterpolateTo, Merge)) else around(2, layer)
    with pytest.raises(StreamcheckError) as error:
        streamcheck.plan(module.double(), shape, tile=12)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


def test_an_output_finer_than_the_input_streams() -> None:
    plan = exact(nn.Upsample(scale_factor=2, mode="bilinear"), (1, 2, 15, 13), 6)
    assert plan.total_stride == (Fraction(1, 2), Fraction(1, 2))


def test_outputs_coarser_by_no_integer_factor_are_refused() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 2, 2, stride=2), nn.Conv2d(2, 2, 3, stride=3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.a(x), self.b(x)

    with pytest.raises(StreamcheckError, match="integer factor coarser"):
        streamcheck.plan(Two(), (1, 2, 18, 18), tile=12)


def test_mask_and_computed_region_say_they_are_single_output_only() -> None:
    streamed = streamcheck.Streamed(FPN().double(), tile=40)
    x = torch.zeros(1, 3, 79, 63, dtype=torch.float64)
    with pytest.raises(StreamcheckError, match="mask"):
        streamed(x, mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(StreamcheckError, match="computed_region"):
        streamed.computed_region(x, mask=torch.ones(4, 4, dtype=torch.bool))


# ----------------------------------------------------- timm: TF 'SAME' padding, SpaceToDepth (MS8)


def test_timm_same_padding_is_computed_from_the_whole_image() -> None:
    layers = pytest.importorskip("timm.layers")
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
    from timm.layers.std_conv import ScaledStdConv2dSame

    torch.manual_seed(0)
    module = nn.Sequential(
        layers.Conv2dSame(2, 3, 3, stride=2),  # pads 0/1 or 1/1 depending on the image's parity
        nn.ReLU(),
        MaxPool2dSame(3, stride=2),
        AvgPool2dSame(2, stride=1),
        ScaledStdConv2dSame(3, 4, 3, stride=2),
        layers.Conv2dSame(4, 2, 4, dilation=2),
    )
    for shape in ((1, 2, 97, 90), (1, 2, 100, 91)):
        probe = streamcheck.plan(module.double(), shape, tile=shape[2:])
        assert probe.graph is not None
        pads = [n.layer for n in probe.graph.nodes if getattr(n.layer, "kind", "") == "pad"]
        assert len(pads) == 5 and any(p.pad_left != p.pad_right for p in pads)
        exact(
            module,
            shape,
            tuple(
                f + 2 * s + 1
                for f, s in zip(probe.receptive_field_px, probe.total_stride, strict=True)
            ),
        )


def test_timm_space_to_depth_is_a_window_of_its_block() -> None:
    layers = pytest.importorskip("timm.layers")
    module = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), layers.SpaceToDepth(4), nn.Conv2d(48, 2, 3)
    )
    plan = exact(module, (1, 2, 92, 76), (35, 29))
    assert plan.total_stride == (4, 4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tf_efficientnet_b0", "tresnet_m"])
def test_zoo_gaps_are_now_traced_to_their_squeeze_excite_statistics(name: str) -> None:
    """These trunks used to fail tracing (SAME padding, SpaceToDepth), then stopped at their
    squeeze-excite blocks (a global mean); now each block is a statistic level (reductions
    Rule R1) and the plan counts them."""
    from suites.trunks import timm_trunk

    graph = build_graph(timm_trunk(name).eval(), (1, 3, 256, 256), dtype=torch.float32)
    assert graph.levels >= 2, name


@pytest.mark.slow
def test_timm_hrnet_w18_small_trunk_streams_exactly() -> None:
    """The zoo's trunk of timm's hrnet_w18_small (its features to stride 8, suites.zoo Rule Z1):
    every branch of stages 2-4 (down to 1/32) fused by nearest upsampling, exact in float64. HRNet
    itself needs sizes that divide by 32; its receptive field (~550 px) is most of the image."""
    pytest.importorskip("timm")
    from streamcheck.testing.checker import assert_streaming_equivalent
    from suites.trunks import randomize_norms, timm_trunk

    trunk = randomize_norms(timm_trunk("hrnet_w18_small")).eval().double()
    report = assert_streaming_equivalent(trunk, (1, 3, 640, 608), tile=(620, 600), rtol=RTOL)
    assert report.n_tiles >= 4, str(report)
    n_parameters = sum(1 for p in trunk.parameters() if p.requires_grad)
    assert sum(row.kind == "param_grad" for row in report.rows) == n_parameters
