"""Masks from annotations (streamcheck/annotations.py) and per-image masks of a batch (masks
Rule T5): rasterised pixels against an independent point-in-polygon oracle (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from streamcheck import StreamcheckError, Streamed, load_mask, open_image
from streamcheck.masks import ScaledMask
from streamcheck.testing import relative_error

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("skimage")
mpath = pytest.importorskip("matplotlib.path")

H0, W0 = 512, 768  # level 0 of the slide
# (x, y) in level-0 px; no edge passes through a pixel centre of levels 0-2 (k + 0.5, 2k + 1,
# 4k + 2), where the rasteriser and the oracle may decide a centre on the boundary differently
TUMOUR = [(100.25, 60.0), (420.0, 80.25), (380.0, 300.0), (148.0, 350.25)]
HOLE = [(200.0, 152.0), (300.0, 152.0), (300.0, 220.0), (200.0, 220.0)]
OTHER = [(600.0, 400.0), (700.0, 400.0), (652.0, 500.0)]


@pytest.fixture
def slide(tmp_path: Path):
    from suites.slides.files import tissue_image, write_slide_file

    path = tmp_path / "slide.svs"
    write_slide_file(path, tissue_image(H0, W0), kind="svs", compression="deflate")
    return open_image(path, level=1)  # any level: masks are laid over level 0's coordinates


def oracle(shape: tuple[int, int], down: float, inside: list, outside: list = ()) -> np.ndarray:
    """Pixel centres (level-0 coordinates) inside any ``inside`` ring and no ``outside`` ring."""
    ii, jj = np.mgrid[0 : shape[0], 0 : shape[1]]
    centres = np.stack([(jj.ravel() + 0.5) * down, (ii.ravel() + 0.5) * down], axis=1)

    def any_of(rings) -> np.ndarray:
        hit = np.zeros(len(centres), bool)
        for ring in rings:
            hit |= mpath.Path(ring).contains_points(centres)
        return hit

    return (any_of(inside) & ~any_of(outside)).reshape(shape)


def feature(rings, name, kind="Polygon"):
    coordinates = [[list(p) for p in ring] for ring in rings]
    return {
        "type": "Feature",
        "geometry": {"type": kind, "coordinates": coordinates},
        "properties": {"classification": {"name": name}},
    }


def test_a_qupath_geojson_polygon_with_a_hole_rasterises_at_the_smallest_level(
    tmp_path: Path, slide
) -> None:
    point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]},
             "properties": {"classification": {"name": "Marker"}}}  # fmt: skip
    collection = {
        "type": "FeatureCollection",
        "features": [feature([TUMOUR, HOLE], "Tumor"), feature([OTHER], "Stroma"), point],
    }
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps(collection))
    mask = load_mask(path, like=slide, classes=["Tumor"])  # level -1: 128 x 192, downsample 4
    assert mask.shape == (128, 192) and mask.dtype == bool
    want = oracle((128, 192), 4.0, [TUMOUR], [HOLE])
    assert want.sum() > 0 and np.array_equal(mask, want)
    both = load_mask(path, like=slide, level=0, classes=["Tumor", "Stroma"])
    assert np.array_equal(both, oracle((H0, W0), 1.0, [TUMOUR, OTHER], [HOLE]))
    with pytest.raises(StreamcheckError, match="Point annotation of class 'Marker'.*no area"):
        load_mask(path, like=slide)
    with pytest.raises(StreamcheckError, match="none of classes"):
        load_mask(path, like=slide, classes=["Necrosis"])


def test_an_asap_xml_with_camelyon_exclusions(tmp_path: Path, slide) -> None:
    def annotation(name, group, ring):
        coords = "".join(
            f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(ring)
        )
        return (
            f'<Annotation Name="{name}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">'
            f"<Coordinates>{coords}</Coordinates></Annotation>"
        )

    xml = (
        "<?xml version='1.0'?><ASAP_Annotations><Annotations>"
        + annotation("Annotation 0", "_0", TUMOUR)
        + annotation("Annotation 1", "_2", HOLE)
        + "</Annotations><AnnotationGroups/></ASAP_Annotations>"
    )
    (tmp_path / "a.xml").write_text(xml)
    mask = load_mask(tmp_path / "a.xml", like=slide, level=1, exclude=["_2"])
    assert np.array_equal(mask, oracle((256, 384), 2.0, [TUMOUR], [HOLE]))


def test_a_mask_tiff_is_read_at_the_level_nearest_the_slides_and_its_aspect_checked(
    tmp_path: Path, slide
) -> None:
    labels = np.zeros((H0, W0), np.uint8)
    labels[100:300, 200:500] = 2
    with tifffile.TiffWriter(tmp_path / "mask.tif") as tw:
        tw.write(labels, tile=(64, 64), subifds=2, metadata=None)
        tw.write(labels[::2, ::2], tile=(64, 64), subfiletype=1, metadata=None)
        tw.write(labels[::4, ::4], tile=(64, 64), subfiletype=1, metadata=None)
    assert np.array_equal(load_mask(tmp_path / "mask.tif", like=slide), labels[::4, ::4] > 0)
    assert np.array_equal(
        load_mask(tmp_path / "mask.tif", like=slide, level=1), labels[::2, ::2] > 0
    )
    tifffile.imwrite(tmp_path / "square.tif", np.ones((64, 64), np.uint8))
    with pytest.raises(StreamcheckError, match="square.tif.*aspect ratio"):
        load_mask(tmp_path / "square.tif", like=slide)


def test_an_array_mask_is_checked_and_returned(slide) -> None:
    good = np.zeros((64, 96), bool)
    assert load_mask(good, like=slide) is not None
    with pytest.raises(StreamcheckError, match="aspect ratio"):
        load_mask(np.zeros((64, 64), bool), like=slide)


# ------------------------------------------------------------------------- per-image masks


def trunk() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3)).double()


@pytest.mark.parametrize("form", ["stacked", "with channel", "list"])
def test_per_image_masks_compute_the_tiles_any_image_needs(form: str) -> None:
    x = torch.randn(2, 3, 96, 80, dtype=torch.float64)
    first = torch.zeros(12, 10, dtype=torch.bool)
    first[:3, :3] = True  # top-left corner of image 0
    second = torch.zeros(6, 5, dtype=torch.bool)  # another resolution: image 1's bottom right
    second[5, 4] = True
    masks = {
        "stacked": torch.stack([first, second.repeat_interleave(2, 0).repeat_interleave(2, 1)]),
        "with channel": torch.stack(
            [first, second.repeat_interleave(2, 0).repeat_interleave(2, 1)]
        )[:, None],
        "list": [first, second.numpy()],
    }[form]
    scaled = ScaledMask(masks, (96, 80), batch=2)
    assert scaled.touches(((0, 10), (0, 10))) and scaled.touches_image(0, ((0, 10), (0, 10)))
    assert not scaled.touches_image(1, ((0, 10), (0, 10)))
    assert scaled.touches(((90, 96), (70, 80))) and not scaled.touches(((40, 50), (40, 50)))
    module = trunk()
    streamed = Streamed(module, tile=32)
    out = streamed(x, mask=masks)
    computed = streamed.computed_region(x, mask=masks)
    one = streamed.computed_region(x[:1], mask=first)
    assert computed.any() and not computed.all()
    assert (computed >= one).all()  # the union: every tile image 0 needs is computed
    plain = module(x) * computed  # the contract (Rules T3, T5), for both images alike
    assert relative_error(out, plain) < 1e-10
    with pytest.raises(StreamcheckError, match="3 per-image masks for a batch of 2"):
        ScaledMask([first] * 3, (96, 80), batch=2)
