"""What a run adds to each finished map beyond its metrics: the stability spread map, the
per-structure pointing scores and the trust scorecard (called by the pipeline per map)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from esegeta_engine.config import EvaluationConfig
from esegeta_engine.evaluation.standard import STABILITY_MAP
from esegeta_engine.evaluation.trust import scorecard, verdicts_for

__all__ = ["STABILITY_NIFTI", "expected_metric_evaluations", "map_extras", "portable_extras", "refresh_trust"]

STABILITY_NIFTI = "_stability_std_nifti"
"""A job's stability spread already in NIfTI order (what a worker sends back; see :func:`portable_extras`)."""


def portable_extras(raw_metrics: dict[str, Any], geometry: Any) -> dict[str, Any]:
    """The raw entries of a job's metrics that the run's extra files are built from, small and picklable.

    A worker (device pool, Dask) returns these beside the scalar metrics, so the run that gets its
    outcome writes the same ``curves.json`` and stability map as an inline run: the faithfulness
    curves as they are, and the stability spread in NIfTI order (``geometry`` is the job's).
    """
    from esegeta_engine.evaluation.evaluators import CURVES_KEY

    out: dict[str, Any] = {}
    if CURVES_KEY in raw_metrics:
        out[CURVES_KEY] = raw_metrics[CURVES_KEY]
    spread = raw_metrics.get(STABILITY_MAP)
    if spread is not None:
        out[STABILITY_NIFTI] = geometry.to_nifti(np.asarray(spread)[0]).astype(np.float32)
    return out


def expected_metric_evaluations(cfg: EvaluationConfig, job: Any, model: Any) -> int | None:
    """The plan's estimate of the model evaluations the standard scores add to ``job``'s map."""
    from esegeta_engine.evaluation.standard import metric_cost

    return metric_cost(cfg, job.expected_evaluations, model=model)


def map_extras(raw_metrics: dict[str, Any], array: np.ndarray, volume: Any, out_dir: Path, name: str,
               geometry: Any, cfg: EvaluationConfig, ground_truth: np.ndarray | None) -> tuple[dict, dict]:
    """``(metrics to add, record fields to add)`` for one map written as ``name``.

    Writes the stability standard-deviation map beside the map (``…__stability-std.nii.gz``,
    the scan's geometry) and scores the map against each ground-truth structure when
    ``evaluation.energy_pointing`` is on.
    """
    from esegeta_engine.io import save_map

    metrics: dict[str, Any] = {}
    record: dict[str, Any] = {}
    made = [raw_metrics[k] for k in raw_metrics if k.endswith("_evaluations") and isinstance(raw_metrics[k], int)]
    if made:  # the standard scores' own model evaluations, next to the plan's estimate
        record["metric_evaluations"] = int(sum(made))
    spread = raw_metrics.get(STABILITY_MAP)
    nifti = raw_metrics.get(STABILITY_NIFTI)  # a worker's, already in NIfTI order
    if spread is not None or nifti is not None:
        std_name = name.replace(".nii.gz", "__stability-std.nii.gz")
        std = nifti if spread is None else geometry.to_nifti(np.asarray(spread)[0]).astype(np.float32)
        save_map(std, volume, out_dir / std_name)
        record["stability_map"] = std_name
    if cfg.energy_pointing is not None and ground_truth is not None and np.asarray(ground_truth).any():
        from esegeta_engine.evaluation.pointing import pointing_scores

        p = pointing_scores(array, ground_truth, min_voxels=cfg.energy_pointing.min_voxels,
                            max_components=cfg.energy_pointing.max_components)
        metrics["energy_pointing"] = p["energy_pointing"]
        record["structures"] = p["components"]
    return metrics, record


def refresh_trust(records: list[dict[str, Any]], randomisation: list[dict[str, Any]] | None = None) -> None:
    """(Re)compute every successful record's ``trust`` scorecard (after the randomisation phase too)."""
    for rec in records:
        if rec.get("status") == "ok":
            rec["trust"] = scorecard(rec.get("metrics") or {}, verdicts_for(randomisation, rec))
