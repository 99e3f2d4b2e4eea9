"""Slide files: the backends that read a whole-slide image file region by region (tifffile,
OpenSlide; wsidicom in ``dicomfiles.py``), behind the ``ImageSource`` interface of ``sources.py``.

NOTE [ Slide files ]
Rule SF1. The backend is chosen once, when the file is opened: ``backend="auto"`` reads a TIFF-based
         file (by its first bytes or its suffix: SVS, NDPI, OME-TIFF, generic pyramids) with
         tifffile, a DICOM WSI (a folder of instances, or a file with DICOM's ``DICM`` marker)
         with wsidicom, anything else (MIRAX ``.mrxs``, VMS, ...) with OpenSlide. ``backend=``
         forces one; a backend that is not installed is a ``StreamcheckError`` naming the extra
         to install, raised when the file is opened.
Rule SF2. Codecs are checked when the file is opened, not at the first tile: every compression and
         predictor of the chosen level must have a decoder (tifffile's built-in ones or
         imagecodecs'), or the error names the package and the install line.
Rule SF3. The tifffile backend reads a region by reading the bytes of exactly the tiles (or strips)
         it overlaps, under the file's lock, then decoding them on ``decode_threads`` threads
         (imagecodecs releases the GIL) and pasting them. Its pixels are tifffile's decoder output,
         the same as ``tifffile.imread`` of the level gives.
Rule SF4. The decode-once cache (``cache_bytes``) keeps decoded tiles within a byte budget, so that
         the tiles decoded for forward are not decoded again for backward (and the tiles shared
         by overlapping regions once only). Backward reads forward's regions in forward's order,
         so a least-recently-used cache smaller than a step's tiles would evict every tile before
         backward asks for it; the cache instead keeps the tiles it holds and admits new ones
         only while there is room: backward is served the first ``cache_bytes`` of forward's
         tiles. It belongs to one open source, so its key, the tile's index, is complete: the
         file, series, level and codec are the source's own, and the file's size and
         modification time are checked whenever the file is opened again (after pickling or
         ``close``): a file that changed is an error, never stale pixels. ``Streamed`` empties it
         at the end of each step (sources Rule I7).
Rule SF5. OpenSlide addresses a region at level ``l`` by its top-left corner in level-0 pixels;
         streamcheck passes ``round(x * downsample)``. Where the downsample is not an integer,
         OpenSlide may place that corner between two pixels of the level, so the OpenSlide
         backend refuses such levels (use ``backend="tifffile"`` for a TIFF, or level 0). Its
         RGBA output is straight (not premultiplied) alpha, composited onto white (sources Rule I5).
Rule SF6. µm/px: an Aperio description's ``MPP = ...``; an OME-TIFF's ``PhysicalSizeX/Y`` (µm, nm,
         mm, cm or m); otherwise the baseline page's X/YResolution in pixels per cm, mm, µm or inch;
         OpenSlide's ``openslide.mpp-x/y``. A level's µm/px is level 0's times its downsample.
"""

from __future__ import annotations

import re
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .dicomfiles import DicomSource, is_dicom
from .errors import StreamcheckError
from .geometry import Interval
from .sources import (
    ImageSource,
    Level,
    check_stamp,
    checked_shape,
    choose_level,
    file_stamp,
    import_extra,
    torch_dtype,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = ["OpenSlideSource", "TiffSource", "open_slide_file"]

BACKENDS = ("auto", "tifffile", "openslide", "wsidicom")
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".btf", ".tf8", ".qptiff", ".scn", ".bif")
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_UNITS_UM = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}
_RESOLUTION_UNIT_UM = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}  # TIFF ResolutionUnit -> µm per unit


def open_slide_file(
    path: Path,
    *,
    level: int | None,
    mpp: float | None,
    mpp_tolerance: float,
    backend: str,
    series: int,
    channels: int | None,
    alpha: str,
    decode_threads: int,
    cache_bytes: int,
) -> ImageSource:
    """The source of one level of a slide file, by the backend of Rule SF1."""
    if backend not in BACKENDS:
        raise StreamcheckError(
            f"streamcheck: backend {backend!r} is not one of {', '.join(BACKENDS)}"
        )
    if not path.exists():
        raise StreamcheckError(
            f"streamcheck: no file at {str(path)!r} (absolute: {str(path.absolute())!r}). "
            "Fix: check the path"
        )
    if backend == "auto" and is_dicom(path):
        backend = "wsidicom"
    elif backend == "auto":
        with open(path, "rb") as f:
            tiff = f.read(4) in TIFF_MAGIC or path.suffix.lower() in TIFF_SUFFIXES
        backend = "tifffile" if tiff else "openslide"
    if path.is_dir() and backend != "wsidicom":
        raise StreamcheckError(
            f"streamcheck: {str(path)!r} is a folder; backend {backend!r} reads one file. Fix: "
            "the slide's file, or backend='wsidicom' for a folder of DICOM instances"
        )
    chosen: dict[str, Any] = {
        "level": level,
        "mpp": mpp,
        "mpp_tolerance": mpp_tolerance,
        "channels": channels,
    }
    if backend == "wsidicom":
        return DicomSource(path, series=series, **chosen)
    if backend == "tifffile":
        return TiffSource(
            path,
            series=series,
            alpha=alpha,
            decode_threads=decode_threads,
            cache_bytes=cache_bytes,
            **chosen,
        )
    if series != 0:
        raise StreamcheckError(
            "streamcheck: series= is for TIFF files and DICOM pyramids (backends 'tifffile', "
            "'wsidicom')"
        )
    return OpenSlideSource(path, alpha=alpha, **chosen)


class _TileCache:
    """Decoded tiles, admitted while within ``budget`` bytes, never evicted (Rule SF4)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.hits = 0  # tiles served from the cache
        self.decoded = 0  # tiles decoded (with or without a cache)
        self._tiles: dict[int, Any] = {}
        self._lock = threading.Lock()

    def get(self, index: int) -> Any:
        with self._lock:
            tile = self._tiles.get(index)
            self.hits += tile is not None
            return tile

    def clear(self) -> None:
        """Drop the tiles; the counts stay."""
        with self._lock:
            self._tiles.clear()
            self.used = 0

    def put(self, index: int, tile: Any) -> None:
        with self._lock:
            if tile is None or index in self._tiles or self.used + tile.nbytes > self.budget:
                return
            self._tiles[index] = tile
            self.used += tile.nbytes


class TiffSource(ImageSource):
    """One level of a (tiled, pyramidal) TIFF, read tile by tile with tifffile (Rules SF2-SF4)."""

    backend = "tifffile"

    def __init__(
        self,
        path: Path,
        *,
        level: int | None,
        mpp: float | None,
        mpp_tolerance: float,
        series: int,
        channels: int | None,
        alpha: str,
        decode_threads: int,
        cache_bytes: int,
    ) -> None:
        if decode_threads < 1 or cache_bytes < 0:
            raise StreamcheckError(
                f"streamcheck: decode_threads={decode_threads} and cache_bytes={cache_bytes}; "
                "use decode_threads >= 1 and cache_bytes >= 0 (0: no cache)"
            )
        self.path, self.series = path, series
        self.decode_threads, self.cache_bytes = decode_threads, cache_bytes
        self.name = f"'{path}'"
        self._stamp = file_stamp(path)
        self._tiff: Any = None
        self._page: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._cache = _TileCache(cache_bytes)
        tiff = self._open_tiff()  # Rule I3: described now, read on first use
        try:
            self._describe(tiff, level, mpp, mpp_tolerance, channels, alpha)
        finally:
            tiff.close()

    def _open_tiff(self) -> Any:
        tifffile = import_extra("tifffile", "slides")
        try:
            return tifffile.TiffFile(self.path)
        except (tifffile.TiffFileError, ValueError, OSError) as e:
            raise StreamcheckError(
                f"streamcheck: {self.name} is not a TIFF file tifffile can read ({e}). Fix: "
                "backend='openslide' for other slide formats, or convert it to a tiled pyramidal "
                "TIFF (e.g. with vips tiffsave --tile --pyramid)"
            ) from e

    def _describe(
        self,
        tiff: Any,
        level: int | None,
        mpp: float | None,
        tolerance: float,
        channels: int | None,
        alpha: str,
    ) -> None:
        """Levels, µm/px, shape, layout and codecs of the chosen level (Rules I3, SF2, SF6)."""
        if not 0 <= self.series < len(tiff.series):
            raise StreamcheckError(
                f"streamcheck: series {self.series} does not exist in {self.name}, which has "
                f"{len(tiff.series)}. Fix: series=0..{len(tiff.series) - 1}"
            )
        series = tiff.series[self.series]
        sizes = [_yx(lv) for lv in series.levels]
        mpp0 = _tiff_mpp(tiff, self.series)
        self.levels = _levels(sizes, mpp0)
        self.level = choose_level(
            self.levels, level=level, mpp=mpp, tolerance=tolerance, name=self.name
        )
        chosen = series.levels[self.level]
        self.name = f"'{self.path}' level {self.level}"
        if len(chosen.pages) != 1 or chosen.pages[0] is None:
            raise StreamcheckError(
                f"streamcheck: {self.name} has axes {chosen.axes!r} of shape {tuple(chosen.shape)} "
                f"in {len(chosen.pages)} pages; streamcheck streams one 2-D image (one page per "
                "level). Fix: write each plane as its own series and pass series=..."
            )
        page = chosen.pages[0].keyframe
        separate, depth, height, width, contig = page.shaped
        if depth != 1:
            raise StreamcheckError(
                f"streamcheck: {self.name} is a volume (depth {depth}); sources are 2-D images"
            )
        _check_codecs(page, self.name)
        self.layout = "CHW" if separate > 1 else "HWC"
        stored_channels = max(separate, contig)
        extrasamples = tuple(getattr(page, "extrasamples", ()) or ())
        self._alpha = None
        if alpha == "white" and stored_channels in (2, 4) and extrasamples[-1:] in ((1,), (2,)):
            self._alpha = "premultiplied" if extrasamples[-1] == 1 else "straight"
            stored_channels -= 1
        stored = (height, width, stored_channels)
        if self.layout == "CHW":
            stored = (stored_channels, height, width)
        self.shape = checked_shape(stored, self.layout, channels, self.name)
        self.dtype = torch_dtype(page.dtype, self.name)
        self.mpp = self.levels[self.level].mpp

    def _level_page(self) -> Any:
        if self._page is None:
            check_stamp(self.path, self._stamp, self.name)  # Rules SF4, I4
            self._tiff = self._open_tiff()
            weakref.finalize(self, self._tiff.close)  # the file closes with the source
            self._page = self._tiff.series[self.series].levels[self.level].pages[0]
        return self._page

    def _read(self, rows: Interval, cols: Interval) -> np.ndarray:
        """Read and decode the tiles of the region, paste them (Rules SF3, SF4)."""
        import numpy as np

        page = self._level_page()
        key = page.keyframe
        (y0, y1), (x0, x1) = rows, cols
        separate, _, height, width, contig = key.shaped
        th, tw = (key.tilelength, key.tilewidth) if key.is_tiled else (key.rowsperstrip, width)
        th = min(th, height)
        across, down = -(-width // tw), -(-height // th)
        wanted = [
            (s * down + ty) * across + tx
            for s in range(separate)
            for ty in range(y0 // th, -(-y1 // th))
            for tx in range(x0 // tw, -(-x1 // tw))
        ]
        out = np.zeros((separate, y1 - y0, x1 - x0, contig), dtype=key.dtype)
        if not wanted:
            return self._stored(out)
        tiles = {i: self._cache.get(i) for i in wanted} if self.cache_bytes else {}
        missing = [i for i in wanted if tiles.get(i) is None]
        self._cache.decoded += len(missing)
        if missing:
            fh = self._tiff.filehandle
            # positions into ``missing``, not the tiles' indices: tifffile 2024.8.30 looks a
            # single segment up by its index in the lists passed
            segments = fh.read_segments(
                [page.dataoffsets[i] for i in missing],
                [page.databytecounts[i] for i in missing],
                indices=range(len(missing)),
                lock=fh.lock,
                sort=True,
            )
            raw = [(data, missing[at]) for data, at in segments]
            options: dict[str, Any] = {"_fullsize": key.is_tiled}
            if key.compression in (6, 7, 34892, 33007):  # JPEG: tables and header
                options["jpegtables"] = page.jpegtables
                options["jpegheader"] = getattr(key, "jpegheader", None)

            def decode(item: tuple[bytes | None, int]) -> tuple[int, Any]:
                data, index = item
                return index, key.decode(data, index, **options)[0]

            if self.decode_threads > 1 and len(raw) > 1:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        self.decode_threads, thread_name_prefix="streamcheck-decode"
                    )
                    weakref.finalize(self, self._pool.shutdown, wait=False)
                decoded = list(self._pool.map(decode, raw))
            else:
                decoded = [decode(item) for item in raw]
            for index, tile in decoded:
                tiles[index] = tile
                if self.cache_bytes:
                    self._cache.put(index, tile)
        for index in wanted:
            tile = tiles[index]
            if tile is None:  # an empty tile (no bytes): zeros, as tifffile fills it
                continue
            s, rest = divmod(index, down * across)
            ty, tx = divmod(rest, across)
            ty0, tx0 = ty * th, tx * tw
            a0, a1 = max(y0, ty0), min(y1, ty0 + tile.shape[-3])
            b0, b1 = max(x0, tx0), min(x1, tx0 + tile.shape[-2])
            out[s, a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = tile.reshape(tile.shape[-3:])[
                a0 - ty0 : a1 - ty0, b0 - tx0 : b1 - tx0
            ]
        return self._stored(out)

    def _stored(self, out: np.ndarray) -> np.ndarray:
        """(separate, h, w, contig) -> the stored layout: HWC, or CHW for planar files."""
        return out[..., 0] if self.layout == "CHW" else out[0]

    def release(self) -> None:
        """Drop the cached tiles (sources Rule I7)."""
        self._cache.clear()

    def close(self) -> None:
        """Close the file (it is opened again on the next read) and drop the cached tiles."""
        if self._tiff is not None:
            self._tiff.close()
        self._tiff = self._page = None
        self._cache = _TileCache(self.cache_bytes)

    def __getstate__(self) -> dict[str, Any]:  # Rule I4
        return {
            **vars(self),
            "_tiff": None,
            "_page": None,
            "_pool": None,
            "_cache": None,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._cache = _TileCache(self.cache_bytes)


def _check_codecs(page: Any, name: str) -> None:
    """Every codec of the page decodes here, or an error naming what to install (Rule SF2)."""
    from tifffile import TIFF

    for table, value in (
        (TIFF.DECOMPRESSORS, page.compression),
        (TIFF.UNPREDICTORS, page.predictor),
    ):
        if value == 1:
            continue
        try:
            table[value]
        except (KeyError, ValueError, ImportError, AttributeError, NotImplementedError) as e:
            what = getattr(value, "name", value)
            raise StreamcheckError(
                f"streamcheck: {name} is stored with {what} "
                f"({'compression' if table is TIFF.DECOMPRESSORS else 'predictor'} {int(value)}), "
                f"which needs the 'imagecodecs' package ({e}). Fix: pip install "
                "'streamcheck[slides]' (or pip install imagecodecs)"
            ) from e


def _yx(level: Any) -> tuple[int, int]:
    axes, shape = level.axes, level.shape
    if "Y" not in axes or "X" not in axes:
        raise StreamcheckError(
            f"streamcheck: a level has axes {axes!r} of shape {tuple(shape)}; an image needs Y and X"
        )
    return int(shape[axes.index("Y")]), int(shape[axes.index("X")])


def _levels(sizes: list[tuple[int, int]], mpp0: tuple[float, float] | None) -> tuple[Level, ...]:
    h0, w0 = sizes[0]
    levels = []
    for h, w in sizes:
        down = (h0 / h, w0 / w)
        mpp = None if mpp0 is None else (mpp0[0] * down[0], mpp0[1] * down[1])
        levels.append(Level(height=h, width=w, downsample=down, mpp=mpp))
    return tuple(levels)


def _tiff_mpp(tiff: Any, series: int) -> tuple[float, float] | None:
    """Level 0's µm/px (y, x) as the file states it (Rule SF6), or None."""
    page = tiff.pages[0]
    if tiff.is_svs:
        found = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", page.description or "")
        if found:
            return (float(found.group(1)),) * 2
    if tiff.is_ome and tiff.ome_metadata:
        return _ome_mpp(tiff.ome_metadata, series)
    unit = _RESOLUTION_UNIT_UM.get(int(page.tags.valueof(296, default=2)))
    xres, yres = (page.tags.valueof(code) for code in (282, 283))
    if unit is None or xres is None or yres is None or 0 in (*xres, *yres):
        return None
    mpp = (unit * yres[1] / yres[0], unit * xres[1] / xres[0])
    if page.tags.valueof(296) is None and xres == (1, 1):  # tifffile's default, not a scan
        return None
    return mpp


def _ome_mpp(xml: str, series: int) -> tuple[float, float] | None:
    import xml.etree.ElementTree as ET

    images = [e for e in ET.fromstring(xml).iter() if e.tag.endswith("}Image")]
    if series >= len(images):
        return None
    pixels = next((e for e in images[series] if e.tag.endswith("}Pixels")), None)
    if pixels is None:
        return None
    sizes = []
    for axis in ("Y", "X"):
        size = pixels.get(f"PhysicalSize{axis}")
        factor = _UNITS_UM.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        if size is None or factor is None:
            return None
        sizes.append(float(size) * factor)
    return sizes[0], sizes[1]


class OpenSlideSource(ImageSource):
    """One level of a slide OpenSlide reads (extra ``openslide``), Rules SF5 and I5."""

    backend = "openslide"
    layout = "HWC"

    def __init__(
        self,
        path: Path,
        *,
        level: int | None,
        mpp: float | None,
        mpp_tolerance: float,
        channels: int | None,
        alpha: str,
    ) -> None:
        import numpy as np

        self.path = path
        self.name = f"'{path}'"
        self._slide: Any = None
        self._stamp = file_stamp(path)
        slide = self._open()
        try:
            props = slide.properties
            mpp0 = None
            if "openslide.mpp-x" in props and "openslide.mpp-y" in props:
                mpp0 = (float(props["openslide.mpp-y"]), float(props["openslide.mpp-x"]))
            sizes = [(h, w) for w, h in slide.level_dimensions]
            self.levels = _levels(sizes, mpp0)
            self.level = choose_level(
                self.levels, level=level, mpp=mpp, tolerance=mpp_tolerance, name=self.name
            )
            self.downsample = float(slide.level_downsamples[self.level])
        finally:
            slide.close()
        self.name = f"'{path}' level {self.level} (OpenSlide)"
        if self.downsample != round(self.downsample):  # Rule SF5
            raise StreamcheckError(
                f"streamcheck: {self.name} has downsample {self.downsample!r}, not an integer; "
                "OpenSlide addresses its regions in level-0 pixels and may place them between "
                "two pixels of this level. Fix: backend='tifffile' (TIFF-based files), level 0, "
                "or a level whose downsample is an integer"
            )
        self._alpha = "straight" if alpha == "white" else None
        stored = 3 if self._alpha else 4
        h, w = sizes[self.level]
        self.shape = checked_shape((h, w, stored), "HWC", channels, self.name)
        self.dtype = torch_dtype(np.uint8, self.name)
        self.mpp = self.levels[self.level].mpp

    def _open(self) -> Any:
        openslide = import_extra("openslide", "openslide")
        try:
            return openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideError as e:  # includes OpenSlideUnsupportedFormatError
            raise StreamcheckError(
                f"streamcheck: OpenSlide cannot read {self.name} ({e}). Fix: check the file; "
                "OpenSlide reads Aperio, Hamamatsu, Leica, MIRAX, Philips, Sakura, Trestle, "
                "Ventana and generic tiled TIFF slides"
            ) from e

    def _read(self, rows: Interval, cols: Interval) -> np.ndarray:
        import numpy as np

        if self._slide is None:
            check_stamp(self.path, self._stamp, self.name)  # sources Rule I4
            self._slide = self._open()
            # closes it once: at ``close`` or when the source is collected, whichever is first
            self._closer = weakref.finalize(self, self._slide.close)
        (y0, y1), (x0, x1) = rows, cols
        if y1 == y0 or x1 == x0:
            return np.zeros((y1 - y0, x1 - x0, 4), dtype=np.uint8)
        corner = (round(x0 * self.downsample), round(y0 * self.downsample))
        region = self._slide.read_region(corner, self.level, (x1 - x0, y1 - y0))
        return np.asarray(region)  # RGBA, straight alpha

    def close(self) -> None:
        """Close the slide (it is opened again on the next read)."""
        if self._slide is not None:
            self._closer()
        self._slide = None

    def __getstate__(self) -> dict[str, Any]:  # Rule I4
        return {**vars(self), "_slide": None, "_closer": None}
