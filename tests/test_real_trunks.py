"""Real timm and torchvision trunks that use the operations of ``test_ops.py``, streamed exactly
(float64, rtol 1e-10: output, input gradient, every parameter gradient), random weights.

The trunks are cut at total stride 4 (the zoo, ``python -m suites.zoo``, goes to stride 8) and the
image is the smallest that gives two tiles per axis (``suites.zoo.run.input_and_tile``).
"""

from __future__ import annotations

import pytest
import torch

from streamcheck.testing.checker import assert_streaming_equivalent
from suites.trunks import randomize_norms, timm_trunk, torchvision_trunk
from suites.zoo.run import input_and_tile, reach

pytest.importorskip("timm")
pytest.importorskip("torchvision")

TIMM = {
    "convnext_atto": "layer scale and LayerNorm2d computed from parameters in forward",
    "nf_resnet26": "ScaledStdConv2d: weight standardised in forward, F.conv2d",
    "resnetblur18": "BlurPool2d: F.pad reflect + F.conv2d with a fixed filter buffer",
    "mobilenetv2_100": "BatchNormAct2d: shape asserts, eval-mode F.batch_norm, activation",
    "res2net50_14w_8s": "torch.split along channels, pieces indexed and concatenated",
    "hgnetv2_b0": "stem: asymmetric F.pad, ceil-mode max pool, concatenation",
}
TORCHVISION = {
    "shufflenet_v2_x1_0": (["conv1", "maxpool", "stage2"], "channel shuffle and chunk"),
}


def check(trunk: torch.nn.Module) -> None:
    trunk = randomize_norms(trunk).eval().double()
    fields, strides, _ = reach(trunk, 2)
    shape, tile = input_and_tile(fields, strides)
    report = assert_streaming_equivalent(trunk, shape, tile=tile, rtol=1e-10)
    assert report.n_tiles >= 4, str(report)
    n_parameters = sum(1 for p in trunk.parameters() if p.requires_grad)
    assert sum(row.kind == "param_grad" for row in report.rows) == n_parameters


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TIMM))
def test_timm_trunk_streams_exactly(name: str) -> None:
    check(timm_trunk(name, stride=4))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_trunk_streams_exactly(name: str) -> None:
    check(torchvision_trunk(name, TORCHVISION[name][0]))
