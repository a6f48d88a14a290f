"""Deletion and insertion curves (Petsiuk et al., 2018) for 2D/3D targets.

A faithful map ranks the voxels the model really relies on first: replacing
them with a baseline (deletion) should make the target score fall fast, and
revealing them on the baseline (insertion) should make it rise fast. The
curves record the target score after each of ``steps`` equal fractions of
voxels, most attributed first; the areas under the normalised curves
(lower deletion / higher insertion is better) and the AOPC of deletion
(Samek et al., 2017; higher is better) summarise them.

Examples
--------
>>> import torch
>>> w = torch.rand(1, 1, 6, 6)
>>> f = lambda x: (x * w).flatten(1).sum(1, keepdim=True)
>>> x = torch.rand(1, 1, 6, 6)
>>> c = faithfulness_curves(f, x, w * x, 0, steps=4, baseline="zero")
>>> float(c.deletion_norm[0]), float(c.deletion_norm[-1])
(1.0, 0.0)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from esegeta_engine.errors import Cancelled, MethodError
from esegeta_engine.methods._common import make_baseline

__all__ = ["Curves", "faithfulness_curves", "random_baseline_curves"]

_EPS = 1e-12


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


@dataclass
class Curves:
    """Deletion and insertion curves of one map for one target.

    Attributes
    ----------
    fractions : np.ndarray
        ``(steps + 1,)`` fraction of voxels replaced (deletion) or revealed
        (insertion), from 0 to 1.
    deletion, insertion : np.ndarray
        Raw target scores at each fraction (mean over the input batch).
    deletion_norm, insertion_norm : np.ndarray
        The scores divided by the unperturbed score (per input, then
        averaged); NaN where the unperturbed score is zero.
    auc_deletion, auc_insertion : float
        Trapezoid areas under the normalised curves (deletion: lower is
        better; insertion: higher is better).
    aopc_deletion : float
        Mean over all ``steps + 1`` points of ``f(x) - f(x_k)`` on the raw
        scores (higher is better).
    score, baseline_score : float
        Target score of the unperturbed input and of the full baseline.
    target : int
        Index of the explained score column.
    baseline : str
        Kind of baseline the voxels were replaced with.
    note : str
        Why something is undefined (empty when all is well).
    """

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    deletion_norm: np.ndarray
    insertion_norm: np.ndarray
    auc_deletion: float
    auc_insertion: float
    aopc_deletion: float
    score: float
    baseline_score: float
    target: int
    baseline: str
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists for the curves, ``None`` for NaN)."""

        def clean(v: Any) -> Any:
            if isinstance(v, np.ndarray):
                return [clean(float(t)) for t in v]
            if isinstance(v, float) and not np.isfinite(v):
                return None
            return v

        keys = ("fractions", "deletion", "insertion", "deletion_norm", "insertion_norm", "auc_deletion",
                "auc_insertion", "aopc_deletion", "score", "baseline_score", "target", "baseline", "note")
        return {k: clean(getattr(self, k)) for k in keys} | dict(self.extra)


def _ranking_map(attribution: Any, inputs: torch.Tensor) -> torch.Tensor:
    """Per-input ranking map ``(N, V)`` from an attribution of several layouts."""
    n, c, *spatial = inputs.shape
    a = torch.as_tensor(np.asarray(attribution) if not torch.is_tensor(attribution) else attribution)
    a = a.detach().to(device=inputs.device, dtype=torch.float64)
    shape = tuple(a.shape)
    if shape == tuple(spatial):
        a = a.expand(n, *spatial)
    elif shape == (n, *spatial):
        pass
    elif a.dim() == inputs.dim() and shape[0] == n and shape[2:] == tuple(spatial) and shape[1] in (1, c):
        a = a.sum(1)  # channel-summed map, applied to all channels
    else:
        raise MethodError(f"attribution of shape {shape} does not fit inputs of shape {tuple(inputs.shape)}",
                          "give a map (*spatial), (N, *spatial) or (N, C, *spatial) on the input grid")
    if not torch.isfinite(a).all():
        raise MethodError("the attribution map has NaN or Inf values", "recompute the map")
    return a.reshape(n, -1)


def _ranks(a: torch.Tensor, seed: int) -> torch.Tensor:
    """Rank of each voxel (0 = most attributed); ties broken by a seeded shuffle."""
    n, v = a.shape
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.empty((n, v), dtype=torch.long, device=a.device)
    for i in range(n):
        perm = torch.randperm(v, generator=gen).to(a.device)
        order = perm[torch.argsort(-a[i, perm], stable=True)]
        ranks[i, order] = torch.arange(v, device=a.device)
    return ranks


def faithfulness_curves(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    attribution: Any,
    target: int,
    *,
    steps: int = 20,
    baseline: str = "blur",
    batch_size: int = 4,
    cancel: threading.Event | None = None,
    prepare_target: bool = True,
    seed: int = 0,
) -> Curves:
    """Deletion and insertion curves of ``attribution`` for score ``target``.

    Parameters
    ----------
    score_fn : callable
        ``x (N, C, *spatial) -> (N, K)`` scores: a
        :class:`~esegeta_engine.forward.scoring.ScoreModel` or any such callable.
    inputs : torch.Tensor
        The explained input ``(N, C, *spatial)``, 2D or 3D.
    attribution : array or tensor
        ``(*spatial)``, ``(N, *spatial)`` or ``(N, C, *spatial)``; multi-channel
        maps are summed over channels and every channel of a voxel is
        replaced together. Voxels are ranked by the signed value, descending.
    target : int
        Column of the ``(N, K)`` scores to follow.
    steps : int
        Number of equal fractions (the curves have ``steps + 1`` points).
    baseline : {"blur", "zero", "mean", "min"}
        What replaced voxels become (see :func:`~esegeta_engine.methods._common.make_baseline`).
    batch_size : int
        Perturbed inputs per model call (times ``N``).
    cancel : threading.Event, optional
        Checked before each model call; raises :class:`~esegeta_engine.errors.Cancelled`.
    prepare_target : bool
        If ``score_fn`` is a ScoreModel, freeze its target on the unperturbed
        output first (as the Explainer does), so the region does not move.
    seed : int
        Seed of the tie-breaking shuffle (for maps with equal values).

    Returns
    -------
    Curves
    """
    if steps < 1 or batch_size < 1:
        raise MethodError(f"steps={steps} and batch_size={batch_size} must be at least 1")
    inputs = inputs.detach()
    n = inputs.shape[0]
    ranks = _ranks(_ranking_map(attribution, inputs), seed)
    n_vox = ranks.shape[1]
    base = make_baseline(inputs, baseline)
    counts = [int(round(k * n_vox / steps)) for k in range(steps + 1)]

    def perturbed(kind: str, k: int) -> torch.Tensor:
        keep = (ranks < counts[k]).reshape(n, 1, *inputs.shape[2:])  # the top voxels
        if kind == "deletion":
            return torch.where(keep, base, inputs)
        return torch.where(keep, inputs, base)

    # f(x) and f(baseline) are shared by both curves; the inner points are not.
    jobs = [("deletion", 0), ("insertion", 0)] + [(kind, k) for k in range(1, steps) for kind in
                                                  ("deletion", "insertion")]

    def chunks() -> Iterator[list[tuple[str, int]]]:
        for i in range(0, len(jobs), batch_size):
            yield jobs[i: i + batch_size]

    scores: dict[tuple[str, int], np.ndarray] = {}
    with torch.no_grad():
        if prepare_target and hasattr(score_fn, "target") and hasattr(score_fn, "model_output"):
            _check(cancel)
            score_fn.target.prepare(score_fn.model_output(inputs))
        for chunk in chunks():
            _check(cancel)
            batch = torch.cat([perturbed(kind, k) for kind, k in chunk])  # input-major per copy
            out = score_fn(batch)
            if out.dim() != 2 or out.shape[0] != batch.shape[0] or not 0 <= target < out.shape[1]:
                raise MethodError(f"score function gave shape {tuple(out.shape)} for {batch.shape[0]} "
                                  f"inputs; target {target} needs (N, K) with K > {target}")
            vals = out[:, target].detach().double().cpu().numpy().reshape(len(chunk), n)
            for job, v in zip(chunk, vals):
                scores[job] = v
    f_x, f_b = scores[("deletion", 0)], scores[("insertion", 0)]
    deletion = np.stack([f_x] + [scores[("deletion", k)] for k in range(1, steps)] + [f_b])
    insertion = np.stack([f_b] + [scores[("insertion", k)] for k in range(1, steps)] + [f_x])
    return _summarise(deletion, insertion, counts, n_vox, target, baseline)


def _summarise(deletion: np.ndarray, insertion: np.ndarray, counts: list[int], n_vox: int,
               target: int, baseline: str) -> Curves:
    """Curves from raw ``(steps + 1, N)`` score arrays."""
    fractions = np.asarray(counts, dtype=np.float64) / n_vox
    f_x = deletion[0]
    ok = np.abs(f_x) > _EPS
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(ok, f_x, np.nan)
        del_norm = (deletion / scale).mean(1)
        ins_norm = (insertion / scale).mean(1)
    note = "" if ok.all() else "the unperturbed score is zero: normalised curves are undefined"
    return Curves(
        fractions=fractions, deletion=deletion.mean(1), insertion=insertion.mean(1),
        deletion_norm=del_norm, insertion_norm=ins_norm,
        auc_deletion=_trapezoid(del_norm, fractions), auc_insertion=_trapezoid(ins_norm, fractions),
        aopc_deletion=float((f_x[None] - deletion).mean()),
        score=float(f_x.mean()), baseline_score=float(deletion[-1].mean()),
        target=int(target), baseline=baseline, note=note,
    )


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled by the user")


def random_baseline_curves(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    target: int,
    *,
    seed: int = 0,
    **kwargs: Any,
) -> Curves:
    """Curves of a uniformly random attribution: the chance level to beat.

    Parameters
    ----------
    score_fn, inputs, target
        As for :func:`faithfulness_curves`.
    seed : int
        Seed of the random map (the same seed gives the same curves).
    **kwargs
        Passed on to :func:`faithfulness_curves` (steps, baseline, ...).
    """
    gen = torch.Generator().manual_seed(seed)
    n, _, *spatial = inputs.shape
    noise = torch.rand((n, *spatial), generator=gen, dtype=torch.float64)
    curves = faithfulness_curves(score_fn, inputs, noise, target, seed=seed, **kwargs)
    curves.extra["random_seed"] = seed
    return curves
