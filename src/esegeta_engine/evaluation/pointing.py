"""Localisation per structure: energy-based pointing game, relevance mass and rank per component.

A ground truth with several structures (vessel segments, lesions) is split into its connected
components (26-connectivity in 3D, 8 in 2D); for each, and for the whole mask:

``energy_pointing``
    Energy-based pointing game (Wang et al. 2020, Score-CAM): the share of the map's positive
    energy inside the structure's bounding box. Chance: the box's share of the volume.
``mass_inside``
    Relevance mass accuracy (Arras et al. 2022): the share of positive relevance inside the
    structure itself.
``rank_accuracy``
    Relevance rank accuracy (Arras et al. 2022): of the ``|structure|`` most relevant voxels,
    the fraction inside it.

Examples
--------
>>> import numpy as np
>>> gt = np.zeros((8, 8), bool); gt[1:3, 1:3] = True; gt[5:7, 5:7] = True
>>> m = np.zeros((8, 8)); m[1:3, 1:3] = 1.0
>>> s = pointing_scores(m, gt)
>>> s["energy_pointing"], [c["mass_inside"] for c in s["components"]]
(1.0, [1.0, 0.0])
"""

from __future__ import annotations

from typing import Any

import numpy as np

from esegeta_engine.evaluation.costs import ScoredMap, score_cost
from esegeta_engine.evaluation.localisation import _rank_accuracy

__all__ = ["POINTING_METRICS", "pointing_scores"]

POINTING_METRICS = ("energy_pointing",)


def _box(mask: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask)
    box = np.zeros_like(mask, dtype=bool)
    if idx.size:
        box[tuple(slice(lo, hi + 1) for lo, hi in zip(idx.min(0), idx.max(0)))] = True
    return box


def _scores(values: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    pos = np.clip(values, 0, None)
    total = float(pos.sum())
    nan = float("nan")
    k = int(mask.sum())
    return {"energy_pointing": float(pos[_box(mask)].sum()) / total if total > 0 else nan,
            "mass_inside": float(pos[mask].sum()) / total if total > 0 else nan,
            "rank_accuracy": _rank_accuracy(values.ravel(), mask.ravel(), k) if 0 < k < values.size else nan,
            "voxels": k}


def pointing_scores(attribution: Any, ground_truth: Any, *, min_voxels: int = 1,
                    max_components: int | None = 20) -> dict[str, Any]:
    """Energy pointing for the whole ground truth and all three scores per component (largest first).

    ``attribution`` and ``ground_truth`` share one grid (NIfTI order; a map with a trailing
    channel axis is summed over it).
    """
    from esegeta_engine.regions import connected_components

    gt = np.asarray(ground_truth) != 0
    a = np.asarray(attribution, dtype=np.float64)
    if a.ndim == gt.ndim + 1:
        a = a.sum(-1)
    if a.shape != gt.shape:
        raise ValueError(f"map {a.shape} and ground truth {gt.shape} are not on one grid")
    whole = _scores(a, gt) if gt.any() else {"energy_pointing": float("nan")}
    comps = []
    for i, m in enumerate(connected_components(gt, min_voxels, max_components), start=1):
        centroid = np.argwhere(m).mean(0)
        comps.append({"component": i, **_scores(a, m), "centroid_voxel": [round(float(v), 2) for v in centroid]})
    return {"energy_pointing": whole["energy_pointing"], "components": comps}


@score_cost("energy_pointing")
def pointing_cost(cfg: Any, scored: ScoredMap) -> int:
    """None: the pointing scores read the map and the ground truth, never the model."""
    return 0
