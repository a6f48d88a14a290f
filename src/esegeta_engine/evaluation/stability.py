"""How stable a map is: the same target explained by each ensemble member, or under input noise.

For an ensemble — nnU-Net folds, mirrored copies, any list of models — each member explains
the same target alone; the per-voxel standard deviation of the members' maps (a NIfTI) and the
mean pairwise Spearman rank correlation (of ``|map|``) say how much the explanation depends on
which member made it. Without members, ``samples`` seeded Gaussian copies of the input (the
SmoothGrad distribution, std ``noise`` x the input's range) stand in for the members.

An ensemble exposes its members through a small interface: a model with a ``members()``
method (or a ``members`` attribute) returning a sequence of modules, each callable on the same
inputs with the ensemble's output layout (:func:`members_of`). A deployed pipeline with several
kinds of members (nnU-Net: folds and mirrored copies) takes the kind, ``members(kind="folds")``
or ``members(kind="mirrors")``, and may name each member (``member_name``: ``fold 0``).
``evaluation.stability.over`` chooses (:func:`choose_members`): ``folds``, ``mirrors``,
``models`` (the config's model list beside the run's model), ``noise``, or ``auto`` (the model
list when given, else the folds when there are several, else noise). Identical members give
zero spread and correlation 1.
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

__all__ = ["choose_members", "members_of", "stability"]


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


def _members_of_kind(model: Any, kind: str) -> list[nn.Module] | None:
    """``members(kind=...)`` of ``model`` (or of the module it wraps); ``None`` when it takes no kind."""
    import inspect

    for obj in (model, getattr(model, "model", None), getattr(model, "module", None)):
        m = getattr(obj, "members", None) if obj is not None else None
        if not callable(m) or isinstance(m, nn.Module):
            continue
        try:
            takes_kind = "kind" in inspect.signature(m).parameters
        except (TypeError, ValueError):
            takes_kind = False
        if takes_kind:
            return list(m(kind=kind))
    return None


def choose_members(model: Any, over: str = "auto", models: Sequence[nn.Module] = ()) -> tuple[str, list | None]:
    """``(what the maps vary over, the members or None for input noise)`` for ``evaluation.stability.over``.

    ``models``: the config's model list (loaded), explained beside ``model``. ``folds`` /
    ``mirrors`` ask ``model.members(kind=...)`` (an nnU-Net pipeline); ``auto`` takes the model
    list when given, else the folds when there are several, else the members of a model whose
    ``members()`` takes no kind (any ensemble), else noise.

    Raises
    ------
    MethodError
        ``folds`` / ``mirrors`` asked of a model that has no such members.
    """
    from esegeta_engine.errors import MethodError

    if over == "noise":
        return "noise", None
    if over == "models" or (over == "auto" and models):
        return "models", [model, *models]
    if over in ("folds", "mirrors"):
        found = _members_of_kind(model, over)
        if found is None or len(found) < 2:
            n = 0 if found is None else len(found)
            note = getattr(getattr(model, "model", model), "members_note", None)  # why a source has none
            raise MethodError(f"stability over {over}: the model has {n} {over[:-1]} member(s), not several"
                              + (f" ({note})" if note and n == 0 else ""),
                              "use stability.over: noise (or auto), or a model with several folds")
        return over, found
    folds = _members_of_kind(model, "folds")
    if folds is not None:
        return ("folds", folds) if len(folds) >= 2 else ("noise", None)
    generic = members_of(model)
    return ("members", generic) if generic else ("noise", None)


def member_names(members: Sequence[Any]) -> list[str]:
    """Each member's ``member_name`` (``fold 0``), else its position (``member 1``)."""
    return [str(getattr(m, "member_name", None) or f"member {i}") for i, m in enumerate(members, start=1)]


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
    n = scored.n_members(c)
    return None if scored.method_evaluations is None else (c.samples if n is None else n) * scored.method_evaluations
