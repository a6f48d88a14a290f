"""Evaluation of attribution maps: axiom (completeness) checks, faithfulness/robustness
metrics, map similarity and calibrated model-randomisation sanity checks, class contrast,
localisation against a ground-truth mask, deletion/insertion curves, figures and the
HTML/PDF report. Front ends call :mod:`esegeta_engine.evaluation.api`."""

from __future__ import annotations

from esegeta_engine.evaluation.axioms import completeness_check
from esegeta_engine.evaluation.calibration import calibrated_verdict, footprint_spearman, null_seeds
from esegeta_engine.evaluation.contrast import class_contrast
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
    "calibrated_verdict",
    "class_contrast",
    "completeness_check",
    "footprint_spearman",
    "null_seeds",
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
