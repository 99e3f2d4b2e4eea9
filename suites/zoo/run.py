"""Stream one zoo trunk in float64 and record what happened.

Rule Z4. Every model gets one record: ``exact`` (output, input gradient and every parameter
         gradient within rtol 1e-10 of the plain module; the worst relative error is kept),
         ``refused`` (the engine's StreamcheckError: every layer it names, with the reason),
         ``wrong`` (streamed but outside 1e-10) or ``crash`` (any other exception, with its type
         and message).
Rule Z5. A refusal is *legitimate* when every reason it gives is a genuinely non-local operation
         (``NON_LOCAL``: statistics or pooling over space, attention, resampling), or a layer inside
         the module of such an operation that uses its result (squeeze-excite's ``x * scale``
         combines the map with the pooled 1 x 1 one): class ``after non-local``. Any other reason is
         a *gap* of the engine. The record keeps each refused layer with its class.
Rule Z6. The input is as small as the trunk allows: a plan for a large image gives the receptive
         field F and total stride S per axis; the tile is F + 3 S (4 output pixels per tile) and the
         image F + 5 S, so that every axis has two tiles (4 tiles in 2-D, 8 in 3-D).
"""

from __future__ import annotations

import re
import time
import traceback
from typing import Any

import torch

import streamcheck
from streamcheck.testing.checker import check_streaming_equivalence
from suites.equivalence.trunks import randomize_norms

from .models import ZooModel

RTOL = 1e-10

#: Reasons that name a genuinely non-local operation (Rule Z5).
NON_LOCAL = (
    "pools over the whole image",
    "a global pooling",
    "statistics over space",
    "statistics over the whole batch",
    "attention mixes every position",
    "attention() is not",  # a function named attention (torchvision's shifted_window_attention)
    "resamples space",
    "mean() ",
    "averages over",
)

_PROBLEM = re.compile(r"^  - '(?P<path>[^']*)': (?P<reason>.*?)(?: Fix: .*)?$")


def refused_layers(message: str) -> list[dict[str, str]]:
    """Each layer a StreamcheckError names, with its reason and Rule Z5's class.

    >>> refused_layers("streamcheck: cannot ...:\\n  - 'se.pool': AdaptiveAvgPool2d pools over "
    ...                "the whole image (global or adaptive pooling). Fix: move it.")
    [{'path': 'se.pool', 'reason': 'AdaptiveAvgPool2d pools over the whole image (global or adaptive pooling).', 'kind': 'non-local'}]
    """
    layers = []
    for line in message.splitlines():
        match = _PROBLEM.match(line)
        if match:
            reason = match["reason"]
            kind = "non-local" if any(k in reason for k in NON_LOCAL) else "gap"
            layers.append({"path": match["path"], "reason": reason, "kind": kind})
    if not layers:
        layers.append({"path": "", "reason": message.splitlines()[0], "kind": "gap"})
    owners = [_owner(layer["path"]) for layer in layers if layer["kind"] == "non-local"]
    for layer in layers:
        inside = any(layer["path"].startswith(owner) for owner in owners if owner)
        if layer["kind"] == "gap" and inside:
            layer["kind"] = "after non-local"
    return layers


def _owner(path: str) -> str:
    """The module a refused layer belongs to: ``se`` for ``'se (mean)'`` and for ``'se.pool'``."""
    return path.split(" (")[0] if " (" in path else path.rpartition(".")[0]


def input_and_tile(
    trunk: torch.nn.Module, spatial_axes: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Rule Z6: the input shape and the tile."""
    big = (1, 3, *([16] * (spatial_axes - 2)), *([1024] * min(spatial_axes, 2)))[: 2 + spatial_axes]
    if spatial_axes == 3:
        big = (1, 3, 64, 512, 512)
    probe = streamcheck.plan(trunk, big, tile=big[2:], dtype=torch.float64)
    fields, strides = probe.receptive_field_px, probe.total_stride
    tile = tuple(f + 3 * s for f, s in zip(fields, strides, strict=True))
    image = tuple(f + 5 * s for f, s in zip(fields, strides, strict=True))
    return (1, 3, *image), tile


def check_model(model: ZooModel) -> dict[str, Any]:
    """Build, plan and check one trunk (Rules Z4-Z6); never raises."""
    record: dict[str, Any] = {
        "name": model.name,
        "library": model.library,
        "family": model.family,
        "expect": model.expect,
    }
    start = time.perf_counter()
    try:
        trunk = randomize_norms(model.build()).eval().double()
        record["parameters"] = sum(p.numel() for p in trunk.parameters())
        shape, tile = input_and_tile(trunk, model.spatial_axes)
        record["input_shape"], record["tile"] = list(shape), list(tile)
        report = check_streaming_equivalence(trunk, shape, tile=tile, rtol=RTOL, atol=0.0)
        worst = max(row.max_rel_error for row in report.rows)
        record.update(
            status="exact" if report.passed else "wrong",
            worst_rel_error=worst,
            n_tiles=report.n_tiles,
            n_compared=len(report.rows),
        )
        if not report.passed:
            record["failures"] = [row.name for row in report.failures][:10]
    except streamcheck.StreamcheckError as error:
        layers = refused_layers(str(error))
        kinds = {layer["kind"] for layer in layers}
        record.update(
            status="refused",
            refusal="gap" if "gap" in kinds else "non-local",
            layers=layers,
        )
    except Exception as error:  # Rule Z4: a crash is recorded, not raised
        record.update(
            status="crash",
            error=f"{type(error).__name__}: {error}"[:500],
            where=traceback.format_exc().splitlines()[-3:],
        )
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record
