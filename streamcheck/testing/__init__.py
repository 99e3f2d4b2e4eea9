"""Testing helpers for streamcheck: hypothesis strategies (and the equivalence checker)."""

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

__all__ = [
    "ACTIVATIONS",
    "SMOOTH_ACTIVATIONS",
    "StackGeometry",
    "StreamingCase",
    "conv_stacks",
    "image_shapes",
    "stack_geometry",
    "streaming_cases",
    "tile_sizes",
]
