"""Section 4 of the report: conventional vs streamed training (paper Fig. 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from suites.imagenette.plots import PAPER_LR, reading

from .format import err, figure, missing_note, relpath, table
from .sources import Source, finite, get, read_csv


# ----------------------------------------------------------------------------- 4. training
def training_section(imn: Source, out_dir: Path) -> str:
    parts = ["## 4. Training (paper Fig. 4)", ""]
    if not imn.found:
        return "\n".join(parts + missing_note(imn, "python -m suites.imagenette"))
    run = imn.data["run"]
    label = imn.data["label"]
    synthetic = run.get("synthetic", label != "imagenette")
    if synthetic:
        parts += [
            f"> **STAND-IN data, not ImageNette.** This run trained on `{run.get('dataset', label)}`: "
            "random views (crops, scales, flips, colour jitter) of scikit-image's bundled sample "
            "photographs, one set of photographs per class, in ImageNette's folder layout. It "
            "checks that conventional and streamed training coincide while the network learns, "
            "not ImageNette accuracy.",
            "",
        ]
    cfg = run.get("config", {})
    stream = run.get("streaming", {})
    parts.append(
        f"The Table 1 network trained twice from the same initial weights on identical batches, "
        f"once conventionally and once with its first layers streamed "
        f"({stream.get('n_tiles_per_image', 'n/a')} tiles of {stream.get('tile_px', 'n/a')} px per "
        f"{cfg.get('image_size', 'n/a')} px image): {run.get('epochs_completed', 'n/a')} of "
        f"{cfg.get('epochs', 'n/a')} epochs, {run.get('steps_completed', 'n/a')} steps of batch "
        f"{cfg.get('batch_size', 'n/a')}, SGD lr {cfg.get('lr', 'n/a')}"
        + (f" (paper: {PAPER_LR})" if cfg.get("lr") != PAPER_LR else "")
        + f", {cfg.get('dtype', 'n/a')}; status: {run.get('status', 'n/a')}."
    )
    try:
        parts += ["", reading(imn.folder, label)]
    except (KeyError, ValueError, IndexError) as error:  # Rule P2: said, never filled in
        parts += ["", f"No reading: a field is missing from the result files ({error!r})."]
    others = imn.data.get("other_runs", [])
    if others:
        parts += [
            "",
            "Other runs of the same suite (in subfolders):",
            "",
            _other_runs_table(others, imn.folder),
        ]
    parts += [""]
    command = run.get("command")
    captions = {
        "fig4_curves": "Fig. 4 replica: loss and tuning accuracy of both runs drawn over each other.",
        "loss_difference": "How far apart the runs are, per step, on a log scale (with the control run, if made).",
    }
    for i, path in enumerate(imn.figures, 1):
        kind = path.stem.removeprefix(f"{label}_")
        caption = ("STAND-IN data. " if synthetic else "") + captions.get(kind, path.name)
        parts += [figure(path, out_dir, f"Figure 4.{i}", caption, command), ""]
    parts += [
        f"Details: [`{imn.folder.name}/{label}_SUMMARY.md`]"
        f"({relpath(imn.folder / f'{label}_SUMMARY.md', out_dir)}) "
        "and the CSV/JSON files next to it."
        if (imn.folder / f"{label}_SUMMARY.md").exists()
        else f"Details: the CSV/JSON files in `{imn.folder.name}/`."
    ]
    if imn.missing:
        parts += ["", "Missing: " + "; ".join(imn.missing) + "."]
    return "\n".join(parts)


def _other_runs_table(runs: list[dict[str, Any]], folder: Path) -> str:
    rows = []
    for r in runs:
        run, steps = r["run"], r["steps"]
        missing: list[str] = []
        epochs = read_csv(folder / r["folder"] / f"{r['label']}_epochs.csv", missing)
        accuracy = (
            f"{epochs[-1]['val_acc_conventional']:.3f} / {epochs[-1]['val_acc_streaming']:.3f}"
            if epochs
            and all(
                finite(epochs[-1].get(k)) for k in ("val_acc_conventional", "val_acc_streaming")
            )
            else "n/a"
        )

        def worst(key: str, steps: list[dict[str, Any]] = steps) -> str:
            values = [s[key] for s in steps if finite(s.get(key))]
            return err(max(values)) if values else "n/a"

        def last(key: str, steps: list[dict[str, Any]] = steps) -> str:
            return err(steps[-1].get(key)) if steps else "n/a"

        rows.append(
            [
                f"`{r['folder']}/` ({r['label']})",
                get(run, "config", "dtype", default="n/a"),
                run.get("steps_completed", len(steps)),
                worst("loss_rel_diff"),
                worst("loss_rel_diff_reordered"),
                last("trunk_weight_rel_diff"),
                last("trunk_weight_rel_diff_reordered"),
                get(run, "config", "lr", default="n/a"),
                accuracy,
                f"`{run.get('command', 'n/a')}`",
            ]
        )
    return table(
        "run | dtype | steps | max rel. loss difference, streaming | same, control | trunk weight rel. difference at the end, streaming | same, control | lr | tuning accuracy at the end, conventional / streaming | command",
        rows,
        align="llrrrrrrrl",
    )
