"""The trunk zoo: every real network the suites and tests build, from one set of builders.

Rules (trunks):

T1. Random weights only (``weights=None`` / ``pretrained=False``), seed 0 before each model is
    built, so a trunk is the same in every process and nothing is downloaded.
T2. A torchvision trunk is the prefix of the model's own top-level modules (``prefix``: their
    names kept, dots as underscores), or ``features[:stop]`` / ``layers[:stop]``; a timm trunk is
    the model's own feature extractor cut at one feature (``timm_trunk``, zoo Rule Z1).
T3. Checked trunks get random norms (``randomize_norms``: a fresh BatchNorm is almost the identity,
    which would test little) and ConvNeXt's layer scale 1 (its 1e-6 init would hide the blocks
    behind the skip path): ``checked``.

>>> trunk = torchvision_trunk("resnet18", RESNET[:5])  # stem + layer1
>>> list(dict(trunk.named_children()))
['conv1', 'bn1', 'relu', 'maxpool', 'layer1']
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

RESNET = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
THREE_D = {"r3d_18", "mc3_18", "r2plus1d_18"}  # torchvision.models.video


def prefix(model: nn.Module, names: list[str]) -> nn.Module:
    """Rule T2: the model's own top-level modules ``names``, in order."""
    return nn.Sequential(OrderedDict((n.replace(".", "_"), model.get_submodule(n)) for n in names))


def torchvision_model(arch: str, **kwargs: object) -> nn.Module:
    """A whole torchvision model, random weights, seed 0 (Rule T1)."""
    import torchvision

    torch.manual_seed(0)
    where = torchvision.models.video if arch in THREE_D else torchvision.models
    model: nn.Module = getattr(where, arch)(weights=None, **kwargs)
    return model


def torchvision_trunk(arch: str, names: list[str], **kwargs: object) -> nn.Module:
    return prefix(torchvision_model(arch, **kwargs), names)


def resnet_halves(arch: str) -> tuple[nn.Module, nn.Module]:
    """(trunk, head) of a torchvision ResNet in eval mode (BatchNorm frozen: its batch statistics
    would span the whole image): the trunk conv1 to layer4 (Rule T2), the head its global pool
    and classifier; random weights from the caller's seed."""
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None).eval()
    return prefix(model, RESNET), nn.Sequential(model.avgpool, nn.Flatten(), model.fc)


def tv_features(arch: str, stop: int) -> nn.Module:
    return torchvision_model(arch).features[:stop]


def tv_layers(arch: str, stop: int) -> nn.Module:
    return torchvision_model(arch).layers[:stop]


def vgg16_features(stop: int = 10) -> nn.Module:
    """``vgg16().features[:stop]`` without building the 120M-parameter classifier (3 s)."""
    from torchvision import models

    torch.manual_seed(0)
    return models.vgg.make_layers(models.vgg.cfgs["D"])[:stop]


class Feature(nn.Module):
    """The single feature map a timm feature extractor with one ``out_index`` returns."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


def timm_trunk(name: str, *, stride: int = 8) -> nn.Module:
    """Zoo Rule Z1 for timm: the model's features cut at the deepest reduction <= ``stride``."""
    import timm

    torch.manual_seed(0)
    info = timm.create_model(name, pretrained=False, features_only=True).feature_info
    index = max(i for i, r in enumerate(info.reduction()) if r <= stride)
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, features_only=True, out_indices=(index,))
    if isinstance(net, timm.models.FeatureHookNet):  # hooks do not fire under fx: Rule Z1
        torch.manual_seed(0)
        net = timm.create_model(
            name, pretrained=False, features_only=True, out_indices=(index,), feature_cls="getter"
        )
    return Feature(net)


def randomize_norms(module: nn.Module, *, seed: int = 0) -> nn.Module:
    """Rule T3: random BatchNorm statistics and affine parameters, random LayerNorm affine ones."""
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


def checked(module: nn.Module) -> nn.Module:
    """Rule T3: random norms, ConvNeXt's layer scale 1, eval mode."""
    from torchvision.models.convnext import CNBlock

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, CNBlock):
                m.layer_scale.fill_(1.0)
    return randomize_norms(module).eval()


@dataclass(frozen=True)
class Trunk:
    """A named trunk, what it is, an input shape and a tile giving several tiles."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    tile: int


def _resnet(arch: str, up_to: str = "layer1") -> Callable[[], nn.Module]:
    return lambda: torchvision_trunk(arch, RESNET[: RESNET.index(up_to) + 1])


# The equivalence record's trunks (suites/equivalence), and more in tests/test_trunks.py. Receptive
# fields (total stride in brackets) bound the useful tile from below.
TRUNKS: tuple[Trunk, ...] = (
    # stem 11 px [4], layer1 (2 blocks of two 3x3 convs) +32 -> 43 px [4]
    Trunk("ResNet-18", "stem + layer1", _resnet("resnet18"), (1, 3, 96, 96), 64),
    # 3 blocks: +48 -> 59 px [4]
    Trunk("ResNet-34", "stem + layer1", _resnet("resnet34"), (1, 3, 96, 96), 80),
    # bottlenecks: 1x1, 3x3, 1x1 -> layer1 +24 -> 35 px [4]
    Trunk("ResNet-50", "stem + layer1 (bottlenecks)", _resnet("resnet50"), (1, 3, 96, 96), 64),
    # conv conv pool conv conv pool: 16 px [4]
    Trunk("VGG-16", "features[:10]", vgg16_features, (1, 3, 96, 96), 48),
    # depthwise convs, ReLU6(inplace), an inverted residual with skip: 19 px [4]
    Trunk("MobileNetV2", "features[:4] (depthwise, ReLU6)", lambda: tv_features("mobilenet_v2", 4), (1, 3, 96, 96), 48),
    # patchify stem, 3 CNBlocks (7x7 depthwise, LayerNorm, MLP, layer scale) + downsample: 80 px [8]
    Trunk("ConvNeXt-Tiny", "features[:3] (7x7 depthwise, LayerNorm)", lambda: tv_features("convnext_tiny", 3), (1, 3, 160, 160), 112),
)  # fmt: skip
