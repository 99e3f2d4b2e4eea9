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
