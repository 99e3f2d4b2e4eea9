"""Fig 4 of the paper, redrawn from the result files (never from numbers held in memory)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .train import IMAGENETTE_TRAIN_IMAGES  # noqa: E402

PAPER_LR = 1e-3  # Section 5.2
COLORS = {"conventional": "tab:blue", "streaming": "tab:orange"}
STYLE = {
    "conventional": {"lw": 3.0, "alpha": 0.45, "ls": "-"},
    "streaming": {"lw": 1.2, "alpha": 1.0, "ls": "--"},
}


def _subtitle(meta: dict) -> str:
    env, cfg = meta["environment"], meta["config"]
    data = meta["dataset"] + (
        " (views of scikit-image's sample photographs, not ImageNette)" if meta["synthetic"] else ""
    )
    return (
        f"data: {data}, {meta['n_train_images']} train / {meta['n_val_images']} val images; "
        f"{meta['epochs_completed']} epochs, {meta['steps_completed']} steps of batch {meta['config']['batch_size']}\n"
        f"device: {env['device']} ({env['cpu']}, torch threads: {env['threads']}), {cfg['dtype']}; "
        f"trunk streamed in {meta['streaming']['n_tiles_per_image']} tiles of "
        f"{meta['streaming']['tile_px']} px; torch {env['torch']}, streamcheck {env['streamcheck']}"
    )


def run_files(out_dir: Path, label: str) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """A run's steps, epochs and metadata (``train.py`` writes them)."""
    steps = pd.read_csv(out_dir / f"{label}_steps.csv")
    epochs = pd.read_csv(out_dir / f"{label}_epochs.csv")
    return steps, epochs, json.loads((out_dir / f"{label}_run.json").read_text())


def plot_run(out_dir: Path, label: str) -> list[Path]:
    """Write {label}_fig4_curves.png and {label}_loss_difference.png next to the result files."""
    steps, epochs, meta = run_files(out_dir, label)
    spe = meta["steps_per_epoch"]
    tag = "STAND-IN: " if meta["synthetic"] else ""
    written = []

    # --- Fig 4: both runs drawn over each other -------------------------------------------
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 5.2))
    x_steps = steps["step"] / spe
    for r in ("conventional", "streaming"):
        ax_loss.plot(
            x_steps,
            steps[f"loss_{r}"],
            color=COLORS[r],
            label=f"{r}: training loss (per step)",
            **STYLE[r],
        )
    for r in ("conventional", "streaming"):
        ax_loss.plot(
            epochs["epoch"],
            epochs[f"val_loss_{r}"],
            color=COLORS[r],
            marker="o" if r == "conventional" else "x",
            ms=8 if r == "conventional" else 6,
            lw=0 if len(epochs) > 1 else 0,
            label=f"{r}: tuning loss (per epoch)",
        )
        ax_acc.plot(
            epochs["epoch"],
            epochs[f"val_acc_{r}"],
            color=COLORS[r],
            marker="o" if r == "conventional" else "x",
            label=f"{r}: tuning accuracy",
            **STYLE[r],
        )
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (tuning set)", title="accuracy", ylim=(0, 1))
    ax_acc.axhline(0.1, color="grey", lw=0.8, ls=":", label="chance (10 classes)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{tag}conventional vs streaming training from the same initialisation (paper Fig. 4)\n"
        + _subtitle(meta),
        fontsize=9.5,
    )
    fig.tight_layout()
    p = out_dir / f"{label}_fig4_curves.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    # --- how far apart the runs are, on a log scale -----------------------------------------
    fig, (ax_l, ax_w) = plt.subplots(1, 2, figsize=(13, 5.2))
    floor = 1e-12 if meta["config"]["dtype"] == "float32" else 1e-18
    zero = steps["loss_abs_diff"] == 0
    ax_l.semilogy(
        x_steps,
        steps["loss_abs_diff"].clip(lower=floor),
        ".",
        ms=4,
        color="tab:red",
        label="|training loss difference| per step",
    )
    control = "loss_abs_diff_reordered" in steps
    if control:
        ax_l.semilogy(
            x_steps,
            steps["loss_abs_diff_reordered"].clip(lower=floor),
            "x",
            ms=4,
            color="grey",
            label="control: |conventional - conventional with half-batch sums|",
        )
    ax_l.semilogy(
        epochs["epoch"],
        epochs["val_loss_abs_diff"].clip(lower=floor),
        "s",
        color="tab:purple",
        label="|tuning loss difference| per epoch",
    )
    unit = 2.0**-24 if meta["config"]["dtype"] == "float32" else 2.0**-53
    ax_l.semilogy(
        x_steps,
        unit * steps["loss_conventional"].abs(),
        color="grey",
        lw=1,
        ls="--",
        label=f"one rounding unit of the loss value ({meta['config']['dtype']})",
    )
    if zero.any():
        ax_l.axhline(
            floor,
            color="grey",
            ls=":",
            lw=0.8,
            label=f"exactly equal ({int(zero.sum())} steps), drawn at {floor:g}",
        )
    ax_l.set(xlabel="epoch", ylabel="|loss conventional - loss other run|", title="loss difference")
    # (column, style, label): the streaming run's weight distance, then the control's
    curves = [
        (
            "trunk_weight_rel_diff",
            {"color": "tab:orange"},
            "streaming run: trunk (conv16, conv32, streamed)",
        ),
        ("head_weight_rel_diff", {"color": "tab:blue"}, "streaming run: head (conv64..fc10)"),
    ]
    if control:
        curves += [
            ("trunk_weight_rel_diff_reordered", {"color": "black", "lw": 1.2, "ls": "-."}, "control (half-batch sums), trunk"),
            ("head_weight_rel_diff_reordered", {"color": "grey", "lw": 1.2, "ls": ":"}, "control (half-batch sums), head"),
        ]  # fmt: skip
    for column, style, text in curves:
        ax_w.semilogy(x_steps, steps[column].clip(lower=floor), **style, label=text)
    ax_w.semilogy(
        x_steps,
        steps["trunk_update_rel_streaming"],
        color="tab:orange",
        ls=":",
        alpha=0.7,
        label="for scale: one step's update of the streamed trunk",
    )
    ax_w.set(
        xlabel="epoch",
        ylabel="||w_conv - w_stream|| / ||w_conv||",
        title="weight difference after each step",
    )
    for ax in (ax_l, ax_w):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{tag}floating-point drift between the two runs\n" + _subtitle(meta), fontsize=9.5
    )
    fig.tight_layout()
    p = out_dir / f"{label}_loss_difference.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    return written


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}{'' if k == 1 else 's'}"


def _fmt(x: float) -> str:
    return f"{x:.1e}"


def reading(out_dir: Path, label: str) -> str:
    """The run's two-sentence reading, from its files alone (its SUMMARY's and the report's)."""
    steps, epochs, meta = run_files(out_dir, label)
    env, cfg = meta["environment"], meta["config"]
    first = steps[steps["epoch"] == steps["epoch"].min()]
    last = steps[steps["epoch"] == steps["epoch"].max()]
    final = epochs.iloc[-1]
    tw = steps["trunk_weight_rel_diff"]
    where = "the photograph STAND-IN" if meta["synthetic"] else "ImageNette"
    if "trunk_weight_rel_diff_reordered" in steps:
        ratio = tw.iloc[-1] / steps["trunk_weight_rel_diff_reordered"].iloc[-1]
        size = "as large as" if 0.5 <= ratio <= 2 else f"{ratio:.2g}x"
        yardstick = (
            f", {size} the distance between the conventional run and a control that only sums each "
            f"batch gradient as two half-batch sums "
            f"({_fmt(steps['trunk_weight_rel_diff_reordered'].iloc[-1])}): reordering noise"
        )
    else:
        yardstick = ""
    growth = tw.iloc[-1] / max(tw.iloc[0], 1e-300)
    on = "CPU" if env["device"] == "cpu" else env["device"]
    rounding = "float32 drift" if cfg["dtype"] == "float32" else f"{cfg['dtype']} rounding"
    reading = (
        f"From the same He-initialised weights and bitwise-identical batches, conventional and streaming "
        f"training gave training-loss curves ({steps['loss_conventional'].iloc[0]:.2f} -> "
        f"{steps['loss_conventional'].iloc[-1]:.2f} over {_n(len(steps), 'step')}) and tuning loss and accuracy curves "
        f"that lie on top of each other: per-step losses agree to {_fmt(steps['loss_rel_diff'].max())} relative at "
        f"worst (median {_fmt(first['loss_rel_diff'].median())} in the first epoch, "
        f"{_fmt(last['loss_rel_diff'].median())} in the last), tuning accuracy "
        + " and ".join(
            f"{e['val_acc_conventional']:.3f} vs {e['val_acc_streaming']:.3f} after epoch {int(e['epoch'])}"
            for e in ([epochs.iloc[0]] if len(epochs) == 1 else [epochs.iloc[0], final])
        )
        + " (chance 0.100). "
        + (
            f"The difference is {rounding} that grows from {_fmt(tw.iloc[0])} (relative trunk-weight distance "
            f"after step 1) to {_fmt(tw.iloc[-1])} after step {len(steps)}{yardstick} amplified by training"
            if growth > 10
            else f"The difference is {rounding} that stays between {_fmt(tw.min())} and {_fmt(tw.max())} "
            f"(relative trunk-weight distance) over {_n(len(steps), 'step')}{yardstick}"
        )
        + f", as the paper says of its Fig. 4 -- here on {where}, {_n(meta['epochs_completed'], 'epoch')} on {on}, "
        "not 200 epochs of ImageNette on a GPU."
    )
    return reading


def headline(out_dir: Path) -> str:
    """The reading of the real ImageNette run when there is one, else of the first run."""
    labels = [p.name.removesuffix("_run.json") for p in sorted(out_dir.glob("*_run.json"))]
    return reading(out_dir, "imagenette" if "imagenette" in labels else labels[0])


def write_summary(out_dir: Path, label: str) -> Path:
    """{label}_SUMMARY.md: the run's facts and a two-sentence reading, all read from the files."""
    steps, epochs, meta = run_files(out_dir, label)
    env, cfg, st, tm = meta["environment"], meta["config"], meta["streaming"], meta["timing"]
    lib = meta["libraries"]
    data = meta["dataset"] + (
        " -- random views of scikit-image's sample photographs in ImageNette layout, NOT ImageNette"
        if meta["synthetic"]
        else ""
    )
    spe = meta["steps_per_epoch"]
    n_equal = int((steps["loss_abs_diff"] == 0).sum())
    unit = 2.0**-24 if cfg["dtype"] == "float32" else 2.0**-53
    on = "CPU" if env["device"] == "cpu" else env["device"]
    lines = [
        f"# ImageNette reproduction (paper Section 5, Table 1, Fig. 4): {meta['dataset']} data",
        "",
        "Generated by `python -m suites.imagenette` from the files in this folder; do not edit by hand.",
        "",
        "## Reading",
        "",
        reading(out_dir, label),
        "",
        f"![loss and accuracy]({label}_fig4_curves.png)",
        "",
        f"![differences]({label}_loss_difference.png)",
        "",
        "## Run",
        "",
        f"- command: `{meta['command']}`",
        f"- status: {meta['status']}; {meta['epochs_completed']} of {cfg['epochs']} epochs, {meta['steps_completed']} steps "
        f"({spe} per epoch), wall time {meta['wall_s'] / 60:.1f} min, {meta['started_utc']} -> {meta['finished_utc']}",
        f"- data: {data}; {meta['n_train_images']} train / {meta['n_val_images']} tuning images (`{meta['data_root']}`)",
        f"- training: SGD lr {cfg['lr']}{'' if cfg['lr'] == PAPER_LR else f' (paper: {PAPER_LR})'}, momentum {cfg['momentum']}, weight decay {cfg['weight_decay']}, batch {cfg['batch_size']}, "
        f"{cfg['image_size']} px RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3); tuning: Resize + CenterCrop {cfg['image_size']} px; seed {cfg['seed']}",
        f"- model: {meta['model']['architecture']}; {meta['model']['parameters']:,} parameters",
        f"- streamed: {meta['model']['streamed']}; tile {st['tile_px']} px requested"
        + (f" (from {st['tile_requested_px']})" if st["tile_px"] != st["tile_requested_px"] else "")
        + f", {st['tile_px_used'][0]} px input tiles used by the engine, {st['output_tile_px'][0]} px output tiles, "
        f"{st['n_tiles_per_image']} tiles per image; receptive field {st['receptive_field_px'][0]} px, total stride {st['total_stride'][0]}",
        f"- device: {env['device']} ({env['cpu']}), torch threads {env['threads']}, {cfg['dtype']}",
        f"- versions: python {env['python']}, torch {env['torch']}, torchvision {env['torchvision']}, streamcheck {env['streamcheck']}, "
        f"numpy {lib['numpy']}, pandas {lib['pandas']}, Pillow {lib['pillow']}, scikit-image {lib['scikit_image']}; "
        f"git {env['git_commit']}",
        "",
        "## Per epoch",
        "",
        "| epoch | step | train loss conv. | train loss stream. | tuning loss conv. | tuning loss stream. | |diff| | tuning acc. conv. | tuning acc. stream. |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for _, e in epochs.iterrows():
        lines.append(
            f"| {int(e['epoch'])} | {int(e['step'])} | {e['train_loss_conventional']:.6f} | {e['train_loss_streaming']:.6f} | "
            f"{e['val_loss_conventional']:.6f} | {e['val_loss_streaming']:.6f} | {_fmt(e['val_loss_abs_diff'])} | "
            f"{e['val_acc_conventional']:.3f} | {e['val_acc_streaming']:.3f} |"
        )
    lines += [
        "",
        "## Agreement",
        "",
        f"- steps with bit-identical losses: {n_equal} of {len(steps)}",
        f"- per-step |loss difference| / loss: max {_fmt(steps['loss_rel_diff'].max())}, median {_fmt(steps['loss_rel_diff'].median())}; "
        f"one {cfg['dtype']} rounding unit is {_fmt(unit)} relative",
        f"- relative weight difference after the last step: trunk (streamed) {_fmt(steps['trunk_weight_rel_diff'].iloc[-1])}, "
        f"head {_fmt(steps['head_weight_rel_diff'].iloc[-1])}; for scale, one step moves the streamed trunk by "
        f"{_fmt(steps['trunk_update_rel_streaming'].median())} (median)",
        *(
            [
                f"- control run (conventional, batch gradient summed as two half-batch gradients: only the float summation "
                f"order differs): per-step relative loss difference from conventional max "
                f"{_fmt(steps['loss_rel_diff_reordered'].max())}, median {_fmt(steps['loss_rel_diff_reordered'].median())}; "
                f"trunk weights {_fmt(steps['trunk_weight_rel_diff_reordered'].iloc[-1])} apart after the last step "
                f"(streaming: {_fmt(steps['trunk_weight_rel_diff'].iloc[-1])})"
            ]
            if "loss_rel_diff_reordered" in steps
            else []
        ),
        "- every step both runs' trunk and head weights changed (columns `*_update_rel_*` of the steps file), and "
        "both runs' batches were checked bitwise equal",
        "",
        "## Timing (this machine, shared with other jobs: ratios are more telling than seconds)",
        "",
        "| run | median step (s) | train s / image | eval s / image | ImageNette train epoch (9469 images), est. min | ImageNette tuning pass (3925 images), est. min |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in ("conventional", "streaming"):
        t = tm[r]
        lines.append(
            f"| {r} | {t['median_step_s']:.2f} | {t['median_train_s_per_image']:.3f} | {t.get('median_eval_s_per_image', float('nan')):.3f} | "
            f"{t['imagenette_train_epoch_estimate_min']:.0f} | {t.get('imagenette_val_epoch_estimate_min', float('nan')):.1f} |"
        )
    both = sum(
        tm[r]["imagenette_train_epoch_estimate_min"]
        + tm[r].get("imagenette_val_epoch_estimate_min", 0)
        for r in ("conventional", "streaming")
    )
    lines += [
        "",
        f"Streaming / conventional step time: {tm['streaming_over_conventional']:.2f} (median). "
        f"One ImageNette epoch of both runs would take about {both:.0f} min here, so the paper's 200 epochs about "
        f"{both * 200 / 60 / 24:.1f} days on this {'CPU: the real run wants a GPU' if on == 'CPU' else 'device'}.",
        "",
    ]
    if "data_s_per_image_per_stream" in tm:  # runs since the data time was recorded
        data_s = tm["data_s_per_image_per_stream"]
        data_h = data_s * 2 * IMAGENETTE_TRAIN_IMAGES * 200 / 3600
        lines += [
            f"Data: decoding and augmenting took {data_s * 1e3:.1f} ms per image for each of the two batch "
            f"streams (included in no step time above). That work stays on this process's CPU with "
            f"`--device cuda`: for 200 ImageNette epochs it alone would take about {data_h:.0f} h at this rate.",
            "",
        ]
    p = out_dir / f"{label}_SUMMARY.md"
    p.write_text("\n".join(lines))
    return p
