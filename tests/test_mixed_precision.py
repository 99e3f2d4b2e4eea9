"""Mixed-precision training loops through a streamed trunk against the same loop un-streamed.

The engine's own tests (test_streaming.py) check one bfloat16 autocast forward and backward. These
check the training-loop usage of docs/SCALING.md ("Mixed precision"): autocast forward, loss,
backward (through a ``GradScaler`` for float16), optimizer step, several steps, and the weights of
the streamed and the plain model stay together.

Tolerance. Under autocast both runs compute every convolution in the low-precision dtype with unit
roundoff ``eps`` (bfloat16: 8 significant bits, eps = 2**-7; float16: 11 bits, eps = 2**-10; torch's
``finfo.eps``). A tile computes the same products as the full image, but the convolution kernels
block the accumulation differently, so an intermediate can round to the neighbouring low-precision
number: at most one ``eps`` (relative) per element and layer. A gradient entry is a sum over pixels
of products of such values; the engine's single-step test allows ``8 * eps`` against the gradient's
scale (relative_error below), and so do we for every step's unscaled gradient. SGD moves the
weights by ``lr * grad``, so the accumulated update ``w_t - w_0`` inherits the same relative error
as long as the runs do not drift apart; we allow ``8 * eps`` on it too, after ``STEPS`` steps. The
weights themselves are compared through that update (they differ by far less than ``eps`` relative
to their own size, which would hide a wrong update). Measured on CPU: at most 0.9 eps.

The head average-pools. A global MAX pool picks one pixel per channel, and a one-rounding difference
can move that pixel: the gradient then flows through another place of the image and differs by
tens of eps (measured: 65 eps at the third bfloat16 step). That is low precision, not streaming: two
plain runs whose kernels block differently diverge the same way. float64 (test_accumulation.py,
test_distributed.py) is where max-pool heads are checked.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from streamcheck import Streamed
from streamcheck.testing import relative_error
from streamcheck.testing.statistics import SqueezeExcite

STEPS = 3
LR = 0.1


def build_model(*, streamed: bool, device: str, squeeze: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        *([SqueezeExcite(8, ndim=2, squeeze="mean")] if squeeze else []),  # a statistic: 2 passes
        nn.Conv2d(8, 8, 3, padding=1),
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))  # not max: see top
    return nn.Sequential(Streamed(trunk, tile=24) if streamed else trunk, head).to(device)


def batches(device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(2, 3, 64, 56, generator=generator).to(device),
            torch.randint(0, 4, (2,), generator=generator).to(device),
        )
        for _ in range(STEPS)
    ]


# float16 only: the first step's scale 2**20 overflows float16 (65504) in backward, as gradients
# here are ~0.1-1 before scaling, so the scaler skips that step and backs off by 2**-4 to 2**16;
# the later steps are taken. Both runs must skip alike.
SCALER = {"init_scale": 2.0**20, "backoff_factor": 2.0**-4}


def train(
    model: nn.Module, *, device: str, dtype: torch.dtype, scaled: bool
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]], list[float]]:
    """The loop of docs/SCALING.md: unscaled gradients and weights after every step, and scales."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler(device, **SCALER) if scaled else None
    grads, weights, scales = [], [], []
    for images, labels in batches(device):
        with torch.autocast(device, dtype=dtype):
            loss = nn.functional.cross_entropy(model(images), labels)
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # so that .grad holds the true gradient
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)  # skipped if a gradient is inf/nan
            scaler.update()
            scales.append(scaler.get_scale())
        weights.append([p.detach().clone() for p in model.parameters()])
        optimizer.zero_grad(set_to_none=True)
    return grads, weights, scales


def assert_training_agrees(
    *, device: str, dtype: torch.dtype, scaled: bool, squeeze: bool = False
) -> None:
    eps = torch.finfo(dtype).eps
    streamed = build_model(streamed=True, device=device, squeeze=squeeze)
    plain = build_model(streamed=False, device=device, squeeze=squeeze)
    start = [p.detach().clone() for p in plain.parameters()]
    names = [name for name, _ in plain.named_parameters()]
    got = train(streamed, device=device, dtype=dtype, scaled=scaled)
    want = train(plain, device=device, dtype=dtype, scaled=scaled)
    assert got[2] == want[2]  # the scaler skipped the same steps and kept the same scale
    taken = [all(torch.isfinite(g).all() for g in step) for step in want[0]]
    assert taken == ([False] + [True] * (STEPS - 1) if scaled else [True] * STEPS)
    for step in range(STEPS):
        for name, a, b in zip(names, got[0][step], want[0][step], strict=True):
            assert a.dtype == b.dtype == torch.float32
            assert torch.isfinite(a).all() == torch.isfinite(b).all(), (step, name)
            if torch.isfinite(b).all():
                assert relative_error(a, b) <= 8 * eps, (step, name, "grad")
        for name, a, b, w0 in zip(names, got[1][step], want[1][step], start, strict=True):
            assert relative_error(a - w0, b - w0) <= 8 * eps, (step, name, "update")


def test_bfloat16_autocast_training_steps_match_the_plain_model() -> None:
    # bfloat16 has float32's exponent range: no GradScaler needed.
    assert_training_agrees(device="cpu", dtype=torch.bfloat16, scaled=False)


def test_bfloat16_autocast_through_a_squeeze_excite_matches_the_plain_model() -> None:
    # engine Rule S6: backward runs the SE's 1x1 convs on the statistics under forward's autocast
    # (without it: "Input type (c10::BFloat16) and bias type (float) should be the same")
    assert_training_agrees(device="cpu", dtype=torch.bfloat16, scaled=False, squeeze=True)


def test_float16_autocast_with_grad_scaler_on_cpu_matches_the_plain_model() -> None:
    # The same loop as on CUDA, with the CPU GradScaler: scaled backward, unscale_, step, update.
    assert_training_agrees(device="cpu", dtype=torch.float16, scaled=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float16_autocast_with_grad_scaler_on_cuda_matches_the_plain_model() -> None:
    assert_training_agrees(device="cuda", dtype=torch.float16, scaled=True)
