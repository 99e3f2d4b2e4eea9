"""The slides suite (suites/slides): generated slides, the --quick run, and peak RSS while
streaming a modest slide from its file (asserted loosely; the benchmark has the figures)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tifffile")
pytest.importorskip("zarr")
pytest.importorskip("skimage")

from streamcheck import open_image  # noqa: E402
from suites.slides.__main__ import Point, main, run_point  # noqa: E402
from suites.slides.generate import THUMB, write_slide  # noqa: E402


def test_a_generated_slide_has_its_tissue_fraction_levels_and_size(tmp_path: Path) -> None:
    slide = write_slide(tmp_path / "s.tif", side=1024, fraction=0.3, seed=5)
    assert abs(slide.tissue_fraction - 0.3) < 0.01
    assert slide.file_bytes >= 1024 * 1024 * 3  # uncompressed (Rule W2)
    level0, thumb = open_image(slide.path), open_image(slide.path, level=-1)
    assert level0.shape == (1, 3, 1024, 1024) and thumb.shape == (
        1,
        3,
        1024 // THUMB,
        1024 // THUMB,
    )
    # Each slide pixel takes its thumbnail pixel's class: stain (green low) or glass (Rule W1).
    assert open_image(slide.path, level=1).shape == (1, 3, 256, 256)
    pixels = level0[:, :, 0:256, 0:256][0].numpy()
    classes = thumb[:, :, 0:16, 0:16][0].numpy()[1] < 200
    assert np.array_equal(pixels[1] < 200, np.repeat(np.repeat(classes, THUMB, 0), THUMB, 1))


@pytest.mark.slow
def test_the_quick_suite_writes_rows_a_summary_and_a_figure_and_deletes_its_slides(
    tmp_path: Path,
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    assert main(["--quick", "--out", str(tmp_path / "out"), "--workdir", str(work)]) == 0
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    ]
    experiments = {"rss", "disk_vs_memory", "skipping", "decoding"}
    assert {r["params"]["experiment"] for r in rows} == experiments
    assert all(r["environment"]["torch"] and r["run"]["quick"] for r in rows)
    masked = next(r for r in rows if r["params"]["kind"] == "paired")
    assert 0 < masked["metrics"]["tiles_computed"] <= masked["metrics"]["tiles"]
    jpeg = next(r for r in rows if r["params"]["experiment"] == "decoding")
    # 1024² px of 256 px JPEG tiles: each file step (a warm-up, then one per pair) starts as a
    # new slide, and its cache (64 MiB) holds all 16 tiles: each decoded once per step
    steps = 1 + len(jpeg["metrics"]["step_s"]["file"])
    assert jpeg["metrics"]["tiles_decoded"] == 16 * steps and jpeg["metrics"]["cache_hits"] > 0
    summary = (tmp_path / "out" / "SUMMARY.md").read_text()
    assert "--quick: tiny slides, not evidence" in summary and "speed-up" in summary
    assert "A JPEG slide from its file" in summary
    assert (tmp_path / "out" / "slides.png").stat().st_size > 0
    assert not list(work.rglob("*.tif"))  # Rule V2
    assert main(["--quick", "--out", str(tmp_path / "out"), "--workdir", str(work)]) == 0
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == len(rows)  # V3


@pytest.mark.slow
def test_peak_rss_streaming_a_slide_from_its_file_does_not_follow_the_file(tmp_path: Path) -> None:
    """A 9x larger file adds about nothing to the peak RSS; a tensor of it would add the file.

    Loose bounds: what the RSS delta holds (tile buffers, allocator arenas of the reading thread)
    varies by tens of MB from run to run."""
    deltas, files = [], []
    for side in (2048, 6144):  # 12 MB and 113 MB
        slide = write_slide(tmp_path / f"s{side}.tif", side=side, fraction=0.5)
        metrics = run_point(Point("rss", "disk", side, 0.5, 512, 1, "infer"), slide.path)
        deltas.append(metrics["delta_rss_bytes"])
        files.append(slide.file_bytes)
        slide.path.unlink()
    assert deltas[1] < files[1], (deltas, files)
    assert deltas[1] - deltas[0] < 0.5 * (files[1] - files[0]), (deltas, files)
