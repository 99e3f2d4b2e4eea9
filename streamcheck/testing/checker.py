"""The equivalence checker: streamed training must equal ordinary training.

``assert_streaming_equivalent`` is meant to sit in a user's test suite (a CI gate): it runs a
module plainly and through :class:`streamcheck.Streamed` on the same input with the same weights,
backpropagates the same loss through both, and compares the output, the input gradient and every
parameter gradient.

NOTE [ How the check works ]
  Rule 1. Two deep copies of the module (and of ``head`` if it is a module) are cast to ``dtype``;
          the caller's module is never touched. Gradients of the copies start at ``None``.
  Rule 1b. Options for ``Streamed`` (``**streamed_options``) go to the streamed copy only; a
          ``tile_transform`` (pixelwise, as ``Streamed`` requires) is applied to the whole input
          of the plain runs, which then compute what each tile computes.
  Rule 2. The loss is ``head(y)`` if that is a scalar, else ``(head(y) * g).sum()`` with ``g`` a
          fixed standard-normal tensor drawn from ``seed`` (``head=None`` means ``head(y) = y``, a
          random projection of the output). A random ``g`` makes every output element matter; an
          all-ones gradient would hide errors that cancel.
  Rule 2b. A module with several outputs (a tuple, list or dict of tensors, e.g. a feature
          pyramid) is compared output by output (rows ``output[0]``, ``output['p2']``); without a
          head its outputs are flattened and concatenated (dicts in key order) before Rule 2.
  Rule 3. Errors are per tensor: ``max_abs_error = max|a - b|`` and
          ``max_rel_error = max|a - b| / scale`` with ``b`` the plain (reference) run. A tensor
          passes when ``max|a - b| <= tolerance``, with
          ``tolerance = atol + rtol * scale + NOISE_FACTOR * max|b - b64|`` (Rules 3b, 3c), with
          ``scale = max|b|`` unless Rule 3c finds its terms larger. If ``scale == 0`` the
          relative error is 0 when ``a == b`` and infinite otherwise. NaN or
          infinity where the reference has a different value is an infinite error; a shape
          mismatch fails the row.
  Rule 3b. Below float64, the plain run is repeated in float64 (``b64``, from the same rounded
          weights and input) and ``max|b - b64|``, the plain run's own rounding error, widens the
          tolerance: the streamed run may be off by NOISE_FACTOR times as much. It covers rounding
          in the forward too (a LayerNorm over nearly equal channels), which Rule 3c does not
          jitter. It does not measure the terms of a cancelling sum: PyTorch's CPU kernels sum
          float32 reductions (BatchNorm's) in float64, so the plain run can be far closer to
          ``b64`` than a float32 sum over tiles can be; Rule 3c measures the terms.
          For float64 checks ``b64 = b`` and the term is zero.
  Rule 3c. The error bound of a sum is relative to the sum of the magnitudes of its terms, not
          to the sum: adding ``L`` terms ``t_i`` in another order (tile by tile) differs by about
          ``eps * sqrt(sum t_i**2)``, however small ``sum t_i`` is. ``rtol`` (and Rule 3's
          relative error) therefore applies to ``scale = max(max|b|, term_scale)``, where
          ``term_scale`` measures the terms: the plain run is repeated (``bj``) with the gradient
          reaching every module's output multiplied by ``1 + JITTER * r``, ``r = +-1`` at random
          per element, as rounding would (the forward is untouched, so the backward is linear in
          these factors and no ReLU or max-pool decision changes), and ``term_scale =
          max|bj - b| / JITTER``, the random-sign sum ``|sum r_i t_i|`` of each gradient's terms.
          Where a gradient does not cancel, ``term_scale`` is about ``max|b|`` and nothing
          changes. Where its terms cancel exactly (the bias of a conv before BatchNorm in training
          mode, GroupNorm or InstanceNorm: the normalisation removes any constant added to the
          map, so the true gradient is 0; an SE gate before a GroupNorm over its one channel,
          which removes any scale), both runs return rounding residue of size ``eps *
          term_scale``, and ``max|b|`` alone would hold that residue to ``rtol`` of itself. A real
          error (a missing tile, a wrong statistic) drops or changes terms, not their rounding,
          and the largest term is at least ``term_scale / sqrt(L)``: far above ``rtol *
          term_scale`` for any ``L < rtol**-2``.
          Output and buffer rows have ``bj = b`` (nothing in the forward is jittered).
  Rule 4. A gradient that is ``None`` counts as zeros (an unused parameter must stay unused
          when streamed; a streamed run that cuts the input gradient fails the ``input.grad``
          row). Parameters with ``requires_grad=False`` are not compared.
  Rule 5. Floating-point buffers (e.g. BatchNorm running statistics) are compared after the run
          as one aggregate row, so a streamed forward that updates them differently fails.
  Rule 6. Nothing is caught: if the module cannot be streamed, the engine's ``StreamcheckError``
          (naming the module path) propagates, so the checker never passes without streaming.
          A tile that covers the whole input (one tile) compares nothing streamed and warns.
  Rule 7. TF32 is switched off for the duration of the check on CUDA and restored afterwards;
          with TF32 float32 convolutions are only good to about 1e-3.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import streamcheck

__all__ = [
    "EquivalenceReport",
    "TensorError",
    "assert_streaming_equivalent",
    "check_streamed",
    "check_streaming_equivalence",
    "default_tolerances",
    "relative_error",
    "tf32_disabled",
]

# Safety factor in the float32 tolerance rtol = C * eps * sqrt(L); see `default_tolerances`.
FLOAT32_SAFETY_FACTOR = 8.0
FLOAT64_RTOL = 1e-10
# Rule 3b: how far the streamed run may be from the plain run, in units of the plain run's own
# rounding error. |a - b| <= |a - exact| + |b - exact|, and the two runs round alike, so 2 is the
# expectation; 4 leaves room for the maximum over elements landing on a different element.
NOISE_FACTOR = 4.0
# Rule 3c: the relative jitter of the gradients; any small power of two (the backward is linear in
# it), large enough that rounding of ``bj - b`` is negligible next to ``JITTER * term_scale``.
JITTER = 2.0**-10


@dataclass(frozen=True)
class TensorError:
    """The comparison of one tensor: streamed (``a``) against plain (``b``)."""

    name: str
    kind: str  # "output" | "input_grad" | "param_grad" | "buffers"
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    reference_max_abs: float
    passed: bool
    reference_rounding_error: float = 0.0  # max|b - b64| (Rule 3b); 0 in float64 checks
    tolerance: float = math.nan  # the bound max_abs_error was held to (Rule 3)
    term_scale: float = 0.0  # Rule 3c's measure of the terms; 0 for outputs and buffers

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "max_abs_error": _json_float(self.max_abs_error),
            "max_rel_error": _json_float(self.max_rel_error),
            "reference_max_abs": _json_float(self.reference_max_abs),
            "reference_rounding_error": _json_float(self.reference_rounding_error),
            "tolerance": _json_float(self.tolerance),
            "term_scale": _json_float(self.term_scale),
            "passed": self.passed,
        }


@dataclass(frozen=True)
class EquivalenceReport:
    """Result of :func:`check_streaming_equivalence`: one :class:`TensorError` row per compared
    tensor; ``str(report)`` is a table, ``to_dict()`` its JSON form.

    >>> from torch import nn
    >>> report = check_streaming_equivalence(nn.Conv1d(1, 2, 3), (1, 1, 30), tile=12)
    >>> [row.name for row in report.rows], report.failures
    (['output', 'input.grad', 'weight', 'bias'], ())
    """

    rows: tuple[TensorError, ...]
    passed: bool
    dtype: torch.dtype
    tile: tuple[int, ...]
    rtol: float
    atol: float
    n_tiles: int
    input_shape: tuple[int, ...]
    accumulation_length: int
    device: str

    @property
    def failures(self) -> tuple[TensorError, ...]:
        return tuple(row for row in self.rows if not row.passed)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; non-finite errors become ``None``."""
        return {
            "passed": self.passed,
            "dtype": _dtype_name(self.dtype),
            "tile": list(self.tile),
            "n_tiles": self.n_tiles,
            "input_shape": list(self.input_shape),
            "rtol": self.rtol,
            "atol": self.atol,
            "accumulation_length": self.accumulation_length,
            "device": self.device,
            "versions": {"streamcheck": streamcheck.__version__, "torch": torch.__version__},
            "n_failed": len(self.failures),
            "rows": [row.to_dict() for row in self.rows],
        }

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        tile = "x".join(str(t) for t in self.tile)
        shape = "x".join(str(s) for s in self.input_shape)
        lines = [
            f"streamcheck equivalence {verdict}: input {shape}, tile {tile} "
            f"({self.n_tiles} tiles), {_dtype_name(self.dtype)} on {self.device}, "
            f"rtol {self.rtol:.3g}, atol {self.atol:.3g}"
        ]
        headers = ("tensor", "shape", "max abs err", "tolerance", "max rel err", "status")
        body = [
            (
                row.name,
                "x".join(str(s) for s in row.shape) or "scalar",
                f"{row.max_abs_error:.3e}",
                f"{row.tolerance:.3e}",
                f"{row.max_rel_error:.3e}",
                "ok" if row.passed else "FAIL",
            )
            for row in self.rows
        ]
        widths = [max(len(r[i]) for r in (headers, *body)) for i in range(len(headers))]
        for i, r in enumerate((headers, *body)):
            cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
            cells += [c.rjust(w) for c, w in zip(r[2:5], widths[2:5], strict=True)]
            cells.append(r[5])
            lines.append("  ".join(cells).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        failures = self.failures
        if failures:
            worst = max(failures, key=lambda row: row.max_rel_error)
            lines.append(
                f"{len(failures)} of {len(self.rows)} tensors differ beyond tolerance; "
                f"worst: {worst.name} "
                f"(max rel err {worst.max_rel_error:.3e}, rtol {self.rtol:.3g})"
            )
        else:
            lines.append(f"all {len(self.rows)} tensors within tolerance")
        return "\n".join(lines)


def default_tolerances(dtype: torch.dtype, accumulation_length: int) -> tuple[float, float]:
    """``(rtol, atol)`` used when the caller gives none.

    float64: ``rtol = 1e-10``, ``atol = 0``. Streaming sums the same terms as the plain run in
    another order, so the difference is rounding only, ~1e-13 relative even for 1e6-pixel sums;
    1e-10 leaves room for that and still catches any real error (a missing or doubled tile border
    pixel changes a gradient by far more).

    float32 (and lower precision): ``rtol = 8 * eps * sqrt(L)``, ``atol = 0``, where ``eps`` is
    the machine epsilon of ``dtype`` and ``L`` the accumulation length, the number of terms summed
    into one weight-gradient entry: batch size times pixels per image, ``N * prod(spatial)``.
    Summing ``L`` terms of random sign in two different orders differs by about
    ``eps * sqrt(L)`` relative to the sum (rounding errors add like a random walk). Measured on
    CPU (ResNet-18/34/50, VGG-16, MobileNetV2 and ConvNeXt trunks at 96-160 px, the paper's
    Fig 2 network at 256-1024 px), the worst tensor of each check had
    ``max_rel_error / (eps * sqrt(L))`` between 0.07 and 0.36; the factor 8 leaves 20x for other
    convolution algorithms (cuDNN's Winograd and FFT) and deeper trunks. For a 1x3x2048x2048
    input this is ``8 * 1.19e-7 * 2048 = 1.95e-3``; for 1x3x96x96 it is ``9.2e-5``. A float32
    check mostly guards the production dtype: weight gradients summed over many pixels cannot
    see a single wrong pixel at this tolerance (the output and input-gradient rows can), so
    float64 is the exactness oracle.

    >>> default_tolerances(torch.float64, 10**6)
    (1e-10, 0.0)
    >>> rtol, atol = default_tolerances(torch.float32, 2048 * 2048)  # 8 * 1.19e-7 * sqrt(L)
    >>> f"{rtol:.2e}", atol
    ('1.95e-03', 0.0)
    """
    if dtype == torch.float64:
        return FLOAT64_RTOL, 0.0
    if not dtype.is_floating_point:
        raise streamcheck.StreamcheckError(
            f"streamcheck: the check needs a floating-point dtype, got {dtype}"
        )
    eps = torch.finfo(dtype).eps
    return FLOAT32_SAFETY_FACTOR * eps * math.sqrt(max(accumulation_length, 1)), 0.0


def check_streaming_equivalence(
    module: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    *,
    tile: int | Sequence[int],
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float64,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    **streamed_options: Any,
) -> EquivalenceReport:
    """Compare ``head(module(x))`` run plainly and streamed; return the report, never raise on
    a mismatch (see :func:`assert_streaming_equivalent` for arguments and the method).

    >>> from torch import nn
    >>> trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    >>> report = check_streaming_equivalence(trunk, (1, 3, 40, 40), tile=16, channels_last=True)
    >>> report.passed, report.n_tiles  # a 16 px tile gives 14 output px (field 3): 3 x 3 tiles
    (True, 9)
    """
    x_ref = _example_tensor(example_input, dtype=dtype, seed=seed)
    device = x_ref.device
    plain = _cast_copy(module, dtype=dtype, device=device)
    streamed_module = _cast_copy(module, dtype=dtype, device=device)
    with tf32_disabled(device):
        # Rule 6: construct and plan before any computation; errors propagate.
        streamed = streamcheck.Streamed(streamed_module, tile=tile, **streamed_options)
        n_tiles = streamcheck.plan(streamed_module, tuple(x_ref.shape), tile=tile).n_tiles
    return _check(
        streamed, plain, x_ref, n_tiles=n_tiles, head=head, rtol=rtol, atol=atol, seed=seed
    )


def check_streamed(
    streamed: streamcheck.Streamed,
    example_input: torch.Tensor | Sequence[int],
    *,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
) -> EquivalenceReport:
    """Compare an existing ``Streamed`` wrapper, as it is now, with its module run plainly.

    Unlike :func:`check_streaming_equivalence` (Rule 1), the wrapper itself runs, with its tile,
    options and whatever it cached from earlier calls: after a user changed the module in place
    (a replaced submodule, loaded weights, another tile), this shows whether the wrapper still
    computes what the module computes. The reference is a deep copy of ``streamed.module`` in its
    current dtype, device and training mode; the dtype of the check is that of the module's
    parameters. The gradients of the wrapped parameters are restored afterwards. Rule 6 holds
    with one change: the wrapper runs first, so its own refusal propagates, and a wrapper that
    streams what a fresh ``streamcheck.plan`` of its module refuses fails with AssertionError.

    >>> import torch
    >>> from torch import nn
    >>> trunk = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()).double()
    >>> streamed = streamcheck.Streamed(trunk, tile=8)
    >>> check_streamed(streamed, (1, 1, 20, 20)).passed
    True
    >>> trunk[1] = nn.Tanh()  # changed after wrapping: the wrapper must see it
    >>> check_streamed(streamed, (1, 1, 20, 20)).passed
    True
    """
    module = streamed.module
    first = next((p for p in module.parameters() if p.is_floating_point()), None)
    dtype = first.dtype if first is not None else torch.float64
    x_ref = _example_tensor(example_input, dtype=dtype, seed=seed)
    if first is not None:
        x_ref = x_ref.to(first.device)
    plain = _cast_copy(module, dtype=dtype, device=x_ref.device)
    saved = [(p, p.grad) for p in module.parameters()]
    for p, _ in saved:
        p.grad = None
    try:
        report = _check(
            streamed, plain, x_ref, n_tiles=None, head=head, rtol=rtol, atol=atol, seed=seed
        )
    finally:
        for p, grad in saved:
            p.grad = grad
    return report


def _check(
    streamed: streamcheck.Streamed,
    plain: nn.Module,
    x_ref: torch.Tensor,
    *,
    n_tiles: int | None,
    head: Callable[[torch.Tensor], torch.Tensor] | None,
    rtol: float | None,
    atol: float | None,
    seed: int,
) -> EquivalenceReport:
    """Run ``streamed`` and ``plain`` (with their heads) on ``x_ref`` and compare (Rules 2-5)."""
    dtype, device = x_ref.dtype, x_ref.device
    if rtol is None or atol is None:
        default_rtol, default_atol = default_tolerances(dtype, _accumulation_length(x_ref.shape))
        rtol = default_rtol if rtol is None else rtol
        atol = default_atol if atol is None else atol

    def copied(part: Any, to: torch.dtype) -> Any:
        return _cast_copy(part, dtype=to, device=device) if isinstance(part, nn.Module) else part

    plain_head, streamed_head = copied(head, dtype), copied(head, dtype)
    exact = (  # Rule 3b: the plain run in float64, from the same rounded weights
        (copied(plain, torch.float64), copied(plain_head, torch.float64))
        if dtype != torch.float64
        else None
    )
    jittered = (copied(plain, dtype), copied(plain_head, dtype))  # Rule 3c

    with tf32_disabled(device):
        streamed_run = _run(streamed, streamed_head, x_ref, seed=seed)
        transform = streamed.tile_transform  # Rule 1b: the plain runs transform the whole input
        plain_run = _run(plain, plain_head, x_ref, seed=seed, transform=transform)
        exact_run = None
        if exact is not None:
            exact_run = _run(*exact, x_ref.double(), seed=seed, transform=transform)
        with _jittered(jittered, seed=seed):
            jittered_run = _run(*jittered, x_ref, seed=seed, transform=transform)
    if n_tiles is None:  # check_streamed: the wrapper ran; a fresh plan must agree it may
        try:
            n_tiles = streamcheck.plan(plain, tuple(x_ref.shape), tile=streamed.tile).n_tiles
        except streamcheck.StreamcheckError as error:
            raise AssertionError(
                "streamcheck: the Streamed wrapper ran, but a fresh plan of its module refuses "
                f"it (a stale cache?): {error}"
            ) from error

    tile_px = _tile_tuple(streamed.tile, spatial_dims=x_ref.dim() - 2)
    if n_tiles < 2:
        warnings.warn(
            f"streamcheck: tile {'x'.join(map(str, tile_px))} covers the whole "
            f"{'x'.join(map(str, x_ref.shape[2:]))} input in one tile, so the check compares "
            "nothing streamed; use a smaller tile or a larger input",
            UserWarning,
            stacklevel=4,
        )

    rows = [
        _compare(
            name,
            kind,
            streamed_run[name][1],
            b,
            None if exact_run is None else exact_run[name][1],
            jittered_run[name][1],
            rtol=rtol,
            atol=atol,
        )
        for name, (kind, b) in plain_run.items()
    ]

    return EquivalenceReport(
        rows=tuple(rows),
        passed=all(row.passed for row in rows),
        dtype=dtype,
        tile=tile_px,
        rtol=float(rtol),
        atol=float(atol),
        n_tiles=int(n_tiles),
        input_shape=tuple(x_ref.shape),
        accumulation_length=_accumulation_length(x_ref.shape),
        device=str(device),
    )


def assert_streaming_equivalent(
    module: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    *,
    tile: int | Sequence[int],
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float64,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    **streamed_options: Any,
) -> EquivalenceReport:
    """Assert that streaming ``module`` gives the same output and gradients as running it plainly.

    Runs ``head(module(x))`` once plainly and once as ``head(Streamed(module, tile=tile)(x))``
    on deep copies cast to ``dtype`` (the module passed in is not modified), backpropagates the
    same loss through both, and compares the output, ``x.grad``, every parameter gradient (of
    ``head`` too, if it is a module) and the floating-point buffers. The method and the error
    definitions are the numbered rules at the top of this module.

    Args:
        module: the part of the network to stream (e.g. a trunk in eval mode).
        example_input: an input tensor ``(N, C, *spatial)``, or just its shape (a standard-normal
            input is then drawn from ``seed``). Its device is the device of the check. The plain
            run holds the whole image's activations, so use the smallest input that still gives
            several tiles per axis.
        tile: input-tile edge in pixels, overlap included; an int or one int per spatial axis.
        head: what follows the streamed part; a scalar output is the loss, otherwise the loss is
            a fixed random projection of it. ``None`` projects ``module``'s output directly.
        dtype: the dtype of the check; float64 is the exactness oracle.
        rtol, atol: tolerances; ``None`` means :func:`default_tolerances` (which documents the
            float32 formula).
        seed: seeds the random upstream gradient (and the input when a shape is given).
        streamed_options: passed on to :class:`streamcheck.Streamed` (``compile=``,
            ``channels_last=``, ``tile_transform=``, ...), so the check runs the wrapper as it
            will be used.

    Returns:
        The :class:`EquivalenceReport` (``passed`` is ``True``).

    Raises:
        AssertionError: if any tensor differs beyond tolerance; the message is the report table.
        streamcheck.StreamcheckError: if the module cannot be streamed (names the module path).

    Example (64x64 image, tile 32 px with overlap, so several tiles; the head is a global max
    pool and a linear layer, whose gradients are compared too):

    >>> import torch
    >>> from torch import nn
    >>> from streamcheck.testing.checker import assert_streaming_equivalent
    >>> trunk = nn.Sequential(
    ...     nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 64 -> 32
    ...     nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
    ... )
    >>> head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    >>> report = assert_streaming_equivalent(trunk, torch.randn(1, 3, 64, 64), tile=32, head=head)
    >>> report.passed, report.n_tiles > 1
    (True, True)
    >>> print(str(report).splitlines()[1])  # the table's columns
    tensor       shape     max abs err  tolerance  max rel err  status
    """
    report = check_streaming_equivalence(
        module,
        example_input,
        tile=tile,
        head=head,
        dtype=dtype,
        rtol=rtol,
        atol=atol,
        seed=seed,
        **streamed_options,
    )
    if not report.passed:
        raise AssertionError("\n" + str(report))
    return report


# --------------------------------------------------------------------------------------------
# helpers


def _example_tensor(
    example_input: torch.Tensor | Sequence[int], *, dtype: torch.dtype, seed: int
) -> torch.Tensor:
    if isinstance(example_input, torch.Tensor):
        x = example_input.detach().to(dtype=dtype)
    else:
        shape = tuple(int(s) for s in example_input)
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=generator, dtype=dtype)
    if x.dim() < 3:
        raise streamcheck.StreamcheckError(
            f"streamcheck: the example input must be (N, C, *spatial), got shape {tuple(x.shape)}"
        )
    return x


def _accumulation_length(shape: Sequence[int]) -> int:
    """Terms summed into one weight-gradient entry: batch size times pixels per image."""
    return math.prod(shape[:1]) * math.prod(shape[2:])


def _tile_tuple(tile: int | Sequence[int], *, spatial_dims: int) -> tuple[int, ...]:
    if isinstance(tile, int):
        return (tile,) * spatial_dims
    return tuple(int(t) for t in tile)


def _cast_copy(module: Any, *, dtype: torch.dtype, device: torch.device) -> Any:
    """Rule 1: an independent copy in ``dtype`` on ``device`` with no gradients."""
    try:
        clone = copy.deepcopy(module)
    except Exception as error:  # e.g. the deprecated torch.nn.utils.weight_norm
        raise RuntimeError(
            f"streamcheck: the check runs two deep copies of the {type(module).__name__}, but "
            f"copy.deepcopy failed ({type(error).__name__}: {error})"
        ) from error
    clone.to(device=device, dtype=dtype)
    for parameter in clone.parameters():
        parameter.grad = None
    return clone


def _run(
    module: nn.Module,
    head: Callable[[torch.Tensor], torch.Tensor] | None,
    x_ref: torch.Tensor,
    *,
    seed: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, tuple[str, torch.Tensor]]:
    """Rules 2-2b, 4, 5: run, backpropagate the loss; every compared tensor by row name, with
    its kind (``output``, ``input_grad``, ``param_grad``, ``buffers``)."""
    x = x_ref.clone().requires_grad_(True)
    y = module(x if transform is None else transform(x))
    z = _flattened(y) if head is None else head(y)
    if z.dim() == 0:
        loss = z
    else:
        generator = torch.Generator().manual_seed(seed + 1)  # float32 draw: same g in every dtype
        g = torch.randn(z.shape, generator=generator).to(device=z.device, dtype=z.dtype)
        loss = (z * g).sum()
    loss.backward()
    x_grad = torch.zeros_like(x) if x.grad is None else x.grad  # Rule 4
    tensors = {name: ("output", value) for name, value in _outputs(y).items()}
    tensors["input.grad"] = ("input_grad", x_grad.detach())
    if isinstance(module, streamcheck.Streamed):
        module = module.module
    owners = [("", module)] + ([("head.", head)] if isinstance(head, nn.Module) else [])
    for prefix, owner in owners:  # Rule 4: None gradients count as zeros
        tensors |= {
            prefix + name: ("param_grad", torch.zeros_like(p) if p.grad is None else p.grad)
            for name, p in owner.named_parameters()
            if p.requires_grad
        }
    buffers = [b.detach().flatten() for b in module.buffers() if b.is_floating_point()]
    if buffers:  # Rule 5: one row
        tensors[f"buffers ({len(buffers)} tensors)"] = ("buffers", torch.cat(buffers))
    return tensors


class _Jitter(torch.autograd.Function):
    """Rule 3c: the identity forward; backward multiplies each element by ``1 +- JITTER``."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        ctx.generator = generator
        return t.clone()  # a new tensor: an in-place layer after it must not write into ``t``

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        signs = torch.randint(0, 2, grad.shape, generator=ctx.generator).to(grad) * 2 - 1
        return grad * (1 + JITTER * signs), None


@contextmanager
def _jittered(modules: Sequence[Any], *, seed: int) -> Iterator[None]:
    """Rule 3c: while active, the output of every module in ``modules`` (a throw-away copy) passes
    through :class:`_Jitter` (an ``nn.Sequential``'s output is its last layer's: skipped)."""
    generator = torch.Generator().manual_seed(seed + 2)

    def jitter(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad:
            return _Jitter.apply(t, generator)
        return t

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, dict):
            return {key: jitter(value) for key, value in output.items()}
        if type(output) in (tuple, list):
            return type(output)(jitter(value) for value in output)
        return jitter(output)

    handles = [
        layer.register_forward_hook(hook)
        for root in modules
        if isinstance(root, nn.Module)
        for layer in root.modules()
        if not isinstance(layer, nn.Sequential)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _outputs(y: Any) -> dict[str, torch.Tensor]:
    """Rule 2b: the module's outputs by row name."""
    if isinstance(y, torch.Tensor):
        return {"output": y.detach()}
    named = y.items() if isinstance(y, dict) else enumerate(y)
    return {f"output[{key!r}]": value.detach() for key, value in named}


def _flattened(y: Any) -> torch.Tensor:
    """Rule 2b: one tensor of all outputs, ``(N, total)``, for the loss of a head-less check."""
    if isinstance(y, torch.Tensor):
        return y
    leaves = y.values() if isinstance(y, dict) else y
    return torch.cat([leaf.flatten(1) for leaf in leaves], dim=1)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` in float64, ``b`` the reference (Rule 3's ``max_rel_error``).

    Equal non-finite entries (inf, NaN in both) count as equal; any other non-finite difference is
    an infinite error; an all-zero ``b`` makes any difference infinite.

    >>> relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
    0.5
    """
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(a.shape)} != reference {tuple(b.shape)}")
    return _relative(_max_abs_difference(a, b), _scale(b))


def _scale(b: torch.Tensor) -> float:
    """max|b| over the finite entries of ``b`` (0 if there are none)."""
    finite = b.detach().to(torch.float64)
    finite = finite[finite.isfinite()].abs()
    return float(finite.max()) if finite.numel() else 0.0


def _relative(max_abs: float, scale: float) -> float:
    if scale > 0:
        return max_abs / scale
    return 0.0 if max_abs == 0 else math.inf


def _max_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| in float64; equal values (NaN with NaN too) differ by 0, others by inf."""
    a64 = a.detach().to(torch.float64)
    b64 = b.detach().to(torch.float64)
    same = (a64 == b64) | (torch.isnan(a64) & torch.isnan(b64))
    diff = torch.where(same, torch.zeros_like(a64), (a64 - b64).abs())
    diff = torch.nan_to_num(diff, nan=math.inf, posinf=math.inf)
    return float(diff.max()) if diff.numel() else 0.0


def _compare(
    name: str,
    kind: str,
    a: torch.Tensor,
    b: torch.Tensor,
    b_exact: torch.Tensor | None,
    b_jittered: torch.Tensor | None = None,
    *,
    rtol: float,
    atol: float,
) -> TensorError:
    """Rule 3: streamed ``a`` against reference ``b``; ``b``'s own error against ``b_exact``
    (Rule 3b) and its jittered repeat ``b_jittered`` (Rule 3c) set the tolerance."""
    shape = tuple(b.shape)
    if a.shape != b.shape:
        return TensorError(name, kind, shape, math.inf, math.inf, math.nan, passed=False)

    def finite_difference(x: torch.Tensor | None) -> float:
        found = 0.0 if x is None else _max_abs_difference(b, x)
        return found if math.isfinite(found) else 0.0  # a non-finite reference tells nothing

    max_abs = _max_abs_difference(a, b)
    term_scale = finite_difference(b_jittered) / JITTER
    scale = max(_scale(b), term_scale)
    rounding = finite_difference(b_exact)
    tolerance = atol + rtol * scale + NOISE_FACTOR * rounding
    return TensorError(
        name,
        kind,
        shape,
        max_abs,
        _relative(max_abs, scale),
        _scale(b),
        passed=max_abs <= tolerance,
        reference_rounding_error=rounding,
        tolerance=tolerance,
        term_scale=term_scale,
    )


@contextmanager
def tf32_disabled(device: torch.device) -> Iterator[None]:
    """Rule 7. Uses torch's fp32_precision settings where they exist (torch >= 2.9): reading the
    legacy ``allow_tf32`` flags after a user set the new ones raises there."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    conv: Any = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        saved = matmul.fp32_precision, conv.fp32_precision
        matmul.fp32_precision = conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
        return
    matmul_precision = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        torch.set_float32_matmul_precision(matmul_precision)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None
