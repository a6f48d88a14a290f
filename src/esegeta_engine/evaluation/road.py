"""ROAD and region perturbation: faithfulness by removing what a map ranks first, in 2D and 3D.

**ROAD** (RemOve And Debias, Rong et al. 2022, ICML): the top (MoRF) or bottom (LeRF) fraction
``p`` of voxels by attribution is removed and filled by *noisy linear imputation* — each
removed voxel is the weighted mean of its neighbours (face neighbours weight 1, edge
diagonals weight 1/2: the paper's 1/6 and 1/12 in 2D), solved as one sparse linear system
with the kept voxels fixed, plus Gaussian noise (std ``noise`` x the input's range). The
imputation leaks no information about the removed mask's shape, which removal with a
constant does. Curves: target score at each ``p``; summaries: their mean (MoRF: lower is
better, LeRF: higher), normalised by the unperturbed score.

**Region perturbation** (Samek et al. 2017, "pixel flipping" on regions): the volume is cut
into cubic supervoxels of side ``region``; they are ranked by summed attribution and
replaced, most relevant first and cumulatively, by seeded uniform noise over the input's
range (or a constant baseline); AOPC = mean over steps ``k = 0..L`` of ``f(x) - f(x_k)``
(higher is better).

Both evaluate the score function the map explains (the job's score model, sliding window
included); under sliding-window execution the perturbed copies reuse the unperturbed patch
outputs and recompute only the patches a perturbation touches.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from esegeta_engine.evaluation.costs import ScoredMap, score_cost
from esegeta_engine.evaluation.faithfulness import _ranking_map

__all__ = ["noisy_linear_imputation", "region_perturbation", "road", "scores_of", "supervoxels"]


def _neighbour_offsets(nd: int) -> list[tuple[tuple[int, ...], float]]:
    """Face neighbours (weight 1) and edge diagonals (weight 1/2)."""
    out = []
    for off in itertools.product((-1, 0, 1), repeat=nd):
        nz = sum(o != 0 for o in off)
        if nz == 1:
            out.append((off, 1.0))
        elif nz == 2:
            out.append((off, 0.5))
    return out


def noisy_linear_imputation(image: np.ndarray, removed: np.ndarray, noise: float = 0.01,
                            rng: np.random.Generator | None = None) -> np.ndarray:
    """Fill ``removed`` voxels of ``image`` ``(C, *spatial)`` by neighbour means (one sparse solve).

    Each removed voxel equals the weighted mean of its in-bounds neighbours (kept or removed);
    kept voxels stay fixed. ``noise`` x (max - min) is the std of the Gaussian noise added to
    the imputed voxels (0: none).
    """
    from scipy.sparse import coo_matrix, diags
    from scipy.sparse.linalg import cg, spsolve

    removed = np.asarray(removed, dtype=bool)
    out = np.array(image, dtype=np.float64, copy=True)
    idx = np.flatnonzero(removed)
    if idx.size == 0:
        return out.astype(image.dtype)
    spatial = removed.shape
    pos = -np.ones(removed.size, dtype=np.int64)
    pos[idx] = np.arange(idx.size)
    coords = np.array(np.unravel_index(idx, spatial))  # (nd, n)
    # symmetric form: total_i x_i - sum_j(unknown) w_ij x_j = sum_j(known) w_ij x_j (SPD: every hole
    # borders a kept voxel), the row-normalised neighbour-mean equations times total_i
    rows, cols, vals = [], [], []
    total = np.zeros(idx.size)
    known: list[tuple[np.ndarray, np.ndarray, float]] = []
    for off, w in _neighbour_offsets(len(spatial)):
        nb = coords + np.array(off)[:, None]
        ok = np.all((nb >= 0) & (nb < np.array(spatial)[:, None]), axis=0)
        flat = np.ravel_multi_index(tuple(nb[:, ok]), spatial)
        total[ok] += w
        inner = pos[flat] >= 0
        src = np.flatnonzero(ok)
        rows.append(src[inner])
        cols.append(pos[flat[inner]])
        vals.append(np.full(int(inner.sum()), -w))
        known.append((src[~inner], flat[~inner], w))
    off_diag = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(idx.size, idx.size))
    a = (off_diag + diags(total)).tocsr()
    span = float(image.max() - image.min()) if image.size else 0.0
    rng = rng or np.random.default_rng(0)
    for ch in range(out.shape[0]):
        flat_img = out[ch].reshape(-1)
        b = np.zeros(idx.size)
        for src, flat, w in known:
            np.add.at(b, src, w * flat_img[flat])
        if idx.size <= 50_000:
            sol = np.atleast_1d(spsolve(a.tocsc(), b))
        else:  # large holes (real volumes): conjugate gradients, Jacobi-preconditioned
            precond = diags(1.0 / total)
            sol, _ = cg(a, b, x0=np.full(idx.size, float(flat_img[~removed.reshape(-1)].mean())),
                        rtol=1e-6, maxiter=2000, M=precond)
        if noise > 0:
            sol = sol + rng.normal(0.0, noise * span, size=sol.shape)
        flat_img[idx] = sol
    return out.astype(image.dtype)


def scores_of(score_model: Any, copies: Sequence[torch.Tensor], target: int, batch_size: int = 4) -> list[float]:
    """Target scores of input copies (no gradient), ``batch_size`` copies per model evaluation.

    Sliding-window runners get the first copy (the unperturbed input) as their base, so the
    others recompute only the patches they change.
    """
    runner = getattr(score_model, "runner", None)
    reuse = getattr(score_model, "patchwise", False) and hasattr(runner, "set_base")
    if reuse:
        runner.set_base(copies[0])
    try:
        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(copies), batch_size):
                s = score_model(torch.cat(list(copies[i:i + batch_size])))
                out.extend(float(v) for v in s[:, target])
        return out
    finally:
        if reuse:
            runner.set_base(None)


def _order(attribution: Any, inputs: torch.Tensor) -> np.ndarray:
    """Voxel indices, most attributed first (stable ties)."""
    rank = _ranking_map(attribution, inputs)[0].reshape(-1).cpu().numpy()
    return np.argsort(-rank, kind="stable")


def road(score_model: Any, inputs: torch.Tensor, attribution: Any, target: int, *,
         percentages: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), noise: float = 0.01,
         seed: int = 0, batch_size: int = 4) -> dict[str, Any]:
    """ROAD curves (MoRF and LeRF) of one map for one input ``(1, C, *spatial)``.

    Returns ``road_morf`` and ``road_lerf`` (mean normalised score over the percentages),
    the raw curves (``road_curve_morf`` / ``_lerf``), the unperturbed ``road_score`` and the
    percentages.
    """
    x = inputs[:1]
    _, c, *spatial = x.shape
    order = _order(attribution, x)
    n = order.size
    rng = np.random.default_rng(seed)
    image = x[0].detach().cpu().numpy()
    copies = [x]
    for direction in ("morf", "lerf"):
        ranked = order if direction == "morf" else order[::-1]
        for p in percentages:
            removed = np.zeros(n, dtype=bool)
            removed[ranked[: int(round(p * n))]] = True
            filled = noisy_linear_imputation(image, removed.reshape(spatial), noise, rng)
            copies.append(torch.from_numpy(filled)[None].to(x.device, x.dtype))
    s = scores_of(score_model, copies, target, batch_size)
    base, k = s[0], len(percentages)
    morf, lerf = s[1:1 + k], s[1 + k:]
    norm = base if abs(base) > 1e-12 else float("nan")
    return {"road_morf": float(np.mean(morf) / norm), "road_lerf": float(np.mean(lerf) / norm),
            "road_score": base, "road_curve_morf": morf, "road_curve_lerf": lerf,
            "road_percentages": list(percentages)}


def supervoxels(spatial: Sequence[int], region: int) -> np.ndarray:
    """Label image of cubic supervoxels of side ``region`` (the last ones cut at the border)."""
    grids = np.meshgrid(*[np.arange(s) // region for s in spatial], indexing="ij")
    per_axis = [-(-s // region) for s in spatial]
    return np.ravel_multi_index(tuple(grids), per_axis)


def region_perturbation(score_model: Any, inputs: torch.Tensor, attribution: Any, target: int, *,
                        region: int = 4, steps: int = 10, perturbation: str = "uniform", seed: int = 0,
                        batch_size: int = 4) -> dict[str, Any]:
    """Region perturbation (most relevant supervoxels first) of one input ``(1, C, *spatial)``.

    Returns ``region_aopc`` (mean of ``f(x) - f(x_k)`` over ``k = 0..steps``; higher is better),
    ``region_curve`` (the scores ``f(x_k)``) and the ranked supervoxel ids.
    """
    x = inputs[:1]
    _, c, *spatial = x.shape
    labels = supervoxels(spatial, region)
    rank = _ranking_map(attribution, x)[0].cpu().numpy()
    n_regions = int(labels.max()) + 1
    relevance = np.bincount(labels.ravel(), weights=rank.ravel(), minlength=n_regions)
    ranked = np.argsort(-relevance, kind="stable")[:steps]
    rng = np.random.default_rng(seed)
    lo, hi = float(x.min()), float(x.max())
    current = x.detach().clone()
    copies = [x]
    lab = torch.from_numpy(labels).to(x.device)
    for rid in ranked:
        inside = (lab == int(rid))
        if perturbation == "uniform":
            fill = torch.from_numpy(rng.uniform(lo, hi, size=(c, int(inside.sum())))).to(x.dtype)
        else:  # a constant baseline ("zero")
            fill = torch.zeros((c, int(inside.sum())), dtype=x.dtype)
        current = current.clone()
        current[0][:, inside] = fill.to(x.device)
        copies.append(current)
    s = scores_of(score_model, copies, target, batch_size)
    drops = [s[0] - v for v in s]
    return {"region_aopc": float(np.mean(drops)), "region_curve": s, "region_ranked": [int(r) for r in ranked],
            "region_size": region}


@score_cost("road")
def road_cost(cfg: Any, scored: ScoredMap) -> int:
    """ROAD: the unperturbed input and two curves of ``len(percentages)`` copies, ``batch_size`` a call."""
    c = cfg.road
    return 0 if c is None else math.ceil((1 + 2 * len(c.percentages)) / c.batch_size)


@score_cost("region_perturbation")
def region_perturbation_cost(cfg: Any, scored: ScoredMap) -> int:
    """Region perturbation: the unperturbed input and ``steps`` copies, ``batch_size`` a call (at most:
    a volume with fewer supervoxels than ``steps`` makes fewer)."""
    c = cfg.region_perturbation
    return 0 if c is None else math.ceil((1 + c.steps) / c.batch_size)
