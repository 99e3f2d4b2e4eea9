"""The proof on graphs: streamed DAG networks equal the plain network in float64.

Networks come from ``streamcheck.testing.graphs.dag_cases``: residual add and multiply,
concatenation along channels, branches that rejoin by add or multiply, one conv used twice,
permute + LayerNorm / Linear over channels, FrozenBatchNorm (whose forward reads its buffers),
between strided conv and pooling segments. Each case is checked by the equivalence checker
(output, input gradient, every parameter gradient and the buffers; float64, rtol 1e-10), and the
engine's receptive field and total stride must equal the strategies' own arithmetic (NOTE [ DAG
geometry ]).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings

import streamcheck
from streamcheck.testing import StreamingCase, assert_streaming_equivalent
from streamcheck.testing.graphs import dag_cases

pytestmark = [
    pytest.mark.property,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
]

# A DAG example costs a few chain examples: 2D gets a quarter of the profile, 1D and 3D an eighth.
QUARTER = settings(max_examples=max(8, settings.default.max_examples // 4))
EIGHTH = settings(max_examples=max(4, settings.default.max_examples // 8))


def check_case(case: StreamingCase) -> None:
    plan = streamcheck.plan(case.module, case.image_shape, tile=case.tile)
    assert plan.receptive_field_px == case.geometry.receptive_field_px
    assert plan.total_stride == case.geometry.total_stride
    assert plan.output_shape[2:] == case.geometry.output_px(case.module, case.image_shape[2:])
    if plan.n_tiles < 2:
        return  # nothing streamed: the checker would warn and compare a single tile
    assert_streaming_equivalent(case.module, case.image_shape, tile=case.tile, seed=case.seed)


@QUARTER
@given(dag_cases(ndim=2))
def test_dag_outputs_and_gradients_equal_plain_2d(case: StreamingCase) -> None:
    check_case(case)


@EIGHTH
@given(dag_cases(ndim=1))
def test_dag_outputs_and_gradients_equal_plain_1d(case: StreamingCase) -> None:
    check_case(case)


@EIGHTH
@given(dag_cases(ndim=3))
def test_dag_outputs_and_gradients_equal_plain_3d(case: StreamingCase) -> None:
    check_case(case)
