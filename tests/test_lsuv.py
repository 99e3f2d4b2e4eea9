"""streamcheck.lsuv: statistics streamed from tiles equal whole-image statistics (float64).

The oracle is the plain module run on whole images, with torch's two-pass mean and variance.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import streamcheck
from streamcheck.lsuv import channel_statistics

F64 = torch.float64


def _trunk() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()),  # nested: flattened
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 5, padding=2, stride=2),
        nn.ReLU(),
    ).to(F64)


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shapes = [(2, 3, 61, 75), (1, 3, 61, 75), (3, 3, 40, 52)]  # sizes differ between batches
    return [torch.randn(s, generator=g, dtype=F64) * 3 + 2 for s in shapes]


def _whole(module: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """channels x values of module's output over all images, from whole-image forwards."""
    with torch.no_grad():
        return torch.cat([module(x).transpose(0, 1).flatten(1) for x in batches], dim=1)


@pytest.mark.parametrize("tile", [20, 33, 200])
def test_statistics_from_tiles_equal_whole_image(tile: int) -> None:
    trunk, batches = _trunk(), _batches()
    plan = streamcheck.plan(trunk, batches[0].shape, tile=tile)
    stats = channel_statistics(trunk, batches, tile=tile)
    whole = _whole(trunk, batches)
    assert stats.count == whole.shape[1]
    torch.testing.assert_close(stats.mean, whole.mean(dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.var, whole.var(dim=1, unbiased=False), rtol=1e-12, atol=0)
    if tile < 200:
        assert plan.n_tiles > 4  # really accumulated over many tiles


def test_statistics_stable_when_the_mean_dwarfs_the_spread() -> None:
    """Rule L2: E[X²] - μ² in float64 would lose ~all digits here (mean 1e6, std 1e-2)."""
    conv = nn.Conv2d(1, 2, 3, padding=1).to(F64)
    with torch.no_grad():
        conv.weight.mul_(1e-2)
        conv.bias.fill_(1e6)
    batches = [torch.randn(1, 1, 50, 50, dtype=F64) for _ in range(3)]
    stats = channel_statistics(conv, batches, tile=16)
    whole = _whole(conv, batches)
    torch.testing.assert_close(stats.var, whole.var(dim=1, unbiased=False), rtol=1e-8, atol=0)
    naive = whole.square().mean(dim=1) - whole.mean(dim=1).square()
    assert ((naive - stats.var).abs() / stats.var).max() > 1e-6  # the naive formula does lose them


def test_statistics_with_a_tile_transform_of_uint8_images() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1).to(F64)
    images = [torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8) for _ in range(2)]

    def transform(t: torch.Tensor) -> torch.Tensor:
        return (t.to(F64) / 255 - 0.5) / 0.25

    stats = channel_statistics(conv, images, tile=16, tile_transform=transform)
    whole = _whole(conv, [transform(x) for x in images])
    torch.testing.assert_close(stats.var, whole.var(dim=1, unbiased=False), rtol=1e-12, atol=0)


def _independent_lsuv(trunk: nn.Sequential, batches: list[torch.Tensor]) -> nn.Sequential:
    """LSUV on whole images with plain forwards: the oracle for lsuv_init's weights."""
    model = copy.deepcopy(trunk)
    flat = [model[0], model[1], model[2][0], model[2][1], model[3], model[4], model[5]]
    for k, layer in enumerate(flat):
        if isinstance(layer, nn.Conv2d):
            std = _whole(nn.Sequential(*flat[: k + 1]), batches).std(dim=1, unbiased=False)
            with torch.no_grad():
                layer.weight.div_(std.view(-1, 1, 1, 1))
                layer.bias.div_(std)
    return model


def test_lsuv_init_equals_whole_image_lsuv_and_gives_unit_variance() -> None:
    trunk, batches = _trunk(), _batches()
    expected = _independent_lsuv(trunk, batches)
    layers = streamcheck.lsuv_init(trunk, batches, tile=24)
    assert [layer.path for layer in layers] == ["0", "2.0", "4"]
    for (name, got), want in zip(
        trunk.state_dict().items(), expected.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0, msg=name)
    flat = [trunk[0], trunk[1], trunk[2][0], trunk[2][1], trunk[3], trunk[4], trunk[5]]
    for k in (0, 2, 5):  # every conv's output, the later ones after the earlier were rescaled
        var = _whole(nn.Sequential(*flat[: k + 1]), batches).var(dim=1, unbiased=False)
        torch.testing.assert_close(var, torch.ones_like(var), rtol=1e-10, atol=0)
    assert all(layer.dead_channels == () for layer in layers)


def test_lsuv_init_leaves_dead_channels_alone() -> None:
    conv = nn.Conv2d(3, 3, 3, padding=1).to(F64)
    with torch.no_grad():
        conv.weight[1].zero_()
        conv.bias[1] = 0.0
    (layer,) = streamcheck.lsuv_init(nn.Sequential(conv), _batches()[:1], tile=16, target_var=4.0)
    assert layer.dead_channels == (1,) and layer.scale[1] == 1.0
    var = _whole(conv, _batches()[:1]).var(dim=1, unbiased=False)
    torch.testing.assert_close(var[[0, 2]], torch.full((2,), 4.0, dtype=F64), rtol=1e-10, atol=0)
    assert var[1] == 0


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: streamcheck.lsuv_init(_trunk(), iter(_batches()), tile=24), "one-shot iterator"),
        (lambda: streamcheck.lsuv_init(_Block(), _batches(), tile=24), "takes an nn.Sequential"),
        (
            lambda: streamcheck.lsuv_init(nn.Sequential(_Block()), _batches(), tile=24),
            r"inside other blocks: '0.conv'",
        ),
        (lambda: streamcheck.lsuv_init(_trunk(), [], tile=24), "no images were given"),
        (
            lambda: channel_statistics(_trunk(), [torch.randn(1, 3, 30, 30)], tile=24),
            "computes in torch.float64",
        ),
        (lambda: channel_statistics(_trunk(), ["not a tensor"], tile=24), "not an image tensor"),
        (lambda: streamcheck.lsuv_init(_trunk(), _batches(), tile=24, target_var=0), "target_var"),
        (lambda: streamcheck.lsuv_init(_trunk(), _batches(), tile=4), "receptive field"),
    ],
)
def test_bad_input_is_refused(call, message: str) -> None:
    with pytest.raises(streamcheck.StreamcheckError, match=message):
        call()
