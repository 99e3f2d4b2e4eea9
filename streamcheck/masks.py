"""Background skipping: a tissue mask decides which tiles are computed at all.

NOTE [ Tissue masks ]
Rule T1. A mask is a boolean array with one axis per spatial axis of the image, of any resolution
         whose aspect ratio is the image's (within one mask pixel per axis): mask pixel ``i`` covers
         image rows ``[i * H / h, (i + 1) * H / h)``. A thumbnail-level mask of a slide fits.
Rule T2. A tile is computed when its *input* box (overlap included) touches a ``True`` mask pixel;
         otherwise it is skipped in forward (its output box stays zero, its region is not read)
         and in backward (not recomputed).
Rule T3. The contract: on computed tiles the output equals the plain module's; the gradients
         equal those of ``plain(x) * computed`` where ``computed`` (``Streamed.computed_region``)
         is 1 on the output boxes of computed tiles and 0 elsewhere. Proof: the streamed output
         *is* ``plain(x) * computed`` (zeros elsewhere), and a skipped tile's output elements get
         gradient ``dL/dy * 0``, so leaving them out of geometry Rule 7's sum changes nothing.
         Where ``plain(x)`` is inf or NaN on a skipped tile, ``plain(x) * computed`` is NaN there
         (0 * inf) while the streamed output is 0: the contract holds for finite outputs.
Rule T4. ``tissue_mask`` makes a mask from a low-resolution level with scikit-image: Otsu's
         threshold on the saturation (HSV) channel, or a fixed saturation threshold. Background in
         a bright-field slide is white or grey (low saturation), stained tissue is coloured.
Rule T5. Per-image masks. For a batch, the mask may be one per image: ``(N, *spatial)``,
         ``(N, 1, *spatial)`` or a list of N masks (each of any resolution with the image's aspect
         ratio). The tiles are shared by the batch (one tile is cut from all N images at once), so a
         tile is computed when its input box touches a True pixel of *any* image's mask, and the
         contract of Rule T3 holds with ``computed`` shared by all images: an image whose own mask
         is empty on a computed tile still gets its true output there. One mask (no batch axis)
         applies to every image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import StreamcheckError
from .geometry import Box

__all__ = ["ScaledMask", "check_aspect", "tissue_mask"]


class ScaledMask:
    """A boolean mask laid over an image of ``spatial`` pixels (Rule T1), or one mask per image of
    a batch (Rule T5): ``(N, *spatial)``, ``(N, 1, *spatial)`` or a list of N masks."""

    def __init__(self, mask: Any, spatial: Sequence[int], *, batch: int | None = None) -> None:
        spatial = tuple(int(n) for n in spatial)
        if isinstance(mask, (list, tuple)):
            masks = [_as_bool_tensor(m) for m in mask]
            per_image = True
        else:
            one = _as_bool_tensor(mask)
            per_image = one.dim() in (len(spatial) + 1, len(spatial) + 2)
            if one.dim() == len(spatial) + 2:
                if one.shape[1] != 1:
                    raise StreamcheckError(
                        f"streamcheck: mask of shape {tuple(one.shape)} has {one.shape[1]} "
                        f"channels; a per-image mask is (N, {', '.join('...' for _ in spatial)}) "
                        "or (N, 1, ...). Fix: one boolean channel, e.g. mask.any(dim=1)"
                    )
                one = one[:, 0]
            masks = list(one) if per_image else [one]
        if per_image and batch is not None and len(masks) != batch:
            raise StreamcheckError(
                f"streamcheck: {len(masks)} per-image masks for a batch of {batch} images. "
                "Fix: one mask per image, in the batch's order"
            )
        if not masks:
            raise StreamcheckError("streamcheck: an empty list of masks")
        for m in masks:
            if m.dim() != len(spatial):
                raise StreamcheckError(
                    f"streamcheck: mask of shape {tuple(m.shape)} has {m.dim()} axes; the image "
                    f"has {len(spatial)} spatial axes ({' x '.join(map(str, spatial))} px). Fix: "
                    "one mask axis per spatial axis, with a batch axis first for one mask per "
                    "image: (N, *spatial), (N, 1, *spatial) or a list"
                )
            check_aspect(tuple(m.shape), spatial, what="mask")
        self.masks = [m.cpu() for m in masks]
        self.spatial = spatial

    def touches(self, box: Box) -> bool:
        """Whether the image box ``box`` touches a True pixel of any image's mask (Rules T2, T5)."""
        return any(self.touches_image(n, box) for n in range(len(self.masks)))

    def touches_image(self, n: int, box: Box) -> bool:
        """Whether ``box`` touches a True pixel of image ``n``'s mask (Rule T2)."""
        mask = self.masks[n]
        index = tuple(
            slice(start * m // size, -(-stop * m // size))
            for (start, stop), m, size in zip(box, mask.shape, self.spatial, strict=True)
        )
        return bool(mask[index].any())


def check_aspect(sizes: Sequence[int], spatial: Sequence[int], *, what: str) -> None:
    """A mask of ``sizes`` fits an image of ``spatial`` px (Rule T1), or an error."""
    sizes = tuple(int(n) for n in sizes)
    for axis, (m, n) in enumerate(zip(sizes, spatial, strict=True)):
        if m == 0:
            raise StreamcheckError(f"streamcheck: {what} of shape {sizes} is empty")
        for other, (m2, n2) in enumerate(zip(sizes, spatial, strict=True)):
            if other != axis and abs(m - n * m2 / n2) > 1:  # Rule T1
                raise StreamcheckError(
                    f"streamcheck: {what} {' x '.join(map(str, sizes))} does not have the "
                    f"aspect ratio of the image {' x '.join(map(str, spatial))} px (scaled by "
                    f"its axis {other}, the mask's axis {axis} should be "
                    f"{n * m2 / n2:.1f}, not {m}). Fix: make the mask from this image (or a "
                    "pyramid level of it), e.g. streamcheck.tissue_mask(open_image(path, level=-1))"
                )


def _as_bool_tensor(mask: Any) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        if not (hasattr(mask, "shape") and hasattr(mask, "dtype")):
            raise StreamcheckError(
                f"streamcheck: mask must be a boolean tensor or NumPy array, got "
                f"{type(mask).__module__}.{type(mask).__name__}"
            )
        mask = torch.from_numpy(_as_numpy(mask))
    if mask.dtype != torch.bool:
        raise StreamcheckError(
            f"streamcheck: mask must be boolean, got {mask.dtype}. Fix: pass mask > 0 "
            "(or streamcheck.tissue_mask(...))"
        )
    return mask


def _as_numpy(array: Any) -> Any:
    import numpy as np

    return np.ascontiguousarray(np.asarray(array))


def tissue_mask(
    image: Any,
    *,
    threshold: float | None = None,
    min_saturation: float = 0.05,
) -> Any:
    """A boolean tissue mask of a low-resolution image (Rule T4), as a NumPy array (H, W).

    ``image`` is an image source (``open_image(path, level=-1)``: read whole, so use a small
    level), or an HWC uint8 NumPy array. Pixels whose saturation exceeds ``threshold`` are tissue;
    by default the threshold is Otsu's, but at least ``min_saturation`` (an all-white level has
    no tissue, instead of half).

    >>> import numpy as np
    >>> thumbnail = np.full((40, 60, 3), 245, dtype=np.uint8)           # white glass
    >>> thumbnail[10:30, 5:25] = (200, 90, 160)                         # one pink blob
    >>> mask = tissue_mask(thumbnail)
    >>> mask.shape, int(mask.sum())                                     # 400 = 20 * 20 px
    ((40, 60), 400)
    """
    import numpy as np
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu

    from .opening import open_image
    from .sources import ImageSource

    if not isinstance(image, ImageSource):
        image = open_image(image)
    pixels = image.read_all()[0].permute(1, 2, 0).numpy()
    if pixels.shape[2] < 3:
        raise StreamcheckError(
            f"streamcheck: tissue_mask needs an RGB image, got {pixels.shape[2]} channel(s). "
            "Fix: pass your own boolean mask"
        )
    saturation = rgb2hsv(pixels[..., :3])[..., 1]
    if threshold is None:
        spread = float(saturation.max() - saturation.min())
        threshold = float(threshold_otsu(saturation)) if spread > 0 else 1.0
        threshold = max(threshold, min_saturation)
    return np.asarray(saturation > threshold)
