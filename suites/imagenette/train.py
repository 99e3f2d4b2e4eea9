"""Two training runs in lock step -- conventional and streamed -- from the same initial weights.

NOTE [ Lock step ]
Rule 1. One initialised `Table1Net`; the streamed run is a deep copy with its trunk wrapped in
        `streamcheck.Streamed` (model.streamed_twin), so both start from identical weights.
Rule 2. Each run has its own optimizer (SGD, built after the wrapping) and its own seeded
        `BatchStream`; step k of both runs sees bitwise-identical batches (checked every step).
Rule 3. The runs alternate step by step, so a time budget cuts both at the same step, and the
        per-step loss and weight differences are recorded as they happen.
Rule 4. Results are files (steps.csv, epochs.csv, run.json), rewritten after every epoch; plots
        and the report are built from those files only.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from suites.environment import environment

from . import data as D
from .model import Table1Net, choose_tile, he_init_, streamed_twin, trunk_of

RUNS = ("conventional", "streaming")
# The control (--control): conventional training whose batch gradient is summed as two half-batch
# gradients. Same mathematics, different float summation order: its distance from the
# conventional run is the drift any reordering causes, the yardstick for the streaming run's.
CONTROL = "reordered"
IMAGENETTE_TRAIN_IMAGES = 9469  # imagenette2 train split
IMAGENETTE_VAL_IMAGES = 3925  # imagenette2 val split


@dataclass(frozen=True)
class Config:
    data_root: Path
    dataset: str  # "ImageNette" or D.STANDIN_LABEL
    out_dir: Path
    epochs: int = 200
    batch_size: int = 32  # paper 5.2
    lr: float = 1e-3  # paper 5.2
    weight_decay: float = 1e-6  # paper 5.2
    momentum: float = 0.0  # the paper does not mention momentum: plain SGD
    image_size: int = 320  # paper 5.1
    tile: int = 32  # paper 5.2: "streamed with tiles of 32 x 32 pixels"
    seed: int = 0
    dtype: str = "float32"
    # 1, not 2: on a shared 2-core machine two OpenMP threads made each tile-sized conv 13-30x
    # slower (10-24 ms instead of 0.8 ms), and streaming 10x slower overall (README, "Threads").
    threads: int = 1
    steps_per_epoch: int | None = None  # cap (quick runs and tests); None = whole train split
    max_minutes: float | None = None  # stop after the epoch that would overrun this budget
    control: bool = False  # also train the CONTROL run
    device: str = "cpu"  # "cuda" works in principle (TF32 off); only the CPU path is tested
    command: tuple[str, ...] = field(default_factory=lambda: tuple(sys.argv))

    @property
    def label(self) -> str:
        """File-name prefix: says STAND-IN when the data are synthetic."""
        return D.STANDIN_LABEL if self.dataset == D.STANDIN_LABEL else "imagenette"


def libraries() -> dict[str, str]:
    """Versions of the libraries besides torch that shape this suite's result (data, files)."""
    import numpy
    import skimage
    from PIL import __version__ as pillow

    return {
        "numpy": numpy.__version__,
        "pandas": pd.__version__,
        "pillow": pillow,
        "scikit_image": skimage.__version__,
    }


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def evaluate(
    model: nn.Module, stream: D.BatchStream, dtype: torch.dtype, device: torch.device
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the whole tuning split."""
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in stream.epoch(0):
            x, y = x.to(device, dtype), y.to(device)
            logits = model(x)
            total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
    model.train()
    return total_loss / n, correct / n


def run_experiment(cfg: Config, *, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Train both runs; write {label}_steps.csv, {label}_epochs.csv, {label}_run.json to out_dir."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, log)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg: Config, log: Callable[[str], None]) -> dict[str, Path]:
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    started = time.perf_counter()
    started_utc = datetime.now(timezone.utc).isoformat(timespec="seconds")

    # Rule 1: one initialisation, two (three with the control) copies.
    device = torch.device(cfg.device)
    if device.type == "cuda":  # TF32 would limit float32 to ~1e-3 (REFERENCE.md, pitfalls)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    base = he_init_(Table1Net(image_size=cfg.image_size), seed=cfg.seed).to(device, dtype)
    runs = RUNS + ((CONTROL,) if cfg.control else ())
    tile, plan, refusals = choose_tile(
        base.trunk, (cfg.batch_size, 3, cfg.image_size, cfg.image_size), requested=cfg.tile
    )
    if tile != cfg.tile:
        log(f"tile {cfg.tile} refused by the engine ({refusals[0]}); using {tile}")
    log(f"streaming plan for the trunk (conv16-pool-conv32-pool):\n{plan}")
    models = {"conventional": base, "streaming": streamed_twin(base, tile=tile)}
    if cfg.control:
        models[CONTROL] = copy.deepcopy(base)
    opts = {
        r: torch.optim.SGD(
            m.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        for r, m in models.items()
    }  # Rule 2: built after the wrapping, over the parameters that are trained

    train_split, val_split = (
        D.load_split(cfg.data_root, "train"),
        D.load_split(cfg.data_root, "val"),
    )
    train_streams = {
        r: D.BatchStream(
            train_split,
            D.train_transform(cfg.image_size),
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            shuffle=True,
            augment_seeded=True,
        )
        for r in RUNS
    }
    val_stream = D.BatchStream(
        val_split,
        D.eval_transform(cfg.image_size),
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        shuffle=False,
        augment_seeded=False,
    )
    steps_per_epoch = len(train_streams["conventional"])
    if cfg.steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    log(
        f"{cfg.dataset}: {len(train_split)} train / {len(val_split)} val images from {cfg.data_root}; "
        f"{cfg.epochs} epochs x {steps_per_epoch} steps of batch {cfg.batch_size}, {cfg.dtype}, "
        f"{torch.get_num_threads()} CPU threads"
    )

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        k: out / f"{cfg.label}_{k}.{ext}"
        for k, ext in (("steps", "csv"), ("epochs", "csv"), ("run", "json"))
    }
    step_rows: list[dict] = []
    epoch_rows: list[dict] = []
    meta = {
        "dataset": cfg.dataset,
        "synthetic": cfg.dataset == D.STANDIN_LABEL,
        "data_root": str(cfg.data_root),
        "n_train_images": len(train_split),
        "n_val_images": len(val_split),
        "runs": list(runs),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "command": " ".join(cfg.command),
        "started_utc": started_utc,
        # rule E1 of suites/environment.py; E2's +dirty watches what shapes this result
        "environment": environment(cfg.device, watched=("suites/imagenette", "streamcheck")),
        "libraries": libraries(),
        "model": {
            "architecture": "Table 1: conv16-pool2-conv32-pool2 | conv64-pool2-conv128-pool2-conv256-pool10-fc10, ReLU after each conv",
            "parameters": sum(p.numel() for p in base.parameters()),
            "streamed": "trunk = conv16, ReLU, maxpool2, conv32, ReLU, maxpool2",
        },
        "streaming": {
            "tile_requested_px": cfg.tile,
            "tile_px": tile,
            "tile_px_used": list(plan.tile_px_used),
            "output_tile_px": list(plan.output_tile_px),
            "receptive_field_px": list(plan.receptive_field_px),
            "total_stride": list(plan.total_stride),
            "overlap_px": [list(o) for o in plan.overlap_px],
            "n_tiles_per_image": plan.n_tiles,
            "refusals": refusals,
        },
    }

    def write(status: str) -> None:
        elapsed = time.perf_counter() - started
        steps = pd.DataFrame(step_rows)
        timing = {}
        if len(steps):
            for r in runs:
                per_img = float((steps[f"time_s_{r}"] / steps["batch_size"]).median())
                timing[r] = {
                    "median_step_s": float(steps[f"time_s_{r}"].median()),
                    "median_train_s_per_image": per_img,
                    "imagenette_train_epoch_estimate_min": per_img * IMAGENETTE_TRAIN_IMAGES / 60,
                }
            # Rule 2: each run's stream decodes and augments the batch itself, on the CPU
            timing["data_s_per_image_per_stream"] = float(
                (steps["data_time_s"] / steps["batch_size"] / len(RUNS)).median()
            )
            timing["streaming_over_conventional"] = float(
                (steps["time_s_streaming"] / steps["time_s_conventional"]).median()
            )
        evals = pd.DataFrame(epoch_rows)
        if len(evals):
            for r in runs:
                timing.setdefault(r, {})["median_eval_s_per_image"] = float(
                    (evals[f"eval_time_s_{r}"] / len(val_split)).median()
                )
                timing[r]["imagenette_val_epoch_estimate_min"] = (
                    timing[r]["median_eval_s_per_image"] * IMAGENETTE_VAL_IMAGES / 60
                )
        meta.update(
            status=status,
            epochs_completed=len(epoch_rows),
            steps_completed=len(step_rows),
            steps_per_epoch=steps_per_epoch,
            wall_s=round(elapsed, 1),
            finished_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            timing=timing,
        )
        steps.to_csv(paths["steps"], index=False)
        evals.to_csv(paths["epochs"], index=False)
        paths["run"].write_text(json.dumps(meta, indent=1) + "\n")

    global_step = 0
    last_epoch_s = 0.0
    status = "finished"
    for epoch in range(1, cfg.epochs + 1):
        if cfg.max_minutes is not None and epoch > 1:
            used = time.perf_counter() - started
            if used + last_epoch_s > 60 * cfg.max_minutes:
                status = f"stopped after {epoch - 1} epochs: another would overrun --max-minutes {cfg.max_minutes}"
                log(status)
                break
        epoch_start = time.perf_counter()
        iters = {r: train_streams[r].epoch(epoch) for r in RUNS}
        train_loss_sum = dict.fromkeys(runs, 0.0)
        n_seen = 0
        for k in range(steps_per_epoch):
            t0 = time.perf_counter()
            batches = {r: next(iters[r]) for r in RUNS}
            data_s = time.perf_counter() - t0  # decoding and augmenting, once per batch stream
            xc, yc = batches["conventional"]
            xs, ys = batches["streaming"]
            if not (torch.equal(xc, xs) and torch.equal(yc, ys)):  # Rule 2
                raise AssertionError(
                    "the two runs' batches differ: this is a suites.imagenette bug"
                )
            global_step += 1
            row: dict = {"step": global_step, "epoch": epoch, "batch_size": len(yc)}
            row["data_time_s"] = data_s
            before = {
                r: (_flat(trunk_of(m).parameters()), _flat(m.head.parameters()))
                for r, m in models.items()
            }
            for r in runs:  # Rule 3
                model, opt = models[r], opts[r]
                x, y = batches.get(r, batches["conventional"])
                x, y = x.to(device, dtype), y.to(device)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                if r == CONTROL:  # the same mean loss and gradient, summed over two half batches
                    h = (len(y) + 1) // 2
                    loss = sum(
                        nn.functional.cross_entropy(model(xp), yp, reduction="sum") / len(y)
                        for xp, yp in ((x[:h], y[:h]), (x[h:], y[h:]))
                        if len(yp)
                    )
                    loss.backward()
                else:
                    loss = nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                row[f"time_s_{r}"] = time.perf_counter() - t0
                row[f"loss_{r}"] = loss.detach().item()
                train_loss_sum[r] += row[f"loss_{r}"] * len(y)
            after = {
                r: (_flat(trunk_of(m).parameters()), _flat(m.head.parameters()))
                for r, m in models.items()
            }
            n_seen += len(yc)
            lc, ls = row["loss_conventional"], row["loss_streaming"]
            row["loss_abs_diff"] = abs(lc - ls)
            row["loss_rel_diff"] = abs(lc - ls) / abs(lc)
            if cfg.control:
                row[f"loss_abs_diff_{CONTROL}"] = abs(lc - row[f"loss_{CONTROL}"])
                row[f"loss_rel_diff_{CONTROL}"] = abs(lc - row[f"loss_{CONTROL}"]) / abs(lc)
            for i, part in enumerate(("trunk", "head")):
                row[f"{part}_weight_rel_diff"] = _rel_diff(
                    after["conventional"][i], after["streaming"][i]
                )
                if cfg.control:
                    row[f"{part}_weight_rel_diff_{CONTROL}"] = _rel_diff(
                        after["conventional"][i], after[CONTROL][i]
                    )
                for r in runs:
                    row[f"{part}_update_rel_{r}"] = _rel_diff(before[r][i], after[r][i])
            step_rows.append(row)
            log(
                f"epoch {epoch}/{cfg.epochs} step {k + 1}/{steps_per_epoch}  loss conventional {lc:.6f} "
                f"streaming {ls:.6f}  |diff| {row['loss_abs_diff']:.1e}  trunk w rel diff "
                f"{row['trunk_weight_rel_diff']:.1e}  ({row['time_s_conventional']:.2f} s, {row['time_s_streaming']:.2f} s)"
                + (
                    f"  control: |diff| {row[f'loss_abs_diff_{CONTROL}']:.1e}, trunk w rel diff "
                    f"{row[f'trunk_weight_rel_diff_{CONTROL}']:.1e}"
                    if cfg.control
                    else ""
                )
            )
            if not all(math.isfinite(row[f"loss_{r}"]) for r in runs):
                raise FloatingPointError(f"non-finite loss at step {global_step}: {lc}, {ls}")
        erow: dict = {"epoch": epoch, "step": global_step}
        for r in runs:
            t0 = time.perf_counter()
            vloss, vacc = evaluate(models[r], val_stream, dtype, device)
            erow[f"eval_time_s_{r}"] = time.perf_counter() - t0
            erow[f"train_loss_{r}"] = train_loss_sum[r] / n_seen
            erow[f"val_loss_{r}"] = vloss
            erow[f"val_acc_{r}"] = vacc
        erow["val_loss_abs_diff"] = abs(erow["val_loss_conventional"] - erow["val_loss_streaming"])
        erow["val_acc_abs_diff"] = abs(erow["val_acc_conventional"] - erow["val_acc_streaming"])
        if cfg.control:
            erow[f"val_loss_abs_diff_{CONTROL}"] = abs(
                erow["val_loss_conventional"] - erow[f"val_loss_{CONTROL}"]
            )
        epoch_rows.append(erow)
        last_epoch_s = time.perf_counter() - epoch_start
        log(
            f"epoch {epoch} done in {last_epoch_s:.0f} s: val loss {erow['val_loss_conventional']:.6f} / "
            f"{erow['val_loss_streaming']:.6f}, val acc {erow['val_acc_conventional']:.3f} / {erow['val_acc_streaming']:.3f}"
        )
        write("running")  # Rule 4
    write(status)
    return paths
