"""Calibrating the randomisation check: a null, the target footprint, verdicts with reasons.

Two things make a raw rank correlation between a trained model's map and a randomised
model's map hard to read (Adebayo et al. 2018 use it with a fixed threshold):

* **The target's footprint.** The explained score is a sum over a region frozen from the
  trained model's prediction. The gradient of *any* network's sum over a thin region is
  large near that region, so maps of unrelated (randomised) networks share its shape and
  rank-correlate strongly (Spearman 0.86-0.90 for two random networks on the sample U-Net's
  vessel class). :func:`footprint_spearman` removes it: it ranks ``|map|`` over the voxels,
  regresses the ranks on step functions (quantile bins) of the region blurred at a few
  scales, plus the region itself and an intercept (least squares), and correlates the
  residuals — a *partial* Spearman correlation given the footprint.
* **What "similar" means for this method and input.** :func:`null_seeds` seeds two
  independent *full* randomisations of the model (every parameterised layer
  re-initialised); the similarity of the method's maps on those two networks is the null:
  how alike maps are when no learned weight is shared. A method whose maps agree even then
  does not depend on the weights (a map equal to the input has null 1).

:func:`calibrated_verdict` combines them into ``pass`` / ``fail`` / ``no verdict`` and
says why, for every method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from scipy.stats import rankdata

__all__ = ["FOOTPRINT_SIGMAS", "calibrated_verdict", "FOOTPRINT_BINS", "footprint_design", "footprint_spearman",
           "null_seeds", "target_region"]

#: Blur scales (voxels) of the region whose ranks are regressed out.
FOOTPRINT_SIGMAS = (1.0, 2.0, 4.0, 8.0)
#: Quantile bins of each blurred region (the step function regressed out).
FOOTPRINT_BINS = 16


def null_seeds(seed: int) -> tuple[int, int]:
    """Seeds of the two fully randomised networks of the null (disjoint from stage seeds,
    which are ``seed * 1_000_003 + position``)."""
    base = (int(seed) * 1_000_003 + 500_009) % 2**62
    return base, (base + 250_013) % 2**62


def target_region(target: Any, cls: int, spatial: Sequence[int]) -> np.ndarray | None:
    """The voxels the explained score sums over, ``(N, *spatial)`` bool, or ``None``.

    Argmax (frozen) region of class ``cls``, Otsu foreground/background, an ROI mask or a
    voxel; ``None`` for classification targets or a region not on the input grid.
    """
    region = None
    if getattr(target, "region", None) is not None and target.region.numel():
        # ArgmaxRegionTarget: its labels may be uint8, where a class out of range would wrap onto another
        region = target.region.long() == cls if cls < 0 or cls > 255 else target.region == cls
    elif isinstance(getattr(target, "foreground", None), torch.Tensor) and target.foreground.numel():
        region = target.foreground.bool() if cls == 1 else ~target.foreground.bool()  # Otsu
    elif isinstance(getattr(target, "mask", None), torch.Tensor) and target.mask.numel():
        region = target.mask != 0  # region of interest
        region = region[:, 0] if region.dim() == len(spatial) + 2 else region
    elif getattr(target, "index", None) is not None:
        idx = tuple(int(i) for i in target.index)
        region = torch.zeros(tuple(spatial), dtype=torch.bool)
        if len(idx) == len(spatial) and all(0 <= i < s for i, s in zip(idx, spatial)):
            region[idx] = True
    if region is None:
        return None
    arr = region.detach().cpu().numpy().astype(bool)
    if arr.ndim == len(spatial):
        arr = arr[None]
    if tuple(arr.shape[1:]) != tuple(spatial):
        return None
    return arr


def footprint_design(region: np.ndarray, sigmas: Sequence[float] = FOOTPRINT_SIGMAS,
                     bins: int = FOOTPRINT_BINS, check: Callable[[], None] | None = None) -> np.ndarray:
    """Orthonormal basis ``(voxels, k)`` of the footprint regressors.

    The regressors are an intercept, the region, and for each blur scale ``sigma`` the
    indicators of ``bins`` quantile bins of the blurred region (a step function of it, so
    any monotone or non-monotone dependence of the map's ranks on the blurred region is
    removed, not only a linear one). Projecting onto this basis is the least-squares fit.
    ``check`` (the run's cancel) is called between the steps.
    """
    check = check or (lambda: None)
    r = region.astype(np.float64)
    whiches = []
    for s in sigmas:
        check()
        ranks = rankdata(gaussian_filter(r, s, mode="nearest").ravel(), method="min")
        edges = np.unique(np.quantile(ranks, np.linspace(0, 1, bins + 1)[1:-1]))
        whiches.append(np.searchsorted(edges, ranks, side="right"))

    def columns(rows: np.ndarray | slice) -> np.ndarray:
        flat = r.ravel()[rows]
        cols = [np.ones(flat.size), flat]
        for which in whiches:
            cols += [(which[rows] == k).astype(np.float64) for k in range(1, int(which.max()) + 1)]
        return np.stack(cols, axis=1)

    if not np.isin(r, (0.0, 1.0)).all():  # a non-binary region: every voxel's row
        u, sv, _ = np.linalg.svd(columns(slice(None)), full_matrices=False)
        return u[:, _kept(sv)]
    # A voxel's row depends only on (region, bin at each scale). With W the count of each distinct row U,
    # A = P U (P: voxel -> its row) and A^T A = U^T W U, so if W^1/2 U = L S V^T, then A = (P W^-1/2 L) S V^T
    # and P W^-1/2 L has orthonormal columns: the basis comes from the SVD of the few distinct rows
    # (milliseconds, where a QR of every voxel's row took seconds of LAPACK that Cancel could not stop).
    # The SVD also finds the rank where the bins of two scales coincide (collinear regressors).
    code = r.ravel().astype(np.int64)
    for which in whiches:
        code = code * (bins + 1) + which
    _, first, inverse, counts = np.unique(code, return_index=True, return_inverse=True, return_counts=True)
    weight = np.sqrt(counts.astype(np.float64))[:, None]
    check()
    u, sv, _ = np.linalg.svd(weight * columns(first), full_matrices=False)
    return (u[:, _kept(sv)] / weight)[inverse.ravel()]


def _kept(sv: np.ndarray) -> np.ndarray:
    """Singular values that carry a direction (numpy's ``matrix_rank`` tolerance)."""
    return sv > sv.max(initial=0.0) * max(sv.size, 1) * 8 * np.finfo(np.float64).eps


def _standard(v: np.ndarray) -> np.ndarray:
    sd = v.std()
    return (v - v.mean()) / sd if sd > 0 else np.zeros_like(v)


def _residual(values: np.ndarray, design: np.ndarray) -> np.ndarray:
    y = _standard(rankdata(np.abs(values).ravel()))
    return y - design @ (design.T @ y)


def footprint_spearman(a: np.ndarray, b: np.ndarray, design: np.ndarray) -> float:
    """Partial Spearman correlation of ``|a|`` and ``|b|`` given the footprint ``design``.

    Returns ``nan`` when a map is non-finite or constant, or a residual vanishes (the map is
    a function of the footprint alone).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or np.ptp(np.abs(a)) == 0 or np.ptp(np.abs(b)) == 0:
        return math.nan
    ra, rb = _residual(a, design), _residual(b, design)
    na, nb = float(np.linalg.norm(ra)), float(np.linalg.norm(rb))
    if na < 1e-9 * math.sqrt(ra.size) or nb < 1e-9 * math.sqrt(rb.size):
        return math.nan
    return float(ra @ rb / (na * nb))


def calibrated_verdict(values: Sequence[float], null: float, *, measure: str, threshold: float,
                       stages: Sequence[int], constant: bool, failed: int = 0,
                       mode: str = "cascading") -> dict[str, Any]:
    """Verdict and its reason for one method.

    Parameters
    ----------
    values : sequence of float
        The ``measure`` (original vs randomised map) at each verdict stage (``nan``: undefined).
    null : float
        The same measure between the maps of two independently, fully randomised networks.
    measure : str
        ``spearman_footprint`` (footprint removed) or ``spearman_abs``.
    threshold : float
        A map passes when its mean similarity over the verdict stages is below this *and*
        the null is below it (maps depend on the weights at all).
    stages : sequence of int
        Stage numbers the values belong to (for the reason).
    constant : bool
        The trained model's map is constant (no ranks: nothing to compare).
    failed : int
        Verdict stages whose run failed or whose map was not finite.
    mode : {"cascading", "independent"}
        Cascading: the first third of stages is left out by the caller; independent: all.

    Returns
    -------
    dict
        ``passes`` (bool or ``None``), ``verdict`` (``pass``, ``fail``, ``no verdict``),
        ``reason`` (one sentence), ``rule``, ``mean_similarity``, ``null``, ``margin``
        (mean similarity minus null), ``measure``.
    """
    span = f"stages {stages[0]}..{stages[-1]}" if stages else "no stage"
    rule = (f"pass if the mean {measure} (trained vs randomised map, {mode} {span}) is below {threshold:g} "
            f"and two independently randomised networks' maps are also below it (null); "
            "a map that became constant counts as 0")
    finite = [v for v in values if math.isfinite(v)]
    mean = float(np.mean(finite)) if finite else math.nan
    margin = mean - null if math.isfinite(null) and finite else math.nan
    out = {"measure": measure, "rule": rule, "mean_similarity": mean, "null": null, "margin": margin}

    def done(passes: bool | None, reason: str) -> dict[str, Any]:
        return {**out, "passes": passes, "verdict": {True: "pass", False: "fail"}.get(passes, "no verdict"),
                "reason": reason}

    if constant:
        return done(None, "map is constant: no verdict (nothing to rank)")
    if not finite:
        why = f"{failed} stage(s) failed or gave non-finite maps" if failed else "no similarity is defined"
        return done(None, f"no verdict: {why}")
    note = f" ({failed} stage(s) undefined, left out)" if failed else ""
    if math.isfinite(null) and null >= threshold:
        return done(False, f"fail: maps of two independently randomised networks agree ({measure} {null:.2f} "
                           f">= {threshold:g}), so the map does not depend on the learned weights{note}")
    null_text = f"null {null:.2f}, margin {margin:+.2f}" if math.isfinite(null) else "null undefined"
    if mean < threshold:
        return done(True, f"pass: mean {measure} {mean:.2f} < {threshold:g} ({null_text}): the map "
                          f"changes when the weights are randomised{note}")
    return done(False, f"fail: mean {measure} {mean:.2f} >= {threshold:g} ({null_text}): the map stays "
                       f"close to the trained model's after randomisation{note}")
