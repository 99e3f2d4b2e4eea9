"""The resolution experiment's SUMMARY.md, from ``reports/resolution/summary.json`` alone.

Every number is read from ``summary.json``; the verdicts ("rises with
resolution", "better than chance") are computed from those numbers and their intervals, never typed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from suites.markdown import code, commit, figure, table

COMMAND = "python -m suites.resolution"


def _ci(values: list[float]) -> str:
    return f"{values[0]:.3f} to {values[1]:.3f}"


def verdicts(summary: dict[str, Any]) -> list[str]:
    """Plain statements computed from the numbers: does AUC rise, does saliency find lesions."""
    rows = sorted(summary["resolutions"], key=lambda r: r["input_px"])
    lo, hi = rows[0], rows[-1]
    aucs = [r["auc"] for r in rows]
    steps = list(zip(aucs, aucs[1:], strict=False))
    if all(b > a for a, b in steps):
        trend = "rises at every step up in"
    elif all(b >= a for a, b in steps):
        trend = "never falls (but does not always rise) with"
    else:
        trend = "does not rise monotonically with"
    tests = {(t["higher_px"], t["lower_px"]): t for t in summary["permutation_tests"]}
    top = tests.get((hi["input_px"], lo["input_px"]))
    significant = [t for t in summary["permutation_tests"] if t["p_one_sided"] < 0.05]
    prior = summary.get("saliency_baseline_border_distance_auc")
    listed = ", ".join(f"{r['input_px']}² {r['auc']:.3f}" for r in rows)
    out = [
        f"Test AUC {trend} resolution: {listed}; "
        + (
            f"{len(significant)} of {len(tests)} higher-vs-lower comparisons significant at 0.05"
            if significant
            else f"none of the {len(tests)} higher-vs-lower differences is significant at 0.05"
        )
        + ".",
        f"Highest against lowest resolution ({hi['input_px']}² vs {lo['input_px']}²): AUC "
        f"{hi['auc']:.3f} (95 % CI {_ci(hi['auc_ci'])}) vs {lo['auc']:.3f} "
        f"({_ci(lo['auc_ci'])})"
        + (
            f", one-sided permutation p = {top['p_one_sided']:.3g} ("
            + (
                f"the smallest p {top['permutations']} permutations can give; "
                if top["p_one_sided"] * (1 + top["permutations"]) < 1.5
                else ""
            )
            + f"{'significant' if top['p_one_sided'] < 0.05 else 'not significant'} at 0.05)."
            if top
            else "."
        ),
        f"At the lowest resolution the lesions change no downsampled pixel by more than "
        f"{lo['lesion_visibility']:.2f} texture standard deviations (full resolution: "
        f"{hi['lesion_visibility']:.2f}); its AUC CI "
        + ("includes" if lo["auc_ci"][0] <= 0.5 <= lo["auc_ci"][1] else "excludes")
        + " chance (0.5).",
        f"Saliency of the highest resolution as a lesion-pixel detector: AUC "
        f"{hi['saliency_lesion_auc']:.3f} (95 % CI {_ci(hi['saliency_lesion_auc_ci'])}), "
        + ("better" if hi["saliency_lesion_auc_ci"][0] > 0.5 else "not measurably better")
        + " than chance (0.5)"
        + _against_border(hi, prior)
        + ".",
    ]
    missed = [
        r
        for r in rows[1:]
        if (r["lesion_visibility"] or 0) > 1 and r["auc_ci"][0] <= 0.5 <= r["auc_ci"][1]
    ]
    if missed:
        out.append(
            "Lesions visible (more than one texture standard deviation) but not learned (AUC CI "
            "includes chance) at "
            + ", ".join(
                f"{r['input_px']}² (visibility {r['lesion_visibility']:.2f}, last-epoch train "
                f"loss {r['final_epoch_train_loss']:.3f})"
                for r in missed
            )
            + ": the signal is there, and this network and schedule did not pick it up."
        )
    return out


def _against_border(row: dict[str, Any], prior: float | None) -> str:
    """The saliency against the border-distance map (Rule SA4), paired per slide where recorded."""
    if prior is None:
        return ""
    about = (
        f"a map that only knows the distance from the border ({prior:.3f}; lesions are never "
        "placed near the border, Rule SA4)"
    )
    ci = row.get("saliency_minus_border_auc_ci")
    if ci is None:  # summaries written before the paired difference was recorded
        better = row["saliency_lesion_auc_ci"][0] > prior
        return f" and {'better' if better else 'not measurably better'} than {about}"
    verdict = "better" if ci[0] > 0 else "worse" if ci[1] < 0 else "not measurably better"
    return (
        f" and {verdict} than {about}: paired per slide, saliency minus border "
        f"{row['saliency_minus_border_auc']:+.3f} (95 % CI {ci[0]:+.3f} to {ci[1]:+.3f}), "
        f"higher on {row['saliency_beats_border_slides']} of "
        f"{row['positive_test_slides']} positive test slides"
    )


def headline(folder: Path) -> str:
    """The first verdict: does test AUC rise with resolution."""
    return verdicts(json.loads((folder / "summary.json").read_text()))[0]


def write_summary(folder: Path) -> Path:
    """``SUMMARY.md`` next to ``summary.json`` (figure links relative to the folder)."""
    path = folder / "SUMMARY.md"
    summary = json.loads((folder / "summary.json").read_text())
    path.write_text(summary_markdown(summary, figures=folder))
    return path


def summary_markdown(summary: dict[str, Any], *, figures: Path) -> str:
    """The summary's body."""
    out_dir = figures
    cfg = summary["config"]
    spec = cfg["spec"]
    rows = sorted(summary["resolutions"], key=lambda r: -r["input_px"])
    parts = [
        f"> **{summary['label']} slides, not CAMELYON17.** Generated tissue texture (scikit-image's "
        f"bundled IHC image, tiled, rotated, recoloured) with small lesions built to vanish under "
        f"downsampling (`suites/resolution/slides.py`, NOTE [ Synthetic slides ]). Configuration "
        f"**{cfg['name']}**: {cfg['description']}.",
        "",
        *[f"- {line}" for line in verdicts(summary)],
        "",
        f"{spec['n_train']} training and {spec['n_test']} test slides of {spec['size_px']}² px "
        f"(half with {spec['lesions'][0]}-{spec['lesions'][1]} lesions of "
        f"{spec['nuclei'][0]}-{spec['nuclei'][1]} nuclei); the Table 2-style network "
        f"(conv pairs of {tuple(cfg['channels'])} channels, 2x2 max-pools, global max-pool, one "
        f"logit) trained streamed (tile {cfg['tile']} px) at each resolution through Lightning, "
        f"{cfg['epochs']} epochs, {cfg['accumulate']} slides per step, Adam lr {cfg['lr']}, "
        f"precision {cfg['precision']}, LSUV initialisation from streamed statistics "
        f"({cfg['lsuv_slides']} slides), image-level labels only.",
        "",
        table(
            "input | test AUC | 95 % CI | saliency lesion AUC | 95 % CI | lesion visibility | last-epoch train loss | s per slide step",
            [
                [
                    f"{r['input_px']}² (1/{r['downsample']})",
                    f"{r['auc']:.3f}",
                    _ci(r["auc_ci"]),
                    f"{r['saliency_lesion_auc']:.3f}",
                    _ci(r["saliency_lesion_auc_ci"]),
                    f"{r['lesion_visibility']:.2f}",
                    "n/a"
                    if r["final_epoch_train_loss"] is None
                    else f"{r['final_epoch_train_loss']:.3f}",
                    f"{r['train_s_per_slide_step']:.2f}",
                ]
                for r in rows
            ],
        ),
        "",
        "Lesion visibility: the largest change the lesions make to any downsampled pixel, in "
        "standard deviations of the texture at that resolution (Rule SL5). CIs: "
        f"{cfg['bootstrap']} bootstrap resamples of the test slides, the same for every "
        "resolution; saliency CIs resample the positive test slides.",
        "",
        table(
            ["higher", "lower", "AUC difference", "one-sided p"],
            [
                [
                    f"{t['higher_px']}²",
                    f"{t['lower_px']}²",
                    f"{t['auc_difference']:+.3f}",
                    f"{t['p_one_sided']:.3g}",
                ]
                for t in summary["permutation_tests"]
            ],
        ),
        "",
        f"Paired permutation tests ({cfg['permutations']} permutations of within-model ranks, "
        "NOTE [ Comparing resolutions ]).",
        "",
    ]
    command = summary.get("command")
    for name, number, caption in (
        (
            "auc_vs_resolution.png",
            "Fig. R1",
            "Test AUC and saliency-lesion AUC against input size.",
        ),
        (
            "saliency_overlays.png",
            "Fig. R2",
            "Saliency maps per resolution on test slides (paper Figs 5-6 recipe).",
        ),
    ):
        if (figures / name).is_file():
            parts += [figure(figures / name, out_dir, number, caption, command), ""]
    env = summary.get("environment", {})
    loads = ", ".join(f"{px}² {v}" for px, v in summary.get("runs_load_1min", {}).items())
    parts += [
        f"Run: {code(command or COMMAND)}; training and evaluation took "
        f"{summary.get('train_and_eval_s', float('nan')) / 60:.1f} min summed over the "
        f"resolutions (each one's times and environment are in its `runs/` record; 1-min load "
        f"at the end of each: {loads or 'n/a'}; OpenMP wait policy "
        f"{summary.get('omp_wait_policy') or 'unset'}, Rule X4); this summary was written "
        f"{summary['finished_utc']} ({summary['wall_s'] / 60:.1f} min wall: finished resolutions "
        f"are reused, Rule X2), commit {commit(env.get('git_commit'))}, torch "
        f"{env.get('torch', 'n/a')}, {env.get('device', 'n/a')} ({env.get('cpu', 'n/a')}), "
        f"{env.get('threads', 'n/a')} threads, 1-min load {env.get('load_1min', 'n/a')} at the end.",
    ]
    return "\n".join(parts)
