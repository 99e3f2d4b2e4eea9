"""Real torchvision trunks (random weights, eval mode, small inputs) for the equivalence record.

The same trunks as ``tests/test_trunks.py`` (suites do not import tests, so the builders are
repeated here): BatchNorm gets random running statistics and affine parameters (a fresh BatchNorm
is almost the identity, which would test little) and ConvNeXt's layer scale is set to 1 (its 1e-6
init would hide the blocks behind the skip path).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Trunk:
    """A named trunk, what it is, an input shape and a tile giving several tiles."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    tile: int


def randomize_norms(module: nn.Module, *, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, random LayerNorm affine parameters."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(like: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(like.shape, generator=generator)

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=generator))
                m.running_var.copy_(uniform(m.running_var, 0.5, 2.0))
            if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.LayerNorm):
                m.weight.copy_(uniform(m.weight, 0.5, 1.5))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=generator))
    return module


def _resnet(arch: str) -> nn.Module:
    from torchvision import models

    torch.manual_seed(0)
    net = getattr(models, arch)(weights=None)
    names = ["conv1", "bn1", "relu", "maxpool", "layer1"]
    return nn.Sequential(OrderedDict((name, getattr(net, name)) for name in names))


def _vgg16() -> nn.Module:
    from torchvision import models

    torch.manual_seed(0)  # features only: the 120M-parameter classifier is never built
    return models.vgg.make_layers(models.vgg.cfgs["D"])[:10]


def _mobilenet_v2() -> nn.Module:
    from torchvision import models

    torch.manual_seed(0)
    return models.mobilenet_v2(weights=None).features[:4]


def _convnext_tiny() -> nn.Module:
    from torchvision import models

    torch.manual_seed(0)
    trunk = models.convnext_tiny(weights=None).features[:3]
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, models.convnext.CNBlock):
                m.layer_scale.fill_(1.0)
    return trunk


TRUNKS: tuple[Trunk, ...] = (
    Trunk("ResNet-18", "stem + layer1", lambda: _resnet("resnet18"), (1, 3, 96, 96), 64),
    Trunk("ResNet-34", "stem + layer1", lambda: _resnet("resnet34"), (1, 3, 96, 96), 80),
    Trunk("ResNet-50", "stem + layer1 (bottlenecks)", lambda: _resnet("resnet50"), (1, 3, 96, 96), 64),
    Trunk("VGG-16", "features[:10]", _vgg16, (1, 3, 96, 96), 48),
    Trunk("MobileNetV2", "features[:4] (depthwise, ReLU6)", _mobilenet_v2, (1, 3, 96, 96), 48),
    Trunk("ConvNeXt-Tiny", "features[:3] (7x7 depthwise, LayerNorm)", _convnext_tiny, (1, 3, 160, 160), 112),
)  # fmt: skip


def build(trunk: Trunk) -> nn.Module:
    """The trunk with random norms, in eval mode (what the record checks)."""
    return randomize_norms(trunk.build()).eval()
