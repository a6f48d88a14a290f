"""Evaluation of attribution maps: faithfulness/robustness metrics, map
similarity and model-randomisation sanity checks."""

from __future__ import annotations

from esegeta_engine.evaluation.metrics import (
    gaussian_perturbation,
    infidelity_score,
    sensitivity_score,
    uniform_perturbation,
)
from esegeta_engine.evaluation.randomisation import (
    RandomisationResult,
    execution_order,
    randomised_copies,
    run_randomisation,
)
from esegeta_engine.evaluation.similarity import compare_maps, spearman, ssim, topk_overlap

__all__ = [
    "RandomisationResult",
    "compare_maps",
    "execution_order",
    "gaussian_perturbation",
    "infidelity_score",
    "randomised_copies",
    "run_randomisation",
    "sensitivity_score",
    "spearman",
    "ssim",
    "topk_overlap",
    "uniform_perturbation",
]
