"""Testing helpers for streamcheck: the equivalence checker, hypothesis strategies, a state machine.

Twelve public names. The checker (``assert_streaming_equivalent``, ``check_streaming_equivalence``,
``check_streamed``, ``EquivalenceReport``, ``relative_error``) needs only torch. The strategies
(``streaming_cases`` and its part ``conv_stacks``, ``dag_cases``, ``unet_cases``,
``pyramid_cases``, all drawing a ``StreamingCase``-like case) and ``streaming_machine`` need
hypothesis (``pip install streamcheck[testing]``) and are imported on first use, so
``from streamcheck.testing import assert_streaming_equivalent`` works without it. The submodules
hold the building blocks of the project's own tests (blocks, geometry oracle, statistics layers);
they are not a stable API.

>>> import warnings
>>> from hypothesis import given, settings
>>> from streamcheck.testing import assert_streaming_equivalent, streaming_cases
>>> @settings(max_examples=3, deadline=None, database=None)
... @given(streaming_cases(ndim=1))
... def streams_exactly(case):
...     with warnings.catch_warnings():  # a drawn tile may cover the whole image: it warns
...         warnings.simplefilter("ignore")
...         assert_streaming_equivalent(case.module, case.image_shape, tile=case.tile)
>>> streams_exactly()
"""

from __future__ import annotations

import importlib
from typing import Any

from streamcheck.testing.checker import (
    EquivalenceReport,
    assert_streaming_equivalent,
    check_streamed,
    check_streaming_equivalence,
    relative_error,
)

# The names that need hypothesis, with the module that defines them (imported on first access).
_LAZY = {
    "StreamingCase": "strategies",
    "conv_stacks": "strategies",
    "streaming_cases": "strategies",
    "dag_cases": "graphs",
    "unet_cases": "unets",
    "pyramid_cases": "unets",
    "streaming_machine": "machine",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'streamcheck.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(f"streamcheck.testing.{_LAZY[name]}"), name)


__all__ = [  # the lazy names resolve through __getattr__
    "EquivalenceReport",
    "assert_streaming_equivalent",
    "check_streamed",
    "check_streaming_equivalence",
    "relative_error",
    *_LAZY,
]
