"""The resolution experiment: one network trained streamed at several resolutions of the same slides.

NOTE [ Resolution experiment ]
Rule X1. Every resolution sees the same slides (downsampled from full resolution by area
         averaging and rounded to uint8, like a pyramid level), the same initial weights (one seed,
         He init, then LSUV on that resolution's first training slides), the same slide order and
         the same schedule; only the input size differs. Labels are image-level only; the lesion
         masks are read for evaluation and never for training.
Rule X2. A finished resolution is written to ``runs/px<N>.json`` at once, keyed on the whole
         configuration; a rerun with the same configuration reuses it (nothing finished is lost),
         and any change recomputes it.
Rule X3. The summary is computed from the ``runs/`` files only (Rules C1-C2, SA3), so the figures
         and the report can be rebuilt without training.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import streamcheck

from . import saliency as SA
from . import slides as S
from . import stats as ST


@dataclass(frozen=True)
class Config:
    """One named configuration of the experiment."""

    name: str
    spec: S.SlideSpec
    factors: tuple[int, ...]  # downsampling factors; 1 = full resolution
    channels: tuple[int, ...] = (8, 16, 32, 32)
    epochs: int = 6
    accumulate: int = 4  # slides per optimizer step (Lightning accumulate_grad_batches)
    lr: float = 1e-3
    tile: int = 128
    lsuv_slides: int = 8
    bootstrap: int = 1000
    permutations: int = 1000
    overlay_slides: int = 3  # positive test slides in the saliency figure (plus one negative)
    seed: int = 0
    precision: str = "32-true"
    description: str = field(default="", compare=False)

    def input_px(self, factor: int) -> int:
        return self.spec.size_px // factor


def _key(config: Config, factor: int) -> dict[str, Any]:
    """What a finished resolution depends on (Rule X2); JSON-normalised for comparison."""
    want = {k: v for k, v in asdict(config).items() if k != "description"}
    return json.loads(json.dumps({"config": want, "factor": factor, "streamcheck": 1}))


def _levels(
    root: Path, table: list[S.Slide], factor: int
) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    images, labels, masks = [], [], []
    for slide in table:
        image, mask = S.read_slide(root, slide.name)
        images.append(S.downsample(image, factor))
        labels.append(slide.label)
        masks.append(mask)
    return torch.stack(images), torch.tensor(labels), masks


def train_one(
    config: Config,
    factor: int,
    root: Path,
    out: Path,
    cache: Path,
    *,
    progress: bool,
    log: Callable[[str], object],
) -> dict[str, Any]:
    """Train and evaluate at one resolution; returns (and writes) its ``runs/`` record (X1, X2)."""
    from .train import SlideClassifier, loader, trainer

    path = out / "runs" / f"px{config.input_px(factor)}.json"
    key = _key(config, factor)
    if path.is_file():
        record: dict[str, Any] = json.loads(path.read_text())
        if record.get("key") == key:
            log(f"reusing {path} (same configuration)")
            return record
    table = S.read_table(root)
    train_slides = [s for s in table if s.split == "train"]
    test_slides = [s for s in table if s.split == "test"]
    train_x, train_y, _ = _levels(root, train_slides, factor)
    test_x, test_y, test_masks = _levels(root, test_slides, factor)
    pixels = train_x.double().transpose(0, 1).flatten(1)
    mean, std = pixels.mean(dim=1).tolist(), pixels.std(dim=1).tolist()  # training set, per channel
    px = config.input_px(factor)
    log(f"px {px}: {len(train_slides)} training slides, {len(test_slides)} test slides")

    torch.manual_seed(config.seed)
    model = SlideClassifier(
        channels=config.channels, tile=config.tile, mean=mean, std=std, lr=config.lr
    )
    started = time.perf_counter()
    lsuv = streamcheck.lsuv_init(
        model.trunk,
        [train_x[i : i + 1] for i in range(min(config.lsuv_slides, len(train_x)))],
        tile=config.tile,
        tile_transform=model.streamed.tile_transform,
    )
    lsuv_s = time.perf_counter() - started
    fit = trainer(
        epochs=config.epochs,
        accumulate=config.accumulate,
        precision=config.precision,
        log_dir=out / "logs",
        name=f"px{px}",
        progress=progress,
    )
    started = time.perf_counter()
    fit.fit(model, loader(train_x, train_y, seed=config.seed, shuffle=True))
    train_s = time.perf_counter() - started
    slide_steps = config.epochs * len(train_x)
    final_loss = fit.callback_metrics.get("train_loss_epoch")

    model.eval()
    started = time.perf_counter()
    scores, lesion_aucs, maps = [], [], {}
    positives = [i for i, s in enumerate(test_slides) if s.label == 1]
    shown = (
        positives[: config.overlay_slides]
        + [i for i, s in enumerate(test_slides) if s.label == 0][:1]
    )
    for i, slide in enumerate(test_slides):
        logit, raw = SA.input_gradient(model, test_x[i])
        scores.append(logit)
        smap = SA.processed(raw, px)
        if slide.label == 1:
            lesion_aucs.append(SA.saliency_lesion_auc(smap, test_masks[i]))
        if i in shown:
            maps[slide.name] = smap.astype(np.float32)
    eval_s = time.perf_counter() - started
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache / f"saliency_px{px}.npz", **maps)  # type: ignore[arg-type]
    record = {
        "key": key,
        "input_px": px,
        "downsample": factor,
        "test_slides": [s.name for s in test_slides],
        "test_labels": [s.label for s in test_slides],
        "test_logits": scores,
        "positive_slides": [test_slides[i].name for i in positives],
        "saliency_lesion_auc_per_slide": lesion_aucs,
        "overlay_slides": list(maps),
        "normalisation": {"mean": mean, "std": std},
        "lsuv": [
            {"layer": layer.path, "std_before": layer.before.var.sqrt().tolist()} for layer in lsuv
        ],
        "optimizer_steps": fit.global_step,
        "slide_steps": slide_steps,
        "final_epoch_train_loss": None if final_loss is None else float(final_loss),
        "lsuv_s": lsuv_s,
        "train_s": train_s,
        "train_s_per_slide_step": train_s / slide_steps,
        "eval_s": eval_s,
        "environment": _environment(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    log(f"px {px}: test AUC {ST.auc(record['test_labels'], scores):.3f}, {train_s:.0f} s training")
    return record


def _environment() -> dict[str, Any]:
    from ..environment import environment

    return environment("cpu")


def summarize(
    config: Config,
    records: list[dict[str, Any]],
    visibility: dict[int, float],
    *,
    border: dict[str, float] | None = None,
) -> dict:
    """The summary from the per-resolution records (Rule X3; Rules C1, C2).

    ``border`` maps each positive test slide to the lesion AUC of the border-distance map (Rule
    SA4); with it, each resolution also gets the paired difference saliency - border per slide,
    its mean and a bootstrap CI over the same resamples of the positive slides.
    """
    records = sorted(records, key=lambda r: r["input_px"])
    labels = np.array(records[0]["test_labels"])
    for r in records:
        if r["test_slides"] != records[0]["test_slides"]:
            raise ValueError("resolutions were tested on different slides")
        if border is not None and list(border) != r["positive_slides"]:
            raise ValueError("the border baseline was scored on other slides than the saliency")
    resamples = ST.bootstrap_indices(labels, n=config.bootstrap, seed=config.seed)
    pos_rng = np.random.default_rng(config.seed + 1)
    n_pos = len(records[0]["saliency_lesion_auc_per_slide"])
    pos_resamples = pos_rng.integers(0, n_pos, (config.bootstrap, n_pos))
    rows = []
    for r in records:
        scores = np.array(r["test_logits"])
        per_slide = np.array(r["saliency_lesion_auc_per_slide"])
        means = per_slide[pos_resamples].mean(axis=1)
        paired: dict[str, Any] = {}
        if border is not None:
            diff = per_slide - np.array(list(border.values()))
            diff_means = diff[pos_resamples].mean(axis=1)
            paired = {
                "saliency_minus_border_auc": float(diff.mean()),
                "saliency_minus_border_auc_ci": [
                    float(v) for v in np.percentile(diff_means, [2.5, 97.5])
                ],
                "saliency_beats_border_slides": int((diff > 0).sum()),
                "positive_test_slides": len(diff),
            }
        rows.append(
            {
                "input_px": r["input_px"],
                "downsample": r["downsample"],
                "auc": ST.auc(labels, scores),
                "auc_ci": list(ST.bootstrap_ci(labels, scores, resamples)),
                "saliency_lesion_auc": float(per_slide.mean()),
                "saliency_lesion_auc_ci": [float(v) for v in np.percentile(means, [2.5, 97.5])],
                **paired,
                "lesion_visibility": visibility.get(r["downsample"]),
                "final_epoch_train_loss": r["final_epoch_train_loss"],
                "optimizer_steps": r["optimizer_steps"],
                "train_s": r["train_s"],
                "train_s_per_slide_step": r["train_s_per_slide_step"],
                "eval_s": r["eval_s"],
            }
        )
    tests = []
    for i, hi in enumerate(records):
        for lo in records[:i]:
            d, p = ST.permutation_p(
                labels,
                np.array(hi["test_logits"]),
                np.array(lo["test_logits"]),
                n=config.permutations,
                seed=config.seed,
            )
            tests.append(
                {"higher_px": hi["input_px"], "lower_px": lo["input_px"], "auc_difference": d}
                | {"p_one_sided": p, "permutations": config.permutations}
            )
    return {"resolutions": rows, "permutation_tests": tests}


def quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
