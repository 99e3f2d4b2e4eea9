"""Gradient accumulation over images, one image per backward, against one plain step over the batch.

Pathology pipelines fit one gigapixel image per step: K backwards of one image each, with the loss
divided by K, then one optimizer step. With a mean loss that is the gradient of the batch of K, so
a streamed accumulation loop must move the weights exactly as one plain (un-streamed) step over the
batch (float64, 1e-10). The same loop under DistributedDataParallel with ``no_sync()`` is tested in
test_distributed.py; docs/SCALING.md ("Gradient accumulation") shows the loop.
"""

from __future__ import annotations

import torch
from torch import nn

from streamcheck import Streamed
from streamcheck.testing import relative_error

F64_RTOL = 1e-10
TILE = 24


def build_model(*, streamed: bool) -> nn.Sequential:
    """A streamed (or plain) trunk and a head, float64, identical initial weights on every call."""
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3),
    )
    head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    return nn.Sequential(Streamed(trunk, tile=TILE) if streamed else trunk, head).double()


def images_and_labels(
    sizes: list[tuple[int, int]], *, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(1, 3, *size, dtype=torch.float64, generator=generator),
            torch.randint(0, 3, (1,), generator=generator),
        )
        for size in sizes
    ]


def assert_close(got: nn.Module, want: nn.Module, *, what: str) -> None:
    pairs = zip(got.parameters(), want.named_parameters(), strict=True)
    for a, (name, b) in pairs:
        if what == "grad":
            assert relative_error(a.grad, b.grad) <= F64_RTOL, name
        else:
            assert relative_error(a.detach(), b.detach()) <= F64_RTOL, name


def test_k_backwards_of_one_image_equal_one_plain_step_over_the_batch_of_k() -> None:
    K, steps = 3, 2
    streamed, plain = build_model(streamed=True), build_model(streamed=False)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (streamed, plain)]
    for step in range(steps):
        samples = images_and_labels([(40, 36)] * K, seed=step)
        for image, label in samples:  # the streamed loop: K backwards, loss scaled by 1/K
            (nn.functional.cross_entropy(streamed(image), label) / K).backward()
        images = torch.cat([image for image, _ in samples])
        labels = torch.cat([label for _, label in samples])
        nn.functional.cross_entropy(plain(images), labels).backward()  # mean over the batch
        assert_close(streamed, plain, what="grad")
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert_close(streamed, plain, what="weights")


def test_accumulation_over_images_of_different_sizes_equals_plain_accumulation() -> None:
    # Whole-slide images differ in size, so they cannot be batched: the oracle is the same loop
    # un-streamed. Each new shape gets its own tile plan.
    sizes = [(40, 36), (52, 28), (33, 47)]
    streamed, plain = build_model(streamed=True), build_model(streamed=False)
    for model in (streamed, plain):
        for image, label in images_and_labels(sizes, seed=7):
            (nn.functional.cross_entropy(model(image), label) / len(sizes)).backward()
    assert_close(streamed, plain, what="grad")
    assert streamed[0].plan((1, 3, 52, 28)).n_tiles > 1
