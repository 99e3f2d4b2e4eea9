"""What users do to a model after wrapping it, and bad inputs: exact answers or a clear error.

Each silent-wrong case here gave a wrong answer before the plan cache was keyed on the module's
state (streaming Rules K1-K5); each bad input raised a raw error mid-way or a misleading message.
"""

from __future__ import annotations

import io
import pickle
import re

import numpy as np
import pytest
import torch
from torch import nn

from streamcheck import StreamcheckError, Streamed
from streamcheck.testing import check_streamed, relative_error

F64_RTOL = 1e-10


def image(shape: tuple[int, ...] = (1, 3, 48, 48), seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def assert_matches_plain(streamed: Streamed, x: torch.Tensor) -> None:
    """Output, input gradient and every parameter gradient equal the plain module's (float64)."""
    module = streamed.module
    params = [p for p in module.parameters() if p.requires_grad]
    results = []
    for run in (module, streamed):
        leaf = x.detach().requires_grad_()
        y = run(leaf)
        g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
        results.append((y.detach(), *torch.autograd.grad(y, [leaf, *params], g)))
    for got, want in zip(*reversed(results), strict=True):
        assert relative_error(got, want) <= F64_RTOL


def trunk() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1)
    ).double()


class FrozenBatchNorm2d(nn.Module):
    """torchvision's FrozenBatchNorm2d: the scale is computed from buffers in ``forward``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var + 1e-5).rsqrt().reshape(
            1, -1, 1, 1
        )
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift


# -------------------------------------------------------------------- changes after the first call


@pytest.mark.parametrize(
    "replace",
    [
        lambda t: t.__setitem__(1, nn.Sigmoid()),
        lambda t: t.__setitem__(0, nn.Conv2d(3, 4, 3, padding=1).double()),  # a new stem
        lambda t: t.__setitem__(3, nn.Conv2d(4, 4, 7, padding=3).double()),  # more overlap
        lambda t: t.__setitem__(2, nn.AvgPool2d(2)),
    ],
    ids=["activation", "conv same shape", "conv larger kernel", "pool kind"],
)
def test_a_submodule_replaced_after_the_first_call_is_used(replace) -> None:
    t = trunk()
    s = Streamed(t, tile=20)
    x = image()
    s(x)
    replace(t)
    assert_matches_plain(s, x)


def test_a_conv_attribute_changed_in_place_is_used() -> None:
    t = trunk()
    s = Streamed(t, tile=20)
    x = image()
    s(x)
    t[0].padding = (0, 0)  # the output shrinks: the plan must be new
    assert s(x).shape == t(x).shape
    assert_matches_plain(s, x)


def test_buffers_read_in_forward_are_re_read_after_load_state_dict() -> None:
    t = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), FrozenBatchNorm2d(4), nn.ReLU()).double()
    s = Streamed(t, tile=20)
    x = image()
    s(x)
    state = {k: v.clone() for k, v in t.state_dict().items()}
    state["1.running_var"] = torch.rand(4, dtype=torch.float64) + 0.5
    state["1.running_mean"] = torch.randn(4, dtype=torch.float64)
    t.load_state_dict(state)
    assert_matches_plain(s, x)
    with torch.no_grad():
        t[1].weight.mul_(3)  # in place, not through load_state_dict
    assert_matches_plain(s, x)


def test_batchnorm_running_statistics_changed_in_place_are_used() -> None:
    t = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).double().eval()
    s = Streamed(t, tile=20)
    x = image()
    s(x)
    t[1].running_var.uniform_(0.5, 2.0)
    t[1].running_mean.normal_()
    assert_matches_plain(s, x)


def test_changing_the_tile_after_the_first_call_changes_the_plan() -> None:
    t = trunk()
    s = Streamed(t, tile=20)
    x = image()
    before = s.plan(x.shape).n_tiles
    s(x)
    s.tile = 48
    after = s.plan(x.shape)
    assert after.tile_px == (48, 48) and after.n_tiles < before
    assert_matches_plain(s, x)


def test_a_switch_to_training_mode_is_followed_not_ignored() -> None:
    """train() after the first call: the next call plans BatchNorm's batch statistics (a second
    pass) and equals the plain module, running statistics included."""
    t = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).double().eval()
    s = Streamed(t, tile=20)
    x = image()
    s(x)
    assert s.plan(x.shape).levels == 0
    t.train()
    assert s.plan(x.shape).levels == 1
    report = check_streamed(s, x)  # the conv's bias gradient is 0 up to rounding: Rule 3c
    assert report.passed, str(report)


def test_a_hook_registered_after_the_first_call_is_refused() -> None:
    t = trunk()
    s = Streamed(t, tile=20)
    x = image()
    s(x)
    t[1].register_forward_hook(lambda *args: None)
    with pytest.raises(StreamcheckError, match="'1': has forward or backward hooks"):
        s(x)


def test_dtype_and_requires_grad_changes_are_followed() -> None:
    t = trunk().float()
    s = Streamed(t, tile=20)
    s(image().float())
    t.double()
    t[0].weight.requires_grad_(False)
    assert_matches_plain(s, image())


def test_a_module_changed_between_forward_and_backward_is_refused() -> None:
    t = trunk()
    s = Streamed(t, tile=20)
    y = s(image())
    t[3] = nn.Conv2d(4, 4, 3, padding=1).double()
    with pytest.raises(StreamcheckError, match="changed between forward and backward"):
        y.sum().backward()


def test_weights_changed_in_place_between_forward_and_backward_are_refused() -> None:
    t = trunk()
    s = Streamed(t, tile=20)
    y = s(image())
    with torch.no_grad():
        t[0].weight.add_(1)
    with pytest.raises(StreamcheckError, match="'0.weight'"):
        y.sum().backward()


def test_a_streamed_model_pickles_after_running() -> None:
    t = trunk()
    s = Streamed(t, tile=20)
    x = image()
    s(x)
    buffer = io.BytesIO()
    torch.save(s, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert_matches_plain(loaded, x)
    assert relative_error(loaded(x), s(x)) == 0
    assert isinstance(pickle.loads(pickle.dumps(s)), Streamed)


def test_revalidation_reuses_the_plan_when_nothing_changed() -> None:
    t = trunk()
    s = Streamed(t, tile=20)
    x = image()
    first = s.plan(x.shape)
    with torch.no_grad():
        t[0].weight.mul_(2)  # values are read live: no new plan needed
    s(x)
    assert s.plan(x.shape) is first


# ------------------------------------------------------------------------------------ bad inputs


def test_an_integer_image_without_a_tile_transform_says_how_to_convert() -> None:
    s = Streamed(trunk(), tile=20)
    for dtype in (torch.uint8, torch.int64):
        x = torch.zeros(1, 3, 48, 48, dtype=dtype)
        with pytest.raises(StreamcheckError, match=re.escape(str(dtype))) as info:
            s(x)
        assert "torch.float64" in str(info.value) and "tile_transform" in str(info.value)


def test_a_float_image_of_another_dtype_is_refused_with_both_dtypes() -> None:
    s = Streamed(trunk(), tile=20)
    with pytest.raises(StreamcheckError, match=r"torch\.float32.*torch\.float64"):
        s(image().float())


def test_a_tile_transform_returning_the_wrong_dtype_is_refused_before_the_module_runs() -> None:
    s = Streamed(trunk(), tile=20, tile_transform=lambda t: t.float() / 255)
    with pytest.raises(StreamcheckError, match=r"tile_transform.*torch\.float32.*torch\.float64"):
        s(torch.zeros(1, 3, 48, 48, dtype=torch.uint8))


def test_a_tile_transform_that_changes_the_shape_is_refused_before_the_module_runs() -> None:
    s = Streamed(trunk(), tile=20, tile_transform=lambda t: t[:, :, 1:].double())
    with pytest.raises(StreamcheckError, match=r"keep the shape"):
        s(torch.zeros(1, 3, 48, 48, dtype=torch.uint8))


def test_an_unbatched_image_asks_for_the_batch_axis() -> None:
    s = Streamed(trunk(), tile=20)
    with pytest.raises(StreamcheckError, match=r"\(N, C, H, W\).*\(3, 48, 48\)") as info:
        s(image()[0])
    assert "locality" not in str(info.value) and "unsqueeze(0)" in str(info.value)


@pytest.mark.parametrize(
    "bad", [[[0.0]], np.zeros((1, 3, 48, 48)), "image.png"], ids=["list", "numpy", "str"]
)
def test_anything_but_a_tensor_is_refused(bad) -> None:
    s = Streamed(trunk(), tile=20)
    with pytest.raises(StreamcheckError, match=type(bad).__name__):
        s(bad)


def test_double_backward_is_refused_clearly() -> None:
    s = Streamed(trunk(), tile=20)
    x = image().requires_grad_()
    y = s(x)
    with pytest.raises(StreamcheckError, match="create_graph"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_parameters_on_several_dtypes_are_refused_by_path() -> None:
    t = trunk()
    t[3].float()
    with pytest.raises(StreamcheckError, match=r"torch\.float32: '3\.weight'"):
        Streamed(t, tile=20)(image())
