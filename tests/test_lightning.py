"""A LightningModule with a Streamed trunk: a few Trainer steps equal a plain loop (float64).

The plain loop runs the un-streamed trunk on whole images, with the same optimizer, the same
batches in the same order, and Lightning's accumulation rule (each loss divided by
``accumulate_grad_batches``, one optimizer step per ``accumulate_grad_batches`` batches). In
float64 the streamed and plain gradients agree to ~1e-15 relative (the equivalence suite), so
after a few steps the weights agree far inside the 1e-10 asserted here; a trunk that did not
train, a skipped or extra step, or a wrongly scaled accumulation would be off by the size of an
update (~1e-2 relative here).
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from suites.resolution.train import SlideClassifier, loader, trainer

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:GPU available but not used:UserWarning"),
    pytest.mark.filterwarnings("ignore:The number of training batches:UserWarning"),
    # lightning 2.6 on torch 2.15: its own use of a deprecated torch pytree class
    pytest.mark.filterwarnings(
        "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"
    ),
]
MEAN, STD = [150.0, 140.0, 130.0], [50.0, 55.0, 60.0]


@pytest.fixture(autouse=True)
def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _data(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (n, 3, 72, 72), generator=g, dtype=torch.uint8)
    return images, torch.tensor([i % 2 for i in range(n)])


def _plain_loop(model: SlideClassifier, images, labels, *, accumulate: int) -> SlideClassifier:
    """The same training without Lightning and without streaming."""
    model = copy.deepcopy(model).double()
    norm = model.streamed.tile_transform
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    for i in range(len(images)):
        logit = model.head(model.trunk(norm(images[i : i + 1]))).flatten()
        loss = model.loss_fn(logit, labels[i : i + 1].double())
        (loss / accumulate).backward()
        if (i + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
    return model


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adam", 1e-2)])
def test_trainer_steps_equal_a_plain_loop_in_float64(optimizer: str, lr: float) -> None:
    torch.manual_seed(0)
    model = SlideClassifier(
        channels=(4, 8), tile=40, mean=MEAN, std=STD, lr=lr, optimizer=optimizer
    )
    assert model.streamed.plan((1, 3, 72, 72)).n_tiles > 1  # really streamed
    images, labels = _data()
    expected = _plain_loop(model, images, labels, accumulate=2)
    start = copy.deepcopy(model).double()
    fit = trainer(epochs=1, accumulate=2, precision="64-true", progress=False)
    fit.fit(model, loader(images, labels, seed=0, shuffle=False))
    assert fit.global_step == 3  # 6 batches, accumulated in pairs
    moved = 0.0
    for (name, got), want, before in zip(
        model.state_dict().items(),
        expected.state_dict().values(),
        start.state_dict().values(),
        strict=True,
    ):
        assert got.dtype == torch.float64, name
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14, msg=name)
        if got.is_floating_point() and "weight" in name:
            moved = max(moved, float((got - before).abs().max() / before.abs().max()))
    assert moved > 1e-3  # the steps changed the weights, so equality is not vacuous


def test_bf16_mixed_trainer_steps_equal_the_same_loop_under_autocast() -> None:
    """``precision="bf16-mixed"`` is autocast around the forward and nothing else.

    The oracle is a plain loop over the same streamed model under ``torch.autocast("cpu",
    dtype=torch.bfloat16)``: the same operations on the same values in the same order, so the
    weights are asserted bitwise equal. (Streamed against un-streamed under autocast differs by
    low-precision rounding; that is test_mixed_precision.py's subject.)
    """
    torch.manual_seed(0)
    model = SlideClassifier(channels=(4, 8), tile=40, mean=MEAN, std=STD, lr=1e-2)
    images, labels = _data()
    expected = copy.deepcopy(model)
    optimizer = expected.configure_optimizers()["optimizer"]
    for i in range(len(images)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logit = expected(images[i : i + 1])
            loss = expected.loss_fn(logit, labels[i : i + 1].to(logit.dtype))
        (loss / 2).backward()
        if (i + 1) % 2 == 0:
            optimizer.step()
            optimizer.zero_grad()
    start = copy.deepcopy(model)
    fit = trainer(epochs=1, accumulate=2, precision="bf16-mixed", progress=False)
    fit.fit(model, loader(images, labels, seed=0, shuffle=False))
    assert fit.global_step == 3
    for (name, got), want, before in zip(
        model.state_dict().items(),
        expected.state_dict().values(),
        start.state_dict().values(),
        strict=True,
    ):
        assert got.dtype == torch.float32, name  # mixed: the weights stay float32
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
        if "weight" in name:
            assert not torch.equal(got, before), name  # every weight moved


def _recipe() -> str:
    text = (Path(__file__).resolve().parents[1] / "docs" / "LIGHTNING.md").read_text()
    (block,) = re.findall(r"## The recipe\n\n```python\n(.*?)```", text, flags=re.S)
    return block


@pytest.mark.filterwarnings("ignore:Precision bf16-mixed is not supported by the model summary")
def test_the_docs_recipe_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/LIGHTNING.md's recipe, executed on tiny slides (its sizes scaled down, nothing else)."""
    code = _recipe()
    scaled = {"tile=2048": "tile=40", "max_epochs=100": "max_epochs=2"}
    for big, small in scaled.items():
        assert big in code, big
        code = code.replace(big, small)
    torch.manual_seed(0)
    images, labels = _data(4)
    namespace = {
        "trunk": nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        "head": nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 1)),
        "mean": MEAN,
        "std": STD,
        "first_batches": [images[:2]],
        "slides": TensorDataset(images, labels),
    }
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/LIGHTNING.md", "exec"), namespace)
    model, fit = namespace["model"], namespace["trainer"]
    assert model.streamed.plan((1, 3, 72, 72)).n_tiles > 1  # really streamed
    assert fit.global_step == 2  # 4 slides per epoch < 16: Lightning steps at each epoch end
    assert (tmp_path / "logs").is_dir()  # the CSV logger wrote
