"""The blocks the strategies build networks from: joins (``graphs``) and scales (``unets``).

Module-level classes, so they pickle and torch.fx traces through them; the geometry oracle
(``_geometry.py``) reads their structure.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Branches",
    "ChannelMix",
    "FrozenBatchNorm",
    "Interpolate",
    "Pyramid",
    "Residual",
    "SharedTwice",
    "UNet",
]

OUTPUT_STRUCTURES = ("tuple", "list", "dict")  # what a Pyramid returns


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics whose ``forward`` reads its buffers (torchvision's
    ``FrozenBatchNorm2d`` for any number of spatial axes): the scale is computed from
    ``running_var`` on every call, so a buffer that is baked in instead of re-read goes stale.

    >>> norm = FrozenBatchNorm(3, ndim=2)
    >>> norm(torch.ones(1, 3, 2, 2)).shape
    torch.Size([1, 3, 2, 2])
    """

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, channels: int, *, ndim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.ndim = ndim
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0)):
            self.register_buffer(name, torch.full((channels,), value))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * self.ndim
        scale = self.weight.reshape(shape) * (self.running_var.reshape(shape) + self.eps).rsqrt()
        shift = self.bias.reshape(shape) - self.running_mean.reshape(shape) * scale
        return x * scale + shift


class Residual(nn.Module):
    """``x + body(x)`` or ``x * body(x)``; ``body`` keeps the shape."""

    def __init__(self, body: nn.Module, *, merge: str = "add") -> None:
        super().__init__()
        self.body = body
        self.merge = merge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.merge == "add" else x * y

    def extra_repr(self) -> str:
        return f"merge={self.merge!r}"


class Branches(nn.Module):
    """Branches from one input that rejoin: summed, multiplied, or concatenated along channels."""

    def __init__(self, *branches: nn.Module, merge: str = "cat") -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.merge = merge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [branch(x) for branch in self.branches]
        if self.merge == "cat":
            return torch.cat(outputs, dim=1)
        return functools.reduce(operator.add if self.merge == "add" else operator.mul, outputs)

    def extra_repr(self) -> str:
        return f"merge={self.merge!r}"


class SharedTwice(nn.Module):
    """One layer applied twice (its gradient sums both uses), with an activation between."""

    def __init__(self, layer: nn.Module, activation: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.activation(self.layer(x)))


class ChannelMix(nn.Module):
    """Channels moved last, a LayerNorm or Linear over them, and moved back (ConvNeXt's pattern)."""

    def __init__(self, inner: nn.Module, *, ndim: int) -> None:
        super().__init__()
        self.inner = inner
        self.ndim = ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = (0, *range(2, 2 + self.ndim), 1)
        back = (0, 1 + self.ndim, *range(1, 1 + self.ndim))
        return self.inner(x.permute(*last)).permute(*back)


class Interpolate(nn.Module):
    """``F.interpolate(x, scale_factor=...)`` as a module: the functional spelling of
    ``nn.Upsample``, so both reach the engine.

    >>> Interpolate(2, mode="nearest")(torch.ones(1, 1, 3)).shape  # 6 = 3 * 2
    torch.Size([1, 1, 6])
    """

    def __init__(self, scale_factor: int, *, mode: str, align_corners: bool | None = None) -> None:
        super().__init__()
        self.scale_factor = scale_factor
        self.mode = mode
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(
            x, scale_factor=self.scale_factor, mode=self.mode, align_corners=self.align_corners
        )

    def extra_repr(self) -> str:
        return f"scale_factor={self.scale_factor}, mode={self.mode!r}, align_corners={self.align_corners}"


class UNet(nn.Module):
    """An encoder-decoder with skip connections: ``stem``; per level, the map is kept as a skip and
    ``downs[i]`` takes it down; ``bottom``; per level from the deepest, ``ups[j]`` takes the map up
    to its skip's scale and size, merges it with the skip (``"cat"``: ``torch.cat([skip, x])``,
    ``"add"``: ``skip + x``) and ``decoders[j]`` follows; ``head`` gives the logits.

    >>> net = UNet(stem=nn.Conv2d(1, 2, 3, padding=1), downs=[nn.MaxPool2d(2)],
    ...            bottom=nn.Conv2d(2, 2, 1), ups=[nn.Upsample(scale_factor=2)], merges=["cat"],
    ...            decoders=[nn.Conv2d(4, 2, 3, padding=1)], head=nn.Conv2d(2, 3, 1))
    >>> net(torch.ones(1, 1, 10, 6)).shape  # full-resolution logits, 3 classes
    torch.Size([1, 3, 10, 6])
    """

    def __init__(
        self,
        *,
        stem: nn.Module,
        downs: Sequence[nn.Module],
        bottom: nn.Module,
        ups: Sequence[nn.Module],
        merges: Sequence[str],
        decoders: Sequence[nn.Module],
        head: nn.Module,
    ) -> None:
        super().__init__()
        if not len(downs) == len(ups) == len(merges) == len(decoders):
            raise ValueError("a UNet needs as many ups, merges and decoders as downs")
        self.stem = stem
        self.downs = nn.ModuleList(downs)
        self.bottom = bottom
        self.ups = nn.ModuleList(ups)
        self.merges = tuple(merges)
        self.decoders = nn.ModuleList(decoders)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for down in self.downs:
            skips.append(x)
            x = down(x)
        x = self.bottom(x)
        for up, merge, decode, skip in zip(
            self.ups, self.merges, self.decoders, reversed(skips), strict=True
        ):
            x = up(x)
            x = torch.cat([skip, x], dim=1) if merge == "cat" else skip + x
            x = decode(x)
        return self.head(x)

    def extra_repr(self) -> str:
        return f"merges={self.merges}"


class Pyramid(nn.Module):
    """A feature pyramid (FPN): ``stem`` and backbone ``stages`` (each one scale down); a lateral
    1x1 conv per stage; top-down, each level is its lateral plus ``ups[i]`` of the level above;
    ``smooths[i]`` gives output ``i``. Returned as a ``"tuple"``, ``"list"`` or ``"dict"`` (keys
    ``names``), finest first.

    >>> net = Pyramid(stem=nn.Identity(), stages=[nn.MaxPool2d(2), nn.MaxPool2d(2)],
    ...               laterals=[nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 1)],
    ...               ups=[nn.Upsample(scale_factor=2)], smooths=[nn.Identity(), nn.Identity()],
    ...               returns="dict", names=["p1", "p2"])
    >>> {k: tuple(v.shape) for k, v in net(torch.ones(1, 1, 8, 12)).items()}  # scales 1/2, 1/4
    {'p1': (1, 2, 4, 6), 'p2': (1, 2, 2, 3)}
    """

    def __init__(
        self,
        *,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        laterals: Sequence[nn.Module],
        ups: Sequence[nn.Module],
        smooths: Sequence[nn.Module],
        returns: str,
        names: Sequence[str],
    ) -> None:
        super().__init__()
        if not len(stages) == len(laterals) == len(smooths) == len(ups) + 1 == len(names):
            raise ValueError("a Pyramid needs one lateral, smooth and name per stage, one up less")
        if returns not in OUTPUT_STRUCTURES:
            raise ValueError(f"returns must be one of {OUTPUT_STRUCTURES}, got {returns!r}")
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.laterals = nn.ModuleList(laterals)
        self.ups = nn.ModuleList(ups)
        self.smooths = nn.ModuleList(smooths)
        self.returns = returns
        self.names = tuple(names)

    def forward(self, x: torch.Tensor) -> Any:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        top = self.laterals[-1](features[-1])
        outputs = [self.smooths[-1](top)]
        for i in range(len(features) - 2, -1, -1):
            top = self.laterals[i](features[i]) + self.ups[i](top)
            outputs.insert(0, self.smooths[i](top))
        if self.returns == "tuple":
            return tuple(outputs)
        if self.returns == "list":
            return outputs
        return dict(zip(self.names, outputs, strict=True))

    def extra_repr(self) -> str:
        return f"returns={self.returns!r}, names={self.names}"
