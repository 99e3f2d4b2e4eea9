"""Fig 4 of the paper, redrawn from the result files (never from numbers held in memory)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

COLORS = {"conventional": "tab:blue", "streaming": "tab:orange"}
STYLE = {
    "conventional": {"lw": 3.0, "alpha": 0.45, "ls": "-"},
    "streaming": {"lw": 1.2, "alpha": 1.0, "ls": "--"},
}


def _subtitle(meta: dict) -> str:
    env = meta["environment"]
    data = meta["dataset"] + (" (synthetic textures, not ImageNette)" if meta["synthetic"] else "")
    return (
        f"data: {data}, {meta['n_train_images']} train / {meta['n_val_images']} val images; "
        f"{meta['epochs_completed']} epochs, {meta['steps_completed']} steps of batch {meta['config']['batch_size']}\n"
        f"device: {env['device']} ({env['cpu']}, {env['torch_threads']} threads), {env['dtype']}; "
        f"trunk streamed in {meta['streaming']['n_tiles_per_image']} tiles of "
        f"{meta['streaming']['tile_px']} px; torch {env['torch']}, streamcheck {env['streamcheck']}"
    )


def plot_run(out_dir: Path | str, label: str) -> list[Path]:
    """Write {label}_fig4_curves.png and {label}_loss_difference.png next to the result files."""
    out_dir = Path(out_dir)
    steps = pd.read_csv(out_dir / f"{label}_steps.csv")
    epochs = pd.read_csv(out_dir / f"{label}_epochs.csv")
    meta = json.loads((out_dir / f"{label}_run.json").read_text())
    spe = meta["steps_per_epoch"]
    tag = "STAND-IN: " if meta["synthetic"] else ""
    written = []

    # --- Fig 4: both runs drawn over each other -------------------------------------------
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 5.2))
    x_steps = steps["step"] / spe
    for r in ("conventional", "streaming"):
        ax_loss.plot(x_steps, steps[f"loss_{r}"], color=COLORS[r], label=f"{r}: training loss (per step)", **STYLE[r])
    for r in ("conventional", "streaming"):
        ax_loss.plot(epochs["epoch"], epochs[f"val_loss_{r}"], color=COLORS[r], marker="o" if r == "conventional" else "x",
                     ms=8 if r == "conventional" else 6, lw=0 if len(epochs) > 1 else 0, label=f"{r}: tuning loss (per epoch)")
        ax_acc.plot(epochs["epoch"], epochs[f"val_acc_{r}"], color=COLORS[r], marker="o" if r == "conventional" else "x",
                    label=f"{r}: tuning accuracy", **STYLE[r])
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (tuning set)", title="accuracy", ylim=(0, 1))
    ax_acc.axhline(0.1, color="grey", lw=0.8, ls=":", label="chance (10 classes)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{tag}conventional vs streaming training from the same initialisation (paper Fig. 4)\n" + _subtitle(meta), fontsize=9.5)
    fig.tight_layout()
    p = out_dir / f"{label}_fig4_curves.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    # --- how far apart the runs are, on a log scale -----------------------------------------
    fig, (ax_l, ax_w) = plt.subplots(1, 2, figsize=(13, 5.2))
    floor = 1e-12 if meta["environment"]["dtype"] == "float32" else 1e-18
    zero = steps["loss_abs_diff"] == 0
    ax_l.semilogy(x_steps, steps["loss_abs_diff"].clip(lower=floor), ".", ms=4, color="tab:red", label="|training loss difference| per step")
    ax_l.semilogy(epochs["epoch"], epochs["val_loss_abs_diff"].clip(lower=floor), "s", color="tab:purple", label="|tuning loss difference| per epoch")
    if zero.any():
        ax_l.axhline(floor, color="grey", ls=":", lw=0.8, label=f"exactly equal ({int(zero.sum())} steps), drawn at {floor:g}")
    ax_l.set(xlabel="epoch", ylabel="|loss conventional - loss streaming|", title="loss difference")
    ax_w.semilogy(x_steps, steps["trunk_weight_rel_diff"].clip(lower=floor), color="tab:orange", label="streamed trunk (conv16, conv32)")
    ax_w.semilogy(x_steps, steps["head_weight_rel_diff"].clip(lower=floor), color="tab:blue", label="head (conv64..fc10)")
    ax_w.semilogy(x_steps, steps["trunk_update_rel_streaming"], color="tab:orange", ls=":", alpha=0.7, label="for scale: one step's update of the streamed trunk")
    ax_w.set(xlabel="epoch", ylabel="||w_conv - w_stream|| / ||w_conv||", title="weight difference after each step")
    for ax in (ax_l, ax_w):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"{tag}floating-point drift between the two runs\n" + _subtitle(meta), fontsize=9.5)
    fig.tight_layout()
    p = out_dir / f"{label}_loss_difference.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    return written
