"""``streamcheck.split`` against the whole model: ``head(trunk(x))`` equals ``model(x)`` bit for bit
(float64), parameters are the model's own, the trunk streams, and bad input is refused.

The oracle is the un-split model itself; the longest prefix is checked against the engine's verdict
on the next longer prefix (it must be refused), and strides against the shapes of a plain run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import streamcheck
from streamcheck.testing.checker import assert_streaming_equivalent
from suites.trunks import randomize_norms

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

SHAPE = (1, 3, 64, 64)


def built(factory: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(factory()).eval().double()


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return built(lambda: torchvision.models.resnet18(weights=None))


@pytest.fixture(scope="module")
def seresnet18() -> nn.Module:
    return built(lambda: timm.create_model("seresnet18", pretrained=False))


def image(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def assert_pair_is_the_model(model: nn.Module, cut: streamcheck.Split) -> None:
    x = image()
    with torch.no_grad():
        assert torch.equal(cut.head(cut.trunk(x)), model(x))
    own = {id(p) for p in model.parameters()}
    parts = [p for part in cut for p in part.parameters()]
    assert {id(p) for p in parts} == own  # the same objects, every one of them
    assert len(parts) == len(own)  # and none in both parts


def test_until_cuts_after_the_named_module_and_trains_the_model(resnet18: nn.Module) -> None:
    cut = streamcheck.split(resnet18, until="layer3", input_shape=SHAPE)
    trunk, head = cut
    assert cut.cut == "layer3" and cut.total_stride == (16, 16)
    assert cut.modules(trunk) == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]
    assert cut.modules(head) == ["layer4", "avgpool", "flatten()", "fc"]
    assert_pair_is_the_model(resnet18, cut)
    assert trunk.get_submodule("layer3.1") is resnet18.layer3[1]  # the model's paths
    x = image((1, 3, 32, 32))
    resnet18.zero_grad()
    resnet18(x).square().sum().backward()
    whole = {n: p.grad.clone() for n, p in resnet18.named_parameters()}
    resnet18.zero_grad()
    head(trunk(x)).square().sum().backward()
    for name, p in resnet18.named_parameters():
        assert torch.equal(p.grad, whole[name]), name
    resnet18.zero_grad()


def test_the_trunk_streams_exactly(resnet18: nn.Module) -> None:
    trunk, _ = streamcheck.split(resnet18, until="layer1.0", input_shape=SHAPE)
    report = assert_streaming_equivalent(trunk, (1, 3, 72, 72), tile=56, rtol=1e-10)
    assert report.n_tiles >= 4


def test_stride_cuts_at_the_deepest_point_within_it(resnet18: nn.Module) -> None:
    for stride, name in [(2, "relu"), (4, "layer1"), (8, "layer2"), (31, "layer3")]:
        cut = streamcheck.split(resnet18, stride=stride, input_shape=SHAPE)
        assert cut.cut == name, stride
        trunk_out = cut.trunk(image())
        assert max(SHAPE[-1] // trunk_out.shape[-1], 1) <= stride  # a plain run's shapes


def test_the_default_is_the_longest_streamable_prefix(resnet18: nn.Module) -> None:
    cut = streamcheck.split(resnet18, input_shape=SHAPE)
    assert cut.cut == "layer4" and cut.total_stride == (32, 32)
    assert cut.stopped_by is not None and "'avgpool'" in cut.stopped_by
    assert_pair_is_the_model(resnet18, cut)
    with pytest.raises(streamcheck.StreamcheckError, match="'avgpool'"):
        streamcheck.split(resnet18, until="avgpool", input_shape=SHAPE)  # the next cut


def test_squeeze_excite_streams_so_the_prefix_reaches_the_global_pool(
    seresnet18: nn.Module,
) -> None:
    """Rule SP8: squeeze-excite blocks are statistic levels now, not refusals."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cut = streamcheck.split(seresnet18, input_shape=SHAPE)
    assert cut.cut == "layer4" and cut.total_stride == (32, 32)
    assert cut.stopped_by is not None and "'global_pool.pool'" in cut.stopped_by
    assert_pair_is_the_model(seresnet18, cut)
    plan = streamcheck.Streamed(cut.trunk, tile=512).plan((1, 3, 512, 512))
    assert plan.levels == 8  # one squeeze-excite per basic block


def test_until_past_the_global_pool_names_it_and_the_fix(seresnet18: nn.Module) -> None:
    with pytest.raises(streamcheck.StreamcheckError) as error:
        streamcheck.split(seresnet18, until="global_pool", input_shape=SHAPE)
    message = str(error.value)
    assert "'global_pool.pool'" in message and "until='layer4'" in message
    assert "Streamed(model)" in message


class RowMean(nn.Module):
    """A block that averages over rows only: not a statistic of the whole map (Rule G13)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * x.mean(2, keepdim=True).sigmoid()


def test_a_reduction_over_some_spatial_axes_ends_the_prefix_early_with_a_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), RowMean(), nn.Conv2d(4, 2, 3))
    with pytest.warns(UserWarning, match=r"(?s)ends early, after '1'.*only some spatial axes"):
        cut = streamcheck.split(model.double(), input_shape=SHAPE)
    assert cut.cut == "1"
    assert_pair_is_the_model(model, cut)


class DropoutHead(nn.Module):
    """A classifier whose own forward reads ``self.training`` (timm's ``forward_head`` does)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x)).mean((2, 3))
        return self.fc(F.dropout(x, p=0.5, training=self.training))


def test_code_that_reads_the_mode_runs_in_the_parts_mode() -> None:
    model = DropoutHead().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cut = streamcheck.split(model, input_shape=(1, 3, 16, 16))
    assert cut.cut == "relu()"
    x = image((2, 3, 16, 16))
    for mode in (True, False):
        model.train(mode)
        cut.trunk.train(mode)
        cut.head.train(mode)
        torch.manual_seed(1)
        whole = model(x)
        torch.manual_seed(1)
        assert torch.equal(cut.head(cut.trunk(x)), whole), mode


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"until": "layer9"}, r"no module 'layer9'; it can be cut after: conv1, bn1, .*layer4"),
        ({"until": "layer1.0.conv1"}, r"cannot cut after 'layer1.0.conv1': .*skip connection"),
        ({"stride": 1}, r"no cut of ResNet has total stride <= 1; .*maxpool 4 x 4"),
        ({"stride": 0}, r"stride=0 must be a positive int"),
        ({"until": "layer1", "stride": 4}, "not both"),
        ({"input_shape": (3, 64, 64, 1, 1, 1)}, "is not"),
        ({"tile": -1}, "positive int"),
    ],
)
def test_bad_input_is_refused_with_the_choices(
    resnet18: nn.Module, options: dict[str, object], match: str
) -> None:
    kwargs: dict = {"input_shape": SHAPE} | options
    with pytest.raises(streamcheck.StreamcheckError, match=match):
        streamcheck.split(resnet18, **kwargs)


def test_a_tile_smaller_than_the_receptive_field_shortens_the_prefix(resnet18: nn.Module) -> None:
    with pytest.warns(UserWarning, match="ends early, after 'layer1'"):
        cut = streamcheck.split(resnet18, input_shape=(1, 3, 256, 256), tile=64)
    plan = streamcheck.plan(cut.trunk, (1, 3, 256, 256), tile=64)  # accepted at this tile
    assert plan.receptive_field_px[0] <= 64
    assert cut.stopped_by is not None and "receptive field" in cut.stopped_by


def test_a_model_with_no_streamable_prefix_is_refused() -> None:
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    with pytest.raises(streamcheck.StreamcheckError, match=r"no prefix of Sequential streams"):
        streamcheck.split(model, input_shape=(1, 3, 8, 8))
