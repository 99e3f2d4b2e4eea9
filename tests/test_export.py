"""Overlays and GeoJSON (streamcheck/export.py): a map over a slide whose lesion position is known,
written, read back with tifffile and OpenSlide (µm/px, alignment) and rasterised back from GeoJSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from streamcheck import (
    StreamcheckError,
    Streamed,
    load_mask,
    open_image,
    write_geojson,
    write_overlay,
)
from suites.slides.files import write_slide_file

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("skimage")

H0, W0, MPP, STRIDE = 512, 768, 0.25, 16
LESION = (slice(128, 256), slice(320, 512))  # level-0 rows, cols: a multiple of the stride


@pytest.fixture
def slide(tmp_path: Path):
    image = np.full((H0, W0, 3), 235, np.uint8)
    image[LESION] = (150, 40, 120)
    path = tmp_path / "slide.tif"
    write_slide_file(path, image, kind="generic", compression="deflate", mpp=MPP)
    return open_image(path)


def lesion_map(slide) -> torch.Tensor:
    """A map at stride 16 from a streamed network: mean redness minus greenness per 16 x 16 px."""
    net = nn.Sequential(nn.Conv2d(3, 1, 1, bias=False), nn.AvgPool2d(STRIDE)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1) / 255)
        return Streamed(net, tile=128, tile_transform=lambda t: t.double())(slide)[0, 0]


def want_lesion(shape: tuple[int, int]) -> np.ndarray:
    """The lesion on a grid of ``shape`` over the slide (the independent answer)."""
    out = np.zeros(shape, bool)
    fy, fx = H0 // shape[0], W0 // shape[1]
    out[
        LESION[0].start // fy : LESION[0].stop // fy, LESION[1].start // fx : LESION[1].stop // fx
    ] = True
    return out


@pytest.mark.parametrize("level", [None, 1])
def test_an_overlay_reads_back_aligned_with_its_mpp_in_tifffile_and_openslide(
    tmp_path: Path, slide, level: int | None
) -> None:
    heat = lesion_map(slide)
    assert heat.shape == (H0 // STRIDE, W0 // STRIDE)
    path = write_overlay(tmp_path / "heat.tif", heat, like=slide, level=level, colormap="viridis")
    down = STRIDE if level is None else 2**level
    shape = (H0 // down, W0 // down)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.shape == (*shape, 4) and page.is_tiled
        x_per_cm = page.tags["XResolution"].value
        assert 1e4 * x_per_cm[1] / x_per_cm[0] == pytest.approx(MPP * down)
        rgba = page.asarray()
    lesion = want_lesion(shape)
    inside = tuple(np.argwhere(lesion)[0])
    hot = (rgba == rgba[inside]).all(-1)  # the lesion's colour, the map's maximum
    assert np.array_equal(hot, lesion)
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.dimensions == (shape[1], shape[0])
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(MPP * down)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(MPP * down)
        assert osr.level_count == (1 if level is None else 2)  # down to one tile of 256 px
        assert np.array_equal(np.asarray(osr.read_region((0, 0), 0, osr.dimensions)), rgba)


def test_an_overlay_of_values_keeps_them_and_every_level_is_aligned(tmp_path: Path, slide) -> None:
    heat = lesion_map(slide).numpy()
    path = write_overlay(tmp_path / "values.tif", heat, like=slide, level=0)
    overlay = open_image(path)
    assert overlay.mpp == pytest.approx((MPP, MPP)) and len(overlay.levels) == 3
    for k, lv in enumerate(overlay.levels):
        got = open_image(path, level=k).read_all()[0, 0].numpy()
        assert got.dtype == np.float32 and got.shape == (lv.height, lv.width)
        f = STRIDE // 2**k  # overlay pixels per map pixel at this level
        assert np.array_equal(got, np.repeat(np.repeat(heat, f, 0), f, 1).astype(np.float32))


def test_thresholded_geojson_outlines_rasterise_back_to_the_thresholded_pixels(
    tmp_path: Path, slide
) -> None:
    heat = np.zeros((H0 // STRIDE, W0 // STRIDE))
    heat[want_lesion(heat.shape)] = 1.0
    heat[10:13, 22:27] = 0.0  # a hole in the lesion
    heat[2, 2] = heat[3, 3] = 1.0  # two pixels touching at a corner
    heat[30, 40] = np.nan
    path = write_geojson(tmp_path / "lesion.geojson", heat, like=slide, threshold=0.5, name="Tumor")
    features = json.loads(path.read_text())["features"]
    assert any(len(f["geometry"]["coordinates"]) == 2 for f in features)  # outer ring + hole
    for level in range(3):
        mask = load_mask(path, like=slide, level=level)
        f = STRIDE // 2**level
        assert np.array_equal(mask, np.repeat(np.repeat(heat >= 0.5, f, 0), f, 1))


def test_tile_geojson_has_one_square_per_finite_pixel_with_its_value(tmp_path: Path, slide) -> None:
    heat = np.arange(32 * 48, dtype=np.float64).reshape(32, 48)
    heat[0, 0] = np.nan
    features = json.loads(
        write_geojson(tmp_path / "t.geojson", heat, like=slide, name="p").read_text()
    )["features"]
    assert len(features) == 32 * 48 - 1
    second = features[0]
    assert second["properties"]["measurements"]["p"] == 1.0
    assert second["geometry"]["coordinates"][0][:4] == [
        [16.0, 0.0],
        [32.0, 0.0],
        [32.0, 16.0],
        [16.0, 16.0],
    ]


def test_bad_maps_and_colormaps_are_refused(tmp_path: Path, slide) -> None:
    with pytest.raises(StreamcheckError, match="map 32 x 32 does not have the aspect ratio"):
        write_overlay(tmp_path / "x.tif", np.zeros((32, 32)), like=slide)
    with pytest.raises(StreamcheckError, match="not a matplotlib colormap"):
        write_overlay(tmp_path / "x.tif", np.zeros((32, 48)), like=slide, colormap="no-such-map")
