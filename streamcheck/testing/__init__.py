"""Testing helpers for streamcheck: hypothesis strategies (and the equivalence checker)."""

from streamcheck.testing.checker import (
    EquivalenceReport,
    TensorError,
    assert_streaming_equivalent,
    check_streaming_equivalence,
    default_tolerances,
    relative_error,
)
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
    "EquivalenceReport",
    "StackGeometry",
    "StreamingCase",
    "TensorError",
    "assert_streaming_equivalent",
    "check_streaming_equivalence",
    "conv_stacks",
    "default_tolerances",
    "image_shapes",
    "relative_error",
    "stack_geometry",
    "streaming_cases",
    "tile_sizes",
]
