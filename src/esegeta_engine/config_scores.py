"""Config sections of the standard attribution scores and the stability check (``evaluation.*``).

Part of :mod:`esegeta_engine.config` (re-exported there): ROAD, region perturbation, smooth /
efficient MPRT, the energy pointing game and stability.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["EnergyPointingConfig", "MprtConfig", "RegionPerturbationConfig", "RoadConfig", "StabilityConfig"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


class RoadConfig(_Strict):
    """ROAD (Rong et al. 2022): remove the most/least relevant voxels, fill by noisy linear imputation."""

    percentages: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
                                     description="fractions of voxels removed, each in (0, 1)")
    noise: float = Field(0.01, ge=0, description="imputation noise std, as a fraction of the input's range")
    batch_size: int = Field(4, ge=1, description="perturbed copies per model evaluation")

    @field_validator("percentages")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < p < 1 for p in v):
            raise ValueError("give at least one fraction, each strictly between 0 and 1")
        return v


class RegionPerturbationConfig(_Strict):
    """Region perturbation (Samek et al. 2017): supervoxels replaced most relevant first; AOPC."""

    region: int = Field(4, ge=1, le=256, description="side of the cubic supervoxels, in voxels")
    steps: int = Field(10, ge=1, le=1000, description="supervoxels replaced (cumulatively)")
    perturbation: Literal["uniform", "zero"] = Field("uniform", description="seeded uniform noise over the "
                                                     "input's range, or zero")
    batch_size: int = Field(4, ge=1)


class MprtConfig(_Strict):
    """Smooth or efficient MPRT (Hedström et al. 2023) beside the calibrated cascading randomisation."""

    variant: Literal["smooth", "efficient"] = "smooth"
    samples: int = Field(10, ge=1, le=1000, description="smooth: noisy copies averaged per map")
    noise: float = Field(0.1, ge=0, description="smooth: noise std as a fraction of the input's range")
    n_bins: int = Field(100, ge=2, le=10000, description="efficient: histogram bins of the entropy")
    max_stages: int | None = Field(None, ge=1, description="smooth: stop after this many layers")


class EnergyPointingConfig(_Strict):
    """Energy pointing game, relevance mass and rank per ground-truth structure (needs a ground truth)."""

    min_voxels: int = Field(1, ge=1, description="ignore ground-truth structures smaller than this")
    max_components: int | None = Field(20, ge=1)


class StabilityConfig(_Strict):
    """Spread of each map over ensemble members (folds, mirrors, models) or seeded input noise."""

    samples: int = Field(4, ge=2, le=1000, description="noisy copies when the model has no members")
    noise: float = Field(0.1, ge=0, description="noise std as a fraction of the input's range")
    models: list[Path] = Field(default_factory=list, description="other models (TorchScript files) "
                               "explained as members beside the run's model")
    over: Literal["auto", "folds", "mirrors", "models", "noise"] = Field(
        "auto", description="what the maps vary over: an nnU-Net model's folds or mirrored copies, the "
        "models list, or seeded input noise; auto: the models list when given, else the folds when the "
        "model has several, else noise")

    @model_validator(mode="after")
    def _models_for_over(self) -> StabilityConfig:
        if self.over == "models" and not self.models:
            raise ValueError("stability.over 'models' needs stability.models (TorchScript files explained "
                             "beside the run's model)")
        if self.models and self.over not in ("auto", "models"):
            raise ValueError(f"stability.models is given but stability.over is {self.over!r}: use "
                             "over 'models' (or auto), or drop the list")
        return self
