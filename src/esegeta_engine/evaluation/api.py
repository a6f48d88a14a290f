"""One evaluation API for every front end: the CLI pipeline and the napari Evaluate panel.

Both build their evaluation settings with :func:`evaluation_config` (one set of defaults:
the fields of :class:`~esegeta_engine.config.EvaluationConfig` and its sub-models, listed
by :func:`default_settings`), score a map with :func:`evaluate_map` / the evaluators of
:func:`~esegeta_engine.evaluation.evaluators.make_evaluators`, and localisation with
:func:`localisation_metrics`. The same map, settings and seed give the same numbers in
both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from esegeta_engine.config import (
    AxiomConfig,
    ClassContrastConfig,
    EvaluationConfig,
    FaithfulnessConfig,
    InfidelityConfig,
    RandomisationConfig,
    SensitivityConfig,
)
from esegeta_engine.errors import Cancelled
from esegeta_engine.explain import Job
from esegeta_engine.methods import MethodContext

__all__ = ["METRIC_KEYS", "MapEvaluation", "default_settings", "evaluate_map", "evaluation_config",
           "localisation_metrics"]

#: Keys each evaluator adds (set to NaN with a note when it fails).
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "axioms": ("completeness_error", "axiom_status"),
    "infidelity": ("infidelity",),
    "sensitivity": ("sensitivity",),
    "faithfulness": ("auc_deletion", "auc_insertion", "aopc_deletion"),
    "class_contrast": ("class_contrast_spearman", "class_contrast_status"),
    "road": ("road_morf", "road_lerf"),
    "region_perturbation": ("region_aopc",),
    "mprt": ("mprt_smooth", "mprt_efficient"),
    "stability": ("stability_std_mean", "stability_spearman"),
}


def default_settings() -> dict[str, Any]:
    """The settings a front end shows, with the engine's defaults (from the config models)."""
    f, i, s, r = FaithfulnessConfig.model_fields, InfidelityConfig.model_fields, \
        SensitivityConfig.model_fields, RandomisationConfig.model_fields
    return {
        "steps": f["steps"].default, "baseline": f["baseline"].default, "batch_size": f["batch_size"].default,
        "n_perturb_samples": i["n_perturb_samples"].default, "noise_scale": i["noise_scale"].default,
        "sensitivity_samples": s["n_perturb_samples"].default, "perturb_radius": s["perturb_radius"].default,
        "mode": r["mode"].default, "max_stages": r["max_stages"].default, "threshold": r["threshold"].default,
        "calibrate": r["calibrate"].default, "footprint": r["footprint"].default,
        "axiom_threshold": AxiomConfig.model_fields["threshold"].default,
        "contrast_threshold": ClassContrastConfig.model_fields["threshold"].default,
    }


def evaluation_config(*, axioms: bool = True, infidelity: bool = False, sensitivity: bool = False,
                      faithfulness: bool = False, randomisation: bool = False, class_contrast: bool = False,
                      **settings: Any) -> EvaluationConfig:
    """An :class:`EvaluationConfig` from switches and flat settings (defaults: :func:`default_settings`).

    Unknown settings raise ``TypeError`` (a front end out of step with the engine).
    """
    known = default_settings()
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise TypeError(f"unknown evaluation settings: {', '.join(unknown)}")
    v = {**known, **settings}
    return EvaluationConfig(
        axioms=AxiomConfig(threshold=v["axiom_threshold"]) if axioms else None,
        infidelity=InfidelityConfig(n_perturb_samples=v["n_perturb_samples"], noise_scale=v["noise_scale"])
        if infidelity else None,
        sensitivity=SensitivityConfig(n_perturb_samples=v["sensitivity_samples"], perturb_radius=v["perturb_radius"])
        if sensitivity else None,
        faithfulness=FaithfulnessConfig(steps=v["steps"], baseline=v["baseline"],
                                        batch_size=v["batch_size"]) if faithfulness else None,
        randomisation=RandomisationConfig(mode=v["mode"], max_stages=v["max_stages"], threshold=v["threshold"],
                                          calibrate=v["calibrate"], footprint=v["footprint"])
        if randomisation else None,
        class_contrast=ClassContrastConfig(threshold=v["contrast_threshold"]) if class_contrast else None,
    )


@dataclass
class MapEvaluation:
    """What :func:`evaluate_map` measured: scalars (NaN where undefined), notes, curves."""

    metrics: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    curves: dict[str, Any] | None = None


def evaluate_map(job: Job, ctx: MethodContext, attribution: torch.Tensor, cfg: EvaluationConfig, *,
                 seed: int = 0, nifti_map: np.ndarray | None = None,
                 ground_truth: np.ndarray | None = None) -> MapEvaluation:
    """Every per-map metric of ``cfg`` for one map; a failing metric is a note, never fatal.

    Parameters
    ----------
    job : Job
        Method, parameters, class, layer and noise tunnel of the map.
    ctx : MethodContext
        Score model, the one input ``(1, C, *spatial)``, target and layer.
    attribution : torch.Tensor
        The map on the input grid, ``(1, C or 1, *spatial)``.
    cfg : EvaluationConfig
        From :func:`evaluation_config` (or a run's config).
    seed : int
        Seed of every perturbation.
    nifti_map, ground_truth : np.ndarray, optional
        The map in NIfTI order and a mask on its grid, for :func:`localisation_metrics`.
    """
    from esegeta_engine.evaluation.evaluators import CURVES_KEY, make_evaluators

    out = MapEvaluation()
    for evaluator in make_evaluators(cfg, seed):
        name = evaluator.__name__
        try:
            for key, value in evaluator(job, ctx, attribution).items():
                if key == CURVES_KEY:
                    out.curves = value
                    if value.get("note"):
                        out.notes[name] = str(value["note"])
                elif key.startswith("_"):  # arrays (a stability spread map) are not metrics
                    continue
                elif key.endswith("_note"):
                    if value:
                        out.notes[name] = str(value)
                else:
                    out.metrics[key] = value
        except Cancelled:
            raise
        except Exception as exc:  # one metric failing must not lose the others
            out.metrics.update({k: math.nan for k in METRIC_KEYS.get(name, ())})
            out.notes[name] = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    if ground_truth is not None and nifti_map is not None:
        loc = localisation_metrics(nifti_map, ground_truth)
        if loc.get("note"):
            out.notes["localisation"] = str(loc.pop("note"))
        out.metrics.update({k: math.nan if v is None else v for k, v in loc.items()})
    return out


def localisation_metrics(array: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """Localisation scores of a NIfTI-ordered map (channels last are summed) against ``mask``.

    Never raises: a mask on another grid or a non-finite map gives every score ``None``
    and a ``note`` saying why (the other metrics of the map are kept).
    """
    from esegeta_engine.evaluation.localisation import LOCALISATION_METRICS, localisation_scores

    arr = np.asarray(array)
    m = np.asarray(mask)
    spatial = arr if arr.ndim == m.ndim else arr.sum(-1)
    try:
        scores = localisation_scores(spatial, m)
    except Exception as exc:  # VolumeError: another grid, NaN in the map
        text = getattr(exc, "problem", None) or str(exc)
        return {**{k: None for k in LOCALISATION_METRICS}, "note": f"undefined: {text}"}
    return {k: (None if isinstance(v, float) and np.isnan(v) else v)
            for k, v in scores.items() if k in LOCALISATION_METRICS or k == "note"}
