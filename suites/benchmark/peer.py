"""Adapter for the peer implementation, lightstream (DIAGNijmegen; PyPI ``lightstream``).

Its two-phase API (checked against lightstream 1.0.7, ``lightstream/core/scnn/scnn.py``)::

    sCNN = StreamingCNN(stream_module, tile_shape=(1, C, T, T), copy_to_gpu=False)
    out = sCNN.forward(image)          # no_grad, tile by tile
    out.requires_grad_()
    loss = head(out); loss.backward()  # gradient of the streamed output in out.grad
    sCNN.backward(image, out.grad)     # recompute tile by tile, accumulate parameter gradients

``StreamingCNN`` swaps the module's ``Conv2d`` children for its own ``StreamingConv2d`` (same
parameter tensors) and measures the overlap with an all-ones tile at construction (setup, not
timed).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def available() -> tuple[bool, str]:
    """Whether lightstream can be imported, and a message saying why not."""
    if importlib.util.find_spec("lightstream") is None:
        return False, "lightstream is not installed (pip install lightstream lightning)"
    if importlib.util.find_spec("lightning") is None:
        return False, "lightstream needs lightning (pip install lightning)"
    return True, ""


def version() -> str | None:
    try:
        return importlib.metadata.version("lightstream")
    except importlib.metadata.PackageNotFoundError:
        return None


def build(
    network: nn.Module, image: torch.Tensor, *, tile_px: int, device: str
) -> tuple[Callable[[], None], dict[str, Any]]:
    """Wrap ``network`` in lightstream's StreamingCNN: (the step, its two-phase forward/backward,
    and the info it fills in: ``n_tiles``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from lightstream.core.scnn.scnn import StreamingCNN

        scnn = StreamingCNN(
            network,
            tile_shape=(1, image.shape[1], tile_px, tile_px),
            copy_to_gpu=False,
            verbose=False,
        )

    info: dict[str, Any] = {"n_tiles": None}
    calls = [0]
    network.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    def step() -> None:
        for p in network.parameters():
            p.grad = None
        with warnings.catch_warnings():
            # On CPU lightstream enters torch.autocast(device_type="cuda") and torch warns.
            warnings.simplefilter("ignore")
            calls[0] = 0
            out = scnn.forward(image)
            info["n_tiles"] = calls[0]  # one stream_module call per tile in the forward phase
            out.requires_grad_()
            out.sum().backward()
            scnn.backward(image, out.grad)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    return step, info
