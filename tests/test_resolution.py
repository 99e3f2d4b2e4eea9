"""suites/resolution: the synthetic slides, the statistics, and the --quick run of the experiment."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from suites.resolution import slides as S

SMALL = S.SlideSpec(size_px=256, n_train=4, n_test=2, lesions=(2, 3))


def test_slides_are_a_pure_function_of_seed_and_index() -> None:
    a = S.render_slide(3, SMALL)
    b = S.render_slide(3, SMALL)  # again, after nothing else: and after another slide
    S.render_slide(1, SMALL)
    c = S.render_slide(3, SMALL)
    for x, y, z in zip(a, b, c, strict=True):
        assert np.array_equal(x, y) and np.array_equal(x, z)
    other = S.render_slide(3, replace(SMALL, seed=1))
    assert not np.array_equal(a[0], other[0])


def test_positives_hold_lesions_and_negatives_none() -> None:
    table = S.slide_table(SMALL)
    assert [s.label for s in table if s.split == "train"] == [0, 1, 0, 1]
    for i, slide in enumerate(table):
        image, mask, clean = S.render_slide(i, SMALL)
        if slide.label:
            # lesion nuclei are a few pixels each: a small fraction of the slide
            assert 0 < mask.mean() < 0.01
            changed = np.abs(image.astype(int) - clean.astype(int)).max(axis=2) > 2
            assert changed[~mask].mean() < 0.01  # the lesions change pixels near their mask only
        else:
            assert not mask.any() and np.array_equal(image, clean)


def test_lesions_vanish_when_downsampled() -> None:
    """Rule SL5: plain at full resolution, below the texture's spread at 1/4, gone at 1/8."""
    vis = S.lesion_visibility(
        S.SlideSpec(size_px=512, n_train=2, n_test=2), [1, 2, 4, 8], slides=[1]
    )
    assert vis[1] > 2.0
    assert vis[1] > vis[2] > vis[4] > vis[8]
    assert vis[4] < 1.0 and vis[8] < 0.25


def test_folder_layout_and_reuse(tmp_path) -> None:
    root = S.make_slides(tmp_path / "slides", SMALL, log=lambda *_: None)
    table = S.read_table(root)
    assert table == S.slide_table(SMALL)
    image, mask = S.read_slide(root, table[1].name)
    want_image, want_mask, _ = S.render_slide(1, SMALL)
    assert np.array_equal(image, want_image) and np.array_equal(mask, want_mask)
    assert json.loads((root / "slides.json").read_text())["label"] == "STAND-IN"
    stamp = (root / "slides" / "slide_0000.png").stat().st_mtime_ns
    S.make_slides(root, SMALL, log=lambda *_: None)  # same spec: reused (Rule SL4)
    assert (root / "slides" / "slide_0000.png").stat().st_mtime_ns == stamp
    S.make_slides(root, replace(SMALL, seed=5), log=lambda *_: None)  # new spec: rebuilt
    assert json.loads((root / "slides.json").read_text())["seed"] == 5


def test_downsample_is_the_box_average() -> None:
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    level = S.downsample(image, 4)
    assert level.shape == (3, 2, 2) and level.dtype == torch.uint8
    want = np.rint(image[:4, 4:8, 1].astype(float).mean())
    assert level[1, 0, 1].item() == want


def test_bad_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple of patch_px"):
        S.SlideSpec(size_px=300)


# ------------------------------------------------------------------ statistics (Rules C1, C2)
def test_auc_equals_the_mann_whitney_count() -> None:
    from suites.resolution.stats import auc

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    scores = np.round(rng.random(40), 1)  # with ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert auc(labels, scores) == pytest.approx(np.mean(pairs), abs=1e-12)


def test_bootstrap_resamples_hold_both_classes_and_the_ci_brackets_the_auc() -> None:
    from suites.resolution.stats import auc, bootstrap_ci, bootstrap_indices

    labels = np.array([0] * 3 + [1] * 3)  # small: one-class resamples are common, and redrawn
    resamples = bootstrap_indices(labels, n=200, seed=0)
    assert resamples.shape == (200, 6)
    assert all(0 < labels[r].sum() < 6 for r in resamples)
    scores = np.array([0.1, 0.5, 0.3, 0.4, 0.8, 0.9])
    lo, hi = bootstrap_ci(labels, scores, resamples)
    assert lo <= auc(labels, scores) <= hi
    assert np.array_equal(resamples, bootstrap_indices(labels, n=200, seed=0))  # seeded


def test_permutation_test_of_a_model_against_itself_is_not_significant() -> None:
    from suites.resolution.stats import permutation_p

    labels = np.array([0, 1] * 10)
    scores = np.random.default_rng(1).random(20)
    d, p = permutation_p(labels, scores, scores * 7 + 1, n=200, seed=0)  # same ranks
    assert d == 0 and p == 1.0


# ------------------------------------------------------------------ saliency (Rules SA1-SA3)
def test_input_gradient_of_the_streamed_model_equals_the_plain_one() -> None:
    from suites.resolution.saliency import input_gradient
    from suites.resolution.train import SlideClassifier

    torch.manual_seed(0)
    model = SlideClassifier(channels=(4, 8), tile=40, mean=[128.0] * 3, std=[60.0] * 3).double()
    image = torch.randint(0, 256, (3, 72, 72), dtype=torch.uint8)
    assert model.streamed.plan((1, 3, 72, 72)).n_tiles > 1
    logit, saliency = input_gradient(model, image)
    x = image[None].double().requires_grad_()
    plain = model.head(model.trunk(model.streamed.tile_transform(x))).sum()
    plain.backward()
    want = x.grad[0].abs().amax(dim=0).numpy()
    assert logit == pytest.approx(plain.item(), rel=1e-12)
    np.testing.assert_allclose(saliency, want, rtol=1e-10, atol=1e-14 * want.max())


def test_saliency_lesion_auc_scores_a_perfect_map_1_and_a_flat_map_half() -> None:
    from suites.resolution.saliency import processed, saliency_lesion_auc, sigma_px

    mask = np.zeros((64, 64), bool)
    mask[10:14, 20:26] = True
    half = mask.reshape(32, 2, 32, 2).any(axis=(1, 3)).astype(float)  # a 1/2-resolution map
    assert saliency_lesion_auc(half, mask) == 1.0
    assert saliency_lesion_auc(-half, mask) == 0.0
    assert saliency_lesion_auc(np.ones((16, 16)), mask) == 0.5
    blurred = processed(half, 32)  # σ = 50 * 32 / 8192 px
    assert sigma_px(32) == pytest.approx(0.1953125)
    assert blurred.max() <= np.percentile(blurred, 99) + 1e-15  # capped
    with pytest.raises(ValueError, match="multiple"):
        saliency_lesion_auc(np.ones((5, 5)), mask)


# ------------------------------------------------------------------ the --quick run (CI)
@pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")
@pytest.mark.filterwarnings("ignore:GPU available but not used:UserWarning")
@pytest.mark.filterwarnings("ignore:The number of training batches:UserWarning")
@pytest.mark.filterwarnings(
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"
)
def test_quick_run_writes_the_summary_the_issue_asks_for(tmp_path) -> None:
    from suites.resolution.__main__ import main

    out, data = tmp_path / "out", tmp_path / "slides"
    argv = ["--quick", "--quiet", "--out", str(out), "--data", str(data)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["resolutions"]
    assert [r["input_px"] for r in rows] == [32, 64, 128]
    for r in rows:
        assert 0 <= r["auc"] <= 1 and len(r["auc_ci"]) == 2 and r["auc_ci"][0] <= r["auc_ci"][1]
        assert 0 <= r["saliency_lesion_auc"] <= 1 and r["lesion_visibility"] > 0
        # paired against the border map: the mean difference is the difference of the means
        want = r["saliency_lesion_auc"] - summary["saliency_baseline_border_distance_auc"]
        assert r["saliency_minus_border_auc"] == pytest.approx(want, rel=1e-12, abs=1e-12)
        lo, hi = r["saliency_minus_border_auc_ci"]
        assert lo <= r["saliency_minus_border_auc"] <= hi or lo == hi
        assert 0 <= r["saliency_beats_border_slides"] <= r["positive_test_slides"] == 4
    assert len(summary["permutation_tests"]) == 3  # every higher-lower pair
    assert summary["environment"]["torch"] == torch.__version__
    assert summary["config"]["name"] == "quick" and summary["label"] == "STAND-IN"
    assert (out / "auc_vs_resolution.png").is_file() and (out / "saliency_overlays.png").is_file()
    text = (out / "SUMMARY.md").read_text()
    assert "4b. Resolution" not in text and "Test AUC" in text and "(saliency_overlays.png)" in text
    # Rule X2: a rerun reuses every finished resolution
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert main(argv) == 0
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    metrics = out / "logs" / "px128" / "version_0" / "metrics.csv"
    assert "train_loss_step" in metrics.read_text().splitlines()[0]  # the CSV logger
