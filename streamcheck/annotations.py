"""Masks from annotations: QuPath GeoJSON, ASAP XML (CAMELYON's format), a mask TIFF, an array.

NOTE [ Annotation masks ]
Rule AN1. Annotation coordinates are level-0 pixels of the slide (as QuPath and ASAP write them),
          ``x`` along the width, ``y`` along the height, pixel ``(i, j)`` of level 0 covering
          ``[j, j + 1) x [i, i + 1)``.
Rule AN2. A mask is rasterised at one level of the slide (``level=``, the smallest by default): its
          pixel ``(i, j)`` is True when its centre, ``((i + 0.5) * dy, (j + 0.5) * dx)`` in level-0
          pixels (``dy, dx`` the level's downsample), lies inside a polygon of a selected class and
          outside that polygon's holes and every excluded polygon (a centre exactly on an edge
          may fall either way: scikit-image's scan conversion decides). The result has the level's
          aspect ratio, so it lays over any level of the slide (masks Rule T1).
Rule AN3. Classes select: ``classes=`` keeps the polygons whose class (QuPath's classification
          name, ASAP's ``PartOfGroup``) is listed (``None``: all); ``exclude=`` lists classes whose
          polygons are cut out (CAMELYON's ``_2``: normal tissue inside a tumour outline). A
          selected annotation without area (a point, a line) is an error, not silently dropped.
Rule AN4. A mask TIFF (a label image, any pyramid level) is read at the smallest of its levels at
          least as tall as the slide's level asked for (the largest one if none is); a pixel is
          True where any of its channels is non-zero. Its aspect ratio is checked against the
          slide's before any pixel is read.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import StreamcheckError
from .masks import ScaledMask, check_aspect
from .opening import open_image
from .sources import ImageSource

if TYPE_CHECKING:
    import numpy as np

__all__ = ["load_mask"]

Ring = list[tuple[float, float]]  # (x, y) vertices in level-0 pixels
Shape = tuple[str | None, str, Ring, list[Ring]]  # class, geometry type, exterior, holes
AREAS = ("Polygon", "MultiPolygon", "Rectangle", "Spline")  # GeoJSON's and ASAP's types with area


def load_mask(
    annotation: Any,
    *,
    like: ImageSource,
    level: int = -1,
    classes: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> np.ndarray:
    """A boolean mask over the slide ``like`` from ``annotation`` (NOTE [ Annotation masks ]).

    ``annotation`` is a path to a QuPath GeoJSON (``.geojson``/``.json``), an ASAP XML
    (``.xml``) or a mask TIFF, or a boolean array. The mask is rasterised at ``like``'s level
    ``level`` (Rule AN2) and goes to ``Streamed`` as ``mask=`` for any level of the slide.

    >>> import json, pathlib, tempfile, numpy as np, streamcheck
    >>> slide = streamcheck.open_image(np.zeros((400, 600, 3), np.uint8))  # level 0: 400 x 600
    >>> square = {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
    ...           "geometry": {"type": "Polygon",
    ...                        "coordinates": [[[100, 50], [300, 50], [300, 250], [100, 250]]]}}
    >>> path = pathlib.Path(tempfile.mkdtemp(), "tumour.geojson")
    >>> _ = path.write_text(json.dumps({"type": "FeatureCollection", "features": [square]}))
    >>> mask = streamcheck.load_mask(path, like=slide)
    >>> mask.shape, int(mask.sum())                   # 40000 = 200 * 200 px
    ((400, 600), 40000)
    """
    import numpy as np

    if not isinstance(like, ImageSource):
        raise StreamcheckError(
            "streamcheck: load_mask(like=...) takes the slide's image source "
            "(streamcheck.open_image(path)), whose levels the mask is laid over"
        )
    spatial = (like.levels[0].height, like.levels[0].width) if like.levels else like.shape[2:]
    if not isinstance(annotation, (str, os.PathLike)):
        ScaledMask(annotation, spatial)  # checks dtype, axes and aspect ratio (masks Rule T1)
        return np.asarray(annotation)
    path = Path(annotation)
    if not path.is_file():
        raise StreamcheckError(f"streamcheck: no annotation file at {str(path)!r}")
    levels = like.levels or ()
    if not -len(levels) <= level < len(levels):
        raise StreamcheckError(
            f"streamcheck: level {level} does not exist in {like.name}'s file, which has "
            f"{len(levels)} level(s). Fix: level=0..{len(levels) - 1} (-1 is the smallest)"
        )
    target = levels[level]
    suffix = path.suffix.lower()
    if suffix in (".geojson", ".json"):
        shapes = _geojson_shapes(path)
    elif suffix == ".xml":
        shapes = _asap_shapes(path)
    else:
        return _mask_tiff(path, spatial, target.height)
    return _rasterise(
        shapes,
        (target.height, target.width),
        target.downsample,
        classes=classes,
        exclude=exclude,
        name=str(path),
    )


def _geojson_shapes(path: Path) -> list[Shape]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StreamcheckError(f"streamcheck: {str(path)!r} is not GeoJSON ({e})") from e
    features = data.get("features", [data]) if isinstance(data, dict) else data
    shapes: list[Shape] = []
    for feature in features:
        geometry = feature.get("geometry") or {}
        props = feature.get("properties") or {}
        classification = props.get("classification") or {}
        name = classification.get("name") if isinstance(classification, dict) else None
        kind = str(geometry.get("type"))
        coordinates = geometry.get("coordinates") or []
        polygons = {"Polygon": [coordinates], "MultiPolygon": coordinates}.get(kind, [[[]]])
        for rings in polygons:
            exterior, *holes = [[(float(p[0]), float(p[1])) for p in ring] for ring in rings]
            shapes.append((name, kind, exterior, holes))
    return shapes


def _asap_shapes(path: Path) -> list[Shape]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise StreamcheckError(f"streamcheck: {str(path)!r} is not ASAP XML ({e})") from e
    shapes: list[Shape] = []
    for annotation in root.iter("Annotation"):
        group = annotation.get("PartOfGroup")
        kind = annotation.get("Type", "Polygon")
        points = sorted(annotation.iter("Coordinate"), key=lambda c: int(float(c.get("Order", 0))))
        ring = [(float(c.get("X", "nan")), float(c.get("Y", "nan"))) for c in points]
        shapes.append((group, kind, ring, []))
    return shapes


def _rasterise(
    shapes: list[Shape],
    size: tuple[int, int],
    downsample: tuple[float, float],
    *,
    classes: Sequence[str] | None,
    exclude: Sequence[str],
    name: str,
) -> np.ndarray:
    """Pixel centres inside the selected polygons (Rules AN2, AN3)."""
    import numpy as np
    from skimage.draw import polygon

    mask = np.zeros(size, dtype=bool)
    cut = np.zeros(size, dtype=bool)
    dy, dx = downsample

    def fill(ring: Ring, value: bool, into: np.ndarray) -> None:
        if len(ring) < 3:
            return
        xs, ys = np.array(ring, dtype=np.float64).T
        rr, cc = polygon(ys / dy - 0.5, xs / dx - 0.5, shape=size)  # centres (Rule AN2)
        into[rr, cc] = value

    found = sorted({str(c) for c, _, _, _ in shapes})
    for cls, kind, exterior, holes in shapes:
        excluded = cls in exclude
        if not excluded and classes is not None and cls not in classes:
            continue
        if kind not in AREAS:
            raise StreamcheckError(
                f"streamcheck: {name} has a {kind} annotation of class {cls!r}, which has no area "
                f"(Rule AN3). Fix: classes=[...] to select the classes of area annotations "
                f"(classes found: {', '.join(found)})"
            )
        target = cut if excluded else mask
        one = np.zeros(size, dtype=bool)
        fill(exterior, True, one)
        for hole in holes:
            fill(hole, False, one)
        target |= one
    if classes is not None and not any(c in found for c in classes):
        raise StreamcheckError(
            f"streamcheck: none of classes {list(classes)} is in {name} (it has "
            f"{', '.join(found) or 'no annotations'})"
        )
    return mask & ~cut


def _mask_tiff(path: Path, spatial: Sequence[int], height: int) -> np.ndarray:
    """A label image at the level of Rule AN4, True where non-zero."""
    first = open_image(path, level=0, alpha="keep")
    sizes = [(lv.height, lv.width) for lv in first.levels]
    taller = [i for i, (h, _) in enumerate(sizes) if h >= height]
    chosen = max(taller, key=lambda i: -sizes[i][0]) if taller else 0
    source = open_image(path, level=chosen, alpha="keep")
    check_aspect(source.shape[2:], spatial, what=f"mask TIFF {str(path)!r}")  # before any pixel
    return (source.read_all()[0] != 0).any(dim=0).numpy()
