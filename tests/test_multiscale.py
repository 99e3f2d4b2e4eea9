"""Streaming at several resolutions (geometry Rules MS1-MS8): U-Nets, feature pyramids, HRNet-style
fusion, transposed convolutions, upsampling, shuffles, TF 'SAME' padding; several outputs.

Every check compares the streamed module against the plain one in float64 at rtol 1e-10: every
output, the input gradient and every parameter gradient, for one loss over all outputs with a
random gradient per output (or over a subset of them), at odd image sizes and tiles that are
multiples of nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

import streamcheck

RTOL = 1e-10


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def exact(
    module: nn.Module,
    shape: tuple[int, ...],
    tile: int | tuple[int, ...],
    *,
    used: Callable[[int], bool] = lambda j: True,
    min_tiles: int = 4,
) -> streamcheck.StreamPlan:
    """Streamed == plain (float64, rtol 1e-10) for outputs, input gradient, every parameter
    gradient; the loss uses the outputs ``j`` with ``used(j)``."""
    torch.manual_seed(0)
    module = module.double().eval()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    streamed = streamcheck.Streamed(module, tile=tile)
    plan = streamed.plan(shape)
    assert plan.n_tiles >= min_tiles, str(plan)
    plain_out = module(x)
    leaves, spec = pytree.tree_flatten(plain_out)
    upstream = [torch.randn_like(leaf) if used(j) else None for j, leaf in enumerate(leaves)]
    params = [p for p in module.parameters() if p.requires_grad]

    def grads(out: Any) -> list[torch.Tensor]:
        flat, their_spec = pytree.tree_flatten(out)
        assert their_spec == spec, "the streamed module returns another structure"
        loss = sum(
            (leaf * g).sum() for leaf, g in zip(flat, upstream, strict=True) if g is not None
        )
        return list(torch.autograd.grad(loss, [x, *params], allow_unused=True))

    plain = grads(plain_out)
    streamed_out = streamed(x)
    for j, (a, b) in enumerate(zip(pytree.tree_leaves(streamed_out), leaves, strict=True)):
        assert a.shape == b.shape
        assert _relative(a, b) <= RTOL, f"output {j}: {_relative(a, b):.2e}"
    for name, a, b in zip(["input", *(n for n, p in module.named_parameters() if p.requires_grad)],
                          grads(streamed_out), plain, strict=True):  # fmt: skip
        if b is None:
            assert a is None or not a.any(), name
            continue
        assert a is not None, name
        assert _relative(a, b) <= RTOL, f"gradient of {name}: {_relative(a, b):.2e}"
    return plan


def boxes_partition(plan: streamcheck.StreamPlan) -> None:
    """Every output element is owned by exactly one tile (geometry Rule MS5), counted directly."""
    for j, shape in enumerate(plan.output_shapes):
        owners = torch.zeros(shape[2:], dtype=torch.int64)
        for tile in plan.tiles:
            box = tile.output_boxes[j] if tile.output_boxes else tile.output_box
            if box is not None:
                owners[tuple(slice(a, b) for a, b in box)] += 1
        assert bool((owners == 1).all()), f"output {j}: owners {owners.unique().tolist()}"


# ------------------------------------------------------------------------------- networks


class UNet(nn.Module):
    """Two levels down (stride-2 conv, max pool), two up (bilinear upsampling, then a transposed
    conv), concatenated skips, logits at full resolution. Odd sizes: the upsampled map is padded
    (or cropped) to its skip with ``F.pad`` amounts from shape reads, as milesial's Pytorch-UNet."""

    def __init__(self, channels: int = 3, classes: int = 2, *, align_corners: bool = False) -> None:
        super().__init__()
        self.enc1 = nn.Conv2d(channels, 4, 3, padding=1)
        self.down1 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.enc2 = nn.Conv2d(6, 6, 3, padding=1)
        self.down2 = nn.MaxPool2d(2)
        self.bottom = nn.Conv2d(6, 8, 3, padding=1)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=align_corners)
        self.dec2 = nn.Conv2d(14, 6, 3, padding=1)
        self.up1 = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1)
        self.dec1 = nn.Conv2d(8, 4, 3, padding=1)
        self.logits = nn.Conv2d(4, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.relu(self.enc1(x))
        x2 = F.relu(self.enc2(self.down1(x1)))
        up = self.up2(F.relu(self.bottom(self.down2(x2))))
        dy, dx = x2.size(2) - up.size(2), x2.size(3) - up.size(3)
        up = F.pad(up, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        y = F.relu(self.dec2(torch.cat([x2, up], 1)))
        y = F.relu(self.dec1(torch.cat([x1, self.up1(y)], 1)))
        return self.logits(y)


class FPN(nn.Module):
    """A three-level feature pyramid: bottom-up stride-2 convs, lateral 1x1 convs, a nearest
    top-down path (F.interpolate with scale_factor) added to the laterals; three outputs."""

    def __init__(self, *, as_dict: bool = True) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.c4 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.lat = nn.ModuleList(nn.Conv2d(c, 5, 1) for c in (4, 6, 8))
        self.smooth = nn.ModuleList(nn.Conv2d(5, 5, 3, padding=1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> Any:
        c2 = F.relu(self.stem(x))
        c3 = F.relu(self.c3(c2))
        c4 = F.relu(self.c4(c3))
        p4 = self.lat[2](c4)
        p3 = self.lat[1](c3) + F.interpolate(p4, scale_factor=2, mode="nearest")
        p2 = self.lat[0](c2) + F.interpolate(p3, scale_factor=2.0, mode="bilinear")
        outs = [s(p) for s, p in zip(self.smooth, (p2, p3, p4), strict=True)]
        return {"p2": outs[0], "p3": outs[1], "p4": outs[2]} if self.as_dict else tuple(outs)


class HRFusion(nn.Module):
    """HRNet's exchange unit: three branches at 1/1, 1/2, 1/4 of the stem; each output sums every
    branch brought to its scale (strided convs down, 1x1 conv + nearest Upsample up); returns the
    list of the three fused maps, as timm's HRNet stages do (so here the outputs are at 1/1, 1/2 and
    1/4 of the stem)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 4, padding=1)  # an odd image to a multiple of 4: 45 -> 44
        self.to2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.to4 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.branches = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
        fuse: list[list[nn.Module]] = []
        for i in range(3):
            row: list[nn.Module] = []
            for j in range(3):
                if j > i:
                    row.append(
                        nn.Sequential(nn.Conv2d(4, 4, 1), nn.Upsample(scale_factor=2 ** (j - i)))
                    )
                elif j < i:
                    row.append(
                        nn.Sequential(
                            *[nn.Conv2d(4, 4, 3, stride=2, padding=1) for _ in range(i - j)]
                        )
                    )
                else:
                    row.append(nn.Identity())
            fuse.append(row)
        self.fuse = nn.ModuleList(nn.ModuleList(r) for r in fuse)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s = F.relu(self.stem(x))
        xs = [s, self.to2(s)]
        xs.append(self.to4(xs[1]))
        xs = [F.relu(b(t)) for b, t in zip(self.branches, xs, strict=True)]
        fused = []
        for i in range(3):
            y = self.fuse[i][0](xs[0])
            for j in range(1, 3):
                y = y + self.fuse[i][j](xs[j])
            fused.append(F.relu(y))
        return fused


# ------------------------------------------------------------------------------------ done when


@pytest.mark.parametrize("align_corners", [False, True])
def test_unet_with_transposed_conv_bilinear_skips_and_full_resolution_logits(
    align_corners: bool,
) -> None:
    plan = exact(UNet(align_corners=align_corners), (1, 3, 71, 57), (45, 41))
    assert plan.output_shape == (1, 2, 71, 57)
    assert plan.output_bytes == 2 * 8 * 2 * 71 * 57  # the logits and their gradient, float64
    assert "outputs and their gradients" in str(plan)
    boxes_partition(plan)


@pytest.mark.parametrize("as_dict", [True, False])
def test_fpn_with_three_outputs(as_dict: bool) -> None:
    plan = exact(FPN(as_dict=as_dict), (1, 3, 79, 63), (39, 45))
    assert len(plan.output_shapes) == 3
    boxes_partition(plan)


def test_fpn_loss_over_some_outputs_only() -> None:
    exact(FPN(), (1, 3, 79, 63), (39, 45), used=lambda j: j == 1)


def test_hrnet_style_fusion() -> None:
    plan = exact(HRFusion(), (1, 3, 45, 53), (37, 33))
    boxes_partition(plan)
