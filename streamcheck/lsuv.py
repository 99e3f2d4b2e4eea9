"""LSUV initialisation from streamed statistics (the paper's Section 7.1).

NOTE [ Streamed statistics ]
Rule L1. A layer's per-channel mean and variance are accumulated tile by tile over every image of
         every mini-batch: each tile contributes the output pixels it owns (geometry Rule 7), so
         every output pixel is counted exactly once, and no feature map larger than one tile is
         ever held. The feature map is never stitched.
Rule L2. Accumulation is in float64 with the pairwise (Chan et al.) update of count, mean and sum
         of squared deviations; it equals E[X²] - μ² in exact arithmetic but does not cancel when
         the mean is large against the spread.
Rule L3. LSUV (Mishkin & Matas 2016) per output channel, as the paper applied it: layer by layer,
         from the input side, each convolution's weight and bias of channel c are multiplied by
         sqrt(target_var / var_c), measured on the conv's output (before its activation) with all
         earlier layers already rescaled. The conv's input does not depend on its own weights, so
         one pass makes its output variance target_var exactly (up to rounding); no iteration.
         Channels with zero variance (dead on these images) are left alone and reported.
Rule L4. Only convolutions that are items of the (possibly nested) ``nn.Sequential`` are rescaled,
         since the statistics of a layer are those of the Sequential's prefix ending at it. A
         convolution hidden inside another block is an error, not silently skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import StreamcheckError
from .program import run_tile
from .streaming import Streamed

__all__ = ["ChannelStatistics", "LSUVLayer", "channel_statistics", "lsuv_init"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class ChannelStatistics:
    """Per-channel statistics of a module's output: ``count`` values per channel, float64."""

    count: int
    mean: torch.Tensor
    var: torch.Tensor  # population variance (divided by count)


@dataclass(frozen=True)
class LSUVLayer:
    """What ``lsuv_init`` did to one convolution: the statistics it measured and the scale applied."""

    path: str  # the conv's name in ``named_modules()`` of the module given
    before: ChannelStatistics
    scale: torch.Tensor  # float64, per output channel; 1 for dead channels
    dead_channels: tuple[int, ...]


class _Accumulator:
    """Rule L2: count, mean and M2 per channel, merged pairwise in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, y: torch.Tensor, channel_dim: int) -> None:
        y = y.detach().to(torch.float64).movedim(channel_dim, 0).flatten(1)
        n = y.shape[1]
        if n == 0:
            return
        mean = y.mean(dim=1)
        m2 = (y - mean[:, None]).square().sum(dim=1)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def result(self) -> ChannelStatistics:
        if self.mean is None or self.m2 is None:
            raise StreamcheckError("streamcheck: no images were given; pass at least one batch")
        return ChannelStatistics(self.count, self.mean.cpu(), (self.m2 / self.count).cpu())


def _images(batches: Iterable[Any]) -> Iterable[torch.Tensor]:
    """The image tensor of every batch: a tensor, or the first item of a tuple/list/dict batch."""
    for batch in batches:
        x = batch
        if isinstance(batch, (tuple, list)) and batch:
            x = batch[0]
        elif isinstance(batch, dict) and batch:
            x = next(iter(batch.values()))
        if not isinstance(x, torch.Tensor):
            raise StreamcheckError(
                f"streamcheck: a batch is a {type(batch).__name__}, not an image tensor (N, C, "
                "*spatial) or a tuple whose first item is one. Fix: pass batches of images"
            )
        yield x


def _index(box: Sequence[tuple[int, int]], layout: Sequence[int], ndim: int) -> tuple[Any, ...]:
    index: list[Any] = [slice(None)] * ndim
    for dim, (start, stop) in zip(layout, box, strict=True):
        index[dim] = slice(start, stop)
    return tuple(index)


def channel_statistics(
    module: nn.Module,
    batches: Iterable[Any],
    *,
    tile: int | Sequence[int],
    tile_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ChannelStatistics:
    """Per-channel mean and variance of ``module``'s output over all images, tile by tile (L1, L2).

    ``module`` is planned as ``Streamed(module, tile=tile)`` would plan it; each batch is an image
    tensor (N, C, *spatial) or a tuple whose first item is one (a DataLoader's ``(x, y)``).

    >>> import torch, torch.nn as nn
    >>> conv = nn.Conv2d(3, 4, 3, padding=1).double()
    >>> images = [torch.randn(2, 3, 60, 60, dtype=torch.float64) for _ in range(3)]
    >>> stats = channel_statistics(conv, images, tile=24)      # 60 px in 24 px tiles: 3 x 3 tiles
    >>> stats.count                                            # 21600 = 3 batches * 2 * 60 * 60
    21600
    >>> whole = torch.cat([conv(x) for x in images]).transpose(0, 1).flatten(1)
    >>> torch.allclose(stats.var, whole.var(dim=1, unbiased=False), rtol=1e-12, atol=0)
    True
    """
    streamed = Streamed(module, tile=tile, tile_transform=tile_transform)
    acc = _Accumulator()
    with torch.no_grad():
        for x in _images(batches):
            plan = streamed.plan(tuple(x.shape))
            if tile_transform is None and x.dtype != plan.dtype:
                raise StreamcheckError(
                    f"streamcheck: an image is {x.dtype}, but the module computes in {plan.dtype}. "
                    f"Fix: pass images as {plan.dtype}, or convert per tile with "
                    f"tile_transform=lambda t: t.to({plan.dtype})"
                )
            graph = plan.graph
            if graph is None:  # pragma: no cover - plans made by Streamed always carry their graph
                raise StreamcheckError("streamcheck: this plan has no graph to run")
            device = next((p.device for p in module.parameters()), x.device)
            in_layout, out_node = graph.nodes[0].layout, graph.output_node
            channel_dim = next(d for d in range(1, len(out_node.shape)) if d not in out_node.layout)
            for schedule in plan.schedules:
                piece = x[_index(schedule.input_box, in_layout, x.dim())].to(device)
                if tile_transform is not None:
                    piece = tile_transform(piece)
                acc.add(run_tile(graph, schedule, piece), channel_dim)
    return acc.result()


def _flatten(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _flatten(child)]
    return [module]


def lsuv_init(
    module: nn.Sequential,
    batches: Iterable[Any],
    *,
    tile: int | Sequence[int],
    target_var: float = 1.0,
    tile_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[LSUVLayer, ...]:
    """Rescale every convolution of ``module`` so its output has variance ``target_var`` per channel.

    Layer by layer, statistics streamed over all ``batches`` (Rules L1-L4); the weights are
    changed in place. ``batches`` is read once per convolution, so give a list or a DataLoader,
    not a one-shot iterator.

    >>> import torch, torch.nn as nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    ...                       nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).double()
    >>> images = [torch.randn(1, 3, 64, 64, dtype=torch.float64) * 5 for _ in range(2)]
    >>> [layer.path for layer in lsuv_init(trunk, images, tile=32)]
    ['0', '3']
    >>> out = torch.cat([trunk[:4](x) for x in images])        # the second conv's output
    >>> out.transpose(0, 1).flatten(1).var(dim=1, unbiased=False).sub(1).abs().max().item() < 1e-12
    True
    """
    if iter(batches) is batches:
        raise StreamcheckError(
            "streamcheck: lsuv_init reads the batches once per convolution, but got a one-shot "
            f"iterator ({type(batches).__name__}). Fix: pass a list of batches or a DataLoader"
        )
    if not isinstance(module, nn.Sequential):
        raise StreamcheckError(
            f"streamcheck: lsuv_init takes an nn.Sequential (the streamed trunk), got "
            f"{type(module).__name__}. Fix: pass the Sequential whose convolutions to rescale"
        )
    if not target_var > 0:
        raise StreamcheckError(f"streamcheck: target_var must be > 0, got {target_var}")
    names = {id(m): name for name, m in module.named_modules()}
    flat = _flatten(module)
    hidden = [
        f"{names[id(item)]}.{name}"
        for item in flat
        if not isinstance(item, _CONVS)
        for name, sub in item.named_modules()
        if isinstance(sub, _CONVS)
    ]
    if hidden:
        raise StreamcheckError(
            "streamcheck: lsuv_init rescales convolutions that are items of the Sequential "
            f"(Rule L4); these sit inside other blocks: {', '.join(repr(h) for h in hidden)}. "
            "Fix: pass a Sequential that lists them as items, or initialise those blocks yourself"
        )
    done = []
    for k, layer in enumerate(flat):
        if not isinstance(layer, _CONVS):
            continue
        stats = channel_statistics(
            nn.Sequential(*flat[: k + 1]), batches, tile=tile, tile_transform=tile_transform
        )
        dead = stats.var == 0
        scale = torch.where(dead, 1.0, (target_var / stats.var.clamp_min(1e-300)).sqrt())
        with torch.no_grad():
            w = scale.to(layer.weight.device, layer.weight.dtype)
            layer.weight.mul_(w.view(-1, *([1] * (layer.weight.dim() - 1))))
            if layer.bias is not None:
                layer.bias.mul_(w)
        dead_channels = tuple(int(c) for c in torch.nonzero(dead).flatten())
        done.append(LSUVLayer(names[id(layer)], stats, scale, dead_channels))
    return tuple(done)
