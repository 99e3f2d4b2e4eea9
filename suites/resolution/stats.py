"""Test AUC with bootstrap confidence intervals and paired permutation tests (paper Table 5).

NOTE [ Comparing resolutions ]
Rule C1. One set of bootstrap resamples of the test slides serves every resolution ("ensuring the
         same sampling across the different resolutions", Section 6.3); a resample holding one
         class only is redrawn. The CI is the 2.5th and 97.5th percentile of the resampled AUCs.
Rule C2. The permutation test is paired and one-sided (higher resolution better, as the paper's
         p-values): each model's scores are replaced by their within-model ranks (which leaves
         each AUC unchanged and makes the two models' scores exchangeable), then for every
         permutation each slide's pair of ranks is swapped with probability 1/2;
         p = (1 + #{AUC_high - AUC_low >= observed}) / (1 + permutations).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score


def auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC (scikit-learn).

    >>> auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    return float(roc_auc_score(np.asarray(labels), np.asarray(scores)))


def bootstrap_indices(labels: np.ndarray, *, n: int, seed: int) -> np.ndarray:
    """``n`` resamples (rows) of test-slide indices, each holding both classes (Rule C1)."""
    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []
    while len(rows) < n:
        idx = rng.integers(0, len(labels), len(labels))
        if 0 < labels[idx].sum() < len(idx):
            rows.append(idx)
    return np.stack(rows)


def bootstrap_ci(
    labels: np.ndarray, scores: np.ndarray, resamples: np.ndarray
) -> tuple[float, float]:
    """95 % percentile interval of the AUC over ``resamples`` (Rule C1)."""
    values = [auc(labels[idx], scores[idx]) for idx in resamples]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def permutation_p(
    labels: np.ndarray, high: np.ndarray, low: np.ndarray, *, n: int, seed: int
) -> tuple[float, float]:
    """(observed AUC difference high - low, one-sided p) of the paired test (Rule C2).

    >>> y = np.array([0, 1] * 20)
    >>> good, noise = y + np.linspace(0, 0.5, 40), np.random.default_rng(0).random(40)
    >>> d, p = permutation_p(y, good, noise, n=999, seed=0)
    >>> d > 0.3, p < 0.01
    (True, True)
    """
    rh, rl = rankdata(high) / len(high), rankdata(low) / len(low)
    observed = auc(labels, rh) - auc(labels, rl)
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n):
        swap = rng.random(len(labels)) < 0.5
        a, b = np.where(swap, rl, rh), np.where(swap, rh, rl)
        hits += auc(labels, a) - auc(labels, b) >= observed - 1e-12
    return observed, (1 + hits) / (1 + n)
