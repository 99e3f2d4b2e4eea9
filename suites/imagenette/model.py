"""The Table 1 network of the paper (Section 5.2) and its streamed twin.

Our reading of Table 1 (the table lists layers, kernel sizes and channels only):
- every conv is 3x3, stride 1, padding 1 ("same"), followed by a ReLU; the table does not list
  activations, Section 5.2 calls the network "five blocks of a convolutional layer followed by a
  max-pool layer";
- the 2x2 max-pools have stride 2, so a 320 px input gives 160, 80, 40, 20 px maps;
- the last max-pool is 10x10 with stride 10 on the 20x20x256 map, giving 2x2x256; Table 1's
  channel column (256) lists no spatial size, so we flatten the 2x2x256 map into the fully
  connected layer: Linear(1024, 10). (The reference notebook instead used a global max-pool and
  Linear(256, 10) with a different network; we follow the table.)
- He initialisation (He et al. 2015): kaiming_normal_, fan_in, ReLU gain, for every conv and the
  fully connected layer; biases zero.
- "the first four layers were streamed": Table 1's first four rows are conv 16, max-pool, conv 32,
  max-pool; with their ReLUs that is `trunk` below, wrapped in `streamcheck.Streamed`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

NUM_CLASSES = 10


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1), nn.ReLU()]


def head_features(image_size: int) -> int:
    """Inputs of the fully connected layer: 256 * (image_size / 16 / 10)**2; 1024 at 320 px."""
    side = image_size // 16 // 10
    if image_size % 16 or side < 1:
        raise ValueError(
            f"image size {image_size} px: need a multiple of 16 and >= 160 px (four 2x2 pools, then 10x10)"
        )
    return 256 * side * side


class Table1Net(nn.Module):
    """conv16-pool-conv32-pool | conv64-pool-conv128-pool-conv256-pool10-fc10.

    >>> net = Table1Net(image_size=320)
    >>> net(torch.zeros(2, 3, 320, 320)).shape     # 320 -> 20 after 4 pools -> 2 after pool 10
    torch.Size([2, 10])
    >>> net.head[-1].in_features                    # 1024 = 256 * 2 * 2
    1024
    """

    def __init__(self, *, image_size: int = 320) -> None:
        super().__init__()
        self.image_size = image_size
        # the first four layers of Table 1 (+ activations): the streamed part
        self.trunk = nn.Sequential(*_conv(3, 16), nn.MaxPool2d(2), *_conv(16, 32), nn.MaxPool2d(2))
        self.head = nn.Sequential(
            *_conv(32, 64), nn.MaxPool2d(2),
            *_conv(64, 128), nn.MaxPool2d(2),
            *_conv(128, 256), nn.MaxPool2d(10),
            nn.Flatten(),
            nn.Linear(head_features(image_size), NUM_CLASSES),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def he_init_(model: nn.Module, *, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                std = (2.0 / m.weight[0].numel()) ** 0.5  # kaiming_normal_, fan_in, ReLU gain
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
                m.bias.zero_()
    return model


def trunk_of(model: Table1Net) -> nn.Module:
    """The plain trunk module, whether or not it is wrapped in streamcheck.Streamed."""
    return getattr(model.trunk, "module", model.trunk)


def streamed_twin(model: Table1Net, *, tile: int) -> Table1Net:
    """A deep copy of `model` whose trunk runs tile by tile. Build optimizers after this call
    (the same Parameter objects stay in place either way: `Streamed.module` is the wrapped module)."""
    import streamcheck

    twin = copy.deepcopy(model)
    twin.trunk = streamcheck.Streamed(twin.trunk, tile=tile)
    return twin


def choose_tile(
    trunk: nn.Module, input_shape: tuple[int, ...], *, requested: int, limit: int = 512
):
    """The smallest legal input-tile edge >= `requested`, and its plan.

    The paper streamed "with tiles of 32 x 32 pixels"; our engine's `tile` is the input-tile edge,
    overlap included (README.md, "Use it"). The trunk's receptive field is 10 px (conv3, pool2,
    conv3, pool2) and its total stride 4, so 32 is expected to be legal; should the engine
    refuse it (StreamcheckError), try 33, 34, ... and report why in the run metadata.
    """
    import streamcheck

    refusals = []
    for tile in range(requested, limit + 1):
        try:
            return tile, streamcheck.plan(trunk, input_shape, tile=tile), refusals
        except streamcheck.StreamcheckError as e:
            if not refusals:
                refusals.append(f"tile {tile}: {e}")
    raise streamcheck.StreamcheckError(f"no legal tile in [{requested}, {limit}]: {refusals}")
