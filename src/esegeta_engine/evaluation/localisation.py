"""Localisation: how well an attribution map points at a ground-truth mask.

All scores compare one map with one binary mask on the same grid (2D or 3D,
any number of axes). They answer "is the relevance where the vessels are?":

``mass_inside``
    Relevance mass accuracy (Arras et al., 2022): the share of the positive
    relevance that falls inside the mask. Chance level: ``mask_fraction``.
``rank_accuracy``
    Relevance rank accuracy (Arras et al., 2022): of the ``|mask|`` most
    relevant voxels, the fraction inside the mask. Chance: ``mask_fraction``.
``pointing_game``
    1.0 if the most relevant voxel lies in the mask (or within ``tolerance``
    voxels of it), else 0.0 (Zhang et al., 2018).
``roc_auc``
    The map as a voxel-wise detector of the mask: the probability that a
    random mask voxel scores higher than a random background voxel
    (Mann-Whitney U with average ranks for ties). Chance: 0.5.

Examples
--------
>>> import numpy as np
>>> mask = np.zeros((8, 8), bool); mask[2:4, 2:6] = True
>>> s = localisation_scores(mask.astype(float), mask)
>>> s["mass_inside"], s["rank_accuracy"], s["pointing_game"], s["roc_auc"]
(1.0, 1.0, 1.0, 1.0)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage, stats

from esegeta_engine.errors import VolumeError

__all__ = ["LOCALISATION_METRICS", "localisation_scores"]

LOCALISATION_METRICS = ("mass_inside", "rank_accuracy", "pointing_game", "roc_auc", "iou_otsu", "dice_otsu",
                        "iou_top", "dice_top", "mask_fraction")
#: Fraction of voxels kept by the top-k threshold of ``iou_top`` / ``dice_top``.
TOP_FRACTION = 0.05


def _nan_scores(mask_fraction: float, note: str) -> dict[str, Any]:
    out: dict[str, Any] = {k: float("nan") for k in LOCALISATION_METRICS}
    out["mask_fraction"] = mask_fraction
    out["note"] = note
    return out


def localisation_scores(
    attribution: np.ndarray,
    mask: np.ndarray,
    *,
    positive_only: bool = True,
    tolerance: float = 0.0,
    top_fraction: float = TOP_FRACTION,
) -> dict[str, Any]:
    """Score an attribution map against a ground-truth mask.

    Parameters
    ----------
    attribution : np.ndarray
        The map, 2D or 3D (any shape equal to ``mask``'s), finite values.
    mask : np.ndarray
        Ground truth; non-zero voxels are "inside".
    positive_only : bool
        True (default): relevance is the positive part of the signed map, and
        voxels are ranked by the signed value (negative evidence counts as
        least relevant). False: relevance and ranking use ``|attribution|``.
    tolerance : float
        Pointing game only: a hit also counts within this Euclidean distance
        (in voxels) of the mask. Default 0: the voxel must be in the mask.
    top_fraction : float
        ``iou_top`` / ``dice_top`` threshold the map at its top ``top_fraction`` of voxels
        (by relevance; ties at the cut-off included); ``iou_otsu`` / ``dice_otsu`` at Otsu's
        threshold of the relevance. Both compare the thresholded map with the mask by
        intersection over union and Dice.

    Returns
    -------
    dict
        ``mass_inside``, ``rank_accuracy``, ``pointing_game``, ``roc_auc``,
        ``mask_fraction`` (floats, NaN where undefined) and, when something is
        undefined, ``note`` (str) saying why. An empty or full mask makes all
        scores NaN. A constant map makes ``pointing_game`` and ``roc_auc`` NaN
        (no voxel stands out; the Mann-Whitney value would be 0.5), while
        ``mass_inside`` and ``rank_accuracy`` take their chance value (a
        uniform map spreads relevance evenly; ties are resolved by
        expectation). A map without positive relevance makes ``mass_inside``
        NaN. With tied maxima the pointing game is the fraction of them that hit.

    Raises
    ------
    VolumeError
        The mask and the map have different shapes, or the map is not finite.
    """
    a = np.asarray(attribution, dtype=np.float64)
    m = np.asarray(mask) != 0
    if a.shape != m.shape:
        raise VolumeError(f"mask has shape {m.shape} but the attribution map has shape {a.shape}",
                          "give a mask drawn on the same grid as the explained volume")
    if not np.isfinite(a).all():
        raise VolumeError(f"the attribution map has {int((~np.isfinite(a)).sum())} NaN or Inf value(s)",
                          "recompute the map; localisation needs finite values")
    n, n_in = a.size, int(m.sum())
    fraction = n_in / n if n else float("nan")
    if n_in == 0:
        return _nan_scores(fraction, "the mask is empty: localisation is undefined")
    if n_in == n:
        return _nan_scores(fraction, "the mask covers the whole image: localisation is undefined")

    ranked = a if positive_only else np.abs(a)
    relevance = np.clip(a, 0.0, None) if positive_only else np.abs(a)
    notes = []
    out: dict[str, Any] = {"mask_fraction": fraction}

    total = relevance.sum()
    if total > 0:
        out["mass_inside"] = float(relevance[m].sum() / total)
    else:
        out["mass_inside"] = float("nan")
        notes.append("no positive relevance: mass_inside is undefined")

    out["rank_accuracy"] = _rank_accuracy(ranked.ravel(), m.ravel(), n_in)

    lo, hi = ranked.min(), ranked.max()
    if lo == hi:
        out["pointing_game"] = float("nan")
        out["roc_auc"] = float("nan")
        notes.append("the map is constant: pointing_game and roc_auc are undefined")
    else:
        peaks = ranked == hi
        hit_zone = m if tolerance <= 0 else ndimage.distance_transform_edt(~m) <= tolerance
        out["pointing_game"] = float(hit_zone[peaks].mean())
        out["roc_auc"] = _roc_auc(ranked.ravel(), m.ravel(), n_in)
    out.update(_overlaps(relevance, m, top_fraction, notes))

    ordered = {k: out[k] for k in LOCALISATION_METRICS}
    if notes:
        ordered["note"] = "; ".join(notes)
    return ordered


def _overlap(pred: np.ndarray, m: np.ndarray, name: str) -> dict[str, float]:
    inter, union, size = int((pred & m).sum()), int((pred | m).sum()), int(pred.sum()) + int(m.sum())
    return {f"iou_{name}": inter / union if union else float("nan"),
            f"dice_{name}": 2 * inter / size if size else float("nan")}


def _overlaps(relevance: np.ndarray, m: np.ndarray, top_fraction: float, notes: list[str]) -> dict[str, float]:
    """IoU and Dice of the map thresholded by Otsu and at its top ``top_fraction`` of voxels."""
    from skimage.filters import threshold_otsu

    lo, hi = float(relevance.min()), float(relevance.max())
    if lo == hi:
        notes.append("the relevance is constant: thresholded overlaps are undefined")
        return {k: float("nan") for k in ("iou_otsu", "dice_otsu", "iou_top", "dice_top")}
    out = _overlap(relevance > threshold_otsu(relevance), m, "otsu")
    k = max(1, int(round(top_fraction * relevance.size)))
    cut = np.partition(relevance.ravel(), relevance.size - k)[relevance.size - k]  # k-th largest
    out.update(_overlap((relevance >= cut) & (relevance > 0), m, "top"))
    return out


def _rank_accuracy(values: np.ndarray, inside: np.ndarray, k: int) -> float:
    """Fraction of the top-``k`` voxels inside; ties at the cut-off by expectation."""
    threshold = np.partition(values, values.size - k)[values.size - k]  # k-th largest
    above = values > threshold
    tied = values == threshold
    n_above = int(above.sum())
    hits = float(inside[above].sum())
    # The remaining k - n_above slots are drawn uniformly from the tied voxels.
    hits += (k - n_above) * float(inside[tied].mean())
    return hits / k


def _roc_auc(values: np.ndarray, inside: np.ndarray, n_pos: int) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic (average ranks)."""
    ranks = stats.rankdata(values, method="average")
    n_neg = values.size - n_pos
    u = ranks[inside].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
