"""The per-map checks of the ``evaluation`` section: infidelity, sensitivity, faithfulness curves,
localisation, randomisation, axioms and class contrast (re-exported by :mod:`esegeta_engine.config`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AxiomConfig", "ClassContrastConfig", "FaithfulnessConfig", "InfidelityConfig", "LocalisationConfig",
           "RandomisationConfig", "SensitivityConfig"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


class InfidelityConfig(_Strict):
    """Infidelity (Yeh et al. 2019) through captum.metrics, with the explained target."""

    n_perturb_samples: int = Field(16, ge=1, le=10000)
    noise_scale: float = Field(0.05, gt=0, description="std of the Gaussian perturbation (normalised units)")
    max_examples_per_batch: int | None = Field(None, ge=1, description="bound memory on large volumes")


class SensitivityConfig(_Strict):
    """Max-sensitivity (Yeh et al. 2019): how much the map changes under small input noise."""

    n_perturb_samples: int = Field(8, ge=1, le=1000)
    perturb_radius: float = Field(0.02, gt=0)
    max_examples_per_batch: int | None = Field(None, ge=1)


class FaithfulnessConfig(_Strict):
    """Deletion/insertion curves (Petsiuk et al. 2018), AUC and AOPC."""

    steps: int = Field(20, ge=2, le=1000)
    baseline: Literal["zero", "min", "mean", "blur"] = "blur"
    batch_size: int = Field(4, ge=1)


class LocalisationConfig(_Strict):
    """Attribution vs a ground-truth mask on the volume's grid."""

    mask: Path = Field(description="NIfTI mask (non-zero = structure), e.g. the vessel ground truth")


class RandomisationConfig(_Strict):
    """Model-parameter randomisation sanity check (Adebayo et al. 2018)."""

    mode: Literal["cascading", "independent", "both"] = "cascading"
    methods: list[str] | None = Field(None, description="method names of this run; default all")
    max_stages: int | None = Field(None, ge=1, description="stop after this many layers")
    threshold: float = Field(0.5, gt=0, le=1, description="pass if the mean similarity to the original "
                             "(and the null) is below")
    calibrate: bool = Field(True, description="null: the method on two independently, fully randomised "
                            "networks (two extra runs per method)")
    footprint: bool = Field(True, description="regress the target region's footprint out of the ranks "
                            "(partial Spearman) before the verdict")


class AxiomConfig(_Strict):
    """Completeness check of every map whose method promises it (two model evaluations)."""

    threshold: float | None = Field(None, gt=0, description="relative error that warns; default 5% "
                                    "(25% for Gradient SHAP, which holds only in expectation)")


class ClassContrastConfig(_Strict):
    """Re-run each method for another class; flag maps that do not change with the class."""

    other_class: int | None = Field(None, ge=0, description="contrast class; default a seeded random other class")
    threshold: float = Field(0.9, gt=0, le=1, description="flag when |Spearman| of the two maps is at least this")
