"""Testing helpers for streamcheck: the equivalence checker, hypothesis strategies and a state machine.

The checker needs only torch. The strategies (``strategies``, ``graphs``, ``unets``) and the state
machine (``machine``) need hypothesis (``pip install streamcheck[testing]``) and are imported on
first use, so ``from streamcheck.testing import assert_streaming_equivalent`` works without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from streamcheck.testing.checker import (
    EquivalenceReport,
    TensorError,
    assert_streaming_equivalent,
    check_streamed,
    check_streaming_equivalence,
    default_tolerances,
    relative_error,
)

if TYPE_CHECKING:
    from streamcheck.testing.graphs import (
        BLOCKS,
        Branches,
        ChannelMix,
        FrozenBatchNorm,
        NetworkGeometry,
        Residual,
        SharedTwice,
        dag_cases,
        dag_networks,
        network_geometry,
    )
    from streamcheck.testing.machine import streaming_machine
    from streamcheck.testing.strategies import (
        ACTIVATIONS,
        SMOOTH_ACTIVATIONS,
        StackGeometry,
        StreamingCase,
        conv_stacks,
        image_shapes,
        stack_geometry,
        streaming_cases,
        tile_sizes,
    )
    from streamcheck.testing.unets import (
        MultiScaleCase,
        Pyramid,
        UNet,
        multiscale_geometry,
        pyramid_cases,
        pyramid_networks,
        unet_cases,
        unet_networks,
    )

# Names that need hypothesis, by the module that defines them (imported on first access).
_LAZY = {
    **dict.fromkeys(
        (
            "ACTIVATIONS",
            "SMOOTH_ACTIVATIONS",
            "StackGeometry",
            "StreamingCase",
            "conv_stacks",
            "image_shapes",
            "stack_geometry",
            "streaming_cases",
            "tile_sizes",
        ),
        "streamcheck.testing.strategies",
    ),
    **dict.fromkeys(
        (
            "BLOCKS",
            "Branches",
            "ChannelMix",
            "FrozenBatchNorm",
            "NetworkGeometry",
            "Residual",
            "SharedTwice",
            "dag_cases",
            "dag_networks",
            "network_geometry",
        ),
        "streamcheck.testing.graphs",
    ),
    "streaming_machine": "streamcheck.testing.machine",
    **dict.fromkeys(
        (
            "MultiScaleCase",
            "Pyramid",
            "UNet",
            "multiscale_geometry",
            "pyramid_cases",
            "pyramid_networks",
            "unet_cases",
            "unet_networks",
        ),
        "streamcheck.testing.unets",
    ),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'streamcheck.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = [  # the checker's names, then the lazy ones (ruff reads this list statically)
    "EquivalenceReport",
    "TensorError",
    "assert_streaming_equivalent",
    "check_streamed",
    "check_streaming_equivalence",
    "default_tolerances",
    "relative_error",
    "ACTIVATIONS",
    "SMOOTH_ACTIVATIONS",
    "StackGeometry",
    "StreamingCase",
    "conv_stacks",
    "image_shapes",
    "stack_geometry",
    "streaming_cases",
    "tile_sizes",
    "BLOCKS",
    "Branches",
    "ChannelMix",
    "FrozenBatchNorm",
    "NetworkGeometry",
    "Residual",
    "SharedTwice",
    "dag_cases",
    "dag_networks",
    "network_geometry",
    "streaming_machine",
    "MultiScaleCase",
    "Pyramid",
    "UNet",
    "multiscale_geometry",
    "pyramid_cases",
    "pyramid_networks",
    "unet_cases",
    "unet_networks",
]
