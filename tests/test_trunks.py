"""Streaming real torchvision trunks (random weights, no download) equals plain training.

Each trunk is checked in float64 with rtol 1e-10 by the equivalence checker: output, input
gradient and every parameter gradient. BatchNorm is in eval mode with random running statistics
and affine parameters (fresh BatchNorms are almost the identity, which would test little), and
ConvNeXt's layer scale is set to 1 (its 1e-6 init would hide the blocks behind the skip path).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from torch import nn

import streamcheck
from streamcheck.testing.checker import assert_streaming_equivalent
from suites.trunks import (
    RESNET,
    checked,
    randomize_norms,
    torchvision_trunk,
    tv_features,
    vgg16_features,
)

torchvision = pytest.importorskip("torchvision")
models = torchvision.models


def resnet_trunk(arch: str, *, up_to: str) -> nn.Module:
    """Stem + residual stages of a torchvision ResNet, keeping its module names."""
    return torchvision_trunk(arch, RESNET[: RESNET.index(up_to) + 1])


def mobilenet_v2_trunk() -> nn.Module:
    return tv_features("mobilenet_v2", 4)


def convnext_tiny_trunk(stages: int) -> nn.Module:
    return checked(tv_features("convnext_tiny", stages))


# (builder, input shape, tile): inputs small enough for a loaded 2-core CPU, tiles giving >= 4
# tiles. Receptive fields in comments (stride in brackets) bound the useful tile from below.
TRUNKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    # stem 11 px [4], layer1 (2 blocks of two 3x3 convs) +32 -> 43 px [4]
    "resnet18-layer1": (lambda: resnet_trunk("resnet18", up_to="layer1"), (1, 3, 96, 96), 64),
    # 3 blocks: +48 -> 59 px [4]
    "resnet34-layer1": (lambda: resnet_trunk("resnet34", up_to="layer1"), (1, 3, 96, 96), 80),
    # bottlenecks: 1x1, 3x3, 1x1 -> layer1 +24 -> 35 px [4]
    "resnet50-layer1": (lambda: resnet_trunk("resnet50", up_to="layer1"), (1, 3, 96, 96), 64),
    # layer2: +8 (stride-2 conv), +48 -> 99 px [8]; downsample shortcut
    "resnet18-layer2": (lambda: resnet_trunk("resnet18", up_to="layer2"), (1, 3, 192, 192), 128),
    # bottleneck layer2: +8 (stride-2 3x3), +48 -> 91 px [8]; downsample shortcut
    "resnet50-layer2": (lambda: resnet_trunk("resnet50", up_to="layer2"), (1, 3, 192, 192), 128),
    # conv conv pool conv conv pool: 16 px [4]
    "vgg16-features10": (vgg16_features, (1, 3, 96, 96), 48),
    # depthwise convs, ReLU6(inplace), an inverted residual with skip: 19 px [4]
    "mobilenet_v2-features4": (mobilenet_v2_trunk, (1, 3, 96, 96), 48),
    # fire modules (1x1 squeeze, 1x1 and 3x3 expand concatenated), ceil-mode max-pools: 39 px [4]
    "squeezenet1_1-features6": (lambda: tv_features("squeezenet1_1", 6), (1, 3, 97, 97), 56),
    # dense block: 6 x (BN, ReLU, 1x1, BN, ReLU, 3x3) concatenated, transition with avg-pool
    "densenet121-features5": (lambda: tv_features("densenet121", 5), (1, 3, 96, 96), 80),
    # patchify stem 4 px [4], 3 CNBlocks (7x7 depthwise, LayerNorm over channels, MLP,
    # layer scale, stochastic depth) +72 -> 76 px [4]
    "convnext_tiny-features2": (lambda: convnext_tiny_trunk(2), (1, 3, 160, 160), 112),
    # + downsample (LayerNorm2d, 2x2 stride-2 conv): 80 px [8]
    "convnext_tiny-features3": (lambda: convnext_tiny_trunk(3), (1, 3, 160, 160), 112),
}


@pytest.mark.parametrize("name", list(TRUNKS))
def test_trunk_streams_exactly(name: str) -> None:
    build, shape, tile = TRUNKS[name]
    trunk = randomize_norms(build()).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    report = assert_streaming_equivalent(trunk, x, tile=tile, dtype=torch.float64, rtol=1e-10)
    assert report.n_tiles >= 4, str(report)
    n_parameters = sum(1 for p in trunk.parameters() if p.requires_grad)
    assert sum(row.kind == "param_grad" for row in report.rows) == n_parameters


def test_resnet_with_a_head_streams_exactly() -> None:
    """Trunk streamed, avgpool + fc as the head: the head's gradients match too."""
    torch.manual_seed(0)
    net = randomize_norms(models.resnet18(weights=None)).eval()
    trunk = nn.Sequential(
        OrderedDict((n, getattr(net, n)) for n in ["conv1", "bn1", "relu", "maxpool", "layer1"])
    )
    head = nn.Sequential(
        net.layer2, net.layer3, net.layer4, net.avgpool, nn.Flatten(), net.fc
    )  # fmt: skip
    report = assert_streaming_equivalent(trunk, (2, 3, 96, 96), tile=64, head=head)
    assert any(row.name == "head.5.weight" for row in report.rows)


# ---------------------------------------------------------------------------------------------
# what cannot be streamed is refused, naming the module


def test_a_resnet_trunk_in_training_mode_streams_exactly_with_its_running_statistics() -> None:
    """Train-mode BatchNorm is a statistic level each (reductions Rules R1-R5): five for the
    stem's bn1 and layer1's four; the running statistics are compared as buffers."""
    trunk = resnet_trunk("resnet18", up_to="layer1").train()
    assert streamcheck.plan(trunk, (2, 3, 96, 96), tile=64).levels == 5
    assert_streaming_equivalent(trunk, (2, 3, 96, 96), tile=64)


def test_too_many_batchnorm_levels_name_the_deepest_and_the_fixes() -> None:
    trunk = mobilenet_v2_trunk().train()
    with pytest.raises(streamcheck.StreamcheckError, match=r"9 levels.*max_levels=4.*\.eval\(\)"):
        streamcheck.plan(trunk, (1, 3, 96, 96), tile=48, max_levels=4)


def test_convnext_in_training_mode_is_refused_at_stochastic_depth() -> None:
    """Stochastic depth with p > 0 draws random masks in training mode (block 1.0 has p = 0)."""
    trunk = convnext_tiny_trunk(2).train()
    with pytest.raises(streamcheck.StreamcheckError, match=r"1\.1\.stochastic_depth") as excinfo:
        streamcheck.plan(trunk, (1, 3, 96, 96), tile=64)
    assert "'1.0.stochastic_depth" not in str(excinfo.value)


def test_squeeze_and_excitation_streams_exactly_a_pass_per_block() -> None:
    """EfficientNet's squeeze-and-excitation pools over the whole image: a level per block."""
    torch.manual_seed(0)
    trunk = models.efficientnet_b0(weights=None).features[:3].eval()
    plan = streamcheck.plan(trunk, (1, 3, 96, 96), tile=48)
    assert plan.levels == 3 and plan.passes_inference == 4  # three SE blocks, then the map
    assert_streaming_equivalent(trunk, (1, 3, 96, 96), tile=48)


def test_a_whole_resnet_asks_for_a_tile_above_its_receptive_field() -> None:
    """The global pool and fc stream (no refusal there); the tile is what is too small."""
    torch.manual_seed(0)
    net = models.resnet18(weights=None).eval()
    with pytest.raises(streamcheck.StreamcheckError, match=r"use tile >= 435"):
        assert_streaming_equivalent(net, (1, 3, 96, 96), tile=64)


@pytest.mark.parametrize(
    "name", ["resnet50-layer1", "mobilenet_v2-features4", "convnext_tiny-features2"]
)
def test_trunk_float32_within_the_default_tolerance_with_margin(name: str) -> None:
    """The float32 default (8 eps sqrt(L)) holds with a 4x margin: it is not fitted to pass."""
    build, shape, tile = TRUNKS[name]
    trunk = randomize_norms(build()).eval()
    report = assert_streaming_equivalent(trunk, shape, tile=tile, dtype=torch.float32)
    assert max(row.max_rel_error for row in report.rows) <= report.rtol / 4, str(report)
