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

NOTE [ Several scales ]
Rule MS1. Every spatial node has a scale per axis relative to the input, a fraction (`scale_after`):
          a window of stride s divides it by s; a transposed convolution of stride s, upsampling by
          an integer factor f and depth-to-space by b multiply it; space-to-depth by b divides it.
          A node that merges feature maps (add, cat, ...) needs equal scales along every axis, and
          equal sizes as before; anything else is refused by path. Scales are exact fractions, so
          a U-Net's skip at 1/1 meets its decoder at 1/1 after four halvings and four doublings.
Rule MS2. A transposed convolution (kernel k, stride s, dilation d, padding p) sends input i to
          outputs ``i*s - p + j*d`` for j < k; output ``[a, b)`` reads inputs ``[ceil((a + p -
          d*(k-1)) / s), floor((b - 1 + p) / s) + 1)`` (`transposed_input`), clipped to the map:
          inputs outside the map do not exist, so there is no padding to recreate. The tile runs
          with padding 0 and output_padding 0, which yields outputs ``[c*s - p, (e-1)*s - p +
          d*(k-1) + 1)`` for input ``[c, e)`` (`transposed_output`); those are cropped, or extended
          with zeros, to ``[a, b)`` and the bias added. Outputs that no input reaches
          (output_padding, strides longer than the kernel) thus get the bias alone, as in the
          whole image. Groups act on channels only.
Rule MS3. Upsampling (nearest, nearest-exact, linear, bilinear, trilinear) is separable: along each
          axis, output o reads one tap (nearest) or two taps with weights (linear) whose positions
          and weights are computed once, for the *whole* image's sizes, exactly as PyTorch computes
          them (``resampling.py``: nearest from PyTorch's own index map, linear from PyTorch's
          formula, checked against PyTorch on the whole axis when the graph is built). A tile then
          uses the whole image's taps for the outputs it owns, wherever it starts: align_corners
          True (taps depend on the image size, not periodic) and False alike. Output ``[a, b)``
          reads ``[first tap of a, last tap of b-1 + 1)``, always inside the map.
Rule MS4. Space-to-depth by b (timm's SpaceToDepth, pixel_unshuffle) is a window of kernel b and
          stride b: output ``[a, c)`` reads exactly ``[a*b, c*b)``; depth-to-space (pixel_shuffle)
          is nearest upsampling by b in its reach: output o reads input ``o // b``.
Rule MS5. Several outputs, several scales: tiles are cut in the finest output (the reference);
          every other output must be coarser by an integer factor q_j along each axis. The
          *period* P of an axis is the least common multiple of the denominators of every node's
          scale relative to the reference (`period`): output tiles of t = m*P reference pixels
          start every node at the same phase, so interior tiles of a periodic network are all the
          same size. Tile k owns ``[k*t/q_j, (k+1)*t/q_j)`` of output j, cut to its size, and the
          last tile of output j runs to its end (`output_pieces`): each output's boxes partition
          it; a tile may own nothing of a coarse output.
Rule MS6. The backward walk (Rules 2-4) starts from every output's box at once; a node that is an
          output and also feeds others computes the hull of both. The tile t is the largest m*P
          whose every tile along the axis reads at most the requested input tile (walked exactly,
          borders included); a requested tile below what P pixels need is an error.
Rule MS7. Exactness over several outputs is Rule 7 summed over them: the loss depends on the outputs
          only and each output's boxes partition it, so dL/dθ = Σ_tiles Σ_j Σ_{o in box_j}
          dL/dy_jo · dy_jo/dθ; each tile backpropagates the slices it owns of every output at once.
Rule MS8. TF "SAME" padding (timm's ``pad_same``, used by Conv2dSame, MaxPool2dSame and
          ScaledStdConv2dSame) depends on the whole image's size: it is computed once, from the
          whole input's size with timm's own formula, and applied as a fixed asymmetric pad (an
          ``F.pad`` window, layers Rule L2). Computing it per tile would pad every tile.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fractions import Fraction
from math import lcm, prod

__all__ = [
    "Box",
    "Interval",
    "avg_pool_divisors",
    "chunks",
    "clip",
    "mirror",
    "hull",
    "input_tile_for",
    "output_pieces",
    "output_tile_for",
    "period",
    "scale_after",
    "transposed_input",
    "transposed_output",
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


def chunks(size: int, piece: int) -> list[Interval]:
    """Consecutive pieces of ``piece`` elements covering ``[0, size)`` (Rule 1).

    >>> chunks(10, 4)
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


def transposed_input(
    out: Interval, *, kernel: int, stride: int, dilation: int, pad_left: int
) -> Interval:
    """The unclipped input interval a transposed convolution reads for output ``out`` (Rule MS2).

    Never empty: where a stride longer than the kernel leaves ``out`` unreached, one input is read.

    >>> transposed_input((0, 4), kernel=2, stride=2, dilation=1, pad_left=0)  # 2x2 up-conv
    (0, 2)
    >>> transposed_input((5, 9), kernel=3, stride=2, dilation=1, pad_left=1)  # 2 = ceil((5+1-2)/2)
    (2, 5)
    """
    start = -((dilation * (kernel - 1) - out[0] - pad_left) // stride)  # a ceiling division
    stop = (out[1] - 1 + pad_left) // stride + 1
    return (start, max(stop, start + 1))


def transposed_output(
    inp: Interval, *, kernel: int, stride: int, dilation: int, pad_left: int
) -> Interval:
    """The outputs a transposed convolution run with padding 0 on input ``inp`` yields (Rule MS2).

    >>> transposed_output((2, 5), kernel=3, stride=2, dilation=1, pad_left=1)  # 9 = 4*2 - 1 + 2 + 1
    (3, 10)
    """
    return (
        inp[0] * stride - pad_left,
        (inp[1] - 1) * stride - pad_left + dilation * (kernel - 1) + 1,
    )


def scale_after(scale: Fraction, *, down: int = 1, up: int = 1) -> Fraction:
    """A node's scale from its source's: divided by a stride, multiplied by a factor (Rule MS1).

    >>> scale_after(scale_after(Fraction(1), down=2), up=4)   # a stride-2 conv, then 4x upsampling
    Fraction(2, 1)
    """
    return scale * up / down


def period(relative_scales: Iterable[Fraction]) -> int:
    """Reference-output pixels after which every node is at the same phase again (Rule MS5).

    >>> period([Fraction(1), Fraction(1, 2), Fraction(1, 16), Fraction(4)])  # a U-Net 4 levels deep
    16
    """
    return lcm(*(Fraction(r).denominator for r in relative_scales))


def output_pieces(size: int, piece: int, count: int) -> list[Interval | None]:
    """``count`` consecutive pieces of ``piece`` elements of ``[0, size)``, the last to its end;
    None where the axis ends before (Rule MS5).

    >>> output_pieces(9, 4, 3), output_pieces(5, 2, 3), output_pieces(3, 1, 4)
    ([(0, 4), (4, 8), (8, 9)], [(0, 2), (2, 4), (4, 5)], [(0, 1), (1, 2), (2, 3), None])
    """
    used = -(-size // piece)
    if used > count:
        raise ValueError("more pieces needed than tiles")
    pieces: list[Interval | None] = [(k * piece, (k + 1) * piece) for k in range(used - 1)]
    pieces.append(((used - 1) * piece, size))
    return pieces + [None] * (count - used)
