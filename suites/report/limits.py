"""What cannot be streamed, asked of the engine itself (so the report's list stays true).

Each probe puts one layer after a 3x3 convolution in a small 2D trunk and asks
``streamcheck.plan`` for a tiling: a ``StreamcheckError`` is a refusal, and its message (which
names the layer, the reason and the fix) goes into the report verbatim. Layers that stream are
listed too, for contrast, and so are known engine bugs, probed by running them.
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import streamcheck
from suites.markdown import table

SHAPE = (1, 4, 32, 32)
TILE = 16


@dataclass(frozen=True)
class Probe:
    label: str
    build: Callable[[], nn.Module]
    tile: int = TILE
    shape: tuple[int, ...] = SHAPE
    alone: bool = False  # the layer is the whole trunk (no conv before it)


@dataclass(frozen=True)
class Verdict:
    label: str
    status: str  # "refused" | "streams" | "crashes" | "not probed"
    message: str


class _SpatialMean(nn.Module):
    """Subtracts the image mean: a statistic over space written as tensor code."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=(2, 3), keepdim=True)


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision import ops

        if name == "SqueezeExcitation":
            return ops.SqueezeExcitation(4, 2)
        return ops.StochasticDepth(0.5, "row").train()

    return build


PROBES: tuple[Probe, ...] = (
    Probe("BatchNorm2d in training mode", lambda: nn.BatchNorm2d(4).train()),
    Probe("InstanceNorm2d", lambda: nn.InstanceNorm2d(4)),
    Probe("GroupNorm", lambda: nn.GroupNorm(2, 4)),
    Probe("LayerNorm over the spatial axes", lambda: nn.LayerNorm([32, 32])),
    Probe("LocalResponseNorm", lambda: nn.LocalResponseNorm(2)),
    Probe("Dropout in training mode", lambda: nn.Dropout(0.5).train()),
    Probe("StochasticDepth in training mode (torchvision)", _torchvision("StochasticDepth")),
    Probe("AdaptiveAvgPool2d (global pooling)", lambda: nn.AdaptiveAvgPool2d(1)),
    Probe("AdaptiveAvgPool2d to a grid (VGG's head)", lambda: nn.AdaptiveAvgPool2d(7)),
    Probe("AdaptiveMaxPool2d to a grid", lambda: nn.AdaptiveMaxPool2d(2)),
    Probe("SqueezeExcitation (torchvision)", _torchvision("SqueezeExcitation")),
    Probe("mean over the image in forward code", _SpatialMean),
    Probe("Flatten", nn.Flatten),
    Probe("Linear over a spatial axis", lambda: nn.Linear(32, 32)),
    Probe("Softmax over a spatial axis", lambda: nn.Softmax(dim=-1)),
    Probe("Upsample by a non-integer factor", lambda: nn.Upsample(scale_factor=1.5)),
    Probe("bicubic Upsample", lambda: nn.Upsample(scale_factor=2, mode="bicubic")),
    Probe("Conv2d with circular padding", lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")),
    Probe("Conv2d with padding wider than its kernel", lambda: nn.Conv2d(4, 4, 1, padding=1)),
    Probe("MaxPool2d(return_indices=True)", lambda: nn.MaxPool2d(2, return_indices=True)),
    Probe("a tile smaller than the receptive field", lambda: nn.Conv2d(4, 4, 5, padding=2), tile=4),
)  # fmt: skip

# Layers that stream (for contrast; same probe).
STREAMS: tuple[Probe, ...] = (
    Probe("BatchNorm2d in eval mode", lambda: nn.BatchNorm2d(4).eval()),
    Probe("Dropout in eval mode", lambda: nn.Dropout(0.5).eval()),
    Probe("Softmax over channels", lambda: nn.Softmax(dim=1)),
    Probe("MaxPool2d / AvgPool2d", lambda: nn.Sequential(nn.MaxPool2d(2), nn.AvgPool2d(3, 1, 1))),
    Probe("Conv2d with reflect / replicate padding", lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="replicate")),
    Probe("Upsample (nearest, bilinear; integer factors)", lambda: nn.Sequential(nn.Upsample(scale_factor=2), nn.Upsample(scale_factor=3, mode="bilinear"))),
    Probe("ConvTranspose2d", lambda: nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1)),
)  # fmt: skip


def _trunk(probe: Probe) -> nn.Module:
    layer = probe.build()
    if probe.alone:
        return layer
    return nn.Sequential(OrderedDict([("conv", nn.Conv2d(4, 4, 3, padding=1)), ("layer", layer)]))


def probe(p: Probe) -> Verdict:
    """Ask the engine to plan ``p`` (nothing is computed)."""
    try:
        module = _trunk(p)
    except ImportError as error:
        return Verdict(p.label, "not probed", f"{type(error).__name__}: {error}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            streamcheck.plan(module, p.shape, tile=p.tile)
    except streamcheck.StreamcheckError as error:
        return Verdict(p.label, "refused", str(error).strip())
    except Exception as error:  # anything else is an engine bug worth showing
        return Verdict(p.label, "crashes", f"{type(error).__name__}: {error}")
    return Verdict(p.label, "streams", "")


def reflect_padding_on_narrow_tiles() -> Verdict:
    """The known reflect-padding gap (tests/test_properties.py, xfail): run it and compare.

    Plain and streamed in float64, output, input and weight gradient; without
    ``streamcheck.testing`` (it needs hypothesis, which the report's environment does not).
    """
    label = "Conv1d with reflect padding, border tile narrower than the padding"
    torch.manual_seed(0)
    module = nn.Conv1d(1, 1, 3, padding=2, padding_mode="reflect", bias=False).double()
    x = torch.randn(1, 1, 5, dtype=torch.float64)
    results = []
    try:
        for run in (module, streamcheck.Streamed(module, tile=3)):
            module.zero_grad()
            xi = x.clone().requires_grad_()
            y = run(xi)
            (y * torch.arange(1.0, y.numel() + 1, dtype=y.dtype).view_as(y)).sum().backward()
            assert xi.grad is not None and module.weight.grad is not None
            results.append((y.detach(), xi.grad, module.weight.grad.clone()))
    except streamcheck.StreamcheckError as error:
        return Verdict(label, "refused", str(error).strip())
    except Exception as error:
        return Verdict(label, "crashes", f"{type(error).__name__}: {error}")
    worst = max(float((a - b).abs().max()) for a, b in zip(*results, strict=True))
    status = "streams" if worst <= 1e-12 else "wrong numbers"
    return Verdict(label, status, f"max abs difference {worst:.2e} (plain vs streamed, float64)")


def all_verdicts() -> tuple[list[Verdict], list[Verdict], Verdict]:
    """(refused or crashing probes, probes that stream, the reflect-padding probe)."""
    return (
        [probe(p) for p in PROBES],
        [probe(p) for p in STREAMS],
        reflect_padding_on_narrow_tiles(),
    )


def limits_section() -> str:
    """The report's Limits section: every probe asked of the engine now (Rule P4 of render.py)."""
    refused, streams, reflect = all_verdicts()
    parts = [
        "## Limits",
        "",
        "Streaming is exact only for layers where each output pixel depends on a bounded window "
        "of input pixels, computed the same way wherever the window is. A layer that needs the "
        "whole image (a statistic over space, a global pooling, a reshape of space into "
        "features), or that would draw different random numbers when a tile is recomputed in "
        "the backward pass, cannot be streamed; it has to go after the streamed part, into the "
        "head, which runs normally. The engine refuses such layers before computing anything, "
        "naming the layer. The table below is produced by asking the engine, when this report is "
        "built, to plan each layer placed after a convolution; the reasons are its own messages.",
        "",
        table(
            ["layer", "engine's verdict", "reason (engine message)", "fix (engine message)"],
            ([v.label, v.status, *_reason_and_fix(v.message)] for v in refused),
            align="llll",
        ),
        "",
        "For contrast, the same probe on layers that stream: "
        + ", ".join(
            v.label + ("" if v.status == "streams" else f" (**{v.status}**)") for v in streams
        )
        + (" -- all accepted." if all(v.status == "streams" for v in streams) else "."),
        "",
        (
            f"Reflect padding ({reflect.label[0].lower() + reflect.label[1:]}): streams exactly "
            "(this probe runs the case the property tests pinned as an engine bug)."
            if reflect.status == "streams"
            else f"Known engine gap: {reflect.label} -- {reflect.status} "
            f"(`{_first_line(reflect.message)}`). The equivalence record does not draw reflect "
            "padding while this stands."
        ),
        "",
        "Other limits, in plain words:",
        "",
        "- Cost: the streamed part runs its forward pass twice per tile (once without gradients, "
        "once again in the backward pass), and tiles overlap by the receptive field, so streaming "
        "is slower than conventional training when the image fits; the benchmark has the measured "
        "ratios.",
        "- float32: streamed and conventional runs sum the same terms in a different order, so "
        "float32 results differ by rounding (the checker's float32 tolerance grows with the square "
        "root of the number of pixels summed, the equivalence record), and two float32 trainings drift apart "
        "over many steps, as a conventional run with reordered sums also does (the training suite). "
        "float64 is the exactness check.",
        "- The memory saving applies to the streamed part; the stitched output of the streamed "
        "part and its gradient are held whole, as is the input image.",
    ]
    return "\n".join(parts)


def _reason_and_fix(message: str) -> list[str]:
    line = message.strip().splitlines()[-1].strip() if message.strip() else ""
    line = re.sub(r"^- '[^']*': ", "", line)
    reason, _, fix = line.partition(" Fix: ")
    if not fix and "; use " in line:  # the tile message: "...; use tile >= 7 or ..."
        reason, _, fix = line.partition("; ")
        reason = reason.removeprefix("streamcheck: ")
    return [reason.rstrip("."), fix.rstrip(".") or "-"]


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""
