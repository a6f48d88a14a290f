"""How stable a map is: the same target explained by each ensemble member, or under input noise.

For an ensemble — nnU-Net folds, mirrored copies, any list of models — each member explains
the same target alone; the per-voxel standard deviation of the members' maps (a NIfTI) and the
mean pairwise Spearman rank correlation (of ``|map|``) say how much the explanation depends on
which member made it. Without members, ``samples`` seeded Gaussian copies of the input (the
SmoothGrad distribution, std ``noise`` x the input's range) stand in for the members.

An ensemble exposes its members through a small interface: a model with a ``members()``
method (or a ``members`` attribute) returning a sequence of modules, each callable on the same
inputs with the ensemble's output layout (:func:`members_of`). Identical members give zero
spread and correlation 1.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from esegeta_engine.evaluation.costs import ScoredMap, score_cost
from esegeta_engine.evaluation.similarity import spearman

__all__ = ["members_of", "stability"]


def members_of(model: Any) -> list[nn.Module] | None:
    """The ensemble members of ``model`` (``members()`` or ``members``), or ``None``."""
    for obj in (model, getattr(model, "model", None), getattr(model, "module", None)):
        if obj is None:
            continue
        m = getattr(obj, "members", None)
        if m is None:
            continue
        m = m() if callable(m) and not isinstance(m, nn.Module) else m
        if isinstance(m, nn.Module) and not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        members = list(m)
        if len(members) >= 2:
            return members
    return None


def stability(explain: Callable[[nn.Module, torch.Tensor], np.ndarray], model: nn.Module, x: torch.Tensor,
              members: Sequence[nn.Module] | None = None, *, samples: int = 4, noise: float = 0.1,
              seed: int = 0) -> dict[str, Any]:
    """Spread of the maps of one target over ensemble members (or seeded input noise).

    Returns ``stability_std_mean`` (mean per-voxel std), ``stability_spearman`` (mean pairwise
    |Spearman|), ``stability_source`` ("members" or "input noise"), ``stability_n`` and, under
    ``_stability_std``, the per-voxel std map ``(N, *spatial)`` (model grid).
    """
    maps = []
    if members:
        source = "members"
        for m in members:
            maps.append(np.asarray(explain(m, x), dtype=np.float64))
    else:
        source = "input noise"
        rng = np.random.default_rng(seed)
        sigma = noise * float(x.max() - x.min())
        for _ in range(samples):
            eps = torch.from_numpy(rng.normal(0.0, sigma, size=tuple(x.shape))).to(x.device, x.dtype)
            maps.append(np.asarray(explain(model, x + eps), dtype=np.float64))
    stack = np.stack(maps)
    std = stack.std(axis=0)
    pairs = [spearman(a, b, absolute=True) for a, b in itertools.combinations(maps, 2)]
    finite = [p for p in pairs if np.isfinite(p)]
    if not finite and pairs and float(std.max()) == 0.0:
        finite = [1.0]  # identical (constant) maps: perfectly stable
    return {"stability_std_mean": float(std.mean()), "stability_spearman": float(np.mean(finite)) if finite
            else float("nan"), "stability_source": source, "stability_n": len(maps), "_stability_std": std}


@score_cost("stability")
def stability_cost(cfg: Any, scored: ScoredMap) -> int | None:
    """One re-run of the method per member (or per noisy input)."""
    c = cfg.stability
    if c is None:
        return 0
    n = scored.n_members(c) or c.samples
    return None if scored.method_evaluations is None else n * scored.method_evaluations
