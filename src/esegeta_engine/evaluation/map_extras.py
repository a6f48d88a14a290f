"""What a run adds to each finished map beyond its metrics: the stability spread map, the
per-structure pointing scores and the trust scorecard (called by the pipeline per map)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from esegeta_engine.config import EvaluationConfig
from esegeta_engine.evaluation.standard import STABILITY_MAP
from esegeta_engine.evaluation.trust import scorecard, verdicts_for

__all__ = ["expected_metric_evaluations", "map_extras", "refresh_trust"]


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
    if spread is not None:
        std_name = name.replace(".nii.gz", "__stability-std.nii.gz")
        save_map(geometry.to_nifti(np.asarray(spread)[0]).astype(np.float32), volume, out_dir / std_name)
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
