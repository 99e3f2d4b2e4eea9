"""Stream one zoo trunk in float64 and record what happened.

Rule Z4. Every model gets one record: ``exact`` (output, input gradient and every parameter
         gradient within rtol 1e-10 of the plain module; the worst relative error is kept),
         ``refused`` (the engine's StreamcheckError: every layer it names, with the reason),
         ``wrong`` (streamed but outside 1e-10) or ``crash`` (any other exception, with its type
         and message).
Rule Z5. A refused layer is *non-local* when its reason is a genuinely non-local operation
         (``NON_LOCAL``: attention, resampling, a reduction over only some spatial axes) or it lies
         in a module that reading the model's code shows to be one (``models.READ_NON_LOCAL``,
         with the reason); *after non-local* when it is inside the module of such an operation
         and uses its result; else a *gap* of the engine. Statistics over every spatial axis
         (squeeze-excite, GroupNorm, GRN, train-mode BatchNorm, global pooling) stream since
         issue 23 (NOTE [ Global statistics ]): their old reasons stay in ``NON_LOCAL`` so that
         old rows keep their class, and a refusal of one today would be an engine gap with
         another reason. A refusal is *non-local* when its first refused layer is (the engine
         lists them in execution order); a refusal whose first refused layer is a gap is a
         *gap*; a plan refused for its levels of statistics (plan Rule PL2) is *budget*, a
         random layer in training mode (stochastic depth, dropout) is *random*. The
         layers come from ``StreamcheckError.problems`` (``Split.stopped_by`` is text: parsed).
         The summary re-derives every class from the recorded paths and reasons
         (``reclassify``), so a change of these rules needs no rerun.
Rule Z8. ``check_split`` cuts the model's whole classifier (random weights, eval mode, float64)
         with ``streamcheck.split`` (its longest streamable prefix) and records where it cut,
         the total stride, what ended the prefix (the refused layers, classed by Rule Z5) and
         whether the prefix ends early (Rule SP7); then whether ``head(trunk(x))`` equals
         ``model(x)`` bit for bit (``torch.equal``), on a 128 px image (3-D: 8 x 64 x 64; timm
         models of fixed input size: their own).
Rule Z6. The input is as small as the trunk allows: a plan for a large image gives the receptive
         field F and total stride S per axis, the largest over its tile passes (plan Rule PL1: a
         statistic pass may reach further than the output pass, and every pass must fit its
         tiles); the tile is F + 3 S (4 output pixels per tile) and the image F + 5 S, so that
         every axis has two tiles (4 tiles in 2-D, 8 in 3-D) in the pass that reaches furthest.
         The large image is one tile (``PROBE``), so it must hold every F: 4096 px in 2-D,
         256 x 1024 x 1024 in 3-D (a whole video classifier reaches 109 frames).
Rule Z11. ``check_train`` is Rule Z4 in training mode (``trunk.train()``: BatchNorm normalises with
          batch statistics and updates its running ones, compared too): ``exact``, ``wrong``,
          ``refused``, ``crash``, or ``budget`` when the plan has more statistic levels than
          ``streamcheck.plan``'s default ``max_levels`` (plan Rule PL2): then only a plan with
          ``max_levels=None`` runs, and its levels and passes are recorded. Every train row
          records ``levels``, ``passes_training`` and ``time_factor`` where a plan was made.
          The batch is one image, two where PyTorch itself refuses one (a BatchNorm on pooled
          features, as in ResNeSt's and SKNet's attention: "more than 1 value per channel").
Rule Z12. ``check_whole`` streams the model's whole classifier to its logits
          (``Streamed(net, tile=..., max_levels=None)``: the levels are recorded, not limited;
          random weights with Rule T3's norms, eval mode, float64) and compares them with
          ``net(x)``: ``equal`` within relative error 1e-10 (the largest absolute difference over
          the largest absolute logit), else ``different``; ``refused`` or ``crash`` otherwise.
          The image is 2 (F + S) per axis rounded up to a multiple of S (multi-branch networks
          that upsample need one; Rule Z6's F and S of the whole classifier), or timm's
          fixed input size; the tile is the whole image but along the first spatial axis, where
          it makes about half the output (F + (ceil(ceil(image / S) / 2) - 1) S): two or more
          tiles in every pass. In 3-D (video) that volume is out of reach: float64 3-D
          convolutions on a CPU unfold their input (r3d_18: about 3.7 kB per voxel, measured), and an
          image that holds its tile on every axis has two tiles on every axis (padding makes
          n S px give n outputs, and one tile of them reads F + (n - 1) S > n S px), so at
          least (2 F)^3 voxels: 33 M for a video classifier's F of 109 x 219 x 219, over 100 GB.
          So in 3-D only the first axis streams, as short as two tiles allow: n S px for the
          fewest n whose half tile F + (ceil(n / 2) - 1) S fits in it; the others are 4 S px
          (4 outputs) in one tile of F + 3 S, which reaches past the image (clipped to it, as
          every border tile is). Every tile holds F on every axis (geometry Rule 6 refuses
          less). It records the levels, passes and tiles of every pass.
"""

from __future__ import annotations

import itertools
import math
import re
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

import streamcheck
from streamcheck.planning import MAX_LEVELS
from streamcheck.testing.checker import check_streaming_equivalence
from suites.trunks import randomize_norms

from .models import READ_NON_LOCAL, ZooModel, classifier

RTOL = 1e-10
EVAL, TRAIN = "eval", "train"
#: Rule Z6's large image per number of spatial axes: one tile, so it must hold every F.
PROBE: dict[int, tuple[int, ...]] = {2: (1, 3, 4096, 4096), 3: (1, 3, 256, 1024, 1024)}

#: Reasons that name a genuinely non-local operation (Rule Z5).
NON_LOCAL = (
    "reduces over every spatial axis",  # split: a trunk ends at its global pool (Rule SP8)
    "pools over the whole image",
    "a global pooling",
    "statistics over space",
    "statistics over the whole batch",
    "attention mixes every position",
    "attention() is not",  # a function named attention (torchvision's shifted_window_attention)
    "resamples space",
    "with windows that depend on the image size",  # adaptive pooling to a fixed grid (VGG)
    "mean() ",
    "averages over",
)

#: Rule Z5's classes that are neither non-local nor a gap, by what their reason says: plan
#: Rule PL2's refusal, and random layers in training mode (drawn per call, not per tile).
BUDGET = "levels of statistics over space"
SPECIAL = {"budget": BUDGET, "random": "random dropping in training mode"}
#: PyTorch's own refusal of a batch statistic of one value (run Rule Z11 again with 2 images).
ONE_VALUE = "more than 1 value per channel"

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


def problem_layers(error: streamcheck.StreamcheckError, *, name: str) -> list[dict[str, str]]:
    """Each layer a StreamcheckError names (``error.problems``), with Rule Z5's class; an error
    about no layer (a tile, a trace failure) is one layer with an empty path and the message."""
    layers = [{"path": p.path, "reason": p.reason} for p in error.problems]
    return _classify(layers or [{"path": "", "reason": str(error).splitlines()[0]}], name)


def _classify(layers: list[dict[str, str]], name: str) -> list[dict[str, str]]:
    """Rule Z5's class of every refused layer."""
    read = READ_NON_LOCAL.get(name)
    for layer in layers:
        by_reason = any(k in layer["reason"] for k in NON_LOCAL)
        by_reading = read is not None and _normal(layer["path"]).startswith(_normal(read[0]))
        layer["kind"] = "non-local" if by_reason or by_reading else "gap"
        layer["kind"] = next((k for k, v in SPECIAL.items() if v in layer["reason"]), layer["kind"])
    owners = [_owner(layer["path"]) for layer in layers if layer["kind"] == "non-local"]
    for layer in layers:
        inside = any(layer["path"].startswith(owner) for owner in owners if owner)
        if layer["kind"] == "gap" and inside:
            layer["kind"] = "after non-local"
    return layers


def refusal_class(layers: list[dict[str, str]]) -> str:
    """Rule Z5: the class of a refusal, from its first refused layer."""
    first = layers[0]["kind"] if layers else "gap"
    return first if first in ("non-local", *SPECIAL) else "gap"


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


def reach(
    net: torch.nn.Module, spatial_axes: int
) -> tuple[tuple[int, ...], tuple[int, ...], streamcheck.StreamPlan]:
    """Rule Z6: the receptive field and total stride per axis, the largest over the tile passes
    of a plan for a large image (any number of levels), and that plan."""
    big = PROBE[spatial_axes]
    probe = streamcheck.plan(net, big, tile=big[2:], dtype=torch.float64, max_levels=None)
    passes = probe.tile_passes
    fields = tuple(max(p.receptive_field_px[a] for p in passes) for a in range(spatial_axes))
    strides = tuple(max(p.total_stride[a] for p in passes) for a in range(spatial_axes))
    return fields, strides, probe


def input_and_tile(
    fields: tuple[int, ...], strides: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Rule Z6: the input shape and the tile.

    >>> input_and_tile((43, 43), (8, 8))  # 67 = 43 + 3 * 8, 83 = 43 + 5 * 8
    ((1, 3, 83, 83), (67, 67))
    """
    tile = tuple(f + 3 * s for f, s in zip(fields, strides, strict=True))
    image = tuple(f + 5 * s for f, s in zip(fields, strides, strict=True))
    return (1, 3, *image), tile


def plan_record(plan: streamcheck.StreamPlan) -> dict[str, Any]:
    """What a plan says a model costs (plan Rules PL1-PL3)."""
    return {
        "levels": plan.levels,
        "passes_training": plan.passes_training,
        "passes_inference": plan.passes_inference,
        "time_factor": round(plan.time_factor, 3),
    }


def check_model(model: ZooModel, *, mode: str = EVAL) -> dict[str, Any]:
    """Build, plan and check one trunk (Rules Z4-Z6; Rule Z11 with ``mode="train"``); never
    raises."""
    record: dict[str, Any] = {
        "name": model.name,
        "mode": mode,
        "library": model.library,
        "family": model.family,
        "expect": model.expect,
    }
    with recorded(record, name=model.name):
        trunk = randomize_norms(model.build()).train(mode == TRAIN).double()
        record["parameters"] = sum(p.numel() for p in trunk.parameters())
        fields, strides, probe = reach(trunk, model.spatial_axes)
        record.update(plan_record(probe))
        if mode == TRAIN and probe.levels > MAX_LEVELS:  # Rule Z11: a plan only
            record.update(status="budget", max_levels=MAX_LEVELS)
            return record
        shape, tile = model.shape_and_tile or input_and_tile(fields, strides)
        record["input_shape"], record["tile"] = list(shape), list(tile)
        try:
            report = check_streaming_equivalence(trunk, shape, tile=tile, rtol=RTOL, atol=0.0)
        except streamcheck.StreamcheckError as error:
            if mode != TRAIN or ONE_VALUE not in str(error):
                raise
            shape = (2, *shape[1:])  # Rule Z11: a BatchNorm on pooled features needs 2 images
            record["input_shape"] = list(shape)
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
    return record


@contextmanager
def recorded(record: dict[str, Any], *, name: str) -> Iterator[None]:
    """Rule Z4: a refusal in the block (its layers, classed by Rule Z5) or a crash is recorded in
    ``record``, never raised; so are the block's seconds."""
    start = time.perf_counter()
    try:
        yield
    except streamcheck.StreamcheckError as error:
        layers = problem_layers(error, name=name)
        record.update(status="refused", refusal=refusal_class(layers), layers=layers)
    except Exception as error:
        record.update(crashed(error))
    record["seconds"] = round(time.perf_counter() - start, 2)


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
    with recorded(record, name=model.name):
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
    return record


def whole_input_and_tile(
    model: ZooModel, net: torch.nn.Module
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Rule Z12's input shape and tile: two tiles along the first spatial axis (3-D: one along
    the others).

    >>> from suites.zoo.models import zoo
    >>> resnet = next(m for m in zoo() if m.name == "timm.resnet10t")
    >>> whole_input_and_tile(resnet, classifier(resnet))   # 480 >= 2 * (199 + 32), 423 = 199 + 7 * 32
    ((1, 3, 480, 480), (423, 480))
    >>> video = next(m for m in zoo() if m.name == "torchvision.r3d_18")  # F 109 x 219 x 219
    >>> whole_input_and_tile(video, classifier(video))   # 205 = 109 + 12 * 8 <= 26 * 8, 267 = 219 + 3 * 16
    ((1, 3, 208, 64, 64), (205, 267, 267))
    """
    fields, strides, _ = reach(net, model.spatial_axes)
    config = getattr(net, "pretrained_cfg", None) or {}
    if model.spatial_axes == 3:  # video: the first axis streams, the others are one tile
        f, s = fields[0], strides[0]
        n = next(n for n in itertools.count(2) if f + (math.ceil(n / 2) - 1) * s <= n * s)
        image = (n * s, *(4 * s for s in strides[1:]))
        rest = tuple(f + 3 * s for f, s in zip(fields[1:], strides[1:], strict=True))
    else:
        image = (
            tuple(config["input_size"][1:])
            if config.get("fixed_input_size")
            else tuple(s * math.ceil(2 * (f + s) / s) for f, s in zip(fields, strides, strict=True))
        )
        rest = image[1:]
    half = math.ceil(math.ceil(image[0] / strides[0]) / 2)  # ceil(ceil(480 / 32) / 2) = 8 px
    return (1, 3, *image), (fields[0] + (half - 1) * strides[0], *rest)


def check_whole(model: ZooModel) -> dict[str, Any]:
    """Rule Z12 for one model; never raises."""
    record: dict[str, Any] = {}
    with recorded(record, name=model.name):
        net = randomize_norms(classifier(model)).eval().double()
        shape, tile = whole_input_and_tile(model, net)
        record.update(input_shape=list(shape), tile=list(tile))
        streamed = streamcheck.Streamed(net, tile=tile, max_levels=None)
        plan = streamed.plan(shape)
        record.update(plan_record(plan), n_tiles=[p.n_tiles for p in plan.tile_passes])
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            plain, logits = net(x), streamed(x)
        error = float((logits - plain).abs().max() / plain.abs().max())
        record.update(
            status="equal" if error <= RTOL else "different",
            rel_error=error,
            logits_shape=list(plain.shape),
        )
    return record
