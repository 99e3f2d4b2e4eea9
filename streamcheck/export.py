"""Maps a viewer opens: any map over a slide (saliency, logits per tile, features, attention) as a
pyramidal tiled TIFF overlay aligned with the slide, and as QuPath GeoJSON.

NOTE [ Overlays ]
Rule EX1. A map is an array ``(h, w)`` or ``(C, h, w)`` that covers the whole slide: map pixel
          ``(i, j)`` covers level-0 pixels ``[i * H0 / h, (i + 1) * H0 / h) x [j * W0 / w, ...)``
          (the grid of a network's output at its stride, as masks Rule T1 lays a mask). Its µm/px
          is the slide's times ``H0 / h`` (and ``W0 / w``).
Rule EX2. The overlay's level 0 is the map's own grid, or a slide level's grid (``level=``), each
          overlay pixel taking the map pixel under its centre (nearest; no interpolation invents
          values). Reduced levels halve the size (``ceil``) down to one tile, each sampled from the
          map the same way, so every level is exactly aligned, and each level states its µm/px as
          X/YResolution in pixels per centimetre (OpenSlide's ``openslide.mpp-x``, QuPath's pixel
          size). Written tile by tile: the overlay is never whole in memory.
Rule EX3. ``colormap=None`` writes the values (float32, one channel per map channel). A colormap
          (a matplotlib name, or a callable taking values in [0, 1] to RGB(A) floats in [0, 1])
          writes RGBA uint8 of one channel's map, scaled by ``value_range`` (the finite values'
          minimum and maximum by default); NaN is transparent (alpha 0).
Rule EX4. GeoJSON coordinates are level-0 pixels (annotations Rule AN1). ``threshold=None`` writes
          one square tile per finite map pixel, its value a measurement (QuPath's tile objects);
          a threshold writes the outlines of ``value >= threshold``: polygons (outer rings and
          their holes) along the map pixels' edges whose union is exactly the thresholded
          pixels' squares, so rasterising them back (``load_mask``, at any level whose pixel
          centres do not lie on the map's pixel edges) gives exactly those pixels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import StreamcheckError
from .sources import ImageSource, import_extra

if TYPE_CHECKING:
    import numpy as np

__all__ = ["write_geojson", "write_overlay"]

TILE = 256


def _map_array(values: Any, like: ImageSource) -> tuple[np.ndarray, tuple[float, float]]:
    """The map as (C, h, w) float64 and its level-0 px per map px (Rule EX1)."""
    import numpy as np

    if not isinstance(like, ImageSource):
        raise StreamcheckError(
            "streamcheck: like= is the slide's image source (streamcheck.open_image(path))"
        )
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]  # a batch of one, as Streamed returns it
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or 0 in array.shape:
        raise StreamcheckError(
            f"streamcheck: a map is (h, w), (C, h, w) or (1, C, h, w); got shape "
            f"{tuple(np.shape(values))}"
        )
    h0, w0 = like.levels[0].height, like.levels[0].width
    from .masks import check_aspect

    check_aspect(array.shape[1:], (h0, w0), what="map")
    return array, (h0 / array.shape[1], w0 / array.shape[2])


def write_overlay(
    path: str | os.PathLike[str],
    values: Any,
    *,
    like: ImageSource,
    level: int | None = None,
    colormap: str | Callable[[np.ndarray], np.ndarray] | None = None,
    channel: int = 0,
    value_range: tuple[float, float] | None = None,
    compression: str = "zlib",
) -> Path:
    """Write ``values`` (a map over the slide ``like``) as a pyramidal tiled TIFF overlay (Rules
    EX1-EX3); returns the path.

    >>> import pathlib, tempfile, numpy as np, tifffile, streamcheck
    >>> slide = streamcheck.open_image(np.zeros((4096, 2048, 3), np.uint8))
    >>> heat = np.linspace(0, 1, 128 * 64).reshape(128, 64)     # stride 32: 4096 / 32 = 128
    >>> path = pathlib.Path(tempfile.mkdtemp(), "heat.tif")
    >>> _ = streamcheck.write_overlay(path, heat, like=slide, colormap=lambda v: np.stack([v] * 3, -1))
    >>> with tifffile.TiffFile(path) as tif:
    ...     [page.shape for page in tif.pages]                  # level 0 is the map's grid, RGBA
    [(128, 64, 4)]
    """

    tifffile = import_extra("tifffile", "slides")
    array, _ = _map_array(values, like)
    if level is None:
        height, width = array.shape[1:]
    else:
        if not -len(like.levels) <= level < len(like.levels):
            raise StreamcheckError(
                f"streamcheck: level {level} does not exist in {like.name}'s file, which has "
                f"{len(like.levels)} level(s)"
            )
        height, width = like.levels[level].height, like.levels[level].width
    pixels = _colours(array, colormap, channel, value_range)
    sizes = [(height, width)]
    while sizes[-1][0] > TILE or sizes[-1][1] > TILE:
        sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
    mpp = like.levels[0].mpp
    h0, w0 = like.levels[0].height, like.levels[0].width
    options: dict[str, Any] = {
        "tile": (TILE, TILE),
        "photometric": "rgb" if pixels.shape[-1] == 4 else "minisblack",
        "compression": compression,
        "metadata": None,
    }
    if pixels.shape[-1] > 1:
        options["planarconfig"] = "contig"
    if pixels.shape[-1] == 4:
        options["extrasamples"] = ["unassalpha"]
    channels = pixels.shape[-1:] if pixels.shape[-1] > 1 else ()
    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, (h, w) in enumerate(sizes):
            resolution = {}
            if mpp is not None:  # Rule EX2: pixels per cm of this level
                resolution = {
                    "resolution": (1e4 * w / (w0 * mpp[1]), 1e4 * h / (h0 * mpp[0])),
                    "resolutionunit": "CENTIMETER",
                }
            tw.write(
                _tiles(pixels if channels else pixels[..., 0], (h, w)),
                shape=(h, w, *channels),
                dtype=pixels.dtype,
                subfiletype=1 if k else 0,
                **resolution,
                **options,
            )
    return path


def _colours(
    array: np.ndarray,
    colormap: str | Callable[[np.ndarray], np.ndarray] | None,
    channel: int,
    value_range: tuple[float, float] | None,
) -> np.ndarray:
    """(h, w, C) float32 values, or (h, w, 4) RGBA uint8 colours (Rule EX3)."""
    import numpy as np

    if colormap is None:
        return np.ascontiguousarray(array.transpose(1, 2, 0), dtype=np.float32)
    if not 0 <= channel < array.shape[0]:
        raise StreamcheckError(
            f"streamcheck: channel={channel}; the map has {array.shape[0]} channel(s)"
        )
    values = array[channel]
    finite = np.isfinite(values)
    if value_range is None:
        lo, hi = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 1.0)
    else:
        lo, hi = value_range
    scaled = np.clip((values - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    scaled[~finite] = 0
    if isinstance(colormap, str):
        matplotlib = import_extra("matplotlib", "slides")
        try:
            colormap = matplotlib.colormaps[colormap]
        except KeyError as e:
            raise StreamcheckError(
                f"streamcheck: colormap {colormap!r} is not a matplotlib colormap "
                "(e.g. 'viridis', 'magma', 'jet')"
            ) from e
    assert callable(colormap)
    rgba = np.asarray(colormap(scaled), dtype=np.float64)
    if rgba.shape[:2] != values.shape or rgba.shape[-1] not in (3, 4):
        raise StreamcheckError(
            f"streamcheck: the colormap turned a map of shape {values.shape} into "
            f"{rgba.shape}; it must give RGB or RGBA per value, in [0, 1]"
        )
    out = np.empty((*values.shape, 4), dtype=np.uint8)
    out[..., :3] = np.round(np.clip(rgba[..., :3], 0, 1) * 255)
    out[..., 3] = np.where(finite, 255, 0)
    return out


def _tiles(pixels: np.ndarray, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """The tiles of the level of ``size``, each pixel the map pixel under its centre (Rule EX2)."""
    import numpy as np

    h, w = size
    mh, mw = pixels.shape[:2]
    for y in range(0, h, TILE):
        rows = np.minimum(((np.arange(y, y + TILE) + 0.5) * mh / h).astype(np.int64), mh - 1)
        for x in range(0, w, TILE):
            cols = np.minimum(((np.arange(x, x + TILE) + 0.5) * mw / w).astype(np.int64), mw - 1)
            yield pixels[rows[:, None], cols[None, :]]


def write_geojson(
    path: str | os.PathLike[str],
    values: Any,
    *,
    like: ImageSource,
    channel: int = 0,
    threshold: float | None = None,
    name: str = "streamcheck",
) -> Path:
    """Write ``values`` (a map over the slide ``like``) as QuPath GeoJSON (Rule EX4): tiles with
    the value as measurement ``name``, or the contours of ``value >= threshold`` classified
    ``name``; returns the path.

    >>> import json, pathlib, tempfile, numpy as np, streamcheck
    >>> slide = streamcheck.open_image(np.zeros((64, 64, 3), np.uint8))
    >>> heat = np.zeros((8, 8)); heat[2:5, 3:6] = 1.0           # stride 8: a 3 x 3 block
    >>> path = pathlib.Path(tempfile.mkdtemp(), "lesion.geojson")
    >>> _ = streamcheck.write_geojson(path, heat, like=slide, threshold=0.5, name="Tumor")
    >>> int(streamcheck.load_mask(path, like=slide).sum())       # 576 = (3 * 8) ** 2
    576
    """
    import numpy as np

    array, (sy, sx) = _map_array(values, like)
    if not 0 <= channel < array.shape[0]:
        raise StreamcheckError(
            f"streamcheck: channel={channel}; the map has {array.shape[0]} channel(s)"
        )
    values = array[channel]
    features = []
    if threshold is None:
        for i, j in zip(*np.nonzero(np.isfinite(values)), strict=True):
            y0, y1, x0, x1 = i * sy, (i + 1) * sy, j * sx, (j + 1) * sx
            ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [ring]},
                    "properties": {
                        "objectType": "tile",
                        "measurements": {name: float(values[i, j])},
                    },
                }
            )
    else:
        for polygon in _contours(values >= threshold):
            rings = [[[x * sx, y * sy] for x, y in ring] for ring in polygon]
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": rings},
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": name},
                    },
                }
            )
    path = Path(path)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _contours(inside: np.ndarray) -> list[list[list[tuple[int, int]]]]:
    """Polygons (outer ring, then its holes) whose union is exactly the True pixels' squares, as
    (x, y) vertices on the map's pixel corners (Rule EX4)."""
    import numpy as np
    from skimage.measure import points_in_poly

    padded = np.pad(inside, 1)
    r, c = np.nonzero(padded)
    r, c = r - 1, c - 1  # pixel (r, c) of the map; corners (c, r) .. (c + 1, r + 1) as (x, y)
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    # each True pixel's sides that face a False pixel, clockwise on screen (y down)
    for (dr, dc), start, end in (
        ((-1, 0), (0, 0), (1, 0)),  # top: left to right
        ((0, 1), (1, 0), (1, 1)),  # right: top to bottom
        ((1, 0), (1, 1), (0, 1)),  # bottom: right to left
        ((0, -1), (0, 1), (0, 0)),  # left: bottom to top
    ):
        facing = ~padded[r + 1 + dr, c + 1 + dc]
        for y, x in zip(r[facing].tolist(), c[facing].tolist(), strict=True):
            edges.setdefault((x + start[0], y + start[1]), []).append((x + end[0], y + end[1]))
    rings: list[list[tuple[int, int]]] = []
    while edges:
        first = next(iter(edges))
        ring, here = [first], first
        heading: tuple[int, int] | None = None
        while True:
            ends = edges[here]
            if heading is not None and len(ends) > 1:  # a pinch: turn right, keeping it simple
                came, at = heading, here
                ends.sort(key=lambda e: _turn(came, (e[0] - at[0], e[1] - at[1])))
            nxt = ends.pop(0)
            if not ends:
                del edges[here]
            heading = (nxt[0] - here[0], nxt[1] - here[1])
            here = nxt
            ring.append(here)
            if here == first:
                break
        rings.append(_straightened(ring))

    def area(ring: list[tuple[int, int]]) -> float:
        xy = np.array(ring, dtype=np.float64)
        return 0.5 * float(np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1]))

    signs = [area(ring) for ring in rings]
    outer_sign = np.sign(max(signs, key=abs)) if signs else 1.0  # the largest ring is outer
    polygons = [[ring] for ring, a in zip(rings, signs, strict=True) if np.sign(a) == outer_sign]
    for ring, a in zip(rings, signs, strict=True):
        if np.sign(a) == outer_sign:
            continue
        probe = np.array([[(ring[0][0] + ring[1][0]) / 2, (ring[0][1] + ring[1][1]) / 2]])
        owners = [p for p in polygons if points_in_poly(probe, np.array(p[0]))[0]]
        if owners:
            min(owners, key=lambda p: abs(area(p[0]))).append(ring)
    return polygons


def _turn(heading: tuple[int, int], step: tuple[int, int]) -> int:
    """0 for a right turn on screen (y down), 1 straight on, 2 left."""
    cross = heading[0] * step[1] - heading[1] * step[0]
    return 0 if cross > 0 else (1 if cross == 0 else 2)


def _straightened(ring: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ring without the vertices in the middle of straight runs (closed: last == first)."""
    kept = [
        p
        for i, p in enumerate(ring[:-1])
        if i == 0
        or (p[0] - ring[i - 1][0]) * (ring[i + 1][1] - p[1])
        != (p[1] - ring[i - 1][1]) * (ring[i + 1][0] - p[0])
    ]
    return [*kept, kept[0]]
