"""Similarity of two attribution maps of the same grid (2D or 3D).

Used by the randomisation sanity checks (Adebayo et al. 2018, *Sanity Checks
for Saliency Maps*, NeurIPS, arXiv:1810.03292) to tell how much a map changed
when the model's weights were randomised, and usable on its own to compare two
methods. Every function returns a plain ``float`` and returns ``nan`` — never
raises — when the similarity is undefined (a constant map, non-finite values,
a grid too small for SSIM).

Examples
--------
>>> import numpy as np
>>> a = np.random.default_rng(0).normal(size=(16, 16, 16))
>>> compare_maps(a, a)
{'spearman_abs': 1.0, 'spearman_signed': 1.0, 'ssim': 1.0, 'topk_iou': 1.0}
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity

__all__ = ["compare_batch", "compare_maps", "randomisation_verdict", "spearman", "ssim", "topk_overlap"]

NAN = float("nan")


def _as_array(a: Any) -> np.ndarray:
    """Return ``a`` (numpy array or torch tensor) as a float64 numpy array."""
    if hasattr(a, "detach"):  # a torch tensor
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Both maps as arrays, or ``None`` when one is non-finite (similarity undefined)."""
    x, y = _as_array(a), _as_array(b)
    if x.shape != y.shape:
        raise ValueError(f"maps have different shapes {x.shape} and {y.shape}")
    if x.size == 0 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    return x, y


def _constant(x: np.ndarray) -> bool:
    return bool(x.max() == x.min())


def spearman(a: Any, b: Any, absolute: bool = True) -> float:
    """Spearman rank correlation of two maps over all voxels.

    Parameters
    ----------
    a, b : array_like
        Maps of the same shape (numpy arrays or torch tensors).
    absolute : bool
        Rank ``|a|`` and ``|b|`` (importance regardless of sign, as in Adebayo
        et al.) instead of the signed values.

    Returns
    -------
    float
        Correlation in [-1, 1]; ``nan`` if either map is constant or non-finite.
    """
    pair = _pair(a, b)
    if pair is None:
        return NAN
    x, y = (np.abs(v).ravel() for v in pair) if absolute else (v.ravel() for v in pair)
    if _constant(x) or _constant(y):
        return NAN
    return float(spearmanr(x, y).statistic)


def _ssim_grid(x: np.ndarray) -> tuple[int, ...]:
    """Shape of ``x`` without singleton axes (a (64, 64, 1) volume is an image)."""
    return tuple(s for s in x.shape if s > 1)


def ssim(a: Any, b: Any, win_size: int | None = None) -> float:
    """Structural similarity of two 2D or 3D maps, normalised jointly to [0, 1].

    Both maps are shifted and scaled by the same minimum and maximum (taken
    over both), so a map and a rescaled copy are *not* equal, and SSIM is
    computed with ``data_range=1`` (:func:`skimage.metrics.structural_similarity`).

    Parameters
    ----------
    a, b : array_like
        Maps of the same shape; singleton axes are dropped first.
    win_size : int, optional
        Odd side of the sliding window; by default 7, shrunk to the largest odd
        size that fits the smallest axis of small grids.

    Returns
    -------
    float
        SSIM in [-1, 1]; ``nan`` if both maps together are constant, a value is
        non-finite, or an axis is shorter than 3 voxels.
    """
    pair = _pair(a, b)
    if pair is None:
        return NAN
    x, y = pair
    grid = _ssim_grid(x)
    if len(grid) < 2 or min(grid) < 3:
        return NAN
    x, y = x.reshape(grid), y.reshape(grid)
    lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
    if hi == lo:
        return NAN
    x, y = (x - lo) / (hi - lo), (y - lo) / (hi - lo)
    win = win_size if win_size is not None else min(7, min(grid))
    if win % 2 == 0:
        win -= 1
    if win < 3 or win > min(grid):
        return NAN
    value = structural_similarity(x, y, data_range=1.0, win_size=win)
    return float(value) if math.isfinite(value) else NAN


def topk_overlap(a: Any, b: Any, k: float = 0.05) -> float:
    """Intersection over union of the top-``k`` fraction of voxels by ``|a|`` and ``|b|``.

    Parameters
    ----------
    a, b : array_like
        Maps of the same shape.
    k : float
        Fraction of voxels in each top set, in (0, 1]; at least one voxel.

    Returns
    -------
    float
        IoU in [0, 1]; ``nan`` if either ``|map|`` is constant (the top set is
        arbitrary) or non-finite.

    Raises
    ------
    ValueError
        If ``k`` is not in (0, 1].
    """
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be a fraction in (0, 1], got {k}")
    pair = _pair(a, b)
    if pair is None:
        return NAN
    x, y = (np.abs(v).ravel() for v in pair)
    if _constant(x) or _constant(y):
        return NAN
    n = max(1, int(round(k * x.size)))
    if n >= x.size:
        return 1.0
    top_a = np.argpartition(-x, n - 1)[:n]
    top_b = np.argpartition(-y, n - 1)[:n]
    inter = np.intersect1d(top_a, top_b, assume_unique=True).size
    return float(inter / (2 * n - inter))


def compare_maps(original: Any, other: Any, k: float = 0.05) -> dict[str, float]:
    """All similarity measures of ``other`` against ``original``.

    Parameters
    ----------
    original, other : array_like
        Maps of the same spatial shape (channels already reduced).
    k : float
        Fraction for :func:`topk_overlap`.

    Returns
    -------
    dict of str to float
        ``spearman_abs``, ``spearman_signed``, ``ssim``, ``topk_iou``; each
        ``nan`` where undefined.
    """
    return {
        "spearman_abs": spearman(original, other, absolute=True),
        "spearman_signed": spearman(original, other, absolute=False),
        "ssim": ssim(original, other),
        "topk_iou": topk_overlap(original, other, k),
    }


def compare_batch(original: Any, other: Any, k: float = 0.05) -> tuple[dict[str, float], float]:
    """Batch mean of :func:`compare_maps` over the first axis of ``(N, *spatial)`` maps.

    Returns
    -------
    tuple of (dict of str to float, float)
        The mean measures, and the mean ``spearman_abs`` used by
        :func:`randomisation_verdict`: 0 (changed completely) for an example
        whose non-constant map became constant, where ``spearman_abs`` is ``nan``.
    """
    original, other = _as_array(original), _as_array(other)
    per = [compare_maps(a, b, k) for a, b in zip(original, other)]
    verdict = [0.0 if math.isnan(p["spearman_abs"]) and np.ptp(a) > 0 and np.ptp(np.abs(b)) == 0
               else p["spearman_abs"] for p, a, b in zip(per, original, other)]
    return {key: float(np.mean([p[key] for p in per])) for key in per[0]}, float(np.mean(verdict))


def randomisation_verdict(values: list[float], n_stages: int, mode: str, threshold: float,
                          skip: int) -> dict[str, Any]:
    """Sanity-check verdict from the per-stage similarity ``values`` of one method.

    Parameters
    ----------
    values : list of float
        Verdict values (see :func:`compare_batch`) of the stages after ``skip``.
    n_stages : int
        Number of stages run.
    mode : {"cascading", "independent"}
        The rule is defined on cascading stages only (``passes`` is ``None`` otherwise).
    threshold : float
        The method passes when the mean is below it (the map changed enough).
    skip : int
        Number of first stages (output end) left out of ``values``.

    Returns
    -------
    dict
        ``{"passes": bool or None, "rule": str, "mean_spearman_abs": float}``;
        ``passes`` is ``None`` when no value is defined.
    """
    finite = [v for v in values if math.isfinite(v)]
    mean = float(np.mean(finite)) if finite else NAN
    if mode != "cascading":
        return {"passes": None, "mean_spearman_abs": mean,
                "rule": "no verdict in independent mode (the rule is defined on cascading stages)"}
    rule = (f"passes if the mean spearman_abs (original vs randomised map) over cascading stages "
            f"{skip + 1}..{n_stages} is < {threshold:g}; a map that became constant counts as 0; "
            "no verdict when undefined (the trained model's map is constant or failed)")
    return {"passes": bool(mean < threshold) if finite else None, "rule": rule,
            "mean_spearman_abs": mean}
