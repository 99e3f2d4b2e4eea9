"""The measured workload: the paper's Figs 2-3 network on one image, and one training step per method.

Setup (network, input, wrappers) is built here apart from the measured body, which is the
callable ``Workload.step``: one forward + backward (loss = output.sum()), parameter gradients left
in ``.grad``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

METHODS = ("conventional", "streamcheck", "streamcheck_tuned", "lightstream")
# streamcheck_tuned: streamcheck with its CPU speed settings (docs/SCALING.md, "Speed on CPU"):
# streamcheck.keep_freed_host_memory() in the (fresh) process and Streamed(..., channels_last=True).


def paper_network() -> nn.Sequential:
    """Figs 2-3 of the paper: three 3x3 convs (padding 1) with 3, 64 and 3 output channels."""
    return nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 3, 3, padding=1),
    )


@dataclass
class Workload:
    """A ready-to-run training step and what is known about its tiling."""

    step: Callable[[], None]
    network: nn.Module
    image: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


def build_inputs(
    *, input_px: int, device: str, dtype: torch.dtype, seed: int
) -> tuple[nn.Module, torch.Tensor]:
    """The network (seeded init) and a (1, 3, input_px, input_px) image: identical in every process."""
    torch.manual_seed(seed)
    network = paper_network().to(device=device, dtype=dtype)  # init in float32, then cast
    generator = torch.Generator().manual_seed(seed + 1)
    # Drawn in float32 whatever the dtype, so that a float64 run sees exactly the same image.
    image = torch.randn(1, 3, input_px, input_px, generator=generator).to(
        device=device, dtype=dtype
    )
    return network, image


def _zero_grads(network: nn.Module) -> None:
    for p in network.parameters():
        p.grad = None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def build(
    method: str, *, input_px: int, tile_px: int | None, device: str, dtype: torch.dtype, seed: int
) -> Workload:
    """Set up ``method`` (see ``METHODS``) on a fresh network and image."""
    network, image = build_inputs(input_px=input_px, device=device, dtype=dtype, seed=seed)
    if method == "conventional":

        def step() -> None:
            _zero_grads(network)
            network(image).sum().backward()
            _sync(device)

        return Workload(step, network, image, {"n_tiles": 1})

    assert tile_px is not None, "streaming methods need tile_px"
    if method in ("streamcheck", "streamcheck_tuned"):
        import streamcheck

        tuned = method == "streamcheck_tuned"
        if tuned and device == "cpu":
            streamcheck.keep_freed_host_memory()
        streamed = streamcheck.Streamed(network, tile=tile_px, channels_last=tuned)
        plan = streamed.plan(image.shape, dtype=image.dtype)

        def step() -> None:
            _zero_grads(network)
            streamed(image).sum().backward()
            _sync(device)

        info = {
            "n_tiles": plan.n_tiles,
            "tile_px_used": plan.tile_px_used[0],
            "overlap_px": list(plan.overlap_px[0]),
            "peak_bytes_estimate": plan.peak_bytes_estimate,
        }
        return Workload(step, network, image, info)

    if method == "lightstream":
        from . import peer

        return peer.build(network, image, tile_px=tile_px, device=device)

    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def reference_gradients(
    *, input_px: int, device: str, dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    """Parameter gradients of conventional training on the same network and image."""
    network, image = build_inputs(input_px=input_px, device=device, dtype=dtype, seed=seed)
    network(image).sum().backward()
    return {name: p.grad.detach().clone() for name, p in network.named_parameters()}


def max_relative_grad_error(network: nn.Module, reference: dict[str, torch.Tensor]) -> float:
    """max over parameters of max|g - g_ref| / max|g_ref| (parameters as named in ``reference``)."""
    worst = 0.0
    grads = {name: p.grad for name, p in network.named_parameters()}
    for name, ref in reference.items():
        grad = grads[name]
        assert grad is not None, f"no gradient for {name}"
        scale = ref.abs().max().item() or 1.0
        worst = max(worst, (grad.to(ref.dtype) - ref).abs().max().item() / scale)
    return worst


def copy_network(network: nn.Module) -> nn.Module:
    return copy.deepcopy(network)
