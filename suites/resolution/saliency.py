"""Saliency maps of streamed networks (paper Section 7.3, Figs 5-6) and how well they find lesions.

NOTE [ Saliency recipe ]
Rule SA1. The map is the exact input gradient of the slide's logit (Simonyan et al. 2013) through
          the streamed trunk (``image.requires_grad_()``; streamcheck's input gradient equals the
          plain module's), taken per pixel as the largest absolute value over the colour channels.
Rule SA2. Then, as the paper: a Gaussian blur whose σ scales with the input size (σ = 50 px at
          8192², 25 at 4096², 12.5 at 2048²: σ = 50 px x input_px / 8192, the same physical width
          at every resolution), capped at the 99th percentile; the upper 50th percentile is what
          an overlay shows.
Rule SA3. ``saliency_lesion_auc`` treats the processed map (Rule SA2, what a person sees) as a
          lesion-pixel detector: every full-resolution pixel of the slide takes the value of the
          map pixel that covers it, and the ROC AUC against the lesion mask is computed over all
          pixels. 0.5 is chance; a map that does not vary (all ties) scores 0.5.
Rule SA4. Lesions are never placed near the slide's border (``slides.py``), and a network's
          input gradient is weaker near the border (fewer output pixels see it), so a map that
          only knows "centre" beats 0.5. ``border_distance`` is that map, scored the same way:
          the chance level a saliency map must beat to show it has found the lesions.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from .stats import auc

PAPER_SIGMA_PX, PAPER_INPUT_PX = 50.0, 8192


def input_gradient(model: nn.Module, image: torch.Tensor) -> tuple[float, np.ndarray]:
    """(logit, |d logit / d pixel| max over channels) of one uint8 slide C x H x W (Rule SA1)."""
    dtype = next(model.parameters()).dtype
    x = image[None].to(dtype).requires_grad_()
    logit = model(x).sum()
    (grad,) = torch.autograd.grad(logit, x)
    return float(logit.detach()), grad[0].abs().amax(dim=0).numpy().astype(np.float64)


def sigma_px(input_px: int) -> float:
    """The paper's blur width scaled to ``input_px`` (Rule SA2).

    >>> sigma_px(8192), sigma_px(2048), sigma_px(512)
    (50.0, 12.5, 3.125)
    """
    return PAPER_SIGMA_PX * input_px / PAPER_INPUT_PX


def processed(saliency: np.ndarray, input_px: int) -> np.ndarray:
    """Blurred (σ scaled to ``input_px``) and capped at the 99th percentile (Rule SA2)."""
    blurred = gaussian_filter(saliency, sigma=sigma_px(input_px), mode="nearest")
    return np.minimum(blurred, np.percentile(blurred, 99))


def saliency_lesion_auc(saliency: np.ndarray, mask: np.ndarray) -> float:
    """AUC of a (processed) saliency map as a detector of the lesion pixels of ``mask`` (SA3).

    ``mask`` is at full resolution, an integer multiple of the map's size.

    >>> mask = np.zeros((8, 8), bool); mask[:2, :2] = True       # lesion in the top-left 2 x 2
    >>> saliency = np.zeros((4, 4)); saliency[0, 0] = 1.0          # 1/2 resolution map
    >>> saliency_lesion_auc(saliency, mask)
    1.0
    """
    fy, fx = mask.shape[0] // saliency.shape[0], mask.shape[1] // saliency.shape[1]
    if (saliency.shape[0] * fy, saliency.shape[1] * fx) != mask.shape:
        raise ValueError(f"mask {mask.shape} is not a multiple of the map {saliency.shape}")
    if mask.all() or not mask.any():
        raise ValueError("the mask needs lesion and non-lesion pixels")
    full = np.repeat(np.repeat(saliency, fy, axis=0), fx, axis=1)
    return auc(mask.ravel(), full.ravel())


def border_distance(shape: tuple[int, int]) -> np.ndarray:
    """Each pixel's distance to the nearest image border: the centre-only map of Rule SA4.

    >>> border_distance((3, 4)).tolist()
    [[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    """
    y = np.minimum(np.arange(shape[0]), np.arange(shape[0])[::-1])
    x = np.minimum(np.arange(shape[1]), np.arange(shape[1])[::-1])
    return np.minimum(y[:, None], x[None, :]).astype(np.float64)


def overlay_alpha(saliency: np.ndarray) -> np.ndarray:
    """Opacity of the overlay: 0 below the median, rising to 1 at the map's maximum (Rule SA2)."""
    median, top = np.percentile(saliency, 50), saliency.max()
    if top <= median:
        return np.zeros_like(saliency)
    return np.clip((saliency - median) / (top - median), 0, 1)
