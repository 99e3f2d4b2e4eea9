"""Image sources (streamcheck/sources.py): streaming a TIFF level, a memmap or a zarr array equals
streaming the same pixels from a tensor; regions only; pickling without reading; bad input."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import streamcheck
from streamcheck import StreamcheckError, Streamed, open_image
from streamcheck.feed import read_ahead
from streamcheck.sources import ImageSource
from streamcheck.testing import relative_error

tifffile = pytest.importorskip("tifffile")
zarr = pytest.importorskip("zarr")

F64_RTOL = 1e-10
H, W = 90, 70  # 3 x 3 tiles of 32 px with the trunk below


def trunk() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1),
    ).double()


def to_float(t: torch.Tensor) -> torch.Tensor:
    return (t.double() / 255 - 0.5) / 0.25


def pixels(h: int = H, w: int = W, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def write_pyramid(path: Path, image: np.ndarray, *, planar: bool = False) -> list[np.ndarray]:
    """A tiled pyramidal TIFF (levels 1/1, 1/2, 1/4 by striding); returns the levels written."""
    levels = [image, image[::2, ::2], image[::4, ::4]]
    options: dict = {
        "tile": (16, 16),
        "photometric": "rgb" if image.shape[2] == 3 else "minisblack",
    }
    if planar:
        levels = [np.ascontiguousarray(lv.transpose(2, 0, 1)) for lv in levels]
        options["planarconfig"] = "separate"
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, **options)
        for level in levels[1:]:
            tw.write(level, subfiletype=1, **options)
    return levels


def as_tensor(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))[None]


def stream_and_grads(image) -> tuple[torch.Tensor, list[torch.Tensor]]:
    module = trunk()
    streamed = Streamed(module, tile=32, tile_transform=to_float)
    out = streamed(image)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    return out.detach(), [p.grad for p in module.parameters()]


def plain_and_grads(tensor: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    module = trunk()
    out = module(to_float(tensor))
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    return out.detach(), [p.grad for p in module.parameters()]


def sources(tmp_path: Path) -> dict[str, tuple[ImageSource, np.ndarray]]:
    """Each kind of source, with the HWC pixels it holds."""
    image = pixels()
    levels = write_pyramid(tmp_path / "slide.tif", pixels(2 * H, 2 * W, seed=1))
    write_pyramid(tmp_path / "planar.tif", image, planar=True)
    mm = np.memmap(tmp_path / "image.u8", dtype=np.uint8, mode="w+", shape=image.shape)
    mm[:] = image
    mm.flush()
    chw = np.memmap(tmp_path / "chw.u8", dtype=np.uint8, mode="w+", shape=(3, H, W))
    chw[:] = image.transpose(2, 0, 1)
    chw.flush()
    z = zarr.open_array(
        tmp_path / "image.zarr", mode="w", shape=image.shape, chunks=(32, 32, 3), dtype="uint8"
    )
    z[:] = image
    return {
        "tiff level 1": (open_image(tmp_path / "slide.tif", level=1), levels[1]),
        "tiff planar (SYX)": (open_image(str(tmp_path / "planar.tif")), image),
        "memmap HWC": (
            open_image(
                np.memmap(tmp_path / "image.u8", dtype=np.uint8, mode="r", shape=image.shape)
            ),
            image,
        ),
        "memmap CHW": (
            open_image(
                np.memmap(tmp_path / "chw.u8", dtype=np.uint8, mode="r", shape=(3, H, W)),
                layout="CHW",
            ),
            image,
        ),
        "zarr": (open_image(zarr.open_array(tmp_path / "image.zarr", mode="r")), image),
        "numpy": (open_image(image), image),
    }


KINDS = ["tiff level 1", "tiff planar (SYX)", "memmap HWC", "memmap CHW", "zarr", "numpy"]


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_a_source_equals_streaming_the_same_pixels_from_a_tensor(
    tmp_path: Path, kind: str
) -> None:
    source, hwc = sources(tmp_path)[kind]
    assert source.shape == (1, 3, *hwc.shape[:2]) and source.dtype == torch.uint8
    tensor = as_tensor(hwc)
    got, got_grads = stream_and_grads(source)
    want, want_grads = stream_and_grads(tensor)
    plain, plain_grads = plain_and_grads(tensor)  # the independent answer
    assert torch.equal(got, want)  # same regions, same layout: the very same kernels (Rule I2)
    assert relative_error(got, plain) < F64_RTOL
    for g, w, p in zip(got_grads, want_grads, plain_grads, strict=True):
        assert torch.equal(g, w)
        assert relative_error(g, p) < F64_RTOL


def test_each_tiff_level_holds_its_pixels_and_negative_levels_count_from_the_smallest(
    tmp_path: Path,
) -> None:
    levels = write_pyramid(tmp_path / "slide.tif", pixels(64, 48))
    for level, want in enumerate(levels):
        source = open_image(tmp_path / "slide.tif", level=level)
        assert source.shape == (1, 3, *want.shape[:2])
        assert torch.equal(source.read_all(), as_tensor(want))
    assert open_image(tmp_path / "slide.tif", level=-1).shape == (1, 3, 16, 12)


def test_a_gray_tiff_is_one_channel_and_channels_keeps_the_first_ones(tmp_path: Path) -> None:
    gray = pixels(40, 30, c=1)[..., 0]
    tifffile.imwrite(tmp_path / "gray.tif", gray, tile=(16, 16))
    source = open_image(tmp_path / "gray.tif")
    assert source.shape == (1, 1, 40, 30)
    assert torch.equal(
        source[:, :, 3:20, 5:9], torch.from_numpy(gray[3:20, 5:9].copy())[None, None]
    )
    rgba = pixels(20, 20, c=4)
    three = open_image(rgba, channels=3)
    assert three.shape == (1, 3, 20, 20)
    assert torch.equal(three.read_all(), as_tensor(rgba[..., :3]))


def test_a_zarr_group_of_levels_is_opened_by_level(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path / "levels.zarr", mode="w")
    image = pixels(32, 32)
    for level, factor in enumerate((1, 2)):
        part = image[::factor, ::factor]
        group.create_array(str(level), shape=part.shape, chunks=(16, 16, 3), dtype="uint8")[:] = (
            part
        )
    assert open_image(group, level=1).shape == (1, 3, 16, 16)
    with pytest.raises(StreamcheckError, match=r"level 2 does not exist.*2 level"):
        open_image(group, level=2)


class Spy:
    """Records every region a source reads (and may refuse to read at all)."""

    def __init__(self, source: ImageSource, *, refuse: bool = False) -> None:
        self.regions: list[tuple[tuple[int, int], tuple[int, int]]] = []
        read = source._read

        def spying(rows, cols):
            if refuse:
                raise AssertionError("read pixels before the checks")
            self.regions.append((rows, cols))
            return read(rows, cols)

        source._read = spying  # type: ignore[method-assign]

    @staticmethod
    def refusing(*args: object) -> None:
        raise AssertionError("read pixels")


def test_only_each_tiles_region_is_read_never_the_whole_level(tmp_path: Path) -> None:
    write_pyramid(tmp_path / "slide.tif", pixels(200, 180))
    source = open_image(tmp_path / "slide.tif")
    spy = Spy(source)
    streamed = Streamed(trunk(), tile=32, tile_transform=to_float)
    streamed(source).sum().backward()
    plan = streamed.plan(source.shape)
    boxes = [t.input_box for t in plan.tiles]
    assert spy.regions == boxes + boxes  # each tile's input box, in forward then in backward
    assert max((r[1] - r[0]) * (c[1] - c[0]) for r, c in spy.regions) <= 32 * 32 < 200 * 180


def test_the_next_region_is_read_on_a_thread_while_the_current_tile_is_used() -> None:
    source = open_image(pixels(8, 8))
    read = source._read
    started = {r: threading.Event() for r in (0, 2, 4)}
    threads: set[str] = set()

    def logged(rows, cols):
        threads.add(threading.current_thread().name.split("_")[0])
        started[rows[0]].set()
        return read(rows, cols)

    source._read = logged  # type: ignore[method-assign]
    indices = [(slice(None), slice(None), slice(r, r + 2), slice(0, 8)) for r in (0, 2, 4)]
    for tile, index in zip(read_ahead(source, indices), indices, strict=True):
        row = index[2].start
        if row < 4:  # while tile `row` is in use, the next region is being read
            assert started[row + 2].wait(timeout=10)
        assert torch.equal(
            tile, torch.from_numpy(read((row, row + 2), (0, 8)).transpose(2, 0, 1).copy())[None]
        )
    assert threads == {"streamcheck-read"}


def test_a_consumer_that_stops_early_leaves_no_reading_thread() -> None:
    source = open_image(pixels(8, 8))
    indices = [(slice(None), slice(None), slice(r, r + 2), slice(0, 8)) for r in (0, 2, 4)]
    tiles = read_ahead(source, indices)
    next(tiles)
    tiles.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("streamcheck-read")]


@pytest.mark.parametrize("kind", ["tiff level 1", "memmap HWC", "memmap CHW", "zarr"])
def test_sources_pickle_without_reading_pixels(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, hwc = sources(tmp_path)[kind]
    with monkeypatch.context() as patch:
        patch.setattr(type(source), "_read", Spy.refusing)
        blob = pickle.dumps(source)
    assert len(blob) < 4096  # a path, a store or a file offset, not 90 x 70 x 3 bytes of pixels
    copy = pickle.loads(blob)
    assert copy.shape == source.shape
    assert torch.equal(copy[:, :, 5:40, 7:30], as_tensor(hwc[5:40, 7:30]))
    assert len(pickle.dumps(copy)) < 4096  # and again from the copy


def test_a_memmap_view_pickles_as_its_bytes_in_the_file(tmp_path: Path) -> None:
    image = pixels(60, 50)
    mm = np.memmap(tmp_path / "big.u8", dtype=np.uint8, mode="w+", shape=(100, 80, 3), offset=4099)
    mm[:] = 0
    mm[20:80, 10:60] = image
    mm.flush()
    view = np.memmap(
        tmp_path / "big.u8", dtype=np.uint8, mode="r", shape=(100, 80, 3), offset=4099
    )[20:80, 10:60]
    copy = pickle.loads(pickle.dumps(open_image(view)))
    assert torch.equal(copy.read_all(), as_tensor(image))


def test_a_fresh_process_reads_a_pickled_tiff_source(tmp_path: Path) -> None:
    """What a DataLoader worker does: receive the source pickled, open the file itself."""
    write_pyramid(tmp_path / "slide.tif", pixels(96, 64))
    source = open_image(tmp_path / "slide.tif", level=1)
    (tmp_path / "source.pkl").write_bytes(pickle.dumps(source))
    code = (
        "import pickle, sys, torch; "
        "source = pickle.loads(open(sys.argv[1], 'rb').read()); "
        "torch.save(source[:, :, 3:30, 4:20], sys.argv[2])"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "source.pkl"), str(tmp_path / "region.pt")],
        check=True,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=300,
    )
    assert torch.equal(torch.load(tmp_path / "region.pt"), source[:, :, 3:30, 4:20])


# ------------------------------------------------------------------------------------ bad input


def test_a_missing_file_is_refused_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(StreamcheckError, match=r"no file at .*nowhere\.tif"):
        open_image(tmp_path / "nowhere.tif")


def test_a_file_that_is_not_a_tiff_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.tif").write_text("not a tiff")
    with pytest.raises(StreamcheckError, match="not a TIFF file"):
        open_image(tmp_path / "notes.tif")


def test_a_level_that_does_not_exist_lists_the_levels(tmp_path: Path) -> None:
    write_pyramid(tmp_path / "slide.tif", pixels(64, 48))
    with pytest.raises(
        StreamcheckError,
        match=r"level 3 does not exist.*3 level\(s\) \(0: 64 x 48 px; 1: 32 x 24 px; 2: 16 x 12 px\).*level=0\.\.2",
    ):
        open_image(tmp_path / "slide.tif", level=3)
    with pytest.raises(StreamcheckError, match="only level 0 exists"):
        open_image(pixels(), level=1)


def test_a_source_with_the_wrong_channel_count_is_refused_before_any_read(tmp_path: Path) -> None:
    source = open_image(pixels(c=4))
    Spy(source, refuse=True)
    streamed = Streamed(trunk(), tile=32, tile_transform=to_float)
    with pytest.raises(StreamcheckError, match=r"4 channel\(s\); open_image\(\.\.\., channels=3\)"):
        streamed(source)


@pytest.mark.parametrize(
    ("array", "options", "message"),
    [
        (np.zeros((10, 10), np.uint8), {}, r"shape \(10, 10\).*array\[\.\.\., None\]"),
        (np.zeros((10, 10, 3), np.uint8), {"layout": "WHC"}, "layout 'WHC'"),
        (np.zeros((10, 10, 3), np.uint8), {"channels": 4}, r"channels=4 asked.*3 channels"),
        (np.zeros((10, 10, 3), "U1"), {}, "torch cannot hold"),
        (torch.zeros(1, 3, 10, 10), {}, "goes to Streamed directly"),
        ([1, 2, 3], {}, "cannot read builtins.list"),
    ],
    ids=["2-D", "layout", "channels", "dtype", "tensor", "list"],
)
def test_bad_arrays_are_refused_when_opened(array, options, message) -> None:
    with pytest.raises(StreamcheckError, match=message):
        open_image(array, **options)


def test_a_uint8_source_without_tile_transform_asks_for_one() -> None:
    with pytest.raises(StreamcheckError, match="tile_transform"):
        Streamed(trunk(), tile=32)(open_image(pixels()))


def test_a_numpy_array_given_to_streamed_points_to_open_image() -> None:
    with pytest.raises(StreamcheckError, match=r"streamcheck\.open_image\(array\)"):
        Streamed(trunk(), tile=32)(pixels())


def test_pyvips_images_stream_like_their_pixels() -> None:
    pyvips = pytest.importorskip("pyvips", reason="pyvips (libvips) is not installed")
    image = pixels()
    vips = pyvips.Image.new_from_memory(image.tobytes(), W, H, 3, "uchar")
    got, got_grads = stream_and_grads(open_image(vips))
    want, want_grads = stream_and_grads(as_tensor(image))
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.equal(g, w)
    with pytest.raises(StreamcheckError, match="cannot be pickled"):
        pickle.dumps(open_image(vips))


def test_exports() -> None:
    assert streamcheck.open_image is open_image and streamcheck.ImageSource is ImageSource


# ---------------------------------------------------------------- input gradients (saliency.py)


def reference_input_grad(hwc: np.ndarray) -> torch.Tensor:
    """d loss / d pixel of the plain module on the same pixels as a float64 tensor, (1, C, H, W)."""
    x = as_tensor(hwc).double().requires_grad_()
    out = trunk()(to_float(x))
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    assert x.grad is not None
    return x.grad


def block_sums(grad: torch.Tensor, f: int) -> torch.Tensor:
    _, c, h, w = grad.shape
    padded = torch.zeros(1, c, -(-h // f) * f, -(-w // f) * f, dtype=grad.dtype)
    padded[..., :h, :w] = grad
    return padded.reshape(1, c, -(-h // f), f, -(-w // f), f).sum(dim=(3, 5))


@pytest.mark.parametrize("factor", [1, 3])
def test_input_gradient_of_a_tiff_source_fills_a_memmap_tile_by_tile(
    tmp_path: Path, factor: int
) -> None:
    source, hwc = sources(tmp_path)["tiff level 1"]
    h, w = -(-hwc.shape[0] // factor), -(-hwc.shape[1] // factor)
    target = np.memmap(tmp_path / "grad.f8", dtype=np.float64, mode="w+", shape=(h, w, 3))
    module = trunk()
    streamed = Streamed(module, tile=32, tile_transform=to_float)
    out = streamed(source, input_grad=target)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    want = block_sums(reference_input_grad(hwc), factor)
    got = torch.from_numpy(np.array(target).transpose(2, 0, 1))[None]
    assert relative_error(got, want) < F64_RTOL
    plain = plain_and_grads(as_tensor(hwc))[1]  # parameter gradients unchanged by the sink
    for p, g in zip(module.parameters(), plain, strict=True):
        assert relative_error(p.grad, g) < F64_RTOL


def test_input_gradient_into_a_zarr_array_accumulates_like_grad(tmp_path: Path) -> None:
    source, hwc = sources(tmp_path)["memmap CHW"]
    target = zarr.open_array(
        tmp_path / "grad.zarr", mode="w", shape=(3, H, W), chunks=(3, 16, 16), dtype="float64"
    )
    target[:] = 0.0
    streamed = Streamed(trunk(), tile=32, tile_transform=to_float)
    for _ in range(2):  # two backward passes add up (Rule A1)
        out = streamed(source, input_grad=target)
        weights = torch.randn(
            out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1)
        )
        (out * weights).sum().backward()
    assert (
        relative_error(torch.from_numpy(target[:])[None], 2 * reference_input_grad(hwc)) < F64_RTOL
    )


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (np.zeros((H, W, 4)), r"shape \(90, 70, 4\).*must be \(90, 70, 3\)"),
        (np.zeros((H - 5, W, 3)), r"downsampled by an integer factor"),
        (np.zeros((H, W, 3), dtype=np.int32), "floating-point"),
        (np.zeros((H, W, 3)).view(), "read-only"),
        ("grad.npy", "must be an array"),
    ],
    ids=["channels", "size", "dtype", "read-only", "type"],
)
def test_bad_gradient_arrays_are_refused_before_any_work(target, message) -> None:
    if message == "read-only":
        target.flags.writeable = False
    source = open_image(pixels())
    Spy(source, refuse=True)
    with pytest.raises(StreamcheckError, match=message):
        Streamed(trunk(), tile=32, tile_transform=to_float)(source, input_grad=target)


def test_a_tensor_image_keeps_its_own_grad() -> None:
    with pytest.raises(StreamcheckError, match="requires_grad_"):
        Streamed(trunk(), tile=32)(
            torch.zeros(1, 3, 40, 40, dtype=torch.float64), input_grad=np.zeros((40, 40, 3))
        )


@pytest.mark.gpu
def test_a_source_streams_onto_a_cuda_module_like_a_host_tensor(tmp_path: Path) -> None:
    """Read on the prefetch thread, then copied on the side stream (feed Rules F2, F5)."""
    source, hwc = sources(tmp_path)["tiff level 1"]
    module = trunk().cuda()
    streamed = Streamed(module, tile=32, tile_transform=to_float)
    got = streamed(source)
    (got * 1.5).sum().backward()
    got_grads = [p.grad.cpu() for p in module.parameters()]
    module.zero_grad()
    want = streamed(as_tensor(hwc))  # a host tensor of the same pixels
    (want * 1.5).sum().backward()
    assert torch.equal(got, want)
    for g, p in zip(got_grads, module.parameters(), strict=True):
        assert torch.equal(g, p.grad.cpu())
