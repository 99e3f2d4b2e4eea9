"""Tests of the equivalence checker: it passes exact streaming and fails every injected error."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import streamcheck
from streamcheck.testing.checker import (
    EquivalenceReport,
    assert_streaming_equivalent,
    check_streamed,
    check_streaming_equivalence,
    default_tolerances,
)

RealStreamed = streamcheck.Streamed


def small_trunk() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
    )


def small_input() -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# the use-it-in-your-own-suite example (also in the README)


def test_my_trunk_streams_exactly() -> None:
    from streamcheck.testing import assert_streaming_equivalent

    trunk = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
    ).eval()  # fmt: skip
    head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    x = torch.randn(2, 3, 128, 128)
    report = assert_streaming_equivalent(trunk, x, tile=64, head=head)  # float64, rtol 1e-10
    assert report.n_tiles >= 4


# ---------------------------------------------------------------------------------------------
# correct streaming passes


def test_passes_and_reports_every_tensor() -> None:
    trunk = small_trunk()
    report = assert_streaming_equivalent(trunk, small_input(), tile=32)
    assert isinstance(report, EquivalenceReport)
    assert report.passed and not report.failures
    assert report.dtype == torch.float64
    assert (report.rtol, report.atol) == (1e-10, 0.0)
    assert report.tile == (32, 32)
    assert report.n_tiles >= 4
    names = [row.name for row in report.rows]
    assert names == ["output", "input.grad"] + [n for n, _ in trunk.named_parameters()]
    for row in report.rows:
        assert row.max_rel_error <= 1e-10
        assert row.reference_max_abs > 0  # a zero reference would make the check vacuous
    table = str(report)
    assert "PASSED" in table
    for name in names:
        assert name in table


def test_does_not_touch_the_callers_module() -> None:
    trunk = small_trunk()
    before = {n: p.detach().clone() for n, p in trunk.named_parameters()}
    assert_streaming_equivalent(trunk, small_input(), tile=32)
    for name, parameter in trunk.named_parameters():
        assert parameter.dtype == torch.float32
        assert parameter.grad is None
        assert torch.equal(parameter.detach(), before[name])


def test_head_module_parameters_are_compared() -> None:
    head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    report = assert_streaming_equivalent(small_trunk(), small_input(), tile=32, head=head)
    assert [r.name for r in report.rows if r.name.startswith("head.")] == [
        "head.2.weight",
        "head.2.bias",
    ]


def test_scalar_head_is_the_loss() -> None:
    report = assert_streaming_equivalent(
        small_trunk(), small_input(), tile=32, head=lambda y: y.square().mean()
    )
    assert report.passed


def test_accepts_a_shape_and_a_tile_per_axis() -> None:
    report = assert_streaming_equivalent(small_trunk(), (2, 3, 64, 48), tile=(32, 24))
    assert report.input_shape == (2, 3, 64, 48)
    assert report.tile == (32, 24)


@pytest.mark.parametrize(
    ("trunk", "shape", "tile"),
    [
        (nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2)), (2, 2, 200), 64),
        (
            nn.Sequential(nn.Conv3d(1, 2, 3), nn.ReLU(), nn.AvgPool3d(2)),
            (1, 1, 20, 24, 16),
            (12, 12, 8),
        ),
    ],
    ids=["1d", "3d"],
)
def test_one_and_three_spatial_dims(
    trunk: nn.Module, shape: tuple[int, ...], tile: int | tuple[int, ...]
) -> None:
    report = assert_streaming_equivalent(trunk, shape, tile=tile)
    assert report.n_tiles >= 4
    assert len(report.tile) == len(shape) - 2


def test_streamed_options_reach_the_wrapper(monkeypatch: pytest.MonkeyPatch) -> None:
    """``**streamed_options`` go to ``Streamed`` (Rule 1b); a tile transform is applied to the
    plain runs' whole input too, so a pixelwise one passes."""
    seen: list[dict[str, object]] = []

    class Recording(RealStreamed):  # type: ignore[misc, valid-type]
        def __init__(self, module: nn.Module, **options: object) -> None:
            seen.append(options)
            super().__init__(module, **options)

    monkeypatch.setattr(streamcheck, "Streamed", Recording)
    report = assert_streaming_equivalent(
        small_trunk(),
        small_input(),
        tile=32,
        channels_last=True,
        tile_transform=lambda t: 2 * t + 1,
    )
    assert report.n_tiles > 1
    assert seen[0]["channels_last"] is True and callable(seen[0]["tile_transform"])
    with pytest.raises(TypeError, match="no_such_option"):
        check_streaming_equivalence(small_trunk(), small_input(), tile=32, no_such_option=1)


def test_float32_uses_the_accumulation_length_tolerance() -> None:
    report = assert_streaming_equivalent(small_trunk(), small_input(), tile=32, dtype=torch.float32)
    assert report.accumulation_length == 64 * 64
    assert report.rtol == pytest.approx(8 * torch.finfo(torch.float32).eps * 64)
    assert report.dtype == torch.float32


def test_default_tolerances() -> None:
    assert default_tolerances(torch.float64, 10**8) == (1e-10, 0.0)
    eps = torch.finfo(torch.float32).eps
    rtol, atol = default_tolerances(torch.float32, 4 * 100 * 100)
    assert rtol == pytest.approx(8 * eps * 200) and atol == 0.0
    with pytest.raises(streamcheck.StreamcheckError):
        default_tolerances(torch.int64, 10)


def test_json_form_round_trips() -> None:
    report = check_streaming_equivalence(small_trunk(), small_input(), tile=32)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["passed"] is True
    assert data["dtype"] == "float64"
    assert data["tile"] == [32, 32]
    assert data["n_failed"] == 0
    assert data["device"] == "cpu"
    assert data["versions"] == {"streamcheck": streamcheck.__version__, "torch": torch.__version__}
    assert [row["name"] for row in data["rows"]] == [row.name for row in report.rows]
    assert data["rows"][0]["shape"] == [1, 8, 32, 32]


def test_single_tile_warns_that_nothing_is_compared() -> None:
    with pytest.warns(UserWarning, match="one tile"):
        assert_streaming_equivalent(small_trunk(), (1, 3, 16, 16), tile=64)


# ---------------------------------------------------------------------------------------------
# injected errors fail, with the table in the message


class PerturbedWeightStreamed(RealStreamed):  # type: ignore[misc, valid-type]
    """Streams correctly, but first nudges one weight of the streamed copy (1e-6 relative)."""

    def __init__(self, module: nn.Module, *, tile: int) -> None:
        with torch.no_grad():
            first = next(module.parameters())
            first.view(-1)[0] *= 1 + 1e-6
        super().__init__(module, tile=tile)


class OffByOnePixelStreamed(RealStreamed):  # type: ignore[misc, valid-type]
    """Streams correctly, then corrupts one output pixel (a stitching error at a tile seam)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        seam = y.shape[-1] // 2
        scale = torch.ones_like(y)
        scale[..., seam, seam] += 1e-6
        return y * scale


class DetachedStreamed(RealStreamed):  # type: ignore[misc, valid-type]
    """Streams correctly but cuts the gradient of the input (saliency maps would be zero)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.detach())


class NaNStreamed(RealStreamed):  # type: ignore[misc, valid-type]
    """Streams correctly, then puts NaN in one output pixel per channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        corrupt = torch.zeros_like(y, dtype=torch.bool)
        corrupt[..., 0, 0] = True
        return y + torch.where(corrupt, torch.nan, 0.0)


@pytest.mark.parametrize(
    ("fake", "failing"),
    [
        # The net is piecewise linear and the loss linear in its output, so a nudged first
        # weight changes the output, the input gradient and the second conv's weight gradient.
        (PerturbedWeightStreamed, {"output", "input.grad", "3.weight"}),
        # A scaled seam pixel changes every gradient that flows through it.
        (
            OffByOnePixelStreamed,
            {"output", "input.grad", "0.weight", "0.bias", "3.weight", "3.bias"},
        ),
        (DetachedStreamed, {"input.grad"}),
        (NaNStreamed, {"output"}),
    ],
    ids=["weight", "pixel", "detached", "nan"],
)
def test_injected_errors_fail_with_a_table(
    monkeypatch: pytest.MonkeyPatch, fake: type, failing: set[str]
) -> None:
    monkeypatch.setattr(streamcheck, "Streamed", fake)
    with pytest.raises(AssertionError) as excinfo:
        assert_streaming_equivalent(small_trunk(), small_input(), tile=32)
    message = str(excinfo.value)
    assert "FAILED" in message
    assert "tensor" in message and "max abs err" in message and "max rel err" in message
    failed_lines = {line.split()[0] for line in message.splitlines() if line.endswith("FAIL")}
    assert failing <= failed_lines
    report = check_streaming_equivalence(small_trunk(), small_input(), tile=32)
    assert not report.passed
    assert failing <= {row.name for row in report.failures}
    json.dumps(report.to_dict(), allow_nan=False)  # non-finite errors become null


def test_float32_tolerance_still_catches_a_dropped_pixel(monkeypatch: pytest.MonkeyPatch) -> None:
    class DroppedPixel(RealStreamed):  # type: ignore[misc, valid-type]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = super().forward(x)
            keep = torch.ones_like(y)
            keep[..., y.shape[-2] // 2, y.shape[-1] // 2] = 0  # one of 32 * 32 output pixels
            return y * keep

    monkeypatch.setattr(streamcheck, "Streamed", DroppedPixel)
    report = check_streaming_equivalence(small_trunk(), small_input(), tile=32, dtype=torch.float32)
    assert {"output", "input.grad", "0.weight", "3.weight", "3.bias"} <= {
        row.name for row in report.failures
    }


def test_float32_tolerance_widens_by_the_plain_runs_own_rounding_error() -> None:
    # Rule 3b on made-up numbers: a gradient that is a cancelling sum (max|b| = 1e-3, its terms
    # of order 1), where the plain float32 run is itself 1e-5 off the float64 value.
    from streamcheck.testing.checker import NOISE_FACTOR, _compare

    b = torch.tensor([1e-3, -5e-4])
    b_exact = b.double() + torch.tensor([1e-5, 0.0], dtype=torch.float64)
    rtol = 1e-6  # alone it would allow 1e-9

    def row(streamed_off_by: float, reference: torch.Tensor | None) -> object:
        a = b + torch.tensor([streamed_off_by, 0.0])
        return _compare("w", "param_grad", a, b, reference, rtol=rtol, atol=0.0)

    within, beyond = row(3e-5, b_exact), row(6e-5, b_exact)
    assert within.passed and not beyond.passed  # 4 x 1e-5 allowed
    assert within.reference_rounding_error == pytest.approx(1e-5, rel=1e-3)
    assert within.tolerance == pytest.approx(rtol * 1e-3 + NOISE_FACTOR * 1e-5, rel=1e-3)
    assert not row(3e-5, None).passed  # without a float64 run (float64 checks): rtol only


def cancelling_bias() -> nn.Module:
    """A conv bias before a GroupNorm over its one channel: the norm removes any constant added
    to the map, so the bias gradient is exactly 0 and both runs return rounding residue."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.GroupNorm(1, 1, affine=False))


def test_a_cancelling_gradient_is_held_to_the_scale_of_its_terms() -> None:
    """Rule 3c: the bias gradient's terms are the gradient at the conv output, ``g``; computed
    here independently (``retain_grad``), their random-sign sum is ``~sqrt(sum g**2)``."""
    module, x = cancelling_bias().double(), small_input()[:, :1].double()
    report = check_streaming_equivalence(module, x, tile=24)
    bias = next(row for row in report.rows if row.name == "0.bias")
    assert report.passed, str(report)
    conv_out = module[0](x.requires_grad_(True))
    conv_out.retain_grad()
    y = module[1](conv_out)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).double()
    (y * g).sum().backward()
    terms = float(conv_out.grad.square().sum().sqrt())
    assert 0.05 * terms < bias.term_scale < 5 * terms
    assert bias.reference_max_abs < 1e-12 * terms  # the sum itself is rounding residue


def test_the_term_scale_allows_rounding_of_the_terms_not_more() -> None:
    # Rule 3c on made-up numbers: a residue of 1e-17 whose terms are of order 1
    from streamcheck.testing.checker import JITTER, _compare

    b = torch.tensor([1e-17], dtype=torch.float64)
    jittered = b + JITTER * 1.0

    def row(streamed_off_by: float) -> object:
        a = b + streamed_off_by
        return _compare("bias", "param_grad", a, b, None, jittered, rtol=1e-10, atol=0.0)

    assert row(1e-14).passed  # rounding of order-1 terms, 45 eps
    assert not row(1e-9).passed  # anything a dropped term could give
    assert not _compare("bias", "param_grad", b + 1e-14, b, None, rtol=1e-10, atol=0.0).passed


def test_an_error_in_a_cancelling_gradient_still_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    class LeakyPixel(RealStreamed):  # type: ignore[misc, valid-type]
        """One seam pixel carries 1e-6 of the bias past the normalisation (a wrong statistic
        there): the bias gradient gets 1e-6 of one term, next to a sum of 64 * 64 * 2 terms."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = super().forward(x)
            leak = torch.zeros_like(y)
            leak[..., y.shape[-2] // 2, y.shape[-1] // 2] = 1e-6
            return y + leak * self.module[0].bias

    monkeypatch.setattr(streamcheck, "Streamed", LeakyPixel)
    report = check_streaming_equivalence(cancelling_bias(), small_input()[:, :1], tile=24)
    assert "0.bias" in {row.name for row in report.failures}


def test_explicit_tolerance_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streamcheck, "Streamed", PerturbedWeightStreamed)
    report = check_streaming_equivalence(small_trunk(), small_input(), tile=32, rtol=1e-6)
    assert report.passed  # a 1e-6 nudge of one of 216 weights is within 1e-6
    assert report.rtol == 1e-6
    worst = max(row.max_rel_error for row in report.rows)
    assert 0 < worst < 1e-6


def test_unused_parameter_must_stay_unused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A parameter without gradient in the plain run compares as zeros (Rule 4)."""

    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = small_trunk()
            self.spare = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    class TouchesSpare(RealStreamed):  # type: ignore[misc, valid-type]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + 0 * self.module.spare.sum()

    monkeypatch.setattr(streamcheck, "Streamed", TouchesSpare)
    report = check_streaming_equivalence(WithSpare(), small_input(), tile=32)
    spare = next(row for row in report.rows if row.name == "spare")
    assert spare.passed and spare.max_abs_error == 0.0  # zeros == None

    class PushesSpare(RealStreamed):  # type: ignore[misc, valid-type]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + 1e-3 * self.module.spare.sum()

    monkeypatch.setattr(streamcheck, "Streamed", PushesSpare)
    report = check_streaming_equivalence(WithSpare(), small_input(), tile=32)
    spare = next(row for row in report.rows if row.name == "spare")
    assert not spare.passed and math.isinf(spare.max_rel_error)


# ---------------------------------------------------------------------------------------------
# modules that cannot be streamed: the engine's error propagates


def test_unstreamable_module_raises_streamcheck_error() -> None:
    # SyncBatchNorm's statistics span processes: no single-device pass can see them
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SyncBatchNorm(8), nn.ReLU())
    trunk.train()
    with pytest.raises(streamcheck.StreamcheckError, match="'1'"):
        assert_streaming_equivalent(trunk, small_input(), tile=32)
    with pytest.raises(streamcheck.StreamcheckError, match="'1'"):
        check_streaming_equivalence(trunk, small_input(), tile=32)


def test_a_module_that_cannot_be_copied_is_reported() -> None:
    class Uncopyable(nn.Sequential):
        def __deepcopy__(self, memo: dict[int, object]) -> None:
            raise TypeError("no copies")

    with pytest.raises(RuntimeError, match=r"deep copies of the Uncopyable.*no copies"):
        assert_streaming_equivalent(Uncopyable(nn.Conv2d(3, 4, 3)), small_input(), tile=32)


def test_tf32_is_off_during_a_cuda_check_and_restored() -> None:
    """Only flags are touched, so this runs without a GPU too (Rule 7)."""
    from streamcheck.testing.checker import tf32_disabled

    if not hasattr(torch.backends.cudnn, "conv"):
        pytest.skip("torch < 2.9 has only the legacy allow_tf32 flags")
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision = conv.fp32_precision = "tf32"  # the user opted in to TF32
        with tf32_disabled(torch.device("cuda")):
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        with tf32_disabled(torch.device("cpu")):
            assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float32_without_tf32() -> None:
    torch.backends.cudnn.allow_tf32 = True
    report = assert_streaming_equivalent(
        small_trunk(), small_input().cuda(), tile=32, dtype=torch.float32
    )
    assert report.passed
    assert torch.backends.cudnn.allow_tf32  # restored


# --------------------------------------------------------------------- check_streamed, imports
def test_check_streamed_sees_changes_after_wrapping() -> None:
    """The wrapper itself is checked, as it is after a change; its gradients are left alone."""
    trunk = small_trunk().double()
    streamed = streamcheck.Streamed(trunk, tile=32)
    assert check_streamed(streamed, small_input()).passed
    trunk[1] = nn.Tanh()
    trunk[0].weight.grad = torch.ones_like(trunk[0].weight)
    report = check_streamed(streamed, small_input())
    assert report.passed and report.n_tiles > 1 and report.dtype == torch.float64
    assert torch.equal(trunk[0].weight.grad, torch.ones_like(trunk[0].weight))


def test_check_streamed_fails_a_wrapper_that_computes_something_else() -> None:
    class Doubled(streamcheck.Streamed):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    report = check_streamed(Doubled(small_trunk().double(), tile=32), small_input())
    assert not report.passed and report.rows[0].name == "output" and not report.rows[0].passed


def test_checker_imports_without_hypothesis() -> None:
    """The checker needs torch only; strategies and the state machine load on first use."""
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"  # `import hypothesis` now fails
        "import streamcheck.testing as t\n"
        "from streamcheck.testing import assert_streaming_equivalent, check_streamed\n"
        "assert 'streamcheck.testing.strategies' not in sys.modules\n"
        "for name in ('conv_stacks', 'dag_cases', 'streaming_machine'):\n"
        "    try:\n"
        "        getattr(t, name)\n"
        "    except ImportError as error:\n"
        "        assert 'hypothesis' in str(error), error\n"
        "    else:\n"
        "        raise AssertionError(name + ' imported without hypothesis')\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_every_public_testing_name_resolves() -> None:
    """A small public surface (at most 12 names), each with a docstring and a runnable example
    (the examples run as doctests)."""
    import streamcheck.testing as testing

    assert len(testing.__all__) <= 12
    for name in testing.__all__:
        value = getattr(testing, name)
        doc = getattr(value, "__doc__", None) or ""
        # a hypothesis strategy function keeps the wrapped function's docstring
        assert ">>> " in doc, f"streamcheck.testing.{name} has no runnable example"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        testing.nothing  # noqa: B018
