"""Evaluation of attribution maps: faithfulness/robustness metrics, map
similarity and model-randomisation sanity checks, localisation against a
ground-truth mask, deletion/insertion curves, figures and the HTML report."""

from __future__ import annotations

from esegeta_engine.evaluation.faithfulness import Curves, faithfulness_curves, random_baseline_curves
from esegeta_engine.evaluation.figures import (
    comparison_grid,
    curves_figure,
    mip_figure,
    montage_figure,
    randomisation_strip,
)
from esegeta_engine.evaluation.localisation import LOCALISATION_METRICS, localisation_scores
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
from esegeta_engine.evaluation.report import build_report_from_run, write_report
from esegeta_engine.evaluation.similarity import compare_maps, spearman, ssim, topk_overlap

__all__ = [
    "Curves",
    "LOCALISATION_METRICS",
    "build_report_from_run",
    "comparison_grid",
    "curves_figure",
    "faithfulness_curves",
    "localisation_scores",
    "mip_figure",
    "montage_figure",
    "random_baseline_curves",
    "randomisation_strip",
    "write_report",
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
