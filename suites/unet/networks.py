"""The benchmark's U-Nets: a small 2-D one (three levels, two convs each) and a 3-D one.

Written as a user would write them: max-pool down, a ConvTranspose and a bilinear (trilinear)
upsampling up, skips concatenated, full-resolution logits from a 1x1 conv.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_CONV: dict[int, Any] = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T: dict[int, Any] = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_POOL: dict[int, Any] = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_LINEAR = {2: "bilinear", 3: "trilinear"}

# Per network: input edges (px, or voxels per axis), the tile, and the quick mode's edges. Sized
# for a few minutes on 2 shared cores: there (load 9-16, niced) one 2-D step at 2048^2 took 48 s
# conventional and 180 s streamed, and at 256^2 37 s of wall time for 1.2 s of CPU time.
SIZES = {
    "unet2d": {"full": (128, 192, 256), "quick": (128, 160), "tile": 96},
    "unet3d": {"full": (24, 32, 40), "quick": (24, 28), "tile": 20},
}


def _block(ndim: int, c_in: int, c_out: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [_CONV[ndim](c_in if i == 0 else c_out, c_out, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


class SegmentationUNet(nn.Module):
    """A U-Net: ``widths`` channels per level (max-pool 2 down), ``convs`` 3x3 convs per block;
    the deepest level comes up by a 2x2 ConvTranspose, the others by (bi/tri)linear upsampling
    and a 1x1 conv; skips concatenated; ``classes`` logits per pixel at full resolution.

    >>> net = SegmentationUNet(ndim=2, widths=(4, 8, 16), classes=2)
    >>> net(torch.zeros(1, 3, 64, 48)).shape  # 64 = 16 * 4: two halvings and two doublings
    torch.Size([1, 2, 64, 48])
    """

    def __init__(
        self,
        *,
        ndim: int = 2,
        in_channels: int = 3,
        widths: tuple[int, ...] = (4, 8, 16),
        convs: int = 2,
        classes: int = 2,
    ) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(
            _block(ndim, c_in, c_out, convs)
            for c_in, c_out in zip((in_channels, *widths[:-1]), widths, strict=True)
        )
        self.pool = _POOL[ndim](2)
        ups: list[nn.Module] = [_CONV_T[ndim](widths[-1], widths[-2], 2, stride=2)]
        for c_in, c_out in zip(widths[-2:0:-1], widths[-3::-1], strict=True):
            upsample = nn.Upsample(scale_factor=2, mode=_LINEAR[ndim], align_corners=False)
            ups.append(nn.Sequential(upsample, _CONV[ndim](c_in, c_out, 1)))
        self.ups = nn.ModuleList(ups)
        self.decoders = nn.ModuleList(_block(ndim, 2 * c, c, convs) for c in reversed(widths[:-1]))
        self.head = _CONV[ndim](widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, encode in enumerate(self.encoders):
            x = encode(x if i == 0 else self.pool(x))
            skips.append(x)
        for up, decode, skip in zip(self.ups, self.decoders, reversed(skips[:-1]), strict=True):
            x = decode(torch.cat([skip, up(x)], dim=1))
        return self.head(x)


def benchmark_unet(network: str) -> SegmentationUNet:
    """The benchmark's U-Nets by name: ``unet2d`` (4/8/16 channels, two convs per block) and
    ``unet3d`` (4/8 channels, one conv per block)."""
    if network == "unet2d":
        return SegmentationUNet(ndim=2, widths=(4, 8, 16), convs=2)
    if network == "unet3d":
        return SegmentationUNet(ndim=3, widths=(4, 8), convs=1)
    raise ValueError(f"unknown U-Net {network!r}; known: unet2d, unet3d")
