"""Blocks with statistics over the whole feature map, and a strategy that draws them.

What reductions Rules R1-R5 stream: squeeze-excite with every reduction the engine accumulates
(mean, sum, amax, std, var, p-norm, GeM, global average and max pooling), ECA (a 1-D conv over
the pooled channels), GRN (ConvNeXt-V2's response norm), GroupNorm, InstanceNorm (affine, with
running statistics), BatchNorm in training mode (momentum or cumulative), and global-pool heads.
The blocks keep the map's shape (a head ends it), so the chain, DAG and U-Net strategies place
them where they place eval-mode layers, and their geometry helpers, which see no window in them,
stay right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

__all__ = ["REDUCTIONS", "GlobalHead", "ResponseNorm", "SqueezeExcite", "statistic_layers"]

#: The squeeze of ``SqueezeExcite``: every reduction reductions Rule R1 accumulates.
REDUCTIONS = ("mean", "sum", "amax", "std", "var", "norm3", "gem", "avg_pool", "max_pool")

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE_NORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_AVG = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
_MAX = {1: nn.AdaptiveMaxPool1d, 2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d}


class SqueezeExcite(nn.Module):
    """``x * sigmoid(fc2(relu(fc1(squeeze(x)))))`` with 1x1 convs (timm's form), or ECA's 1-D
    conv over channels (``eca=True``).

    >>> se = SqueezeExcite(4, ndim=2, squeeze="gem")
    >>> se(torch.rand(2, 4, 5, 6)).shape
    torch.Size([2, 4, 5, 6])
    """

    def __init__(self, channels: int, *, ndim: int, squeeze: str, eca: bool = False) -> None:
        super().__init__()
        self.channels, self.ndim, self.squeeze, self.eca = channels, ndim, squeeze, eca
        hidden = max(1, channels // 2)
        if eca:
            self.weight = nn.Parameter(torch.randn(1, 1, 3) / 2)
        else:
            self.fc1 = _CONV[ndim](channels, hidden, 1)
            self.fc2 = _CONV[ndim](hidden, channels, 1)
        self.pool = _AVG[ndim](1) if squeeze == "avg_pool" else _MAX[ndim](1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(2, 2 + self.ndim))
        s = self.squeeze
        if s in ("avg_pool", "max_pool"):
            m = self.pool(x)
        elif s == "mean":
            m = x.mean(dims, keepdim=True)
        elif s == "sum":
            m = x.sum(dims, keepdim=True) / 64
        elif s == "amax":
            m = x.amax(dims, keepdim=True)
        elif s == "std":
            m = x.std(dims, keepdim=True)
        elif s == "var":
            m = torch.var(x, dims, keepdim=True, correction=0)
        elif s == "norm3":
            m = x.norm(p=3, dim=dims, keepdim=True)
        else:  # gem: generalised mean pooling, p = 3
            m = x.clamp(min=1e-6).pow(3).mean(dims, keepdim=True).pow(1 / 3)
        if self.eca:
            n, c = m.shape[:2]
            attention = F.conv1d(m.reshape(n, 1, c), self.weight, padding=1)
            return x * torch.sigmoid(attention).reshape(m.shape)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(m))))


class ResponseNorm(nn.Module):
    """ConvNeXt-V2's global response normalisation, channels first (timm's GRN form).

    >>> ResponseNorm(3, ndim=1)(torch.randn(2, 3, 7)).shape
    torch.Size([2, 3, 7])
    """

    def __init__(self, channels: int, *, ndim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.channels, self.ndim, self.eps = channels, ndim, eps
        self.weight = nn.Parameter(torch.randn(channels) / 2)
        self.bias = nn.Parameter(torch.randn(channels) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * self.ndim
        g = x.norm(p=2, dim=tuple(range(2, 2 + self.ndim)), keepdim=True)
        n = g / (g.mean(dim=1, keepdim=True) + self.eps)
        return x + torch.addcmul(self.bias.view(shape), self.weight.view(shape), x * n)


class GlobalHead(nn.Module):
    """A classifier head: global average or max pooling, flatten, linear.

    >>> GlobalHead(4, ndim=3, classes=2, pool="max")(torch.randn(1, 4, 3, 3, 3)).shape
    torch.Size([1, 2])
    """

    def __init__(self, channels: int, *, ndim: int, classes: int, pool: str) -> None:
        super().__init__()
        self.pool = (_AVG if pool == "avg" else _MAX)[ndim](1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


@st.composite
def statistic_layers(draw: st.DrawFn, /, *, ndim: int, channels: int) -> nn.Module:
    """One shape-keeping layer with statistics over the whole map, in training mode, with
    random parameters (drawn under the caller's seed).

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=10, deadline=None, database=None)
    ... @given(statistic_layers(ndim=2, channels=4))
    ... def check(layer):
    ...     assert layer(torch.randn(2, 4, 5, 5)).shape == (2, 4, 5, 5)
    >>> check()
    """
    kind = draw(st.sampled_from(["se", "se", "eca", "grn", "group", "instance", "batch"]))
    if kind in ("se", "eca"):
        squeeze = draw(st.sampled_from(REDUCTIONS))
        layer: nn.Module = SqueezeExcite(channels, ndim=ndim, squeeze=squeeze, eca=kind == "eca")
    elif kind == "grn":
        layer = ResponseNorm(channels, ndim=ndim)
    elif kind == "group":
        groups = draw(st.sampled_from([g for g in range(1, channels + 1) if channels % g == 0]))
        layer = nn.GroupNorm(groups, channels, affine=draw(st.booleans()))
    elif kind == "instance":
        layer = _INSTANCE_NORM[ndim](
            channels, affine=draw(st.booleans()), track_running_stats=draw(st.booleans())
        )
    else:
        layer = _BATCH_NORM[ndim](
            channels,
            momentum=draw(st.sampled_from([0.1, 0.5, None])),
            affine=draw(st.booleans()),
            track_running_stats=draw(st.sampled_from([True, True, False])),
        )
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) / 2)
    return layer.train()
