"""Stream one zoo trunk in float64 and record what happened.

Rule Z4. Every model gets one record: ``exact`` (output, input gradient and every parameter
         gradient within rtol 1e-10 of the plain module; the worst relative error is kept),
         ``refused`` (the engine's StreamcheckError: every layer it names, with the reason),
         ``wrong`` (streamed but outside 1e-10) or ``crash`` (any other exception, with its type
         and message).
Rule Z5. A refused layer is *non-local* when its reason is a genuinely non-local operation
         (``NON_LOCAL``: statistics or pooling over space, attention, resampling) or it lies in a
         module that reading the model's code shows to be one (``models.READ_NON_LOCAL``, with
         the reason); *after non-local* when it is inside the module of such an operation and
         uses its result (squeeze-excite's ``x * scale`` combines the map with the pooled 1 x 1
         one); else a *gap* of the engine. A refusal is *non-local* when its first refused layer
         is (the engine lists them in execution order): no engine change streams past that
         layer; gaps after it are kept in the record with their class. A refusal whose first
         refused layer is a gap is a *gap*. The summary re-derives every class from the recorded
         paths and reasons (``reclassify``), so a change of these rules needs no rerun.
Rule Z8. ``check_split`` cuts the model's whole classifier (random weights, eval mode, float64)
         with ``streamcheck.split`` (its longest streamable prefix) and records where it cut,
         the total stride, what ended the prefix (the refused layers, classed by Rule Z5) and
         whether the prefix ends early (Rule SP7); then whether ``head(trunk(x))`` equals
         ``model(x)`` bit for bit (``torch.equal``), on a 128 px image (3-D: 8 x 64 x 64; timm
         models of fixed input size: their own).
Rule Z6. The input is as small as the trunk allows: a plan for a large image gives the receptive
         field F and total stride S per axis; the tile is F + 3 S (4 output pixels per tile) and the
         image F + 5 S, so that every axis has two tiles (4 tiles in 2-D, 8 in 3-D).
"""

from __future__ import annotations

import re
import time
import traceback
import warnings
from typing import Any

import torch

import streamcheck
from streamcheck.testing.checker import check_streaming_equivalence
from suites.trunks import randomize_norms

from .models import READ_NON_LOCAL, ZooModel, classifier

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


def refused_layers(message: str, *, name: str = "") -> list[dict[str, str]]:
    """Each layer a StreamcheckError names, with its reason and Rule Z5's class (``name``: the
    zoo model, for ``READ_NON_LOCAL``).

    >>> refused_layers("streamcheck: cannot ...:\\n  - 'se.pool': AdaptiveAvgPool2d pools over "
    ...                "the whole image (global or adaptive pooling). Fix: move it.")
    [{'path': 'se.pool', 'reason': 'AdaptiveAvgPool2d pools over the whole image (global or adaptive pooling).', 'kind': 'non-local'}]
    """
    layers = []
    for line in message.splitlines():
        match = _PROBLEM.match(line)
        if match:
            layers.append({"path": match["path"], "reason": match["reason"]})
    if not layers:  # one reason for the whole module (a trace failure): split names the prefix
        prefix = re.match(r"the prefix up to '(?P<path>[^']*)' is refused: (?P<reason>.*)", message)
        where, reason = (prefix["path"], prefix["reason"]) if prefix else ("", message)
        layers.append({"path": where, "reason": reason.splitlines()[0]})
    return _classify(layers, name)


def _classify(layers: list[dict[str, str]], name: str) -> list[dict[str, str]]:
    """Rule Z5's class of every refused layer."""
    read = READ_NON_LOCAL.get(name)
    for layer in layers:
        by_reason = any(k in layer["reason"] for k in NON_LOCAL)
        by_reading = read is not None and _normal(layer["path"]).startswith(_normal(read[0]))
        layer["kind"] = "non-local" if by_reason or by_reading else "gap"
    owners = [_owner(layer["path"]) for layer in layers if layer["kind"] == "non-local"]
    for layer in layers:
        inside = any(layer["path"].startswith(owner) for owner in owners if owner)
        if layer["kind"] == "gap" and inside:
            layer["kind"] = "after non-local"
    return layers


def refusal_class(layers: list[dict[str, str]]) -> str:
    """Rule Z5: the class of a refusal, from its first refused layer."""
    return "non-local" if layers and layers[0]["kind"] == "non-local" else "gap"


def reclassify(row: dict[str, Any]) -> dict[str, Any]:
    """The row with Rule Z5 applied again to its recorded paths and reasons (and its split's)."""
    row = dict(row)
    if row.get("status") == "refused" and "layers" in row:
        row["layers"] = _classify([dict(layer) for layer in row["layers"]], row["name"])
        row["refusal"] = refusal_class(row["layers"])
        reading = READ_NON_LOCAL.get(row["name"])
        if reading is not None:
            row["reading"] = f"'{reading[0]}': {reading[1]}"
    split = row.get("split")
    if isinstance(split, dict) and split.get("stopped_by"):
        layers = _classify([dict(layer) for layer in split["stopped_by"]], row["name"])
        row["split"] = split | {"stopped_by": layers, "stopped_class": refusal_class(layers)}
    return row


def _normal(path: str) -> str:
    """A module path as trunk and classifier both name it: the zoo's ``Feature`` wrapper adds
    ``net.``, torchvision ``features[:n]`` trunks drop ``features.``, timm's feature extractors
    write ``stages_1`` for ``stages.1``."""
    return path.removeprefix("net.").removeprefix("features.").replace("_", ".")


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
        shape, tile = model.shape_and_tile or input_and_tile(trunk, model.spatial_axes)
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
        layers = refused_layers(str(error), name=model.name)
        record.update(status="refused", refusal=refusal_class(layers), layers=layers)
    except Exception as error:  # Rule Z4: a crash is recorded, not raised
        record.update(crashed(error))
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def crashed(error: Exception) -> dict[str, Any]:
    """Rule Z4's record of a crash: the error and where it happened."""
    return {
        "status": "crash",
        "error": f"{type(error).__name__}: {error}"[:500],
        "where": traceback.format_exc().splitlines()[-3:],
    }


def split_input(model: ZooModel, net: torch.nn.Module) -> tuple[int, ...]:
    """Rule Z8's input shape."""
    if model.spatial_axes == 3:
        return (1, 3, 8, 64, 64)
    config = getattr(net, "pretrained_cfg", None) or {}
    if config.get("fixed_input_size"):
        return (1, *config["input_size"])
    return (1, 3, 128, 128)


def check_split(model: ZooModel) -> dict[str, Any]:
    """Rule Z8 for one model; never raises."""
    record: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        net = randomize_norms(classifier(model)).eval().double()
        shape = split_input(model, net)
        record["input_shape"] = list(shape)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cut = streamcheck.split(net, input_shape=shape)
        record.update(
            cut=cut.cut,
            total_stride=list(cut.total_stride),
            early=any("ends early" in str(w.message) for w in caught),
            trunk_parameters=sum(p.numel() for p in cut.trunk.parameters()),
            parameters=sum(p.numel() for p in net.parameters()),
        )
        if cut.stopped_by is not None:
            record["stopped_by"] = refused_layers(cut.stopped_by, name=model.name)
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            whole, pair = net(x), cut.head(cut.trunk(x))
        record.update(
            status="equal" if torch.equal(whole, pair) else "different",
            max_abs_difference=float((whole - pair).abs().max()),
        )
    except streamcheck.StreamcheckError as error:
        record.update(status="refused", layers=refused_layers(str(error), name=model.name))
    except Exception as error:  # Rule Z4: a crash is recorded, not raised
        record.update(crashed(error))
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record
