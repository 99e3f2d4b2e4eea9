"""Training through Lightning: a ``LightningModule`` with a ``Streamed`` trunk, automatic optimization.

The recipe (docs/LIGHTNING.md): the trunk is wrapped in ``streamcheck.Streamed`` inside the
LightningModule; ``training_step`` returns the loss and Lightning does backward, gradient
accumulation (``accumulate_grad_batches``: one slide per forward, the paper's mini-batch of
several slides by accumulation), precision (``"32-true"``, ``"64-true"``, ``"bf16-mixed"``) and
the optimizer step. Slides stay uint8 until each tile is normalised on the module's device
(``TileNormalize``, streamcheck Rule S7).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import streamcheck

from .model import TileNormalize, he_init_, head, trunk


class SlideClassifier(L.LightningModule):
    """Image-level classifier (does the slide hold lesions?) with a streamed conv trunk.

    >>> model = SlideClassifier(channels=(4, 8), tile=32, mean=[128.0] * 3, std=[64.0] * 3)
    >>> model(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)).shape   # one logit per slide
    torch.Size([2])
    """

    def __init__(
        self,
        *,
        channels: Sequence[int],
        tile: int,
        mean: Sequence[float],
        std: Sequence[float],
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        lr_decay: float = 0.99,
        optimizer: str = "adam",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.streamed = streamed_trunk(he_init_(trunk(channels)), tile=tile, mean=mean, std=std)
        self.head = he_init_(head(channels[-1]))
        self.loss_fn = nn.BCEWithLogitsLoss()

    @property
    def trunk(self) -> nn.Sequential:
        """The plain trunk (``Streamed`` replaces nothing: its parameters are the trunk's own)."""
        module = self.streamed.module
        assert isinstance(module, nn.Sequential)
        return module

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logit: torch.Tensor = self.head(self.streamed(image)).flatten()
        return logit

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        image, label = batch
        logit = self(image)
        loss = self.loss_fn(logit, label.to(logit.dtype))
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=1)
        return loss

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = self.parameters()
        if hp.optimizer == "sgd":
            return torch.optim.SGD(params, lr=hp.lr, weight_decay=hp.weight_decay)
        optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=hp.lr_decay)  # per epoch
        return {"optimizer": optimizer, "lr_scheduler": decay}


def streamed_trunk(
    module: nn.Module, *, tile: int, mean: Sequence[float], std: Sequence[float]
) -> streamcheck.Streamed:
    """The streamed trunk: uint8 tiles normalised on arrival (TileNormalize is a submodule).

    NHWC tiles (``channels_last``): faster CPU convolutions, identical results.
    """
    norm = TileNormalize(mean=mean, std=std)
    return streamcheck.Streamed(module, tile=tile, tile_transform=norm, channels_last=True)


def loader(images: torch.Tensor, labels: torch.Tensor, *, seed: int, shuffle: bool) -> DataLoader:
    """One slide per batch, in a seeded order (the same order at every resolution)."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(images, labels), batch_size=1, shuffle=shuffle, generator=g)


def trainer(
    *,
    epochs: int,
    accumulate: int,
    precision: str = "32-true",
    log_dir: Path | None = None,
    name: str = "run",
    progress: bool = True,
    max_steps: int = -1,
) -> L.Trainer:
    """The Trainer the experiment uses: CPU here, a progress bar and a CSV logger."""
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(log_dir), name=name, version=0) if log_dir is not None else False
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        precision=precision,
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=progress,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
