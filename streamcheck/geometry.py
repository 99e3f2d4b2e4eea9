"""Tile and receptive-field arithmetic in plain integers (no torch).

NOTE [ Streaming geometry ]
Every spatial axis is treated on its own; a box is one half-open interval ``(start, stop)`` per axis.

Rule 1. Tiles are cut in the *output* of the streamed module: each axis of the output is split into
        consecutive pieces of ``output_tile`` elements (the last one may be shorter). These output
        boxes partition the output, so every output element is computed by exactly one tile.
Rule 2. What a tile needs is found backwards, node by node: a window layer (conv or pool) with
        kernel k, stride s, dilation d and left padding p needs input ``[a*s - p, (b-1)*s - p +
        d*(k-1) + 1)`` for output ``[a, b)`` (`window_input`); a pointwise layer needs the same box.
        These boxes are *unclipped*: they may reach outside ``[0, n)``.
Rule 3. The unclipped box is clipped to the feature map (`clip`); what lies outside is exactly the
        layer's own padding, which the engine recreates explicitly on the tile (zeros, -inf for max
        pooling, reflect/replicate for such convs). This only happens at the image border: inside
        the image, tiles read real neighbouring pixels (the overlap) instead of padding.
        Reflect and replicate padding copy pixels from inside the image, which can lie beyond
        the clipped box (reflect padding wider than the kernel's half): for those layers the
        padded positions are mapped to the pixels they copy (`mirror`) and the box is the span of
        what is read.
Rule 4. A feature map that feeds several layers (residual branches) is computed on the hull of
        what they need (`hull`); each consumer crops its part.
Rule 5. Window layers then run with padding 0 on the padded tile. Average pooling divides by the
        divisor the whole image would use (`avg_pool_divisors`: count_include_pad and ceil_mode as
        PyTorch defines them), not by the tile's.
Rule 6. Interior tiles are all the same size. With total stride S and receptive field F of the
        streamed module, an output tile of t elements needs an input tile of ``(t-1)*S + F`` pixels
        (`input_tile_for`). A requested input tile T is rounded *down* to the largest such size, so
        memory never exceeds what was asked for (`output_tile_for`); T < F is an error.
Rule 7. Why gradients are exact: the loss depends on the output only, and the output boxes
        partition it, so dL/dθ = Σ_tiles Σ_{o in tile} dL/dy_o · dy_o/dθ. Each tile recomputes its
        own y_o from its input tile exactly (Rules 2-5 give the same numbers as the whole image),
        then backpropagates the slice of dL/dy it owns; summing over tiles is the chain rule.
        The same holds for dL/dx, where overlapping input tiles add up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from math import prod

__all__ = [
    "Box",
    "Interval",
    "avg_pool_divisors",
    "clip",
    "mirror",
    "hull",
    "input_tile_for",
    "output_tile_for",
    "split",
    "window_input",
]

Interval = tuple[int, int]
Box = tuple[Interval, ...]


def window_input(
    out: Interval, *, kernel: int, stride: int, dilation: int, pad_left: int
) -> Interval:
    """The unclipped input interval a window layer reads for output ``out`` (Rule 2).

    >>> window_input((0, 4), kernel=3, stride=1, dilation=1, pad_left=1)  # 3x3 'same' conv
    (-1, 5)
    >>> window_input((2, 3), kernel=2, stride=2, dilation=1, pad_left=0)  # 2x2 max-pool
    (4, 6)
    """
    start, stop = out
    return (start * stride - pad_left, (stop - 1) * stride - pad_left + dilation * (kernel - 1) + 1)


def clip(interval: Interval, size: int) -> Interval:
    """The part of ``interval`` inside ``[0, size)`` (Rule 3)."""
    return (max(interval[0], 0), min(interval[1], size))


def mirror(position: int, size: int, mode: str) -> int:
    """The pixel that reflect or replicate padding copies into ``position`` (Rule 3).

    >>> [mirror(p, 4, "reflect") for p in range(-2, 6)]
    [2, 1, 0, 1, 2, 3, 2, 1]
    >>> [mirror(p, 4, "replicate") for p in (-2, 5)]
    [0, 3]
    """
    if mode == "replicate":
        return min(max(position, 0), size - 1)
    if position < 0:
        return -position
    return 2 * (size - 1) - position if position >= size else position


def hull(intervals: Iterable[Interval]) -> Interval:
    """The smallest interval containing all of ``intervals`` (Rule 4)."""
    starts, stops = zip(*intervals, strict=True)
    return (min(starts), max(stops))


def split(size: int, piece: int) -> list[Interval]:
    """Consecutive pieces of ``piece`` elements covering ``[0, size)`` (Rule 1).

    >>> split(10, 4)
    [(0, 4), (4, 8), (8, 10)]
    """
    return [(start, min(start + piece, size)) for start in range(0, size, piece)]


def output_tile_for(tile: int, *, receptive_field: int, stride: int) -> int:
    """Output elements per tile for an input tile of ``tile`` pixels, rounding down (Rule 6).

    >>> output_tile_for(512, receptive_field=7, stride=1)
    506
    >>> output_tile_for(512, receptive_field=7, stride=2)   # 511 = (253 - 1) * 2 + 7
    253
    """
    if tile < receptive_field:
        raise ValueError("tile smaller than the receptive field")
    return (tile - receptive_field) // stride + 1


def input_tile_for(output_tile: int, *, receptive_field: int, stride: int) -> int:
    """Input pixels an interior tile reads to produce ``output_tile`` elements (Rule 6)."""
    return (output_tile - 1) * stride + receptive_field


def avg_pool_divisors(
    out: Interval, *, size: int, kernel: int, stride: int, padding: int, count_include_pad: bool
) -> list[int]:
    """Per-output divisors of average pooling along one axis, as PyTorch computes them (Rule 5).

    PyTorch's divisor is the product over axes of these per-axis counts: the window is first cut at
    ``size + padding`` (windows that ceil_mode lets run past the padding), then, unless
    ``count_include_pad``, cut to the image itself.

    >>> avg_pool_divisors((0, 3), size=5, kernel=3, stride=2, padding=1, count_include_pad=False)
    [2, 3, 2]
    >>> avg_pool_divisors((0, 3), size=5, kernel=3, stride=2, padding=1, count_include_pad=True)
    [3, 3, 3]
    """
    divisors = []
    for o in range(*out):
        start = o * stride - padding
        stop = min(start + kernel, size + padding)
        if not count_include_pad:
            start, stop = max(start, 0), min(stop, size)
        divisors.append(stop - start)
    return divisors


def volume(box: Sequence[Interval]) -> int:
    """Number of elements in a box."""
    return prod(stop - start for start, stop in box)
