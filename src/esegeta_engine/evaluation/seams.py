"""Patch seams of sliding-window maps: where the patch borders are, and how strongly a map shows them.

A sliding-window map is the gradient (or perturbation effect) of the deployed function, which
zero-pads every patch at its border and blends overlapping patches with their weights; a map can
therefore show the patch grid. That is the function's, not an artefact of the method (the maps
equal autograd through MONAI's sliding window). This module measures it:

* :func:`border_planes` — per axis, the interior planes where a patch starts or ends, from the
  same patch positions MONAI's ``dense_patch_slices`` gives the window (volume edges excluded);
* :func:`seam_strength` — per axis, the mean |attribution| on those planes over the median
  plane's (1.0: no seam; the issue measured 1.8 / 2.5 / 3.0 on a whole-brain guided-backprop map);
* :func:`patch_grid` — a mask of the border planes, for a "patch grid" overlay.

Arrays are in the model's axis order (what the window slides over).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["border_planes", "patch_grid", "seam_strength"]


def border_planes(shape: Sequence[int], patch: Sequence[int], overlap: float) -> list[list[int]]:
    """Per axis, the sorted interior plane indices where a patch begins or ends."""
    from monai.data.utils import dense_patch_slices

    shape = tuple(int(s) for s in shape)
    roi = tuple(min(int(p), s) for p, s in zip(patch, shape))
    interval = tuple(r if r == s else max(int(r * (1 - overlap)), 1) for r, s in zip(roi, shape))
    planes: list[set[int]] = [set() for _ in shape]
    for sl in dense_patch_slices(shape, roi, interval):
        for k, s in enumerate(sl):
            for p in (s.start, s.stop - 1):
                if 0 < p < shape[k] - 1:
                    planes[k].add(int(p))
    return [sorted(p) for p in planes]


def seam_strength(attribution: np.ndarray, patch: Sequence[int], overlap: float) -> dict[str, float]:
    """Mean |map| on patch-border planes over the median plane's, per axis (``x``, ``y``, ``z`` of the
    model grid; NaN where the window has no interior border on that axis or the map is zero)."""
    a = np.abs(np.asarray(attribution, dtype=np.float64))
    out = {}
    for k, planes in enumerate(border_planes(a.shape, patch, overlap)):
        profile = a.mean(axis=tuple(i for i in range(a.ndim) if i != k))
        median = float(np.median(profile))
        out["xyz"[k]] = float(profile[planes].mean() / median) if planes and median > 0 else float("nan")
    return out


def patch_grid(shape: Sequence[int], patch: Sequence[int], overlap: float) -> np.ndarray:
    """A boolean mask of ``shape`` that is True on every interior patch-border plane."""
    mask = np.zeros(tuple(int(s) for s in shape), dtype=bool)
    for k, planes in enumerate(border_planes(shape, patch, overlap)):
        index = [slice(None)] * mask.ndim
        index[k] = planes
        mask[tuple(index)] = True
    return mask
