"""Slide files (streamcheck/slidefiles.py, dicomfiles.py, suites/slides/files.py): SVS, generic
pyramids, OME-TIFF and DICOM WSI, JPEG and lossless, through tifffile, OpenSlide and wsidicom;
levels by µm/px; codecs checked when opened; alpha onto white; parallel decoding and the
decode-once cache."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from streamcheck import StreamcheckError, Streamed, open_image
from streamcheck.testing import relative_error
from suites.slides.files import (
    COMPRESSIONS,
    KINDS,
    tissue_image,
    write_dicom_slide,
    write_slide_file,
)

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("imagecodecs")  # the slides extra: JPEG tiles

F64_RTOL = 1e-10
MPP = 0.25
SUFFIX = {"svs": ".svs", "generic": ".tif", "ome": ".ome.tif"}


def openslide_or_skip():
    return pytest.importorskip("openslide", reason="the openslide extra is not installed")


def dicom_slide(tmp_path: Path, compression: str, size: tuple[int, int] = (256, 384)) -> Path:
    """A DICOM WSI of the frames of a generic pyramid (suites/slides/files.py Rule SL5)."""
    pytest.importorskip("wsidicom", reason="the dicom extra is not installed")
    path, _ = slide_file(tmp_path, "generic", compression, size)
    write_dicom_slide(tmp_path / f"dicom-{compression}", path, mpp=MPP)
    return tmp_path / f"dicom-{compression}"


def slide_file(
    tmp_path: Path, kind: str, compression: str, size: tuple[int, int] = (256, 384)
) -> tuple[Path, list[np.ndarray]]:
    path = tmp_path / f"{kind}-{compression}{SUFFIX[kind]}"
    levels = write_slide_file(path, tissue_image(*size), kind=kind, compression=compression)
    return path, levels


def hwc(source) -> np.ndarray:
    return source.read_all()[0].permute(1, 2, 0).numpy()


def tifffile_levels(path: Path) -> list[np.ndarray]:
    """The decoder output of each level as tifffile itself reads it (the independent answer)."""
    with tifffile.TiffFile(path) as tiff:
        return [lv.asarray().reshape(lv.shape[-3:]) for lv in tiff.series[0].levels]


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_level_of_every_layout_reads_as_tifffile_decodes_it(
    tmp_path: Path, kind: str, compression: str
) -> None:
    path, written = slide_file(tmp_path, kind, compression)
    want = tifffile_levels(path)
    assert len(want) == 3
    for level in range(3):
        source = open_image(path, level=level)
        assert source.backend == "tifffile" and source.level == level
        assert source.mpp == pytest.approx((MPP * 2**level,) * 2)
        assert [lv.downsample for lv in source.levels] == [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)]
        # a region that starts and ends inside tiles (32 px)
        region = source[:, :, 5:77, 30:101][0].permute(1, 2, 0).numpy()
        assert np.array_equal(region, want[level][5:77, 30:101])
        assert np.array_equal(hwc(source), want[level])
        if compression == "deflate":  # lossless: the pixels written (Rule SL4)
            assert np.array_equal(hwc(source), written[level])


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("kind", ["svs", "generic"])
def test_openslide_reads_the_same_pixels_as_tifffile(
    tmp_path: Path, kind: str, compression: str
) -> None:
    openslide_or_skip()
    path, _ = slide_file(tmp_path, kind, compression)
    for level, want in enumerate(tifffile_levels(path)):
        source = open_image(path, level=level, backend="openslide")
        assert source.backend == "openslide" and source.shape == (1, 3, *want.shape[:2])
        assert source.mpp == pytest.approx((MPP * 2**level,) * 2)
        assert np.array_equal(hwc(source), want)  # same libjpeg decoder output, or lossless


def trunk() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 2, 3, padding=1)
    ).double()


def to_float(t: torch.Tensor) -> torch.Tensor:
    return t.double() / 255


def step(image) -> tuple[torch.Tensor, list[torch.Tensor]]:
    module = trunk()
    out = Streamed(module, tile=64, tile_transform=to_float)(image)
    out.pow(2).sum().backward()
    return out.detach(), [p.grad for p in module.parameters()]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_a_dicom_slide_reads_as_tifffile_decodes_the_same_frames(
    tmp_path: Path, compression: str
) -> None:
    folder = dicom_slide(tmp_path, compression)
    tiff, written = slide_file(tmp_path, "generic", compression)
    for level, want in enumerate(tifffile_levels(tiff)):
        source = open_image(folder, level=level)  # a folder: the wsidicom backend (Rule SF1)
        assert source.backend == "wsidicom" and source.shape == (1, 3, *want.shape[:2])
        assert source.mpp == pytest.approx((MPP * 2**level,) * 2)
        assert [lv.downsample for lv in source.levels] == [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)]
        region = source[:, :, 5:77, 30:101][0].permute(1, 2, 0).numpy()
        assert np.array_equal(region, want[5:77, 30:101])
        assert np.array_equal(hwc(source), want)  # the same JPEG bytes, the same decoder output
        if compression == "deflate":
            assert np.array_equal(hwc(source), written[level])
    assert open_image(folder, mpp=0.5).level == 1
    one = open_image(folder / "level1.dcm")  # one file: that instance's level alone
    assert one.backend == "wsidicom" and one.shape == (1, 3, 128, 192)


def test_a_dicom_slide_pickles_without_pixels_and_refuses_a_changed_folder(
    tmp_path: Path,
) -> None:
    folder = dicom_slide(tmp_path, "jpeg")
    source = open_image(folder, level=1)
    want = source.read_all()
    assert source._wsi is not None  # opened by the read
    state = pickle.dumps(source)
    assert len(state) < 2000  # its path, pyramid and level, no pixels
    copy = pickle.loads(state)
    assert copy.level == 1 and copy.mpp == source.mpp and copy._wsi is None
    assert torch.equal(copy.read_all(), want)
    fresh = pickle.loads(state)
    write_dicom_slide(folder, slide_file(tmp_path, "generic", "deflate")[0], mpp=MPP)
    with pytest.raises(StreamcheckError, match="changed on disk"):
        fresh.read_all()


def test_dicom_bad_inputs_are_refused_when_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = dicom_slide(tmp_path, "deflate")
    with pytest.raises(StreamcheckError, match=r"level 3 does not exist.*3 level\(s\)"):
        open_image(folder, level=3)
    with pytest.raises(StreamcheckError, match=r"no level .* 0.7 µm/px"):
        open_image(folder, mpp=0.7)
    with pytest.raises(StreamcheckError, match=r"pyramid \(series\) 1 does not exist"):
        open_image(folder, series=1)
    with pytest.raises(StreamcheckError, match="is a folder; backend 'tifffile'"):
        open_image(folder, backend="tifffile")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StreamcheckError, match="wsidicom cannot open"):
        open_image(tmp_path / "empty")
    monkeypatch.setitem(sys.modules, "wsidicom", None)
    with pytest.raises(StreamcheckError, match=r"pip install 'streamcheck\[dicom\]'"):
        open_image(folder)


@pytest.mark.parametrize("backend", ["tifffile", "openslide", "wsidicom"])
def test_a_jpeg_svs_streams_exactly_like_its_decoded_pixels(tmp_path: Path, backend: str) -> None:
    if backend == "openslide":
        openslide_or_skip()
    path, _ = slide_file(tmp_path, "svs", "jpeg", size=(128, 256))  # 2 x 4 tiles of 64 px
    if backend == "wsidicom":  # the same JPEG frames in a DICOM WSI
        path = dicom_slide(tmp_path, "jpeg", size=(128, 256))
    source = open_image(path, backend=backend, decode_threads=2, cache_bytes=2**24)
    tensor = source.read_all()  # the decoded pixels in memory
    got, got_grads = step(source)
    want, want_grads = step(tensor)
    module = trunk()
    plain = module(to_float(tensor))
    plain.pow(2).sum().backward()
    assert torch.equal(got, want)
    assert relative_error(got, plain.detach()) < F64_RTOL
    for g, w, p in zip(got_grads, want_grads, module.parameters(), strict=True):
        assert torch.equal(g, w)
        assert relative_error(g, p.grad) < F64_RTOL


def test_mpp_picks_the_nearest_level_within_the_tolerance(tmp_path: Path) -> None:
    path, _ = slide_file(tmp_path, "svs", "deflate")
    assert open_image(path, mpp=0.5).level == 1
    assert open_image(path, mpp=0.53).level == 1  # 6 % off: within 10 %
    assert open_image(path, mpp=1.2, mpp_tolerance=0.25).level == 2
    with pytest.raises(
        StreamcheckError, match=r"no level .* 0.7 µm/px within 10%.*1: 128 x 192 px, 0.5 µm/px"
    ):
        open_image(path, mpp=0.7)
    with pytest.raises(StreamcheckError, match="both given"):
        open_image(path, mpp=0.5, level=1)
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, tissue_image(64, 64), tile=(16, 16), photometric="rgb")
    assert open_image(bare).mpp is None
    with pytest.raises(StreamcheckError, match="does not state its µm/px"):
        open_image(bare, mpp=0.5)


def test_a_missing_codec_is_refused_when_the_file_is_opened_naming_the_package(
    tmp_path: Path,
) -> None:
    jpeg, _ = slide_file(tmp_path, "svs", "jpeg")
    lossless, _ = slide_file(tmp_path, "generic", "deflate")
    script = f"""
import sys
sys.modules["imagecodecs"] = None  # as if not installed
from streamcheck import StreamcheckError, open_image
print(open_image({str(lossless)!r}).read_all().shape)  # deflate: tifffile's own zlib
try:
    open_image({str(jpeg)!r})
except StreamcheckError as e:
    print(e)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert "torch.Size([1, 3, 256, 384])" in done.stdout
    assert "JPEG" in done.stdout and "imagecodecs" in done.stdout
    assert "pip install 'streamcheck[slides]'" in done.stdout


@pytest.mark.parametrize("codec", ["jpeg", "jpeg2000", "lzw", "zlib", "zstd", "webp"])
def test_the_slides_extra_decodes_every_common_codec(tmp_path: Path, codec: str) -> None:
    image = tissue_image(48, 80)
    tifffile.imwrite(tmp_path / "c.tif", image, tile=(32, 32), photometric="rgb", compression=codec)
    assert np.array_equal(hwc(open_image(tmp_path / "c.tif")), tifffile.imread(tmp_path / "c.tif"))


def test_alpha_is_composited_onto_white(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (40, 48, 4), dtype=np.uint8)
    rgba[:8] = 0  # unscanned: transparent black
    tifffile.imwrite(
        tmp_path / "a.tif", rgba, tile=(16, 16), photometric="rgb", extrasamples=["unassalpha"]
    )
    source = open_image(tmp_path / "a.tif")
    assert source.shape == (1, 3, 40, 48)
    a = rgba[..., 3:].astype(np.float64) / 255  # the independent answer, in floating point
    want = np.round(rgba[..., :3] * a + 255 * (1 - a)).astype(np.uint8)
    got = hwc(source)
    assert np.array_equal(got, want)
    assert (got[:8] == 255).all()
    assert open_image(tmp_path / "a.tif", alpha="keep").shape == (1, 4, 40, 48)


def test_parallel_decoding_and_the_cache_give_the_same_pixels_and_decode_once(
    tmp_path: Path,
) -> None:
    path, _ = slide_file(tmp_path, "svs", "jpeg")
    plain = open_image(path)
    fast = open_image(path, decode_threads=3, cache_bytes=2**24)
    for rows, cols in (((0, 256), (0, 384)), ((10, 90), (60, 200)), ((10, 90), (60, 200))):
        region = np.s_[:, :, slice(*rows), slice(*cols)]
        assert torch.equal(fast[region], plain[region])
    cache = fast._cache
    assert cache.decoded == 8 * 12  # every tile (32 px) decoded once, by the first read
    assert cache.hits == 2 * (3 * 6)  # the two later reads: 3 x 6 tiles each, from the cache
    tiny = open_image(path, cache_bytes=5 * 32 * 32 * 3)  # room for five of the 96 tiles
    for _ in range(2):  # backward reads forward's regions again, in the same order
        assert torch.equal(tiny.read_all(), plain.read_all())
    assert tiny._cache.hits == 5  # the first five kept, not evicted by the 91 after them
    tiny.close()  # a new slide: the cache emptied
    assert torch.equal(tiny.read_all(), plain.read_all()) and tiny._cache.hits == 0


def test_the_cache_lives_one_step(tmp_path: Path) -> None:
    """sources Rule I7: backward is served forward's tiles, then the cache is emptied."""
    path, _ = slide_file(tmp_path, "svs", "jpeg", size=(128, 256))  # 4 x 8 tiles of 32 px
    source = open_image(path, cache_bytes=2**24)
    step(source)  # forward and backward
    cache = source._cache
    assert cache.decoded == 4 * 8  # each tile once: overlaps and backward's reads are hits
    assert cache.hits > 0 and cache.used == 0  # emptied when backward ended
    with torch.no_grad():
        Streamed(trunk(), tile=64, tile_transform=to_float)(source)
    assert cache.decoded == 2 * 4 * 8 and cache.used == 0  # no backward follows: emptied


def test_a_tiff_source_pickles_without_pixels_and_refuses_a_changed_file(tmp_path: Path) -> None:
    path, _ = slide_file(tmp_path, "generic", "deflate")
    source = open_image(path, level=1, decode_threads=2, cache_bytes=2**20)
    want = source.read_all()
    copy = pickle.loads(pickle.dumps(source))
    assert copy.level == 1 and copy.mpp == source.mpp
    assert torch.equal(copy.read_all(), want)
    fresh = pickle.loads(pickle.dumps(open_image(path)))
    write_slide_file(path, tissue_image(256, 384, seed=9), kind="generic", compression="deflate")
    with pytest.raises(StreamcheckError, match="changed on disk"):
        fresh.read_all()


def test_an_openslide_source_pickles_without_pixels_and_refuses_a_changed_file(
    tmp_path: Path,
) -> None:
    """Sources Rule I4 for the OpenSlide backend, as for the TIFF and DICOM ones above."""
    openslide_or_skip()
    path, _ = slide_file(tmp_path, "generic", "deflate")
    source = open_image(path, level=1, backend="openslide")
    want = source.read_all()
    state = pickle.dumps(source)
    assert len(state) < 2000  # its path and level, no pixels
    assert torch.equal(pickle.loads(state).read_all(), want)
    fresh = pickle.loads(state)
    source.close()
    write_slide_file(path, tissue_image(256, 384, seed=9), kind="generic", compression="deflate")
    for changed in (fresh, source):  # a copy, and the source itself opened again after close
        with pytest.raises(StreamcheckError, match="changed on disk"):
            changed.read_all()


def test_openslide_refuses_levels_whose_downsample_is_not_an_integer(tmp_path: Path) -> None:
    openslide_or_skip()
    image = tissue_image(96, 96)
    with tifffile.TiffWriter(tmp_path / "odd.tif") as tw:
        tw.write(image, tile=(16, 16), photometric="rgb", metadata=None)
        tw.write(image[:40, :40], tile=(16, 16), photometric="rgb", subfiletype=1, metadata=None)
    assert open_image(tmp_path / "odd.tif", backend="openslide").shape == (1, 3, 96, 96)
    with pytest.raises(StreamcheckError, match="not an integer"):
        open_image(tmp_path / "odd.tif", level=1, backend="openslide")


def test_unknown_formats_and_backends_are_refused(tmp_path: Path) -> None:
    openslide_or_skip()
    (tmp_path / "slide.mrxs").write_bytes(b"not a slide")
    with pytest.raises(StreamcheckError, match="OpenSlide cannot read"):
        open_image(tmp_path / "slide.mrxs")
    with pytest.raises(StreamcheckError, match="backend 'bioformats' is not one of"):
        open_image(tmp_path / "slide.mrxs", backend="bioformats")


def test_a_missing_backend_names_its_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "slide.mrxs").write_bytes(b"not a slide")
    monkeypatch.setitem(sys.modules, "openslide", None)
    with pytest.raises(StreamcheckError, match=r"pip install 'streamcheck\[openslide\]'"):
        open_image(tmp_path / "slide.mrxs")
