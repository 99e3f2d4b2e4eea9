"""The tile feed (streamcheck/feed.py): prefetch order, views, transform and memory format."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from streamcheck import Streamed
from streamcheck.feed import HostWrites, TileFeed, laid_out_like, one_ahead
from streamcheck.testing import relative_error

F64_RTOL = 1e-10


def test_one_ahead_launches_the_next_item_before_the_current_one_is_used() -> None:
    events: list[str] = []

    def launch(item: int) -> int:
        events.append(f"launch {item}")
        return item

    def arrive(item: int) -> torch.Tensor:
        events.append(f"arrive {item}")
        return torch.tensor(item)

    for tile in one_ahead(range(3), launch, arrive):
        events.append(f"use {int(tile)}")
    assert events == [
        "launch 0", "arrive 0", "launch 1", "use 0",
        "arrive 1", "launch 2", "use 1",
        "arrive 2", "use 2",
    ]  # fmt: skip
    assert list(one_ahead([], launch, arrive)) == []


class LoggedCopier:
    """A device -> host copier that logs when each tile is launched and lands (Rule F7)."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def launch(self, tile: torch.Tensor) -> torch.Tensor:
        self.events.append(f"launch {int(tile.flatten()[0])}")
        return tile.clone()

    def land(self, copy: torch.Tensor) -> torch.Tensor:
        self.events.append(f"land {int(copy.flatten()[0])}")
        return copy


@pytest.mark.parametrize("add", [True, False])
def test_host_writes_land_one_tile_behind_in_order_as_writes_at_once(add: bool) -> None:
    """Rule F7 without CUDA: tile i lands after tile i+1's copy is launched, in put order, and
    the array ends as writing each tile at once leaves it (overlapping sums in the same order)."""
    tiles = [torch.full((1, 2, 3), float(i)) + torch.rand(1, 2, 3) for i in range(4)]
    indices = [(..., slice(i, i + 3)) for i in (0, 2, 3, 1)]  # overlapping
    events: list[str] = []
    staged = HostWrites(torch.zeros(1, 2, 6), add=add, copier=LoggedCopier(events))
    direct = HostWrites(torch.zeros(1, 2, 6), add=add)
    for i, (index, tile) in enumerate(zip(indices, tiles, strict=True)):
        staged.put(index, tile)
        direct.put(index, tile)
        events.append(f"put {i}")
    staged.flush()
    staged.flush()  # nothing left: a no-op
    assert events == [
        "launch 0", "put 0",
        "launch 1", "land 0", "put 1",
        "launch 2", "land 1", "put 2",
        "launch 3", "land 2", "put 3",
        "land 3",
    ]  # fmt: skip
    assert torch.equal(staged.target, direct.target)
    expected = torch.zeros(1, 2, 6)
    for index, tile in zip(indices, tiles, strict=True):
        if add:
            expected[index] += tile
        else:
            expected[index] = tile
    assert torch.equal(direct.target, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_writes_from_cuda_equal_writes_at_once() -> None:
    """Rule F7 on CUDA: side-stream copies into pinned staging land what a synchronous copy
    would, also for crops (views) whose memory is freed while the copy is under way."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    for add, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        staged = HostWrites(torch.zeros(2, 3, 64, 64, dtype=dtype), add=add)
        expected = torch.zeros(2, 3, 64, 64, dtype=dtype)
        for i in range(12):
            top = (i * 13) % 40
            full = torch.randn(2, 3, 30, 30, generator=generator, device="cuda", dtype=dtype)
            tile = full[:, :, 2:26, 3:27]  # a view
            index = (..., slice(top, top + 24), slice(40 - top, 64 - top))
            staged.put(index, tile)
            if add:
                expected[index] += tile.cpu()
            else:
                expected[index] = tile.cpu()
            del full, tile
        staged.flush()
        assert torch.equal(staged.target, expected)


def test_tiles_of_an_image_on_the_modules_device_are_views() -> None:
    image = torch.randn(1, 3, 10, 12)
    indices = [(slice(None), slice(None), slice(0, 6), slice(2, 9))]
    (tile,) = TileFeed(image.device).arrivals(image, indices)
    assert tile.data_ptr() == image[indices[0]].data_ptr()
    assert torch.equal(tile, image[indices[0]])


@pytest.mark.parametrize("ndim", [3, 4, 5])
def test_prepare_applies_the_transform_then_the_memory_format(ndim: int) -> None:
    tile = torch.randint(0, 256, (1, 3, 6, 7, 5)[:ndim], dtype=torch.uint8)
    feed = TileFeed(tile.device, transform=lambda t: t.double() / 255, channels_last=True)
    got = feed.prepare(tile)
    assert torch.equal(got, tile.double() / 255)
    layout = {3: torch.contiguous_format, 4: torch.channels_last, 5: torch.channels_last_3d}[ndim]
    assert got.is_contiguous(memory_format=layout)
    stitched = laid_out_like(got, (2, 3, 10, 11, 12)[:ndim])
    assert stitched.is_contiguous(memory_format=layout) and stitched.dtype == torch.float64


@pytest.mark.parametrize("channels_last", [False, True])
def test_uint8_image_converted_per_tile_equals_converting_the_whole_image(
    channels_last: bool,
) -> None:
    # The image stays uint8 (a quarter of float32's memory); each tile is converted and normalised
    # on the module's device. The reference converts the whole image first.
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3)).double()
    image = torch.randint(0, 256, (1, 3, 41, 37), dtype=torch.uint8)
    mean = torch.tensor([120.0, 110.0, 100.0], dtype=torch.float64).view(1, 3, 1, 1)

    def normalise(tile: torch.Tensor) -> torch.Tensor:
        return (tile.double() - mean.to(tile.device)) / 60.0

    want = trunk(normalise(image))
    g = torch.randn_like(want)
    streamed = Streamed(trunk, tile=16, tile_transform=normalise, channels_last=channels_last)
    got = streamed(image)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert relative_error(got.detach(), want.detach()) <= F64_RTOL
    params = list(trunk.parameters())
    for a, b in zip(
        torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g), strict=True
    ):
        assert relative_error(a, b) <= F64_RTOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_resident_pinned_uint8_image_with_module_on_cuda() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3)).double()
    image = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8).pin_memory()
    want = trunk(image.double() / 255)
    streamed = Streamed(trunk.cuda(), tile=24, tile_transform=lambda t: t.double() / 255)
    got = streamed(image)
    assert got.device.type == "cuda"
    assert relative_error(got.cpu(), want) <= F64_RTOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pinned", [False, True])
def test_prefetched_host_tiles_give_the_plain_outputs_and_gradients(pinned: bool) -> None:
    # Host image, module on the GPU: every tile goes through pinned staging and the side stream
    # (Rule F2), and the input gradient comes back to the host.
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3)).double()
    image = torch.randn(1, 3, 96, 80, dtype=torch.float64)
    image = image.pin_memory() if pinned else image
    x = image.clone().requires_grad_(True)
    want = trunk(x)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x, *trunk.parameters()], g)

    gpu_trunk = trunk.cuda()
    xs = image.requires_grad_(True)
    got = Streamed(gpu_trunk, tile=24)(xs)
    got_grads = torch.autograd.grad(got, [xs, *gpu_trunk.parameters()], g.cuda())
    assert relative_error(got.cpu(), want) <= F64_RTOL
    assert got_grads[0].device.type == "cpu"
    for a, b in zip(got_grads, want_grads, strict=True):
        assert relative_error(a.cpu(), b) <= F64_RTOL
