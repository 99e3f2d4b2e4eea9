"""A tiny user package for the ``streamcheck`` command line.

From the repository root::

    streamcheck plan   examples.my_models:trunk --input 1x3x96x96 --tile 48
    streamcheck verify examples.my_models:trunk --input 1x3x96x96 --tile 48 \
        --head examples.my_models:head

Each factory takes no arguments and returns an ``nn.Module``.
"""

from __future__ import annotations

import torch
from torch import nn


def trunk() -> nn.Module:
    """The part to stream: convs and max-pools (96 px in -> 24 px out, 32 channels)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
    )


def head() -> nn.Module:
    """What follows the trunk, not streamed: global max-pool and a linear classifier."""
    torch.manual_seed(1)
    return nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def paper_fig2() -> nn.Module:
    """The network of the paper's Figs 2-3: three 3x3 convs with 3, 64 and 3 output channels."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 3, 3),
        nn.ReLU(),
        nn.Conv2d(3, 64, 3),
        nn.ReLU(),
        nn.Conv2d(64, 3, 3),
    )


def batchnorm_in_training() -> nn.Module:
    """Streams in two passes: BatchNorm in training mode normalises with statistics over the
    whole image, which a first pass accumulates (NOTE [ Global statistics ])."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())


class RowGate(nn.Module):
    """Gates each row by its mean over the row: a statistic over one spatial axis only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.mean(-1, keepdim=True).sigmoid()


def row_gate() -> nn.Module:
    """Cannot be streamed: a mean over one spatial axis is neither local nor a whole-map
    statistic."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), RowGate(), nn.ReLU())


def not_a_module() -> str:
    """A factory that returns the wrong thing (for the command's error message)."""
    return "not a module"
