"""Bringing input tiles to the module: copy, prefetch, convert, lay out.

NOTE [ Tile feed ]
Rule F1. A tile is cut from the image where the image lives and brought to the module's device. An
         image already there is sliced, never copied: the tile is a view.
Rule F2. From host memory to a CUDA device, the next tile's copy is issued before the current tile
         is computed (``one_ahead``): the host gathers it into pinned staging memory while the GPU
         still runs queued kernels, and the copy engine moves it on a side stream while the current
         tile's kernels run. The compute stream waits for exactly that tile's copy (an event), and
         the tile is recorded on the compute stream so that the allocator does not reuse its memory
         early. Pinned staging makes the copy asynchronous for unpinned images too; the staging
         buffers come from PyTorch's caching host allocator, which holds them until their copy ends.
Rule F3. On the device, ``transform`` (per pixel: conversion, normalisation) and then the memory
         format are applied (``prepare``); a transform that changes the tile's shape (channels
         included: tiles are planned for the image's shape) or returns another dtype than the
         module's is refused on the first tile, before the module runs. Both are ordinary
         autograd ops, so in backward the input gradient flows back through them to the arrived
         tile, the leaf of the recomputation.
Rule F4. ``channels_last`` lays 4-D tiles out as NHWC and 5-D tiles as NDHWC. It changes the
         convolution kernels PyTorch picks, not the arithmetic of any output element: streamed
         results stay equal to the module's in float64 (tests/test_streaming.py).
Rule F5. An image source (``sources.py``: a TIFF level, a memmap, a zarr array) is read region by
         region on one background thread, one region ahead (``read_ahead``): region i+1 is read from
         disk while tile i computes. Onto a CUDA device the copy of Rule F2 follows, so then one
         region is being read, one copied and one computed at a time. The thread is joined when
         the tiles end or their consumer stops early (an error in a tile), never left running.
Rule F6. Only the tiles asked for are read: a masked call (``masks.py``) never reads the regions
         of the tiles it skips.
Rule F7. The way back: a tile computed on a CUDA device and written into a host array (a kept map,
         its gradient, a host image's gradient: ``HostWrites``) is copied into pinned staging on
         a side stream once the compute stream has made it (the side stream waits for the
         compute stream; the tile is recorded on the side stream, so that the allocator does not
         reuse its memory before the copy), and written into the array one tile later, after
         that copy's event: the host writes tile i while the GPU computes tile i+1. Writes land
         in the order they were put, so sums into overlapping regions add in the same order as
         written at once. ``flush`` lands the last one; on a CPU every tile is written at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from .errors import StreamcheckError
from .sources import ImageSource

Index = tuple[Any, ...]
Handle = TypeVar("Handle")

_END = object()


def one_ahead(
    items: Iterable[Any], launch: Callable[[Any], Handle], arrive: Callable[[Handle], torch.Tensor]
) -> Iterator[torch.Tensor]:
    """Yield ``arrive(launch(item))`` per item, launching item i+1 before item i is yielded (Rule F2)."""
    handles = map(launch, items)
    current: Any = next(handles, _END)
    while current is not _END:
        tile = arrive(current)
        current = next(handles, _END)  # the next copy is under way while the caller computes
        yield tile


def read_ahead(source: ImageSource, indices: Sequence[Index]) -> Iterator[torch.Tensor]:
    """``source[index]`` per index, the next region read on a thread while this one is used (Rule F5)."""
    with ThreadPoolExecutor(1, thread_name_prefix="streamcheck-read") as pool:

        def launch(index: Index) -> Future[torch.Tensor]:
            return pool.submit(source.__getitem__, index)

        try:
            yield from one_ahead(indices, launch, Future.result)
        finally:  # Rule F5: an abandoned read is not waited for longer than it runs
            pool.shutdown(wait=True, cancel_futures=True)


class _CudaCopy:
    """Host -> CUDA copies on a side stream (Rule F2)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.compute = torch.cuda.current_stream(device)
        self.side = torch.cuda.Stream(device)

    def launch(self, host: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        if not (host.is_contiguous() and host.is_pinned()):
            staging = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
            host = staging.copy_(host)
        with torch.cuda.stream(self.side):
            tile = host.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.side)
        return tile, copied

    def arrive(self, handle: tuple[torch.Tensor, torch.cuda.Event]) -> torch.Tensor:
        tile, copied = handle
        self.compute.wait_event(copied)
        tile.record_stream(self.compute)
        return tile


class _CudaDrain:
    """CUDA -> host copies on a side stream into pinned staging (Rule F7)."""

    def __init__(self, device: torch.device) -> None:
        self.compute = torch.cuda.current_stream(device)
        self.side = torch.cuda.Stream(device)

    def launch(self, tile: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        staging = torch.empty(tile.shape, dtype=tile.dtype, pin_memory=True)
        self.side.wait_stream(self.compute)  # the tile is made
        with torch.cuda.stream(self.side):
            staging.copy_(tile, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.side)
        tile.record_stream(self.side)
        return staging, copied

    def land(self, handle: tuple[torch.Tensor, torch.cuda.Event]) -> torch.Tensor:
        staging, copied = handle
        copied.synchronize()
        return staging


class HostWrites:
    """``target[index] = tile`` (``add``: ``+=``) for tiles put in order (Rule F7); ``flush``
    after the last. ``copier`` (``launch(tile) -> handle``, ``land(handle) -> host tile``)
    moves device tiles to the host; by default a side-stream copy for CUDA tiles into a host
    ``target``, else none (written at once).

    >>> grad = torch.zeros(1, 1, 4)
    >>> writes = HostWrites(grad, add=True)
    >>> for index in [(..., slice(0, 3)), (..., slice(1, 4))]:   # two overlapping tiles
    ...     writes.put(index, torch.ones(1, 1, 3))
    >>> writes.flush()
    >>> grad.flatten().tolist()
    [1.0, 2.0, 2.0, 1.0]
    """

    def __init__(self, target: torch.Tensor, *, add: bool, copier: Any = None) -> None:
        self.target, self.add, self.copier = target, add, copier
        self.pending: tuple[Index, Any] | None = None

    def put(self, index: Index, tile: torch.Tensor) -> None:
        if self.copier is None and tile.is_cuda and self.target.device.type == "cpu":
            self.copier = _CudaDrain(tile.device)
        if self.copier is None:
            self._write(index, tile)
            return
        handle = self.copier.launch(tile)
        self.flush()  # the previous tile lands while this one is copied
        self.pending = (index, handle)

    def flush(self) -> None:
        if self.pending is not None:
            index, handle = self.pending
            self.pending = None
            self._write(index, self.copier.land(handle))

    def _write(self, index: Index, tile: torch.Tensor) -> None:
        if self.add:
            self.target[index] += tile.to(self.target.device, self.target.dtype)
        else:
            self.target[index] = tile


class TileFeed:
    """Brings the tiles at ``indices`` of an image to ``device`` and prepares them for the module."""

    def __init__(
        self,
        device: torch.device,
        *,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        channels_last: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.device = device
        self.transform = transform
        self.channels_last = channels_last
        self.dtype = dtype  # what the module computes in; None under autocast

    def arrivals(
        self, image: torch.Tensor | ImageSource, indices: Sequence[Index]
    ) -> Iterator[torch.Tensor]:
        """The tiles ``image[index]`` on the module's device, in order (Rules F1, F2, F5)."""
        if isinstance(image, ImageSource):
            tiles: Iterator[torch.Tensor] = read_ahead(image, indices)
        elif image.device == self.device:
            return (image[index] for index in indices)
        else:
            tiles = (image[index] for index in indices)
        if self.device.type == "cuda" and image.device.type == "cpu":
            copy = _CudaCopy(self.device)
            return one_ahead(tiles, copy.launch, copy.arrive)
        return (tile.to(self.device) for tile in tiles)

    def prepare(self, tile: torch.Tensor) -> torch.Tensor:
        """Transform, then memory format (Rules F3, F4)."""
        if self.transform is not None:
            tile = self._checked(tile, self.transform(tile))
        if self.channels_last and tile.dim() in (4, 5):
            layout = torch.channels_last if tile.dim() == 4 else torch.channels_last_3d
            tile = tile.contiguous(memory_format=layout)
        return tile

    def _checked(self, tile: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Rule F3: a transform is per pixel and yields what the module computes in."""
        if result.shape != tile.shape:  # the plan was made for the image's shape
            raise StreamcheckError(
                f"streamcheck: tile_transform turned a tile of shape {tuple(tile.shape)} into "
                f"{tuple(result.shape)}; it must work per pixel and keep the shape (the tiles were "
                "planned for the image's shape). Fix: select channels with "
                "open_image(..., channels=N) or on the image, and crop or resize the image "
                "before streaming"
            )
        if self.dtype is not None and result.dtype != self.dtype:
            raise StreamcheckError(
                f"streamcheck: tile_transform returns {result.dtype} tiles, but the module's "
                f"parameters are {self.dtype}. Fix: end the transform with .to({self.dtype})"
            )
        return result


def laid_out_like(tile: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """An empty tensor of ``shape`` in ``tile``'s dtype, device and memory format (for stitching)."""
    layout = torch.contiguous_format
    if tile.dim() == 4 and tile.is_contiguous(memory_format=torch.channels_last):
        layout = torch.channels_last
    elif tile.dim() == 5 and tile.is_contiguous(memory_format=torch.channels_last_3d):
        layout = torch.channels_last_3d
    return torch.empty(tuple(shape), dtype=tile.dtype, device=tile.device, memory_format=layout)
