"""Drawing the record's networks with the project's hypothesis strategies.

The rules (R1, R2, R2b, R4) are NOTE [ The equivalence record ] in ``record.py``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import seed as hypothesis_seed
from torch import nn

import streamcheck
from streamcheck.testing import (
    StreamingCase,
    check_streaming_equivalence,
    graphs,
    streaming_cases,
    unets,
)
from streamcheck.testing import _blocks as blocks
from streamcheck.testing.strategies import SMOOTH_ACTIVATIONS

# Rule R1b: the families of drawn networks and the strategy that draws each.
FAMILIES = {
    "chain": streaming_cases,
    "dag": graphs.dag_cases,
    "unet": unets.unet_cases,
    "pyramid": unets.pyramid_cases,
    # statistics over the whole map (reductions Rules R1-R5), in training mode; batches of 2 or
    # more, so that a BatchNorm has more than one value per channel more often
    "statistics_chain": functools.partial(streaming_cases, statistics=True, min_batch=2),
    "statistics_dag": functools.partial(graphs.dag_cases, statistics=True, min_batch=2),
    "statistics_unet": functools.partial(unets.unet_cases, statistics=True, min_batch=2),
}
MULTISCALE = (
    "unet",
    "pyramid",
    "statistics_unet",
)  # streamcheck.testing.unets: they name their pools otherwise

# Rule R4: the options each dtype draws with (passed to streaming_cases).
PADDING_MODES = ("zeros", "replicate")
FLOAT32_OPTIONS = {"activations": SMOOTH_ACTIVATIONS, "pools": ("avg",)}
# Why reflect padding would not be drawn: the guard below failing means the fixed narrow-border bug
# (tests/test_properties.py, NARROW_REFLECT) is back.
REFLECT_BUG = "a border tile narrower than the padding no longer streams exactly (tests/test_properties.py, NARROW_REFLECT)"


def reflect_padding_streams() -> bool:
    """Whether the engine streams the pinned reflect-padding case exactly (Rule R4)."""
    module = nn.Sequential(nn.Conv1d(1, 1, 3, padding=2, padding_mode="reflect", bias=False))
    try:
        return check_streaming_equivalence(module, (1, 1, 5), tile=3).passed
    except Exception:
        return False


def draw_options(*, reflect: bool) -> dict[str, dict[str, Any]]:
    modes = (*PADDING_MODES, "reflect") if reflect else PADDING_MODES
    return {
        "float64": {"padding_modes": modes},
        "float32": {"padding_modes": modes, **FLOAT32_OPTIONS},
    }


def family_options(family: str, options: dict[str, Any]) -> dict[str, Any]:
    """Rule R4's options in the words of ``family``'s strategy: the multi-scale strategies draw
    down-sampling kinds, of which float32's average pools are ``avg_pool`` and strided convs."""
    if family not in MULTISCALE or "pools" not in options:
        return options
    kinds = {"avg": "avg_pool", "max": "max_pool"}
    rest = {k: v for k, v in options.items() if k != "pools"}
    return rest | {"downsamplings": ("conv", *(kinds[p] for p in options["pools"]))}


# Share of the examples per ndim: 1D and 3D exercise the same code paths as 2D.
NDIM_SHARE = {1: 0.25, 2: 0.5, 3: 0.25}


def examples_per_ndim(total: int) -> dict[int, int]:
    """Split ``total`` networks per dtype over 1D/2D/3D (at least one each)."""
    counts = {ndim: max(1, round(total * share)) for ndim, share in NDIM_SHARE.items()}
    counts[2] = max(1, total - counts[1] - counts[3]) if total >= 3 else counts[2]
    return counts


def ill_posed(case: StreamingCase | unets.MultiScaleCase) -> str | None:
    """The first layer whose plain output is non-finite on a finite input, or the plain module's
    own refusal of the input (a BatchNorm with one value per channel in training mode) (Rule
    R2b), or None."""
    found: list[str] = []
    named = [(name, m) for name, m in named_leaves(case.module)]
    handles = [
        m.register_forward_hook(
            lambda _m, _args, out, name=name: (
                found.append(name) if not found and not bool(torch.isfinite(out).all()) else None
            )
        )
        for name, m in named
    ]
    try:
        with torch.no_grad():
            x = torch.randn(case.image_shape, generator=torch.Generator().manual_seed(case.seed))
            case.module(x)
    except ValueError as error:  # PyTorch's own refusal of the input
        return f"the plain module refuses the input: {error}"
    finally:
        for handle in handles:
            handle.remove()
    return f"'{found[0]}' outputs non-finite values on a finite input" if found else None


def draw_cases(
    ndim: int, n: int, *, seed: int, options: dict[str, Any], family: str = "chain"
) -> tuple[list[StreamingCase], dict[str, int]]:
    """``n`` streamed cases (>= 2 tiles) of ``family`` drawn by hypothesis (Rules R1, R1b, R2,
    R2b); and the skips."""
    strategy = FAMILIES[family]
    options = family_options(family, options)
    cases: list[Any] = []
    skipped = {"single_tile_draws_skipped": 0, "ill_posed_draws_skipped": 0}

    @hypothesis_seed(seed)
    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy(ndim=ndim, **options))
    def collect(case: Any) -> None:
        try:
            n_tiles = streamcheck.plan(case.module, case.image_shape, tile=case.tile).n_tiles
        except Exception:  # recorded as a failure when checked (Rule R3)
            n_tiles = 2
        if n_tiles < 2:
            skipped["single_tile_draws_skipped"] += 1
        assume(n_tiles >= 2)
        problem = ill_posed(case)
        if problem is not None:
            skipped["ill_posed_draws_skipped"] += 1
        assume(problem is None)
        cases.append(case)

    collect()
    return cases, skipped


def named_leaves(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers without children, in definition order (a layer used twice is listed once)."""
    return [(name, m) for name, m in module.named_modules() if not list(m.children())]


def _join(block: nn.Module) -> str | None:
    """The kind of a joining or shared block of ``streamcheck.testing.graphs`` (None otherwise)."""
    if isinstance(block, blocks.Residual):
        return f"join: residual {'add' if block.merge == 'add' else 'multiply'}"
    if isinstance(block, blocks.Branches):
        merge = {"cat": "concatenation", "add": "add", "mul": "multiply"}[block.merge]
        return f"join: {len(block.branches)} branches, {merge}"
    if isinstance(block, blocks.SharedTwice):
        return "join: one conv used twice"
    if isinstance(block, blocks.ChannelMix):
        return f"join: permute + {type(block.inner).__name__} over channels"
    if isinstance(block, blocks.UNet):
        merges = {"cat": "concatenated", "add": "added"}
        return ", ".join(
            [f"join: U-Net {len(block.downs)} levels deep"]
            + [f"skip {merges[m]}" for m in sorted(set(block.merges))]
        )
    if isinstance(block, blocks.Pyramid):
        return f"join: pyramid of {len(block.stages)} outputs as a {block.returns}"
    return None


def layer_kinds(module: nn.Module) -> list[str]:
    """Leaf layer kinds, with the options that change the streaming arithmetic, and the kinds of
    joining blocks (prefixed ``join:``)."""
    kinds = [kind for m in module.modules() if (kind := _join(m)) is not None]
    for _, layer in named_leaves(module):
        name = type(layer).__name__
        if isinstance(layer, nn.GELU) and layer.approximate == "tanh":
            name = "GELU(tanh)"
        if isinstance(layer, nn.modules.batchnorm._BatchNorm | nn.modules.dropout._DropoutNd):
            name += " (train)" if layer.training else " (eval)"
        kinds.append(name)
        kinds.extend(f"{type(layer).__name__}: {f}" for f in _features(layer))
    return kinds


def _features(layer: nn.Module) -> list[str]:
    """Options of a window layer worth counting (they change tiles and padding)."""
    out: list[str] = []
    if isinstance(layer, nn.Upsample | blocks.Interpolate):
        out.append(f"mode={layer.mode!r}")
        if layer.align_corners:
            out.append("align_corners=True")
        out.append(f"scale_factor={int(layer.scale_factor)}")  # type: ignore[arg-type]
        return out
    if isinstance(layer, nn.modules.conv._ConvTransposeNd) and max(layer.output_padding) > 0:
        out.append("output_padding > 0")
    if isinstance(layer, nn.modules.conv._ConvNd):
        if max(layer.stride) > 1:
            out.append("stride > 1")
        if max(layer.dilation) > 1:
            out.append("dilation > 1")
        if layer.groups > 1:
            out.append("groups > 1")
        if isinstance(layer.padding, str):
            out.append(f"padding='{layer.padding}'")
        elif max(layer.padding) > 0:
            out.append("padding > 0")
        if layer.padding_mode != "zeros":
            out.append(f"padding_mode='{layer.padding_mode}'")
        if layer.bias is None:
            out.append("no bias")
    elif isinstance(layer, nn.modules.pooling._MaxPoolNd | nn.modules.pooling._AvgPoolNd):
        pool: Any = layer
        if pool.ceil_mode:
            out.append("ceil_mode")
        padding = pool.padding if isinstance(pool.padding, tuple) else (pool.padding,)
        if max(padding) > 0:
            out.append("padding > 0")
        stride = pool.stride if isinstance(pool.stride, tuple) else (pool.stride,)
        kernel = pool.kernel_size if isinstance(pool.kernel_size, tuple) else (pool.kernel_size,)
        if tuple(stride) != tuple(kernel):
            out.append("stride != kernel")
        if isinstance(layer, nn.modules.pooling._MaxPoolNd):
            dilation = pool.dilation if isinstance(pool.dilation, tuple) else (pool.dilation,)
            if max(dilation) > 1:
                out.append("dilation > 1")
        else:
            if not pool.count_include_pad:
                out.append("count_include_pad=False")
            if getattr(pool, "divisor_override", None) is not None:
                out.append("divisor_override")
    return out
