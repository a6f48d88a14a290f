"""Smooth and efficient MPRT (Hedström et al. 2023, "Sanity Checks Revisited"), 2D and 3D.

The model parameter randomisation test (Adebayo et al. 2018) asks whether a map changes when
the network's weights are randomised. Hedström et al. repair two of its weaknesses:

- **smooth MPRT** (sMPRT): explanations are de-noised before they are compared — each is the
  mean over ``samples`` copies of the input with Gaussian noise (std ``noise`` x the input's
  range; the same draws for every model state) — so shattered-gradient noise does not pass for
  a change. Score: the mean |Spearman| between the smoothed original map and the smoothed map
  of each cascading randomisation stage (output end first); lower is better.
- **efficient MPRT** (eMPRT): only two model states, the original and the fully randomised
  network; score: the relative rise in explanation complexity, the discrete entropy of the
  map's histogram (``n_bins`` equal bins over its range) after randomisation divided by before;
  higher is better (a map that tracks the weights turns noisy).

Both take an ``explain(model, x) -> map`` callable (the job's method on a score model built by
the one factory, so the map is evaluated on the execution it was made with) and the model
states to compare, so the calibrated cascading randomisation and these scores share the
randomised copies' construction (:func:`~esegeta_engine.evaluation.randomisation.randomised_copies`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from esegeta_engine.evaluation.costs import ScoredMap, score_cost
from esegeta_engine.evaluation.similarity import spearman

__all__ = ["discrete_entropy", "efficient_mprt", "smooth_mprt", "smoothed"]

Explain = Callable[[nn.Module, torch.Tensor], np.ndarray]


def discrete_entropy(a: Any, n_bins: int = 100) -> float:
    """Shannon entropy (nats) of the histogram of ``a``'s values in ``n_bins`` equal bins."""
    v = np.asarray(a, dtype=np.float64).ravel()
    counts, _ = np.histogram(v, bins=n_bins)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def smoothed(explain: Explain, model: nn.Module, x: torch.Tensor, samples: int, noise: float,
             seed: int) -> np.ndarray:
    """Mean map over ``samples`` noisy copies of ``x`` (draws from ``numpy.random.default_rng(seed)``)."""
    rng = np.random.default_rng(seed)
    sigma = noise * float(x.max() - x.min())
    total = None
    for _ in range(samples):
        eps = torch.from_numpy(rng.normal(0.0, sigma, size=tuple(x.shape))).to(x.device, x.dtype)
        m = np.asarray(explain(model, x + eps), dtype=np.float64)
        total = m if total is None else total + m
    assert total is not None
    return total / samples


def smooth_mprt(explain: Explain, model: nn.Module, stages: Iterable[tuple[str, nn.Module]], x: torch.Tensor, *,
                samples: int = 10, noise: float = 0.1, seed: int = 0) -> dict[str, Any]:
    """Smooth MPRT: |Spearman| of smoothed original and smoothed randomised maps per stage.

    Returns ``mprt_smooth`` (mean over stages; lower is better) and ``mprt_smooth_stages``
    (``{stage name: |Spearman|}``).
    """
    original = smoothed(explain, model, x, samples, noise, seed)
    per_stage = {}
    for name, copy in stages:
        per_stage[name] = spearman(original, smoothed(explain, copy, x, samples, noise, seed), absolute=True)
    values = [v for v in per_stage.values() if np.isfinite(v)]
    return {"mprt_smooth": float(np.mean(values)) if values else float("nan"), "mprt_smooth_stages": per_stage}


def efficient_mprt(explain: Explain, model: nn.Module, randomised: nn.Module, x: torch.Tensor, *,
                   n_bins: int = 100) -> dict[str, Any]:
    """Efficient MPRT: entropy of the fully randomised model's map over the original's.

    Returns ``mprt_efficient`` (higher is better) and both entropies.
    """
    h0 = discrete_entropy(explain(model, x), n_bins)
    h1 = discrete_entropy(explain(randomised, x), n_bins)
    return {"mprt_efficient": h1 / h0 if h0 > 0 else float("nan"), "mprt_entropy_original": h0,
            "mprt_entropy_randomised": h1}


@score_cost("mprt")
def mprt_cost(cfg: Any, scored: ScoredMap) -> int | None:
    """Re-runs of the method: 2 (efficient), ``samples`` x (1 + stages) (smooth; stages: the
    parameterised layers, at most ``max_stages``)."""
    c = cfg.mprt
    if c is None:
        return 0
    if c.variant == "efficient":
        reruns: int | None = 2
    else:
        stages = scored.n_stages()
        reruns = None if stages is None else c.samples * (1 + min(stages, c.max_stages or stages))
    return None if reruns is None or scored.method_evaluations is None else reruns * scored.method_evaluations
