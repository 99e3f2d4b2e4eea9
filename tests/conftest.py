"""Shared pytest configuration: hypothesis profiles, the `gpu` marker, deterministic matmuls."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

from streamcheck.testing.checker import tf32_disabled

# Profiles. `ci` is the default; `thorough` is used by `nox -s proofs`. Select one with the
# HYPOTHESIS_PROFILE environment variable or hypothesis' own `--hypothesis-profile=NAME` flag.
# Deadlines are off: a draw may build a conv stack and stream it, whose time varies a lot.
# `ci` is derandomized (the same draws every run, so CI passes or fails on the code alone);
# `thorough` explores fresh draws every run.
settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    print_blob=True,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when CUDA is not available."""
    if torch.cuda.is_available():
        return
    needs_cuda = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(needs_cuda)


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    """Compare exact float32 results on GPUs too: TF32 matmuls/convs would lose ~3 digits."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tf32_disabled(device):
        yield


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for tests of many tiny tensors: on a loaded 2-core machine, two threads
    made a 2x4x20x20 float64 conv2d take 42 ms instead of 0.11 ms (thread oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
