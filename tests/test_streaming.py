"""The engine against the un-streamed module: outputs, every parameter gradient, input gradient."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import streamcheck
from streamcheck import StreamcheckError, Streamed
from streamcheck.testing import relative_error

F64_RTOL = 1e-10


def gradients(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor | None, run) -> tuple:
    """Output, input gradient and every parameter gradient of ``run(x)`` against ``upstream``."""
    x = x.detach().requires_grad_()
    y = run(x)
    g = (
        torch.randn_like(y, generator=torch.Generator().manual_seed(1))
        if upstream is None
        else upstream
    )
    params = list(module.parameters())
    return (y.detach(), g, *torch.autograd.grad(y, [x, *params], g))


def assert_exact(
    module: nn.Module, shape: tuple[int, ...], tile, *, rtol: float = F64_RTOL
) -> None:
    module = module.double()
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y, g, *want = gradients(module, x, None, module)
    streamed = Streamed(module, tile=tile)
    got_y, _, *got = gradients(module, x, g, streamed)
    assert got_y.shape == y.shape
    assert relative_error(got_y, y) <= rtol
    names = ["input", *(name for name, _ in module.named_parameters())]
    for name, a, b in zip(names, got, want, strict=True):
        assert relative_error(a, b) <= rtol, name


CASES_2D = {
    "conv padding int": (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)), 24),
    "conv tuple, stride, no bias": (nn.Sequential(nn.Conv2d(3, 4, (3, 5), stride=(2, 1), padding=(1, 2), bias=False)), 20),
    "conv same even kernel": (nn.Sequential(nn.Conv2d(3, 4, 4, padding="same"), nn.GELU(), nn.Conv2d(4, 2, 2, padding="same")), 16),
    "conv valid dilated": (nn.Sequential(nn.Conv2d(3, 4, 3, padding="valid", dilation=3), nn.Tanh()), 20),
    "conv groups": (nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.SiLU(), nn.Conv2d(8, 8, 3, groups=2)), 18),
    "conv reflect/replicate": (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 2, 5, padding=2, padding_mode="replicate")), 20),
    "max pool ceil dilation": (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True)), 22),
    "avg pool ceil exclude pad": (nn.Sequential(nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), nn.Conv2d(3, 2, 3)), 20),
    "avg pool include pad": (nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d((2, 3), (2, 2), (1, 1), count_include_pad=True)), 20),
    "avg pool divisor override": (nn.Sequential(nn.AvgPool2d(2, divisor_override=3), nn.Conv2d(3, 2, 3, padding=1)), 16),
    "nested sequential identity": (nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Identity()), nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2), nn.Sequential(nn.Conv2d(4, 3, 1)))), 14),
    "every activation": (nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU6(), nn.ELU(), nn.SELU(), nn.CELU(), nn.Mish(), nn.Hardswish(), nn.Hardsigmoid(), nn.Hardtanh(), nn.Softplus(), nn.Softsign(), nn.Sigmoid(), nn.PReLU(3), nn.Conv2d(3, 2, 3, padding=1)), 12),
}  # fmt: skip


@pytest.mark.parametrize("name", CASES_2D)
@pytest.mark.parametrize(
    "shape", [(1, 3, 37, 29), (3, 3, 45, 45)], ids=["odd non-square", "batch 3"]
)
def test_2d_stacks_are_exact_in_float64(name: str, shape: tuple[int, ...]) -> None:
    module, tile = CASES_2D[name]
    torch.manual_seed(0)
    channels = 4 if "groups" in name else 3
    assert_exact(module, (shape[0], channels, *shape[2:]), tile)
    assert Streamed(module, tile=tile).plan((shape[0], channels, *shape[2:])).n_tiles > 1


def test_non_square_tile_and_image_smaller_than_tile() -> None:
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(4, 2, 3, padding=1)
    )
    assert_exact(module, (2, 3, 50, 21), (20, 64))
    assert_exact(module, (1, 3, 9, 11), 64)  # one tile covers everything


def test_1d_and_3d_stacks_are_exact() -> None:
    assert_exact(
        nn.Sequential(nn.Conv1d(2, 3, 5, padding=2), nn.ReLU(), nn.MaxPool1d(3, 2, 1, ceil_mode=True), nn.AvgPool1d(2, count_include_pad=False), nn.Conv1d(3, 2, 3, dilation=2)),
        (2, 2, 101),
        30,
    )  # fmt: skip
    assert_exact(
        nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2), nn.AvgPool3d(3, 1, 1), nn.Conv3d(2, 2, (1, 3, 3), padding="same")),
        (1, 1, 15, 13, 17),
        (12, 12, 14),
    )  # fmt: skip


def test_float32_agrees_within_accumulation_tolerance() -> None:
    # float32 sums the same products in another order (per tile, then over tiles). Each gradient
    # entry sums L = N * H_out * W_out products; the reordering error of a sum of L terms is bounded
    # by about L * eps relative to the sum of magnitudes, and behaves like sqrt(L) * eps for random
    # signs. We allow 4 * sqrt(L) * eps against the gradient's scale, L = 64 * 64 here.
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(1, 3, 64, 64)
    y, g, *want = gradients(module, x, None, module)
    got_y, _, *got = gradients(module, x, g, Streamed(module, tile=20))
    tolerance = 4 * (64 * 64) ** 0.5 * torch.finfo(torch.float32).eps
    assert relative_error(got_y, y) <= tolerance
    for a, b in zip(got, want, strict=True):
        assert relative_error(a, b) <= tolerance


class CountCalls(TorchDispatchMode):
    """Counts aten operators run on real data, also inside autograd's backward (meta is free)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not any(t.is_meta for t in tensors):
            name = func.overloadpacket.__name__
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_each_tile_runs_two_forwards_and_a_trailing_conv_one() -> None:
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 2, 3, padding=1),
    )
    streamed = Streamed(module, tile=16)
    x = torch.randn(1, 3, 40, 40)
    tiles = streamed.plan(x.shape).n_tiles
    with CountCalls() as forward:
        y = streamed(x)
    with CountCalls() as backward:
        y.sum().backward()
    assert tiles == 16  # receptive field 7: output tile 16 - 7 + 1 = 10, so 4 x 4 tiles
    assert forward.calls["convolution"] == 3 * tiles
    assert forward.calls["relu"] == 2 * tiles
    assert backward.calls["convolution"] == 2 * tiles  # the trailing conv is not recomputed
    assert backward.calls["relu"] == 2 * tiles
    assert backward.calls["convolution_backward"] == 3 * tiles


def test_trailing_activation_is_recomputed_and_exact() -> None:
    assert_exact(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.ReLU()), (1, 3, 40, 40), 12
    )


@pytest.mark.parametrize(
    ("layer", "fragment"),
    [
        (nn.SyncBatchNorm(4), "SyncBatchNorm in training mode"),
        (nn.AdaptiveMaxPool2d(2), "AdaptiveMaxPool2d pools to 2"),
        (nn.Dropout(0.5), "Dropout in training mode"),
        (nn.Flatten(), "Flatten reshapes spatial axes"),
        (nn.Linear(9, 9), "'block.1': mixes or indexes parameters by tensor dimension(s) [3]"),
    ],
)
def test_locality_breaking_layers_are_rejected_by_path_before_any_work(
    layer: nn.Module, fragment: str
) -> None:
    module = nn.Sequential()
    module.add_module("stem", nn.Conv2d(3, 4, 3))
    module.add_module("block", nn.Sequential(nn.ReLU(), layer))
    x = torch.randn(1, 3, 11, 11)
    with CountCalls() as counted, pytest.raises(StreamcheckError) as error:
        Streamed(module, tile=8)(x)
    assert fragment in str(error.value)
    assert "Fix:" in str(error.value)
    assert "convolution" not in counted.calls  # rejected before any computation


def test_every_offending_layer_is_listed_at_once() -> None:
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.AdaptiveMaxPool2d(2), nn.Dropout(0.5)
    )
    with pytest.raises(StreamcheckError) as error:
        streamcheck.plan(module, (1, 3, 32, 32), tile=16)
    message = str(error.value)
    assert "'1'" in message and "'2'" in message and "'3'" in message


def test_eval_batchnorm_and_eval_dropout_are_streamed() -> None:
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU()
    )
    with torch.no_grad():
        module[1].running_mean.uniform_(-1, 1)
        module[1].running_var.uniform_(0.5, 2)
    assert_exact(module.eval(), (2, 3, 30, 30), 12)


def test_tile_smaller_than_receptive_field_names_the_numbers() -> None:
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 4, 5))
    with pytest.raises(
        StreamcheckError,
        match=re.escape(
            "tile 10 px (spatial axis 0) is smaller than the receptive field of the streamed module, 12 px"
        ),
    ) as error:
        streamcheck.plan(module, (1, 3, 64, 64), tile=10)
    # 3x3 conv: 3 px; 2x2 pool: +1; 5x5 conv after stride 2: +4 * 2 -> 12 px, reached at '2'
    assert "'2'" in str(error.value) and "use tile >= 12" in str(error.value)


def test_misaligned_tile_is_rounded_down_to_the_stride() -> None:
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2))  # receptive field 4, stride 2
    p = streamcheck.plan(module, (1, 3, 100, 100), tile=33)
    assert p.tile_px_used == (32, 32) and p.output_tile_px == (15, 15)
    assert "rounded down from 33" in str(p)


def test_bad_tile_values_are_rejected() -> None:
    for bad in (0, (16,), (16, 16, 16), 2.5):
        with pytest.raises(StreamcheckError, match="tile"):
            streamcheck.plan(nn.Conv2d(3, 3, 3), (1, 3, 32, 32), tile=bad)  # type: ignore[arg-type]


def test_wrapping_replaces_nothing_and_keeps_state_dict_keys() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    before = [id(p) for p in trunk.parameters()]
    plain = nn.Sequential(trunk, nn.Conv2d(4, 1, 1))
    keys = list(plain.state_dict())
    streamed_model = nn.Sequential(Streamed(trunk, tile=16), plain[1])
    assert list(streamed_model.state_dict()) == keys
    streamed_model.load_state_dict(plain.state_dict())
    assert [id(p) for p in trunk.parameters()] == before
    assert streamed_model[0].module is trunk


def test_optimizer_built_before_wrapping_trains_the_streamed_layers() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    optimizer = torch.optim.SGD(trunk.parameters(), lr=0.1)
    start = [p.detach().clone() for p in trunk.parameters()]
    streamed = Streamed(trunk, tile=12)
    streamed(torch.randn(1, 3, 30, 30)).square().mean().backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(start, trunk.parameters(), strict=True))
    assert trunk(torch.randn(1, 3, 8, 8)).shape == (1, 2, 8, 8)  # still works unwrapped


def test_backward_accumulates_like_autograd_and_input_without_grad() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)
    ).double()
    streamed = Streamed(trunk, tile=12)
    x = torch.randn(2, 3, 30, 30, dtype=torch.float64)  # no requires_grad: no input gradient made
    for _ in range(2):
        streamed(x).sum().backward()
    streamed_grads = [p.grad.clone() for p in trunk.parameters()]
    trunk.zero_grad()
    for _ in range(2):
        trunk(x).sum().backward()
    for a, p in zip(streamed_grads, trunk.parameters(), strict=True):
        assert relative_error(a, p.grad) <= F64_RTOL


def test_no_grad_inference_and_frozen_parameters() -> None:
    trunk = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)
    ).double()
    trunk[0].requires_grad_(False)
    x = torch.randn(1, 3, 30, 30, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(Streamed(trunk, tile=12)(x), trunk(x), rtol=0, atol=1e-12)
    Streamed(trunk, tile=12)(x).sum().backward()
    assert trunk[0].weight.grad is None and trunk[2].weight.grad is not None


def test_bfloat16_autocast_matches_unstreamed_autocast() -> None:
    # Under autocast both runs compute convolutions in bfloat16 (8 bits of mantissa, eps = 2**-7 =
    # 0.0078). The tiles compute the same products, but the stitched output can differ by one
    # bfloat16 rounding of an intermediate, so we allow a few eps of relative error.
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(1, 3, 48, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, g, *want = gradients(trunk, x, None, trunk)
        got_y, _, *got = gradients(trunk, x, g, Streamed(trunk, tile=20))
    eps = 2.0**-7
    assert got_y.dtype == y.dtype == torch.bfloat16
    assert relative_error(got_y.float(), y.float()) <= 4 * eps
    for a, b in zip(got, want, strict=True):
        assert relative_error(a.float(), b.float()) <= 8 * eps


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float64_exact() -> None:
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 2, 3)
    ).cuda()
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64, device="cuda")
    module = module.double()
    y, g, *want = gradients(module, x, None, module)
    got_y, _, *got = gradients(module, x, g, Streamed(module, tile=20))
    assert relative_error(got_y, y) <= F64_RTOL
    for a, b in zip(got, want, strict=True):
        assert relative_error(a, b) <= F64_RTOL


def test_readme_example_runs_as_written() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S)
    assert block is not None and "streamcheck.Streamed" in block.group(1)
    exec(compile(block.group(1), "README.md", "exec"), {})


def test_bfloat16_autocast_with_a_conv_first_and_last() -> None:
    # The only layer is a trailing conv whose input is the float32 image: autocast casts it to
    # bfloat16 in both runs, so the weight gradients agree as in the test above.
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    x = torch.randn(1, 3, 40, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, g, *want = gradients(trunk, x, None, trunk)
        got_y, _, *got = gradients(trunk, x, g, Streamed(trunk, tile=16))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        assert relative_error(a.float(), b.float()) <= 8 * 2.0**-7


class InPlaceOnSharedMap(nn.Module):
    def __init__(self, *, alias: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, padding=1)
        self.alias = alias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        z = y.contiguous() if self.alias else y * 2  # contiguous() returns y itself
        y.relu_()  # in place, result not assigned: the conv below reads the overwritten map
        return self.b(y) + z


def test_in_place_write_to_a_map_others_read_is_rewritten_out_of_place() -> None:
    """graph Rule G5b: the conv's map is its own; the sum reads it before the write."""
    assert_exact(InPlaceOnSharedMap(), (1, 3, 40, 40), 16)


def test_in_place_write_to_a_map_an_alias_reads_is_rejected() -> None:
    with pytest.raises(StreamcheckError, match="works in place on a feature map"):
        streamcheck.plan(InPlaceOnSharedMap(alias=True), (1, 3, 64, 64), tile=24)


def test_in_place_relu_in_a_sequential_is_exact() -> None:
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 3))
    assert_exact(module, (1, 3, 40, 40), 16)


def test_in_place_layer_on_the_image_leaves_the_callers_image_alone() -> None:
    module = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(3, 2, 3))
    image = torch.randn(1, 3, 40, 40)
    before = image.clone()
    streamed = Streamed(module, tile=16)(image)
    assert torch.equal(image, before)
    assert torch.allclose(streamed, module(before.clone()), rtol=0, atol=1e-6)


def test_hooks_on_streamed_modules_are_rejected() -> None:
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    module[0].register_forward_hook(lambda m, args, out: out * 2)
    with pytest.raises(StreamcheckError, match="'0': has forward or backward hooks"):
        streamcheck.plan(module, (1, 3, 64, 64), tile=32)


def test_reflect_padding_wider_than_the_kernel_half_reads_the_mirrored_pixels() -> None:
    # padding 2 with a 3-tap kernel: border outputs copy pixels 1 and 2, beyond their window.
    assert_exact(nn.Sequential(nn.Conv1d(1, 2, 3, padding=2, padding_mode="reflect")), (1, 1, 5), 3)
    assert_exact(
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=2, padding_mode="reflect"), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=3, padding_mode="replicate")),
        (2, 2, 23, 19),
        (9, 12),
    )  # fmt: skip


class Scaled(nn.Module):
    """A conv and a per-channel scale parameter, like ConvNeXt's layer scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.scale


def test_parameters_used_as_constants_get_exact_gradients_and_stay_live() -> None:
    module = Scaled()
    assert_exact(module, (2, 3, 30, 30), 12)
    streamed = Streamed(module, tile=12)
    x = torch.randn(1, 3, 30, 30, dtype=torch.float64)
    streamed(x)  # plan cached
    module.scale = nn.Parameter(torch.full((4, 1, 1), 3.0, dtype=torch.float64))
    assert relative_error(streamed(x), module(x)) <= F64_RTOL


def test_per_pixel_constants_are_rejected() -> None:
    class PositionBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bias = nn.Parameter(torch.zeros(4, 32, 32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + self.bias

    with pytest.raises(StreamcheckError, match="varies along a spatial axis"):
        streamcheck.plan(PositionBias(), (1, 3, 32, 32), tile=16)


def test_channels_last_stays_exact_and_channels_last() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    module = module.double().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 40, 36, dtype=torch.float64).to(memory_format=torch.channels_last)
    y, g, *want = gradients(module, x, None, module)
    got_y, _, *got = gradients(module, x, g, Streamed(module, tile=16))
    assert got_y.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(got_y, y) <= F64_RTOL
    for a, b in zip(got, want, strict=True):
        assert relative_error(a, b) <= F64_RTOL
