"""DICOM whole-slide images (extra ``dicom``: wsidicom), behind the ``ImageSource`` interface of
``sources.py``; ``slidefiles.py`` chooses this backend (Rule SF1).

NOTE [ DICOM slides ]
Rule DW1. A DICOM WSI is a folder of instances (the levels of one or more pyramids, labels,
         overviews): ``open_image(folder)`` opens the folder, ``open_image(file.dcm)`` that one
         file, with wsidicom. ``series=`` picks the pyramid. Every level of the pyramid is one of
         ``.levels`` (size, downsample, µm/px from its pixel spacing); a level with more than one
         focal plane or optical path is refused (which plane to stream would be a guess).
Rule DW2. A region of level ``l`` is read with ``WsiDicom.read_region`` at that level's own
         number (wsidicom keys a pyramid's levels by ``log2`` of their scale, one level per
         number, and resamples the next larger level for a number it does not have): in the
         level's own pixels, never resampled.
Rule DW3. Pixels are wsidicom's decoder output; the extra installs imagecodecs, which wsidicom
         prefers, so a JPEG frame decodes exactly as tifffile decodes the same bytes. A transfer
         syntax with no decoder here is a ``StreamcheckError`` when the slide is opened. DICOM
         has no alpha channel; a sparse tiling's missing tiles read as wsidicom's background.
Rule DW4. wsidicom keeps its own caches of encoded and decoded frames (100 MB each by default),
         so backward's reads of forward's regions are served from memory within that budget;
         ``decode_threads`` and ``cache_bytes`` are the tifffile backend's. The source pickles as
         its path, pyramid and level (Rule I4); the files' sizes and modification times are
         checked when a copy opens them again: a slide that changed is an error.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

__all__ = ["DicomSource", "is_dicom"]

DICOM_MAGIC_AT = 128  # a DICOM file's preamble, then b"DICM"


def is_dicom(path: Path) -> bool:
    """A folder (of DICOM instances) or a DICOM file (Rule DW1)."""
    if path.is_dir():
        return True
    with open(path, "rb") as f:
        f.seek(DICOM_MAGIC_AT)
        return f.read(4) == b"DICM"


class DicomSource(ImageSource):
    """One level of a DICOM WSI read with wsidicom (extra ``dicom``), Rules DW1-DW4."""

    backend = "wsidicom"
    layout = "HWC"

    def __init__(
        self,
        path: Path,
        *,
        level: int | None,
        mpp: float | None,
        mpp_tolerance: float,
        series: int,
        channels: int | None,
    ) -> None:
        self.path, self.series = path, series
        self.name = f"'{path}'"
        self._stamp = file_stamp(path)
        self._wsi: Any = None
        wsi = self._open()
        try:
            pyramid = wsi.pyramids[series]
            found = list(pyramid)
            sizes = [(lv.size.height, lv.size.width) for lv in found]
            mpps = [(lv.mpp.height, lv.mpp.width) if lv.mpp is not None else None for lv in found]
            h0, w0 = sizes[0]
            self.levels = tuple(
                Level(height=h, width=w, downsample=(h0 / h, w0 / w), mpp=m)
                for (h, w), m in zip(sizes, mpps, strict=True)
            )
            self.level = choose_level(
                self.levels, level=level, mpp=mpp, tolerance=mpp_tolerance, name=self.name
            )
            chosen = found[self.level]
            self.name = f"'{path}' level {self.level} (wsidicom)"
            self._number = int(chosen.level)  # Rule DW2
            planes, paths = len(chosen.focal_planes), len(chosen.optical_paths)
            if planes != 1 or paths != 1:
                raise StreamcheckError(
                    f"streamcheck: {self.name} has {planes} focal plane(s) and {paths} optical "
                    "path(s); streamcheck streams one 2-D image. Fix: export one plane and path "
                    "as its own DICOM WSI"
                )
            first = chosen.datasets[0]
            self._samples = int(first.samples_per_pixel)
            if int(first.bits) != 8:
                raise StreamcheckError(
                    f"streamcheck: {self.name} stores {first.bits} bits per sample; the "
                    "wsidicom backend reads 8-bit slides. Fix: convert the slide to 8 bits"
                )
        finally:
            wsi.close()
        h, w = sizes[self.level]
        self.shape = checked_shape((h, w, self._samples), "HWC", channels, self.name)
        self.dtype = torch_dtype("uint8", self.name)
        self.mpp = self.levels[self.level].mpp

    def _open(self) -> Any:
        wsidicom = import_extra("wsidicom", "dicom")
        try:
            wsi = wsidicom.WsiDicom.open(self.path)
        except Exception as e:  # wsidicom's own errors, pydicom's, a missing decoder (Rule DW3)
            raise StreamcheckError(
                f"streamcheck: wsidicom cannot open {self.name} as a DICOM whole-slide image "
                f"({type(e).__name__}: {e}). Fix: check that it is a folder of DICOM WSI "
                "instances (VL Whole Slide Microscopy Image); a compressed transfer syntax needs "
                "its decoder: pip install 'streamcheck[dicom]' installs imagecodecs"
            ) from e
        if not 0 <= self.series < len(wsi.pyramids):
            count = len(wsi.pyramids)
            wsi.close()
            raise StreamcheckError(
                f"streamcheck: pyramid (series) {self.series} does not exist in {self.name}, "
                f"which has {count}. Fix: series=0..{count - 1}"
            )
        return wsi

    def _read(self, rows: Interval, cols: Interval) -> np.ndarray:
        import numpy as np

        if self._wsi is None:
            check_stamp(self.path, self._stamp, self.name)  # Rule DW4, sources Rule I4
            self._wsi = self._open()
            # closes it once: at ``close`` or when the source is collected, whichever is first
            self._closer = weakref.finalize(self, self._wsi.close)
        (y0, y1), (x0, x1) = rows, cols
        if y1 == y0 or x1 == x0:
            return np.zeros((y1 - y0, x1 - x0, self._samples), dtype=np.uint8)
        region = self._wsi.read_region(
            (x0, y0), self._number, (x1 - x0, y1 - y0), pyramid=self.series
        )
        pixels = np.asarray(region)
        return pixels.reshape(y1 - y0, x1 - x0, -1)

    def close(self) -> None:
        """Close the files (they are opened again on the next read)."""
        if self._wsi is not None:
            self._closer()
        self._wsi = None

    def __getstate__(self) -> dict[str, Any]:  # Rule I4
        return {**vars(self), "_wsi": None, "_closer": None}
