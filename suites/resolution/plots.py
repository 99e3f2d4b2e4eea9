"""Figures of the resolution experiment, drawn from its result files only (Rule X3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import saliency as SA  # noqa: E402
from . import slides as S  # noqa: E402


def auc_vs_resolution(summary: dict[str, Any], path: Path, *, label: str) -> Path:
    """Test AUC and saliency-lesion AUC against input size, with bootstrap 95 % CIs."""
    rows = summary["resolutions"]
    px = np.array([r["input_px"] for r in rows])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, title in (
        (axes[0], "auc", "slide classification: test AUC"),
        (axes[1], "saliency_lesion_auc", "saliency as lesion-pixel detector: AUC"),
    ):
        y = np.array([r[key] for r in rows])
        ci = np.array([r[f"{key}_ci"] for r in rows])
        ax.errorbar(px, y, yerr=[y - ci[:, 0], ci[:, 1] - y], marker="o", capsize=4)
        ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance")
        prior = summary.get("saliency_baseline_border_distance_auc")
        if key == "saliency_lesion_auc" and prior is not None:
            ax.axhline(prior, color="tab:orange", ls=":", lw=1.5, label="distance-from-border map")
        ax.set_xscale("log", base=2)
        ax.set_xticks(px, [f"{p}²\n(1/{r['downsample']})" for p, r in zip(px, rows, strict=True)])
        ax.set_ylim(0.3, 1.02)
        ax.set_xlabel("input size (fraction of full resolution)")
        ax.set_title(title)
        ax.legend(loc="lower right")
    fig.suptitle(f"{label}: one network trained streamed at each resolution (95 % bootstrap CIs)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def saliency_grid(
    summary: dict[str, Any],
    records: list[dict[str, Any]],
    root: Path,
    cache: Path,
    path: Path,
    *,
    label: str,
) -> Path:
    """Rows: test slides; columns: the slide with its lesion mask, then each resolution's map."""
    records = sorted(records, key=lambda r: -r["input_px"])
    names = records[0]["overlay_slides"]
    maps = {r["input_px"]: np.load(cache / f"saliency_px{r['input_px']}.npz") for r in records}
    table = {s.name: s for s in S.read_table(root)}
    ncol = 1 + len(records)
    fig, axes = plt.subplots(
        len(names), ncol, figsize=(2.6 * ncol, 2.7 * len(names)), squeeze=False
    )
    for row, name in enumerate(names):
        image, mask = S.read_slide(root, name)
        ax = axes[row, 0]
        ax.imshow(image)
        if mask.any():
            ax.contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(f"{name} (label {table[name].label})\nlesion mask in green", fontsize=8)
        for col, r in enumerate(records, 1):
            px = r["input_px"]
            smap = maps[px][name]
            level = S.downsample(image, r["downsample"]).permute(1, 2, 0).numpy()
            ax = axes[row, col]
            ax.imshow(level)
            ax.imshow(smap, cmap="jet", alpha=SA.overlay_alpha(smap))
            logit = r["test_logits"][r["test_slides"].index(name)]
            ax.set_title(f"{px}² (1/{r['downsample']}), logit {logit:+.2f}", fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        f"{label}: saliency (|input gradient|, blurred with σ = 50 px x input/8192, capped at "
        "the 99th percentile), upper 50th percentile overlaid",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    from PIL import Image

    # a committed figure: a 256-colour palette keeps it a few hundred kB
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
    return path
