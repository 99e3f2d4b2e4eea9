"""Image sources: images that stay where they are (a file, a memmap, a zarr store) and are read
region by region, as ``Streamed`` asks for each tile.

NOTE [ Image sources ]
Rule I1. A source is a 2-D image seen as a batch of one, ``shape == (1, C, H, W)``. Indexing it
         with the slices of one tile (``source[:, :, y0:y1, x0:x1]``) reads exactly that region and
         returns a new CPU tensor of the stored dtype; nothing else of the image is read, and no
         level is ever read whole (except by ``read_all``, which refuses large ones).
Rule I2. Layout. Arrays are assumed HWC (height, width, channels: how slides and ``PIL``/``pyvips``
         store pixels) unless ``layout="CHW"`` says otherwise; a TIFF says its own (its series'
         axes: ``YXS`` is HWC, ``SYX`` and ``CYX`` are CHW). Either way a region arrives laid out
         as a tile of a ``(1, C, H, W)`` tensor would be (contiguous), so streaming a source runs
         the very kernels, and gives the very numbers, of streaming the same pixels as a tensor.
Rule I3. Every check happens when the source is opened, before any tile is read: a missing file,
         a level that does not exist, a layout or channel count that does not fit.
Rule I4. Sources pickle without reading pixels (DataLoader workers, ``torch.multiprocessing``): a
         TIFF by its path, level and series (the copy opens the file on first use), a memmap by
         its file, offset, shape and strides; a zarr array by its store. An in-memory NumPy array is
         its own data and pickles with it. A slide file (TIFF, OpenSlide, DICOM) opened again,
         after pickling or ``close``, is checked against the size and modification time of its
         files when it was first opened (``file_stamp``): a slide that changed is an error, never
         other pixels than the source described.
Rule I5. Transparency is composited onto white where the file says a channel is alpha (a TIFF's
         ExtraSamples, OpenSlide's RGBA): scanners leave unscanned areas transparent black
         (0, 0, 0, 0), which must read as glass, not as black tissue. Straight alpha:
         ``c' = (c * a + M * (M - a) + M // 2) // M`` in integers (``M`` the dtype's maximum, 255
         for uint8), ``c * a + M - a`` for floats; premultiplied: ``min(c + M - a, M)``. The
         source then has one channel less; ``alpha="keep"`` keeps the channel as stored.
Rule I6. Every source states its ``levels`` (height, width, downsample and µm/px of each level of
         its file; one level for arrays), the ``level`` it reads, its ``mpp`` (µm/px along y and x,
         ``None`` where the file does not say) and its ``backend``. ``mpp=`` picks the level whose
         µm/px is nearest (by ratio) to the one asked for, if within ``mpp_tolerance`` (relative);
         otherwise the error lists every level's µm/px. ``level=`` and ``mpp=`` exclude each other.
Rule I7. What a source keeps of its reads (the tifffile backend's decoded tiles, slidefiles Rule
         SF4) lives for one step: ``Streamed`` calls ``source.release()`` when a call has read the
         source for the last time, at the end of its backward, or at the end of its forward when
         no backward follows (no output requires grad). A dataset of open sources thus holds no
         decoded pixels between steps.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import StreamcheckError
from .geometry import Interval

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ImageSource", "Level"]

LAYOUTS = ("HWC", "CHW")
READ_ALL_MAX_PIXELS = 64 * 2**20  # read_all refuses levels larger than this (Rule I1)
MPP_TOLERANCE = 0.1  # mpp= accepts a level within 10 % of the µm/px asked for (Rule I6)


@dataclass(frozen=True)
class Level:
    """One pyramid level of a source's file (Rule I6): size, downsample from level 0 and µm/px
    as (y, x); ``mpp`` is ``None`` where the file does not state it."""

    height: int
    width: int
    downsample: tuple[float, float]
    mpp: tuple[float, float] | None


class ImageSource:
    """A 2-D image read region by region (NOTE [ Image sources ]); make one with ``open_image``."""

    layout: str  # "HWC" or "CHW", the stored order of the axes (Rule I2)
    shape: tuple[int, int, int, int]  # (1, C, H, W), as Streamed sees it
    dtype: torch.dtype
    device = torch.device("cpu")
    name: str  # for messages
    backend: str = "array"  # what reads the pixels: tifffile, openslide, array, pyvips (Rule I6)
    levels: tuple[Level, ...] = ()  # every level of the file; the source's own for arrays
    level: int = 0  # which of ``levels`` this source reads
    mpp: tuple[float, float] | None = None  # µm/px (y, x) of this level, if known
    _alpha: str | None = None  # "straight" or "premultiplied": the last stored channel (Rule I5)

    def _read(self, rows: Interval, cols: Interval) -> np.ndarray:
        """The stored pixels of one region, in the stored layout (subclasses)."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop what was kept for the reads of this step (Rule I7); the file stays open."""

    @property
    def height(self) -> int:
        return self.shape[2]

    @property
    def width(self) -> int:
        return self.shape[3]

    @property
    def channels(self) -> int:
        return self.shape[1]

    def dim(self) -> int:
        return 4

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def region(self, rows: Interval, cols: Interval) -> torch.Tensor:
        """Pixels ``[y0, y1) x [x0, x1)`` as a ``(1, C, h, w)`` CPU tensor (Rules I1, I2)."""
        import numpy as np

        (y0, y1), (x0, x1) = rows, cols
        if not (0 <= y0 <= y1 <= self.height and 0 <= x0 <= x1 <= self.width):
            raise StreamcheckError(
                f"streamcheck: region rows {rows}, cols {cols} lies outside {self.name} "
                f"({self.height} x {self.width} px)"
            )
        stored = self._read(rows, cols)
        if self._alpha is not None:
            stored = _onto_white(stored, self.layout, self._alpha)
        if self.layout == "HWC":
            stored = stored[..., : self.channels].transpose(2, 0, 1)
        else:
            stored = stored[: self.channels]
        # Rule I2: one copy, into the layout of a tile of a (1, C, H, W) tensor (contiguous)
        return torch.from_numpy(np.array(stored, order="C", copy=True))[None]

    def __getitem__(self, index: tuple[Any, ...]) -> torch.Tensor:
        """``source[:, :, y0:y1, x0:x1]``: one region (the only indexing a tile feed does)."""
        if not (
            isinstance(index, tuple)
            and len(index) == 4
            and all(isinstance(s, slice) and s.step in (None, 1) for s in index)
            and index[0] == slice(None)
            and index[1] == slice(None)
        ):
            raise StreamcheckError(
                f"streamcheck: an image source is read by regions, source[:, :, y0:y1, x0:x1]; "
                f"got index {index!r}"
            )
        rows = index[2].indices(self.height)[:2]
        cols = index[3].indices(self.width)[:2]
        return self.region(rows, cols)

    def read_all(self) -> torch.Tensor:
        """The whole image as a ``(1, C, H, W)`` tensor, for small levels (thumbnails) only."""
        if self.height * self.width > READ_ALL_MAX_PIXELS:
            raise StreamcheckError(
                f"streamcheck: {self.name} is {self.height} x {self.width} px, more than "
                f"{READ_ALL_MAX_PIXELS // 2**20} Mpx; read_all is for thumbnails. Fix: open a "
                "lower pyramid level (open_image(path, level=-1) is the smallest)"
            )
        return self.region((0, self.height), (0, self.width))

    def __repr__(self) -> str:
        _, c, h, w = self.shape
        return f"{type(self).__name__}({self.name}, {h} x {w} px, {c} channels, {self.layout}, {self.dtype})"


def _onto_white(stored: np.ndarray, layout: str, kind: str) -> np.ndarray:
    """Colour channels composited onto white by the last channel, alpha (Rule I5)."""
    import numpy as np

    if layout == "HWC":
        colour, a = stored[..., :-1], stored[..., -1:]
    else:
        colour, a = stored[:-1], stored[-1:]
    if colour.dtype.kind == "f":
        return colour + (1 - a) if kind == "premultiplied" else colour * a + (1 - a)
    top = np.iinfo(colour.dtype).max
    wide = colour.astype(np.int64)
    a64 = a.astype(np.int64)
    if kind == "premultiplied":
        out = np.minimum(wide + (top - a64), top)
    else:
        out = (wide * a64 + top * (top - a64) + top // 2) // top
    return out.astype(colour.dtype)


def file_stamp(path: Path) -> tuple[tuple[str, int, int], ...]:
    """Rule I4: the name, size and modification time of a slide's file, or of every file of its
    folder (a DICOM WSI).

    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     (pathlib.Path(folder) / "a.dcm").write_bytes(b"1234")
    ...     [(name, size) for name, size, _ in file_stamp(pathlib.Path(folder))]
    4
    [('a.dcm', 4)]
    """
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def check_stamp(path: Path, stamp: tuple[tuple[str, int, int], ...], name: str) -> None:
    """Rule I4: refuse a slide whose files changed since ``stamp`` was taken."""
    if file_stamp(path) != stamp:
        raise StreamcheckError(
            f"streamcheck: {name} changed on disk since it was opened (its files' sizes or "
            "modification times). Fix: open_image it again"
        )


def choose_level(
    levels: Sequence[Level], *, level: int | None, mpp: float | None, tolerance: float, name: str
) -> int:
    """The index of the level asked for by number or by µm/px (Rule I6), or an error."""
    table = "; ".join(
        f"{i}: {lv.height} x {lv.width} px"
        + (f", {lv.mpp[1]:.4g} µm/px" if lv.mpp is not None else "")
        for i, lv in enumerate(levels)
    )
    if level is not None and mpp is not None:
        raise StreamcheckError(
            f"streamcheck: level={level} and mpp={mpp} both given for {name}; give one "
            f"(levels: {table})"
        )
    if mpp is None:
        level = 0 if level is None else level
        if not -len(levels) <= level < len(levels):
            raise StreamcheckError(
                f"streamcheck: level {level} does not exist in {name}, which has "
                f"{len(levels)} level(s) ({table}). Fix: level=0..{len(levels) - 1} "
                "(-1 is the smallest)"
            )
        return level % len(levels)
    if not (mpp > 0 and tolerance >= 0):
        raise StreamcheckError(
            f"streamcheck: mpp={mpp}, mpp_tolerance={tolerance}; both must be positive"
        )
    stated = [(i, lv.mpp) for i, lv in enumerate(levels) if lv.mpp is not None]
    if not stated:
        raise StreamcheckError(
            f"streamcheck: mpp={mpp} asked of {name}, which does not state its µm/px "
            f"(levels: {table}). Fix: choose by level=..."
        )

    def distance(item: tuple[int, tuple[float, float]]) -> float:
        return max(abs(math.log(m / mpp)) for m in item[1])

    best, best_mpp = min(stated, key=distance)
    if distance((best, best_mpp)) > math.log1p(tolerance):
        raise StreamcheckError(
            f"streamcheck: no level of {name} has {mpp} µm/px within "
            f"{tolerance:.0%} (levels: {table}). Fix: one of those µm/px, a larger "
            "mpp_tolerance=, or resample the level (e.g. with torch.nn.functional.interpolate)"
        )
    return best


def torch_dtype(dtype: Any, name: str) -> torch.dtype:
    import numpy as np

    try:
        return torch.from_numpy(np.zeros(0, dtype=dtype)).dtype
    except TypeError as e:
        raise StreamcheckError(
            f"streamcheck: {name} stores {dtype}, which torch cannot hold. Fix: use an unsigned "
            "8- or 16-bit, a signed integer or a floating-point array"
        ) from e


def checked_shape(
    stored: Sequence[int], layout: str, channels: int | None, name: str
) -> tuple[int, int, int, int]:
    """(1, C, H, W) from a stored HWC/CHW shape, with the checks of Rule I3."""
    if layout not in LAYOUTS:
        raise StreamcheckError(
            f"streamcheck: layout {layout!r} is not one of {', '.join(LAYOUTS)} (for {name})"
        )
    if len(stored) != 3:
        fix = (
            "add a channel axis (array[..., None] for one channel)"
            if len(stored) == 2
            else "pass one 2-D image with its channels (HWC or CHW)"
        )
        raise StreamcheckError(
            f"streamcheck: {name} has shape {tuple(stored)}; an image source has 3 axes "
            f"({layout}). Fix: {fix}"
        )
    h, w, c = stored if layout == "HWC" else (stored[1], stored[2], stored[0])
    if channels is not None:
        if not 1 <= channels <= c:
            raise StreamcheckError(
                f"streamcheck: channels={channels} asked of {name}, which has {c} channels "
                f"({layout} shape {tuple(stored)}). Fix: channels between 1 and {c}, or the other "
                "layout if the axes are not in the order assumed"
            )
        c = channels
    return (1, int(c), int(h), int(w))


class ArraySource(ImageSource):
    """A NumPy array, ``np.memmap`` or zarr array (anything sliced into NumPy arrays)."""

    def __init__(self, array: Any, *, layout: str, channels: int | None, name: str) -> None:
        import numpy as np

        self.array = array
        self.layout = layout
        self.name = name
        self.shape = checked_shape(array.shape, layout, channels, name)
        self.dtype = torch_dtype(array.dtype, name)
        self.levels = (
            Level(height=self.height, width=self.width, downsample=(1.0, 1.0), mpp=None),
        )
        self._file = _MemmapFile(array) if isinstance(array, np.memmap) else None

    def _read(self, rows: Interval, cols: Interval) -> np.ndarray:
        (y0, y1), (x0, x1) = rows, cols
        if self.layout == "HWC":
            return self.array[y0:y1, x0:x1]
        return self.array[:, y0:y1, x0:x1]

    def __getstate__(self) -> dict[str, Any]:  # Rule I4
        return {**vars(self), "array": None} if self._file is not None else dict(vars(self))

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        if self._file is not None:
            self.array = self._file.open()


class _MemmapFile:
    """Where a memmap's bytes lie in its file (Rule I4), to map them again read-only."""

    def __init__(self, array: np.memmap) -> None:
        import numpy as np

        base: Any = array
        while not isinstance(base, mmap.mmap):
            base = base.base
            if base is None or array.filename is None:
                raise StreamcheckError(
                    "streamcheck: this np.memmap has no file mapping (it could not be pickled "
                    "without its data). Fix: open_image the array np.memmap(path, ...) returns, "
                    "or a view of it"
                )
        mapped_at = np.frombuffer(base, dtype=np.uint8).ctypes.data
        mapped_from = array.offset - array.offset % mmap.ALLOCATIONGRANULARITY
        self.filename = str(array.filename)
        self.offset = mapped_from + array.__array_interface__["data"][0] - mapped_at
        self.shape, self.strides, self.dtype = array.shape, array.strides, array.dtype

    def open(self) -> np.ndarray:
        import numpy as np

        steps = list(zip(self.shape, self.strides, strict=True))
        low = sum((n - 1) * s for n, s in steps if s < 0)  # bytes before element 0 (<= 0)
        span = sum((n - 1) * abs(s) for n, s in steps) + self.dtype.itemsize
        flat = np.memmap(
            self.filename, dtype=np.uint8, mode="r", offset=self.offset + low, shape=(span,)
        )
        return np.ndarray(self.shape, self.dtype, buffer=flat, offset=-low, strides=self.strides)


class VipsSource(ImageSource):
    """A ``pyvips.Image`` (bands last: HWC), cropped region by region."""

    backend = "pyvips"

    def __init__(self, image: Any, *, channels: int | None) -> None:
        self.image = image
        self.layout = "HWC"
        self.name = f"pyvips image {image.get('filename') if 'filename' in image.get_fields() else ''}".strip()
        self.shape = checked_shape(
            (image.height, image.width, image.bands), "HWC", channels, self.name
        )
        self.dtype = torch_dtype(_vips_dtype(image), self.name)
        self.levels = (
            Level(height=self.height, width=self.width, downsample=(1.0, 1.0), mpp=None),
        )

    def _read(self, rows: Interval, cols: Interval) -> np.ndarray:
        import numpy as np

        (y0, y1), (x0, x1) = rows, cols
        if y1 == y0 or x1 == x0:
            return np.zeros((y1 - y0, x1 - x0, self.image.bands), dtype=_vips_dtype(self.image))
        region = self.image.crop(x0, y0, x1 - x0, y1 - y0)
        data = region.write_to_memory()
        return np.frombuffer(data, dtype=_vips_dtype(self.image)).reshape(y1 - y0, x1 - x0, -1)

    def __getstate__(self) -> dict[str, Any]:  # Rule I4
        raise StreamcheckError(
            "streamcheck: a pyvips image source cannot be pickled (pyvips images do not pickle). "
            "Fix: for DataLoader workers open the file by path, open_image(path, level=...)"
        )


_VIPS_FORMATS = {
    "uchar": "uint8",
    "char": "int8",
    "ushort": "uint16",
    "short": "int16",
    "uint": "uint32",
    "int": "int32",
    "float": "float32",
    "double": "float64",
}


def _vips_dtype(image: Any) -> str:
    return _VIPS_FORMATS.get(image.format, image.format)


def import_extra(name: str, extra: str) -> Any:
    """Import ``name``, or an error naming the extra that installs it (slidefiles Rule SF1)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise StreamcheckError(
            f"streamcheck: this needs {name}, which is not installed ({e}). Fix: "
            f"pip install 'streamcheck[{extra}]'"
        ) from e
