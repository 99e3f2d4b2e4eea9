"""Synthetic slides: random tissue blobs on white glass, written as a tiled pyramidal TIFF.

Rules (generated slides):

W1. Tissue is a smooth random field on the thumbnail grid (1/``THUMB`` of the slide per axis),
    thresholded at its ``1 - fraction`` quantile, so the thumbnail's tissue fraction is exact up to
    ties; every slide pixel takes its thumbnail pixel's class (blobs with ``THUMB``-pixel steps).
W2. Pixels are stain or glass colours plus fixed noise tiles, so content is not constant and the
    TIFF's uncompressed tiles are the file size: ``height * width * 3`` bytes plus the thumbnail
    (JPEG tiles, for the decoding experiment, are smaller).
W3. The slide is written tile by tile from a generator: writing a 4 GB slide holds one tile row of
    the thumbnail and one 256 x 256 tile in memory, never the level.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TILE = 256  # the TIFF's tile edge (as in most SVS files)
THUMB = 16  # levels: 1/1, 1/4 and 1/16 (the thumbnail) per axis
GLASS = (243, 242, 244)
STAIN = (196, 104, 170)


@dataclass(frozen=True)
class Slide:
    path: Path
    height: int
    width: int
    tissue_fraction: float  # of the thumbnail's pixels (Rule W1)
    file_bytes: int


def tissue_field(height: int, width: int, fraction: float, seed: int) -> np.ndarray:
    """The thumbnail's boolean tissue map (Rule W1)."""
    from skimage.filters import gaussian

    rng = np.random.default_rng(seed)
    field = gaussian(rng.standard_normal((height, width)), sigma=max(2.0, min(height, width) / 8))
    return np.asarray(field > np.quantile(field, 1 - fraction))


def _tiles(tissue: np.ndarray, noise: np.ndarray, scale: int) -> Iterator[np.ndarray]:
    """The tiles of the level with ``scale`` px per thumbnail px, row by row (Rules W2, W3);
    all-glass and all-stain tiles are precomputed."""
    glass, stain = np.array(GLASS, np.int16), np.array(STAIN, np.int16)

    def paint(classes: np.ndarray, k: int) -> np.ndarray:
        return np.clip(np.where(classes[..., None], stain, glass) + noise[k], 0, 255).astype(
            np.uint8
        )

    uniform = {
        value: [paint(np.full((TILE, TILE), value), k) for k in range(len(noise))]
        for value in (False, True)
    }
    step = TILE // scale
    rows, cols = tissue.shape[0] // step, tissue.shape[1] // step
    for r in range(rows):
        for c in range(cols):
            block = tissue[r * step : (r + 1) * step, c * step : (c + 1) * step]
            k = (r * cols + c) % len(noise)
            if block.all() or not block.any():
                yield uniform[bool(block[0, 0])][k]
            else:
                yield paint(np.repeat(np.repeat(block, scale, axis=0), scale, axis=1), k)


def write_slide(
    path: Path, *, side: int, fraction: float, seed: int = 0, compression: str = "none"
) -> Slide:
    """A ``side`` x ``side`` px slide (a multiple of 1024) with ``fraction`` of tissue, its tiles
    uncompressed (``"none"``) or JPEG at quality 90 (``"jpeg"``, as scanners write)."""
    import tifffile

    if side % (4 * TILE):  # level 1 (1/4) is whole tiles too
        raise ValueError(f"side {side} is not a multiple of {4 * TILE}")
    thumb = side // THUMB
    tissue = tissue_field(thumb, thumb, fraction, seed)
    rng = np.random.default_rng(seed + 1)
    noise = rng.integers(-6, 7, (8, TILE, TILE, 3), dtype=np.int16)
    options: dict = {"tile": (TILE, TILE), "photometric": "rgb", "dtype": np.uint8}
    if compression == "jpeg":
        options.update(compression="jpeg", compressionargs={"level": 90})
    elif compression != "none":
        raise ValueError(f"compression {compression!r}")
    with tifffile.TiffWriter(path, bigtiff=True) as tw:  # (tifffile reads steps of 4 as levels)
        tw.write(_tiles(tissue, noise, THUMB), shape=(side, side, 3), subifds=2, **options)
        tw.write(
            _tiles(tissue, noise, 4), shape=(side // 4, side // 4, 3), subfiletype=1, **options
        )
        small = np.where(tissue[..., None], np.array(STAIN, np.uint8), np.array(GLASS, np.uint8))
        tw.write(small, subfiletype=1, **options)
    return Slide(path, side, side, float(tissue.mean()), path.stat().st_size)
