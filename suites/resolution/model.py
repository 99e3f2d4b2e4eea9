"""The network of the resolution experiment: the paper's Table 2 family, narrowed for a CPU.

Our reading of Table 2 (TUPAC16 / CAMELYON17): blocks of two 3x3 convolutions (stride 1,
padding 1, ReLU after each) and a 2x2 max-pool, channels doubling per block, then a max-pool over
the whole feature map ("2D max-pool, input size") and one fully connected layer. The paper's
channels are 32 to 512 over 7 blocks for 2048² to 8192² inputs; a CPU trains ``channels`` (by
default 4 blocks, 8 to 32) on 64² to 1024² inputs. The same network (same weights' shapes) runs at
every resolution, as in the paper's first experiment set ("the same model with various image
sizes"). As in Section 7.1: no BatchNorm and no dropout; He initialisation, then LSUV
(``streamcheck.lsuv_init``) on streamed statistics; the trunk (every conv block) is streamed, the
head (global max-pool and the linear layer) is not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class TileNormalize(nn.Module):
    """Per-channel normalisation of uint8-valued pixels, run per tile (streamcheck Rule S7).

    A module (not a lambda) so that its buffers follow ``.to(dtype)``: under Lightning's
    ``precision="64-true"`` the tiles come out float64 like the converted weights.

    >>> norm = TileNormalize(mean=[128.0, 128.0, 128.0], std=[64.0, 64.0, 64.0])
    >>> norm(torch.full((1, 3, 2, 2), 192, dtype=torch.uint8))[0, :, 0, 0].tolist()  # (192-128)/64
    [1.0, 1.0, 1.0]
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, *, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return (t.to(self.mean.dtype) - self.mean) / self.std


def trunk(channels: Sequence[int] = (8, 16, 32, 32)) -> nn.Sequential:
    """Conv pairs and 2x2 max-pools (Table 2's streamed part).

    >>> t = trunk((4, 8))
    >>> t(torch.zeros(1, 3, 64, 64)).shape      # 64 -> 32 -> 16 after two pools
    torch.Size([1, 8, 16, 16])
    """
    layers: list[nn.Module] = []
    c_in = 3
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1)]
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        c_in = c
    return nn.Sequential(*layers)


def head(channels: int) -> nn.Sequential:
    """Global max-pool and one logit (the slide holds lesions)."""
    return nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(channels, 1))


def he_init_(module: nn.Module) -> nn.Module:
    """He et al. 2015 (fan_in, ReLU gain) for every conv and linear layer; biases zero."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module
