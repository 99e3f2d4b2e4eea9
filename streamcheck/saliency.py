"""Input gradients of an image source, written tile by tile into an array the user gives.

NOTE [ Gradient sinks ]
Rule A1. A source has no tensor to hold ``.grad``; ``streamed(source, input_grad=array)`` names a
           host- or disk-backed array (NumPy, ``np.memmap``, zarr, or a CPU tensor) that backward
           *adds* each tile's input gradient into, as autograd adds into ``.grad``: start from
           zeros, or accumulate over several calls on purpose.
Rule A2. The array is in the source's own layout (HWC or CHW, sources Rule I2) with the
           source's channel count, at full resolution or downsampled by an integer factor per
           axis: ``h == ceil(H / f)``. A downsampled pixel receives the sum of the gradients of the
           ``f x f`` pixels it covers (block sums; the gradient of the loss with respect to moving
           the whole block).
Rule A3. Overlapping tiles add into the same pixels (geometry Rule 7): each tile's gradient is
           computed in the gradient's dtype and added, so the sum is the one autograd forms for a
           tensor image, up to the order of the additions.
Rule A4. The gradient is that of the pixels as stored (what ``tile_transform`` receives), in the
           array's dtype. Integer tiles are converted to the module's floating dtype before
           ``tile_transform`` in that backward (a gradient needs a floating leaf), so the
           transform must give the same values for ``t`` and ``t.float()``, as conversions and
           normalisations do. Pixels of tiles that a mask skips receive nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import StreamcheckError
from .geometry import Box
from .sources import ImageSource

__all__ = ["GradientSink"]


class GradientSink:
    """Where backward adds a source's input gradient (Rules A1, A2)."""

    def __init__(self, target: Any, source: ImageSource) -> None:
        if not (hasattr(target, "shape") and hasattr(target, "__setitem__")):
            raise StreamcheckError(
                f"streamcheck: input_grad must be an array (NumPy, np.memmap, zarr or a CPU "
                f"tensor), got {type(target).__module__}.{type(target).__name__}"
            )
        if getattr(target, "flags", None) is not None and not target.flags.writeable:
            raise StreamcheckError(
                "streamcheck: input_grad is read-only. Fix: np.memmap(..., mode='w+') or 'r+'"
            )
        _, c, h, w = source.shape
        layout = source.layout
        want = (h, w, c) if layout == "HWC" else (c, h, w)
        shape = tuple(int(n) for n in target.shape)
        spatial = shape[:2] if layout == "HWC" else shape[1:]
        channels = shape[2] if layout == "HWC" and len(shape) == 3 else shape[0]
        factors = tuple(-(-n // m) if m > 0 else 0 for n, m in zip((h, w), spatial, strict=False))
        fits = (
            len(shape) == 3
            and channels == c
            and all(
                f >= 1 and -(-n // f) == m for n, m, f in zip((h, w), spatial, factors, strict=True)
            )
        )
        if not fits:
            raise StreamcheckError(
                f"streamcheck: input_grad has shape {shape}; for {source.name} ({layout}) it must "
                f"be {want}, or downsampled by an integer factor f per axis (ceil({h} / f), "
                f"ceil({w} / f)) with the {c} channels kept. Fix: np.zeros({want}, dtype=np.float32)"
            )
        dtype = getattr(target, "dtype", None)
        kind = getattr(dtype, "kind", None)
        if not (kind == "f" or (isinstance(dtype, torch.dtype) and dtype.is_floating_point)):
            raise StreamcheckError(
                f"streamcheck: input_grad must hold floating-point values, it holds {dtype}. "
                "Fix: a float32 or float64 array"
            )
        self.target = target
        self.layout = layout
        self.factors: tuple[int, int] = (factors[0], factors[1])

    def add(self, box: Box, grad: torch.Tensor) -> None:
        """Add one tile's input gradient ``grad`` (1, C, h, w) of image box ``box`` (Rule A3)."""
        tile = grad[0].detach().cpu()
        (y0, y1), (x0, x1) = box
        fy, fx = self.factors
        if (fy, fx) != (1, 1):
            tile, (y0, y1), (x0, x1) = _block_sums(tile, box, (fy, fx))
        if self.layout == "HWC":
            tile = tile.permute(1, 2, 0)
            index: tuple[slice, ...] = (slice(y0, y1), slice(x0, x1))
        else:
            index = (slice(None), slice(y0, y1), slice(x0, x1))
        target = self.target
        if isinstance(target, torch.Tensor):
            target[index] += tile.to(target.dtype)
            return
        current = target[index]
        target[index] = current + tile.numpy().astype(current.dtype, copy=False)


def _block_sums(
    tile: torch.Tensor, box: Box, factors: tuple[int, int]
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """The tile's pixels summed per ``fy x fx`` block of the full image (Rule A2)."""
    (y0, y1), (x0, x1) = box
    fy, fx = factors
    by0, bx0 = y0 // fy, x0 // fx
    by1, bx1 = -(-y1 // fy), -(-x1 // fx)
    padded = tile.new_zeros((tile.shape[0], (by1 - by0) * fy, (bx1 - bx0) * fx))
    padded[:, y0 - by0 * fy : y1 - by0 * fy, x0 - bx0 * fx : x1 - bx0 * fx] = tile
    sums = padded.reshape(tile.shape[0], by1 - by0, fy, bx1 - bx0, fx).sum(dim=(2, 4))
    return sums, (by0, by1), (bx0, bx1)
