"""``open_image``: a slide file, an array or a pyvips image as an ``ImageSource``.

The rules it applies are NOTE [ Image sources ] (``sources.py``, Rules I1-I6) and NOTE [ Slide
files ] (``slidefiles.py``); this module only chooses between them, so that neither of those two
imports the other's caller.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import StreamcheckError
from .slidefiles import open_slide_file
from .sources import MPP_TOLERANCE, ArraySource, ImageSource, VipsSource

__all__ = ["open_image"]


def open_image(
    obj: Any,
    *,
    level: int | None = None,
    mpp: float | None = None,
    mpp_tolerance: float = MPP_TOLERANCE,
    backend: str = "auto",
    layout: str | None = None,
    channels: int | None = None,
    series: int = 0,
    alpha: str = "white",
    decode_threads: int = 2,
    cache_bytes: int = 256 * 2**20,
) -> ImageSource:
    """An image source that ``Streamed`` reads tile by tile, in place of a ``(1, C, H, W)`` tensor.

    ``obj`` is a path to a slide file, a NumPy array or ``np.memmap``, a zarr array (or a zarr
    group of levels ``"0"``, ``"1"``, ...), or a ``pyvips.Image``. Of a file, ``level`` picks the
    pyramid level (``-1`` the smallest) or ``mpp`` the level nearest that many µm/px (Rule I6);
    ``backend`` reads it: ``"tifffile"`` (TIFF-based: SVS, NDPI, OME-TIFF, generic pyramids; the
    default for those), ``"wsidicom"`` (a DICOM WSI: its folder, or one of its files; extra
    ``dicom``), ``"openslide"`` (MIRAX and the other formats OpenSlide reads; extra
    ``openslide``), see ``slidefiles.py``; ``series`` is the image in a multi-image TIFF or the
    pyramid of a DICOM WSI.
    ``decode_threads`` decode a region's tiles in parallel and ``cache_bytes`` keeps decoded tiles
    for the same step's later reads (backward reads forward's regions again), emptied when the
    step ends (tifffile backend, Rules SF3, SF4, I7). In ``reports/slides/`` the cache cut a
    training step's JPEG decoding by 45 % in every run; two decode threads help where cores are
    spare (a GPU does the compute) and were no faster on 2 busy cores. ``decode_threads=1,
    cache_bytes=0`` decodes on the reading thread alone and keeps nothing.
    Arrays are HWC unless ``layout="CHW"`` (Rule I2); ``channels=3`` keeps the first three
    channels; an alpha channel a file states is composited onto white unless ``alpha="keep"``
    (Rule I5). Tiles arrive in the stored dtype (uint8 for slides): give ``Streamed`` a
    ``tile_transform``.

    >>> import numpy as np, torch, torch.nn as nn, streamcheck
    >>> pixels = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)  # HWC
    >>> source = streamcheck.open_image(pixels)
    >>> source.shape                                   # a batch of one, channels first
    (1, 3, 300, 200)
    >>> trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).double()
    >>> to_float = lambda t: t.double() / 255
    >>> streamed = streamcheck.Streamed(trunk, tile=64, tile_transform=to_float)
    >>> tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()   # the same pixels
    >>> torch.equal(streamed(source), streamed(tensor))   # 300 x 200 px -> 5 x 4 tiles of 64 px
    True
    >>> torch.allclose(streamed(source), trunk(to_float(tensor)), rtol=1e-12, atol=0)
    True
    """
    if alpha not in ("white", "keep"):
        raise StreamcheckError(f"streamcheck: alpha={alpha!r}; use 'white' or 'keep' (Rule I5)")
    if isinstance(obj, ImageSource):
        if level is not None or mpp is not None or layout is not None or channels is not None:
            raise StreamcheckError(
                f"streamcheck: {obj!r} is already an image source; open the original with "
                "level/mpp/layout/channels instead"
            )
        return obj
    if isinstance(obj, torch.Tensor):
        raise StreamcheckError(
            "streamcheck: open_image takes a path, a NumPy/zarr array or a pyvips image; a tensor "
            "of shape (N, C, H, W) goes to Streamed directly"
        )
    if isinstance(obj, (str, os.PathLike)):
        if layout is not None:
            raise StreamcheckError(
                "streamcheck: a slide file states its own layout (its axes); drop layout=..."
            )
        return open_slide_file(
            Path(obj),
            level=level,
            mpp=mpp,
            mpp_tolerance=mpp_tolerance,
            backend=backend,
            series=series,
            channels=channels,
            alpha=alpha,
            decode_threads=decode_threads,
            cache_bytes=cache_bytes,
        )
    if mpp is not None or backend != "auto":
        raise StreamcheckError(
            "streamcheck: mpp= and backend= are for slide files; an array has one level and no "
            "µm/px (pick the level you want before open_image)"
        )
    level = 0 if level is None else level
    module = type(obj).__module__.split(".")[0]
    if module == "pyvips":
        _only_level_zero(level, "a pyvips image (load the level with pyvips)")
        if layout not in (None, "HWC"):
            raise StreamcheckError(
                "streamcheck: pyvips images are HWC (bands last); drop layout=..."
            )
        return VipsSource(obj, channels=channels)
    if module == "zarr" and hasattr(obj, "keys") and not hasattr(obj, "dtype"):  # a group of levels
        names = list(obj.keys())
        keys = sorted((k for k in names if k.isdigit()), key=int)
        if not keys:
            raise StreamcheckError(
                f"streamcheck: the zarr group has no levels named '0', '1', ... (it has "
                f"{sorted(names)}). Fix: pass the zarr array itself"
            )
        if not -len(keys) <= level < len(keys):
            raise StreamcheckError(
                f"streamcheck: level {level} does not exist in the zarr group, which has "
                f"{len(keys)} level(s). Fix: level=0..{len(keys) - 1} (-1 is the smallest)"
            )
        array = obj[keys[level]]
        return ArraySource(
            array, layout=layout or "HWC", channels=channels, name=f"zarr level {keys[level]}"
        )
    if hasattr(obj, "shape") and hasattr(obj, "dtype") and hasattr(obj, "__getitem__"):
        _only_level_zero(level, "an array (it has one resolution; open the level you want)")
        kind = "np.memmap" if type(obj).__name__ == "memmap" else f"{module} array"
        return ArraySource(obj, layout=layout or "HWC", channels=channels, name=kind)
    raise StreamcheckError(
        f"streamcheck: open_image cannot read {type(obj).__module__}.{type(obj).__name__}. Fix: "
        "pass a TIFF path, a NumPy array or np.memmap, a zarr array, or a pyvips.Image"
    )


def _only_level_zero(level: int, what: str) -> None:
    if level != 0:
        raise StreamcheckError(
            f"streamcheck: level={level} was given for {what}; only level 0 exists"
        )
