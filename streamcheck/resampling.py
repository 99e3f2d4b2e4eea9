"""Layers that change the scale of a feature map: transposed convolutions, upsampling, and
space-to-depth / depth-to-space (geometry Rules MS1-MS4).

NOTE [ Rescaling layers ]
Rule RS1. A `Rescale` layer is classified without sizes (from a module or a call) and then fitted
          to the whole image's sizes in and out (`Rescale.fitted`), which checks that the scale is
          an integer factor and computes the taps of upsampling once (geometry Rule MS3). What it
          cannot stream exactly is refused there, with the reason: non-integer or downsampling
          factors, ``size=`` that is no integer multiple of the input, bicubic and area modes,
          ``antialias=True``.
Rule RS2. On a tile, a `Rescale` layer gets the absolute box its input covers and the box it must
          produce, and computes exactly that box: a transposed convolution by Rule MS2, upsampling
          by gathering the whole image's taps (`Taps`), a shuffle by running PyTorch's own op on
          the tile and cropping.
Rule RS3. The taps are checked against PyTorch on the whole axis (a 1-D interpolation of a random
          vector with the same arguments), so a PyTorch that computed them differently would fail
          the graph build (an internal error) instead of streaming a wrong answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F

from .errors import internal_error
from .geometry import Box, Interval, transposed_input, transposed_output

__all__ = ["Rescale", "Taps", "linear_taps", "nearest_taps"]

_LINEAR = {"linear", "bilinear", "trilinear"}
_NEAREST = {"nearest", "nearest-exact"}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@dataclass(frozen=True)
class Taps:
    """Along one axis: output o is ``(1 - weight[o]) * x[low[o]] + weight[o] * x[high[o]]``
    (nearest: ``x[low[o]]``, ``weight`` None), positions in the whole image (Rule MS3)."""

    low: torch.Tensor  # int64, one per output position
    high: torch.Tensor
    weight: torch.Tensor | None  # float64
    _on: dict[Any, tuple[torch.Tensor, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def reach(self, out: Interval) -> Interval:
        """The input interval outputs ``out`` read (taps grow with the output position)."""
        return (int(self.low[out[0]]), int(self.high[out[1] - 1]) + 1)

    def apply(self, x: torch.Tensor, dim: int, start: int, out: Interval) -> torch.Tensor:
        """Outputs ``out`` from ``x``, which holds inputs from ``start`` on along ``dim``."""
        key = (x.device, x.dtype)
        if key not in self._on:
            weight = [] if self.weight is None else [self.weight.to(x.device, x.dtype)]
            self._on[key] = (self.low.to(x.device), self.high.to(x.device), *weight)
        low, high, *weight = self._on[key]
        a, b = out
        picked = x.index_select(dim, low[a:b] - start)
        if not weight:
            return picked
        shape = [1] * x.dim()
        shape[dim] = b - a
        w = weight[0][a:b].view(shape)
        return picked * (1 - w) + x.index_select(dim, high[a:b] - start) * w


def nearest_taps(in_size: int, out_size: int, call: dict[str, Any], mode: str) -> Taps:
    """PyTorch's own nearest index map for one axis: the interpolation of ``arange`` (Rule MS3).

    >>> nearest_taps(3, 6, {"scale_factor": 2.0}, "nearest").low.tolist()
    [0, 0, 1, 1, 2, 2]
    """
    probe = torch.arange(in_size, dtype=torch.float64).view(1, 1, in_size)
    low = F.interpolate(probe, mode=mode, **call).view(-1).round().long()
    if low.numel() != out_size:
        raise internal_error(f"nearest map of {low.numel()} positions for an axis of {out_size}")
    return Taps(low, low, None)


def linear_taps(in_size: int, out_size: int, call: dict[str, Any], *, align_corners: bool) -> Taps:
    """PyTorch's linear taps for one axis (``area_pixel_compute_source_index``), checked (RS3).

    ``align_corners=False``: source ``(o + 0.5) * in/out - 0.5``, clamped at 0; ``True``: source
    ``o * (in - 1)/(out - 1)``. Then ``low = floor``, ``high = low + 1`` inside the axis.

    >>> taps = linear_taps(3, 6, {"scale_factor": 2.0}, align_corners=False)
    >>> taps.low.tolist(), taps.high.tolist(), taps.weight.tolist()   # 0.25 = (1 + 0.5) / 2 - 0.5; low = high at the end
    ([0, 0, 0, 1, 1, 2], [1, 1, 1, 2, 2, 2], [0.0, 0.25, 0.75, 0.25, 0.75, 0.25])
    """
    o = torch.arange(out_size, dtype=torch.float64)
    if align_corners:
        source = o * ((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
    else:
        source = ((o + 0.5) * (in_size / out_size) - 0.5).clamp(min=0.0)
    low = source.floor().long().clamp(max=in_size - 1)
    weight = (source - low).clamp(0.0, 1.0)
    high = torch.where(low < in_size - 1, low + 1, low)
    taps = Taps(low, high, weight)
    vector = torch.randn(in_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theirs = F.interpolate(
        vector.view(1, 1, -1), mode="linear", align_corners=align_corners, **call
    ).view(-1)
    ours = taps.apply(vector, 0, 0, (0, out_size))
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-12, atol=1e-12):
        raise internal_error("linear interpolation taps differ from PyTorch's")
    return taps


@dataclass(frozen=True)
class Rescale:
    """A layer that changes scale (Rules MS1-MS4, RS1-RS2).

    ``kind`` is ``"transposed"`` (ConvTranspose, ``F.conv_transpose*d``), ``"resample"``
    (Upsample, ``F.interpolate``), ``"unshuffle"`` (space-to-depth) or ``"shuffle"``
    (depth-to-space). ``factor`` is what it multiplies the scale by, per axis.
    """

    kind: str
    ndim: int
    factor: tuple[Fraction, ...] = ()
    kernel: tuple[int, ...] = ()  # transposed
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    pad_left: tuple[int, ...] = ()
    groups: int = 1
    mode: str = ""  # resample
    align_corners: bool = False
    scale_factor: Any = None  # as the call gave it (None with size=)
    recompute_scale_factor: Any = None
    taps: tuple[Taps, ...] = ()
    block: int = 1  # shuffles
    function: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)

    def fitted(self, in_sizes: tuple[int, ...], out_sizes: tuple[int, ...]) -> Rescale | str:
        """This layer for the whole image's sizes, or why it cannot be streamed (Rule RS1)."""
        if self.kind == "transposed":
            return replace(self, factor=tuple(Fraction(s) for s in self.stride))
        if self.kind in ("shuffle", "unshuffle"):
            up = self.kind == "shuffle"
            factor = Fraction(self.block) if up else Fraction(1, self.block)
            return replace(self, factor=(factor,) * self.ndim)
        factors = []
        for n, m in zip(in_sizes, out_sizes, strict=True):
            if m % n or m < n:
                return (
                    f"resamples an axis of {n} px to {m} px, not by an integer factor >= 1 "
                    f"(scale_factor={self.scale_factor!r})"
                )
            factors.append(m // n)
        scales = self.scale_factor if isinstance(self.scale_factor, (tuple, list)) else None
        taps = []
        for axis, (n, m) in enumerate(zip(in_sizes, out_sizes, strict=True)):
            if self.scale_factor is None:
                call: dict[str, Any] = {"size": m}
            else:
                given = float(scales[axis] if scales is not None else self.scale_factor)
                if given != factors[axis]:
                    return f"scale_factor {self.scale_factor!r} is not an integer"
                call = {"scale_factor": given}
            if self.recompute_scale_factor is not None and "scale_factor" in call:
                call["recompute_scale_factor"] = self.recompute_scale_factor
            if self.mode in _NEAREST:
                taps.append(nearest_taps(n, m, call, self.mode))
            else:
                taps.append(linear_taps(n, m, call, align_corners=self.align_corners))
        return replace(self, factor=tuple(Fraction(f) for f in factors), taps=tuple(taps))

    def input_interval(self, axis: int, out: Interval) -> Interval:
        """The input a tile reads for output ``out`` (unclipped for transposed convolutions)."""
        if self.kind == "transposed":
            return transposed_input(
                out,
                kernel=self.kernel[axis],
                stride=self.stride[axis],
                dilation=self.dilation[axis],
                pad_left=self.pad_left[axis],
            )
        if self.kind == "resample":
            return self.taps[axis].reach(out)
        if self.kind == "unshuffle":
            return (out[0] * self.block, out[1] * self.block)
        return (out[0] // self.block, (out[1] - 1) // self.block + 1)

    def run(
        self,
        x: torch.Tensor,
        in_box: Box,
        out_box: Box,
        weights: tuple[torch.Tensor, torch.Tensor | None, int] | None = None,
    ) -> torch.Tensor:
        """Compute ``out_box`` from ``x``, which covers ``in_box`` of the input (Rule RS2)."""
        first = x.dim() - self.ndim
        if self.kind == "resample":
            for axis, taps in enumerate(self.taps):
                x = taps.apply(x, first + axis, in_box[axis][0], out_box[axis])
            return x
        if self.kind == "transposed":
            if weights is None:
                raise internal_error("a transposed convolution run without its weight")
            weight, bias, groups = weights
            y = _CONV_TRANSPOSE[self.ndim](
                x, weight, None, self.stride, 0, 0, groups, self.dilation
            )
            produced = [
                transposed_output(
                    in_box[a],
                    kernel=self.kernel[a],
                    stride=self.stride[a],
                    dilation=self.dilation[a],
                    pad_left=self.pad_left[a],
                )
                for a in range(self.ndim)
            ]
        else:
            if self.function is None:
                raise internal_error("a shuffle without its function")
            y = self.function(x)
            produced = [
                (int(in_box[a][0] * self.factor[a]), int(in_box[a][1] * self.factor[a]))
                for a in range(self.ndim)
            ]
        y = _place(y, produced, out_box)
        if self.kind == "transposed" and weights is not None and weights[1] is not None:
            y = y + weights[1].view(-1, *([1] * self.ndim))
        return y


def _place(y: torch.Tensor, produced: Sequence[Interval], out_box: Box) -> torch.Tensor:
    """``y``, which holds positions ``produced`` along its last axes, cut and zero-extended to
    ``out_box`` (Rule MS2: positions no input reaches get zeros, then the bias)."""
    first = y.dim() - len(produced)
    pads: list[tuple[int, int]] = []
    for axis, ((p0, p1), (a, b)) in enumerate(zip(produced, out_box, strict=True)):
        start, stop = min(max(a - p0, 0), p1 - p0), max(min(b - p0, p1 - p0), 0)
        if start >= stop:  # nothing of the box is produced here: zeros only
            shape = list(y.shape)
            for k, (c, d) in enumerate(out_box):
                shape[first + k] = d - c
            return y.new_zeros(shape)
        y = y.narrow(first + axis, start, stop - start)
        pads.append((max(p0 - a, 0), max(b - p1, 0)))
    if any(left or right for left, right in pads):
        y = F.pad(y, [amount for pair in reversed(pads) for amount in pair])
    return y
