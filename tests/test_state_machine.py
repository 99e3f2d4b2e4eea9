"""The stateful proof (NOTE [ Stateful proof ] in streamcheck/testing/machine.py) on a few models.

Each machine wraps one model in ``Streamed`` and lets hypothesis change it between calls as users
do; after every step the wrapper must equal the plain model (float64, rtol 1e-10) or refuse with
``StreamcheckError`` where the model is not local. The ``ci`` profile runs a few short sequences,
``nox -s proofs`` (profile ``thorough``) many long ones. The last tests show that the machine can
fail: against a wrapper that keeps running the submodules it first saw, and with a receptive-field
oracle that is off by a few pixels.
"""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis.errors import Flaky
from hypothesis.stateful import run_state_machine_as_test
from torch import nn

import streamcheck
from streamcheck.testing import streaming_machine
from streamcheck.testing._blocks import (
    Branches,
    ChannelMix,
    FrozenBatchNorm,
    Residual,
    SharedTwice,
)
from streamcheck.testing._geometry import geometry_of
from streamcheck.testing.statistics import SqueezeExcite

pytestmark = [pytest.mark.property, pytest.mark.usefixtures("one_thread")]

# ci: 2 sequences of up to 8 steps per model; thorough: 50 sequences of up to 40 steps.
SEQUENCES = settings(
    max_examples=max(2, settings.default.max_examples // 20),
    stateful_step_count=8 if settings.default.max_examples < 100 else 40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def chain_2d() -> nn.Module:
    """A classic trunk: conv, eval BatchNorm, ReLU, max-pool, conv, Dropout (eval)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4).eval(),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="replicate"),
        nn.Dropout(0.3).eval(),
    )


def dag_2d() -> nn.Module:
    """Residual add, concatenation, FrozenBatchNorm (reads its buffers), a conv used twice,
    permute + LayerNorm over channels."""
    frozen = FrozenBatchNorm(3, ndim=2)
    frozen.running_var.uniform_(0.5, 2.0)
    frozen.weight.normal_()
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        Residual(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), frozen, nn.GELU())),
        Branches(nn.Conv2d(3, 2, 1), nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Tanh())),
        SharedTwice(nn.Conv2d(4, 4, 3, padding="same"), nn.SiLU()),
        ChannelMix(nn.LayerNorm(4), ndim=2),
        Residual(nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.Conv2d(4, 4, 1)), merge="mul"),
    )


def torchvision_frozen_2d() -> nn.Module:
    """torchvision's FrozenBatchNorm2d, as in every detection backbone."""
    from torchvision.ops import FrozenBatchNorm2d

    norm = FrozenBatchNorm2d(4)
    norm.running_var.uniform_(0.5, 2.0)
    norm.running_mean.normal_()
    return nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), norm, nn.ReLU(), nn.Conv2d(4, 2, 3))


def chain_1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 3, 5, padding=2, padding_mode="reflect"),
        nn.BatchNorm1d(3).eval(),
        nn.AvgPool1d(3, 2, 1),
        nn.SELU(),
        nn.Conv1d(3, 2, 3, dilation=2),
    )


def dag_3d() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 2, 3, padding=1),
        Residual(nn.Sequential(nn.Conv3d(2, 2, 3, padding=1), nn.Softplus())),
        nn.MaxPool3d(2),
        ChannelMix(nn.Linear(2, 3), ndim=3),
    )


def statistics_2d() -> nn.Module:
    """BatchNorm that train()/eval() switch between batch and running statistics (one pass or
    several), squeeze-excite and GroupNorm: statistics over the whole map."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        SqueezeExcite(4, ndim=2, squeeze="mean"),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
    )


MODELS = {
    "statistics_2d": (statistics_2d, (2, 3, 20, 18), 10),
    "chain_2d": (chain_2d, (1, 3, 24, 20), 12),
    "dag_2d": (dag_2d, (1, 2, 24, 22), 16),
    "torchvision_frozen_2d": (torchvision_frozen_2d, (1, 3, 20, 20), 10),
    "chain_1d": (chain_1d, (1, 2, 32), 16),
    "dag_3d": (dag_3d, (1, 1, 10, 10, 8), 8),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_wrapper_follows_every_change(name: str) -> None:
    build, shape, tile = MODELS[name]
    if name.startswith("torchvision"):
        pytest.importorskip("torchvision")
    run_state_machine_as_test(
        streaming_machine(build, input_shape=shape, tile=tile), settings=SEQUENCES
    )


def test_receptive_fields_of_the_models_are_the_engines() -> None:
    """The machine's default oracle (strategies geometry) agrees with the engine's plan on every
    model above, so the machine's expected refusals are the engine's refusals."""
    for name, (build, shape, _) in MODELS.items():
        if name.startswith("torchvision"):
            pytest.importorskip("torchvision")
        model = build()
        plan = streamcheck.plan(model, shape, tile=max(shape[2:]))
        assert plan.receptive_field_px == geometry_of(model, ndim=len(shape) - 2).receptive_field_px


# ------------------------------------------------------------------------- the machine can fail
QUICK_FAILURE = settings(
    max_examples=200,
    stateful_step_count=10,
    deadline=None,
    database=None,
    phases=[Phase.generate],  # the first failure is enough; no shrinking
    suppress_health_check=list(HealthCheck),
)


_REAL_STREAMED = streamcheck.Streamed  # the test below replaces streamcheck.Streamed
_FIRST_SEEN: weakref.WeakKeyDictionary[nn.Module, streamcheck.Streamed] = (
    weakref.WeakKeyDictionary()
)


class _SwapBlindStreamed(_REAL_STREAMED):
    """A broken wrapper: streams a copy of the module as it was at the first call, sharing its
    parameters and buffers (so it sees weights change) but not its later submodules."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self not in _FIRST_SEEN:
            tensors = [*self.module.parameters(), *self.module.buffers()]
            frozen = copy.deepcopy(self.module, {id(t): t for t in tensors})
            _FIRST_SEEN[self] = _REAL_STREAMED(frozen, tile=self.tile)
        first = _FIRST_SEEN[self]
        first.tile, first.channels_last = self.tile, self.channels_last
        return first(x)


def test_machine_catches_a_wrapper_that_ignores_swaps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streamcheck, "Streamed", _SwapBlindStreamed)
    machine = streaming_machine(
        chain_2d, input_shape=(1, 3, 24, 20), tile=12, rules={"swap_submodule"}
    )
    with pytest.raises((AssertionError, Flaky)):
        run_state_machine_as_test(machine, settings=QUICK_FAILURE)


def test_machine_catches_a_wrong_receptive_field() -> None:
    """An oracle 3 px too large expects refusals the engine rightly does not make."""

    def too_large(model: nn.Module) -> tuple[int, ...]:
        return tuple(f + 3 for f in geometry_of(model, ndim=2).receptive_field_px)

    machine = streaming_machine(
        chain_2d, input_shape=(1, 3, 24, 20), tile=12, receptive_field=too_large, rules={"set_tile"}
    )
    with pytest.raises(AssertionError, match="must refuse"):
        run_state_machine_as_test(machine, settings=QUICK_FAILURE)
