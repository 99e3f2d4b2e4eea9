"""Operations inside real architectures, each on a small hand-built module: streamed exactly
(float64, rtol 1e-10: output, input gradient, every parameter gradient) or refused by path.

Each module below does one thing the engine must *understand* (graph Rules G7-G9, locality Rules
L2-L3): a norm/act subclass with its own ``forward``, shape reads, channel splits and indexing,
tensors computed only from parameters, functional window ops, channel-only reshapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import streamcheck
from streamcheck import StreamcheckError
from streamcheck.testing.checker import assert_streaming_equivalent

RTOL = 1e-10


def exact(module: nn.Module, shape: tuple[int, ...], tile: int | tuple[int, ...]) -> None:
    torch.manual_seed(0)
    report = assert_streaming_equivalent(module.eval(), shape, tile=tile, rtol=RTOL)
    assert report.n_tiles >= 4, str(report)
    n_params = sum(1 for p in module.parameters() if p.requires_grad)
    assert sum(row.kind == "param_grad" for row in report.rows) == n_params


def refused(module: nn.Module, shape: tuple[int, ...], *fragments: str) -> str:
    with pytest.raises(StreamcheckError) as error:
        streamcheck.plan(module.eval(), shape, tile=16)
    for fragment in fragments:
        assert fragment in str(error.value)
    return str(error.value)


def randomized(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return bn


# ---------------------------------------------------------------- norm/act subclasses (Rule G7)


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d, reduced: asserts on the rank and channels, eval-mode F.batch_norm."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        torch._assert(x.shape[1] == self.num_features, "channels")
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            self.training,
            0.0 if self.momentum is None else self.momentum,
            self.eps,
        )
        return self.act(x)


def conv_bn_act() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), randomized(BatchNormAct(4)), nn.Conv2d(4, 4, 3, padding=1)
    )


def test_a_batchnorm_subclass_with_its_own_forward_is_exact() -> None:
    exact(conv_bn_act(), (2, 3, 30, 30), 14)


def test_a_batchnorm_subclass_in_training_mode_is_exact() -> None:
    """Its F.batch_norm(training=True) becomes a statistic (reductions Rule R4)."""
    exact(conv_bn_act().train(), (2, 3, 30, 30), 14)


def test_timm_batchnorm_act_is_exact() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        randomized(timm_layers.BatchNormAct2d(4, act_layer=nn.ReLU)),
        nn.Conv2d(4, 4, 3),
    )
    exact(module, (1, 3, 30, 30), 14)


# ---------------------------------------------------------------- shape reads (Rule G7)


class ShapeReads(nn.Module):
    """Reads batch, channel and rank (the same on every tile) and the spatial sizes only to
    reshape back."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.size(0), x.shape[1]
        h, w = x.shape[-2:]
        y = x.reshape(n, 2, c // 2, h, w).sum(2)  # sums channel groups
        y = y.repeat(1, x.ndim // 2, 1, 1)
        return self.conv(y.view(n, -1, h, w)) * x.dim()


def test_shape_reads_that_do_not_depend_on_the_spatial_size_are_constants() -> None:
    exact(ShapeReads(), (2, 4, 27, 31), 12)


class SpatialSizeRead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * y.shape[-1]  # differs per tile


def test_a_spatial_size_read_is_an_error_that_names_the_line() -> None:
    message = refused(SpatialSizeRead(), (1, 3, 32, 32), "spatial size", "Fix:")
    assert "test_ops.py" in message and "y * y.shape[-1]" in message


class SpatialSizeTensor(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(x.shape[-1], dtype=x.dtype)


def test_a_tensor_built_from_the_spatial_size_is_refused() -> None:
    refused(SpatialSizeTensor(), (1, 3, 32, 32), "spatial size")


# ---------------------------------------------------------------- branches on shapes (Rule G17)


class ShapeBranch(nn.Module):
    """timm's VGG head (ConvMlp), reduced: a Python ``if`` on the spatial size picks the layers;
    both branches keep the shape, so only the values tell them apart."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.wide = nn.Conv2d(4, 4, 5, padding=2)
        self.narrow = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        if y.shape[-2] >= 40 and y.shape[1] == 4:
            return self.wide(y)
        return self.narrow(y) * 2


def test_a_branch_on_the_spatial_size_is_the_whole_images_branch() -> None:
    exact(ShapeBranch(), (1, 3, 48, 40), 20)  # the wide branch
    exact(ShapeBranch(), (1, 3, 32, 40), 12)  # the narrow one


def test_a_branch_is_decided_per_input_shape_and_never_reused_for_another() -> None:
    torch.manual_seed(0)
    net = ShapeBranch().double().eval()
    streamed = streamcheck.Streamed(net, tile=16)
    for rows, taken in ((48, "wide"), (32, "narrow"), (48, "wide")):
        x = torch.randn(1, 3, rows, 40, dtype=torch.float64)
        with torch.no_grad():
            plain, out = net(x), streamed(x)
        assert torch.allclose(out, plain, rtol=RTOL, atol=0), rows
        paths = {node.path for node in streamed.plan(x.shape).graph.nodes}
        assert taken in paths and ({"wide", "narrow"} - {taken}).isdisjoint(paths), paths


class ValueGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x  # the branch depends on the values


class ValueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = ValueGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv(x))


def test_a_branch_on_tensor_values_is_refused_by_the_module_it_is_in() -> None:
    refused(ValueBranch(), (1, 3, 32, 32), "cannot trace", "'gate' branches on a tensor's values")


# ---------------------------------------------------------------- channel split, chunk, index (G9)


class Split(nn.Module):
    """res2net / CSP / mixnet / ghostnet: split channels, process the pieces, concatenate."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 5, padding=2)
        self.c = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a, b = torch.split(x, [2, 4], dim=1)
        y = torch.cat([self.a(a), self.b(b)], 1)
        p, q = y.chunk(2, 1)
        z = torch.cat(
            [self.c(p) + q, y[:, 1:4], x[:, -1:, ...], y[:, None, 0], y[:, 2].unsqueeze(1)], 1
        )
        return z[:, : z.shape[1] - 1]


def test_channel_split_chunk_and_indexing_are_exact() -> None:
    exact(Split(), (2, 3, 29, 33), 14)


class SpatialIndex(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 1:]


class SpatialSplit(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.chunk(2, dim=3)[0]


def test_indexing_or_splitting_a_spatial_axis_is_refused() -> None:
    refused(SpatialIndex(), (1, 3, 32, 32), "slices spatial dimension 2")
    refused(SpatialSplit(), (1, 3, 32, 32), "mixes or indexes", "[3]")


# ---------------------------------------------------------------- constants from parameters (G4)


class StandardizedConv(nn.Conv2d):
    """timm's ScaledStdConv2d: the weight is standardised in ``forward`` with F.batch_norm."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__(cin, cout, k, padding=k // 2)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)
        self.scale = (cin * k * k) ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=(self.gain * self.scale).view(-1),
            training=True,
            momentum=0.0,
            eps=1e-6,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = StandardizedConv(3, 4, 3)
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] + self.conv(x) * self.gamma.reshape(1, -1, 1, 1)


def test_tensors_computed_only_from_parameters_are_exact() -> None:
    exact(nn.Sequential(LayerScale(), StandardizedConv(4, 2, 5)), (2, 3, 30, 30), 16)


# ---------------------------------------------------------------- functional window ops (L2)


class Blur(nn.Module):
    """timm's BlurPool2d: reflect padding, then a fixed binomial filter (a buffer) per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        filt = (taps[:, None] * taps[None, :]) / 16
        self.register_buffer("filt", filt[None, None].repeat(channels, 1, 1, 1), persistent=False)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(x, self.filt, stride=2, groups=self.channels)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.blur = Blur(4)
        self.weight = nn.Parameter(torch.randn(4, 2, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.pad(x, (0, 1, 2, 1)))  # asymmetric zero padding
        x = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=-1.5), kernel_size=2, stride=1)
        x = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) + F.max_pool2d(x, 3, 1, 1)
        x = self.blur(x)
        x = F.avg_pool2d(F.pad(x, (1, 2, 2, 1), mode="replicate"), 2, ceil_mode=True)
        x = F.pad(x, (-1, 0, 0, -1))  # negative padding crops
        return F.conv2d(x, self.weight, None, 1, "same", 1, 2)


def test_functional_window_ops_are_exact() -> None:
    exact(Functional(), (2, 3, 61, 57), 40)


def test_a_conv_whose_weight_comes_from_the_image_is_refused() -> None:
    class ImageWeight(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, x[:1, :, :3, :3].expand(3, 3, 3, 3))

    refused(ImageWeight(), (1, 3, 32, 32))


def test_circular_pad_and_channel_pad_are_refused() -> None:
    class Circular(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.pad(x, (1, 1, 1, 1), mode="circular")

    class ChannelPad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.pad(x, (0, 0, 0, 0, 1, 1))

    refused(Circular(), (1, 3, 32, 32), "'circular' mode")
    refused(ChannelPad(), (1, 3, 32, 32), "pads dimensions that hold no spatial axis")


# ---------------------------------------------------------------- channel-only reshapes (G8)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's shufflenetv2.channel_shuffle, as written there."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1, groups=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = channel_shuffle(self.a(x), 2)
        y = self.b(x).unflatten(1, (3, 2)).permute(0, 2, 1, 3, 4).flatten(1, 2)
        return channel_shuffle(y, 3)


def test_channel_shuffle_is_exact() -> None:
    exact(Shuffle(), (2, 3, 28, 30), 12)


def test_torchvision_channel_shuffle_function_is_exact() -> None:
    tv = pytest.importorskip("torchvision.models.shufflenetv2")

    class TV(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return tv.channel_shuffle(self.conv(x), 4)

    exact(TV(), (1, 3, 28, 28), 12)


def test_a_reshape_that_merges_spatial_axes_is_refused() -> None:
    class Merge(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, c, h, w = x.shape
            return x.view(n, c, h * w).view(n, c, h, w)

    refused(Merge(), (1, 3, 8, 8), ".view() reshapes spatial axes")


class Stacked(nn.Module):
    """torch.stack inserts a dimension: the spatial axes move one dimension on (Rule G3)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 5, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = torch.stack([self.a(x), self.b(x)], dim=1)  # (N, 2, C, H, W)
        return paths.softmax(dim=1).sum(1) + paths.amax(2).sum(1, keepdim=True)


def test_stack_moves_the_spatial_axes_and_is_exact() -> None:
    exact(Stacked(), (2, 3, 30, 30), 14)


def test_an_op_over_a_spatial_axis_after_a_stack_is_refused() -> None:
    class LastAxis(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x, x], dim=1).softmax(dim=-1)[:, 0]

    refused(LastAxis(), (1, 3, 32, 32), "mixes or indexes", "[4]")
