"""Cohort results: class-wise aggregate maps, the cohort metrics table, model-vs-model comparisons.

Aggregate maps (per model x method x class, only when every volume lies on
one grid): each subject's map is *normalised by its largest absolute value*
(``m / max|m|``; an all-zero map stays zero), so every subject weighs the
same whatever the scale of its scores; the mean and the population standard
deviation (``ddof=0``) of these normalised maps over the subjects with a
finished map are written as NIfTI with the common grid's affine. They are
read back from the written maps, so they describe exactly what is on disk.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from esegeta_engine.cohort.config import CohortConfig
from esegeta_engine.cohort.plan import CohortPlan, grid_volume
from esegeta_engine.io import Volume, save_map, write_text
from esegeta_engine.jobs.naming import slug as _slug
from esegeta_engine.jobs.record import MapRecord
from esegeta_engine.tables import safe_cell, safe_row

log = logging.getLogger("esegeta_engine")
TABLE = "cohort_metrics.csv"
GROUPS = "group_summary.csv"
PAIRED = "paired_metrics.csv"


def normalise(arr: np.ndarray) -> np.ndarray:
    """``arr / max|arr|`` in float64 (zeros stay zeros)."""
    a = np.asarray(arr, dtype=np.float64)
    peak = float(np.abs(a).max()) if a.size else 0.0
    return a / peak if peak > 0 else np.zeros_like(a)


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def _records(records: list[dict[str, Any]]) -> list[MapRecord]:
    """The manifest's results as records."""
    return [MapRecord.from_json(r) for r in records]


def _groups(records: list[MapRecord]) -> dict[tuple[str, str, int], list[MapRecord]]:
    out: dict[tuple[str, str, int], list[MapRecord]] = defaultdict(list)
    for r in records:
        if r.ok and r.file and r.planned is not False:
            out[(str(r.model), r.label or r.method, r.cls)].append(r)
    return out


def mean_std_of_normalised(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std (ddof=0) of the maps in ``paths``, each divided by its max |value|.

    The maps must share one grid. Memory holds two running sums and one map, however many maps.
    """
    total = sq = None
    for path in paths:
        a = normalise(_read(path))
        total = a if total is None else total + a
        sq = a * a if sq is None else sq + a * a
    if total is None or sq is None:
        raise ValueError("no maps to aggregate")
    mean = total / len(paths)
    return mean, np.sqrt(np.maximum(sq / len(paths) - mean * mean, 0.0))


def aggregate_maps(out: Path, cfg: CohortConfig, plan: CohortPlan, records: list[dict[str, Any]],
                   like: Volume) -> list[dict[str, Any]]:
    """Write mean and std of the normalised maps per model x method x class; return their entries."""
    entries = []
    order = {v.subject: i for i, v in enumerate(plan.volumes)}
    for (model, method, cls), recs in sorted(_groups(_records(records)).items()):
        recs = sorted(recs, key=lambda r: order[str(r.subject)])
        mean, std = mean_std_of_normalised([out / str(r.file) for r in recs])
        n = len(recs)
        stem = f"aggregate/{model}/{_slug(method)}__{cfg.target.kind}-{cls}"
        save_map(mean, like, out / f"{stem}__mean.nii.gz")
        save_map(std, like, out / f"{stem}__std.nii.gz")
        entries.append({"model": model, "method": method, "class": cls, "n": n,
                        "subjects": [r.subject for r in recs],
                        "mean": f"{stem}__mean.nii.gz", "std": f"{stem}__std.nii.gz"})
        if n < len(plan.volumes):
            log.warning("aggregate %s · %s · class %d over %d of %d subjects (the others failed)",
                        model, method, cls, n, len(plan.volumes))
    return entries


def compare_models(out: Path, cfg: CohortConfig, aggregates: list[dict[str, Any]],
                   like: Volume | None) -> list[dict[str, Any]]:
    """Difference of aggregate means (first model minus second) for every pair of models."""
    by = {(a["model"], a["method"], a["class"]): a for a in aggregates}
    entries = []
    for a, b in itertools.combinations([m.name for m in cfg.models], 2):
        for (model, method, cls), agg in sorted(by.items()):
            other = by.get((b, method, cls))
            if model != a or other is None or like is None:
                continue
            diff = _read(out / agg["mean"]).astype(np.float64) - _read(out / other["mean"])
            name = f"compare/{a}-vs-{b}/{_slug(method)}__{cfg.target.kind}-{cls}__mean-diff.nii.gz"
            save_map(diff, like, out / name)
            entries.append({"models": [a, b], "method": method, "class": cls, "file": name,
                            "max_abs_diff": float(np.abs(diff).max())})
    return entries


def _flat(r: MapRecord) -> dict[str, Any]:
    row = {"subject": r.subject, "group": r.group, "model": r.model,
           "method": r.label or r.method,  # name[@layer][+noise]: one row per job
           "class": r.cls, "status": r.status, "seconds": r.seconds, "model_evaluations": r.model_evaluations,
           "file": r.file, "error": r.error}
    row.update({k: v for k, v in (r.metrics or {}).items() if not isinstance(v, (dict, list))})
    return row


def _numeric(rows: list[dict[str, Any]]) -> list[str]:
    base = {"class", "seconds", "model_evaluations"}
    keys = dict.fromkeys(k for r in rows for k, v in r.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in base)
    return list(keys)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writerow({c: safe_cell(c) for c in columns})
    w.writerows(safe_row(r) for r in rows)  # no cell a spreadsheet would run as a formula
    return write_text(buf.getvalue(), path)


def metrics_tables(out: Path, plan: CohortPlan, records: list[dict[str, Any]],
                   models: list[str]) -> dict[str, str]:
    """The cohort table (one row per job), group summaries and the paired model table, as CSV."""
    rows = [_flat(r) for r in _records(records)]
    order = {v.subject: i for i, v in enumerate(plan.volumes)}
    rows.sort(key=lambda r: (r["model"], r["method"], r["class"], order.get(r["subject"], 0)))
    files = {"table": _write_csv(out / TABLE, rows).name}
    numeric = _numeric(rows)
    if any(v.group for v in plan.volumes):
        summary = []
        buckets: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            if r["status"] == "ok":
                buckets[(r["group"] or "", r["model"], r["method"], r["class"])].append(r)
        for (group, model, method, cls), rs in sorted(buckets.items()):
            entry: dict[str, Any] = {"group": group, "model": model, "method": method, "class": cls, "n": len(rs)}
            for k in numeric:
                vals = np.array([r[k] for r in rs if isinstance(r.get(k), (int, float))], dtype=float)
                entry[f"{k}_mean"] = float(vals.mean()) if vals.size else None
                entry[f"{k}_std"] = float(vals.std()) if vals.size else None
            summary.append(entry)
        files["groups"] = _write_csv(out / GROUPS, summary).name
    paired = _paired(out, rows, numeric, models)
    if paired:
        files["paired"] = _write_csv(out / PAIRED, paired).name
    return files


def _paired(out: Path, rows: list[dict[str, Any]], numeric: list[str], models: list[str]) -> list[dict]:
    """Same subject, method and class under two models: metrics side by side and the maps' correlation."""
    ok = {(r["model"], r["subject"], r["method"], r["class"]): r for r in rows if r["status"] == "ok"}
    paired = []
    for a, b in itertools.combinations(models, 2):
        for (model, subject, method, cls), ra in sorted(ok.items()):
            rb = ok.get((b, subject, method, cls))
            if model != a or rb is None:
                continue
            ma, mb = _read(out / ra["file"]).ravel(), _read(out / rb["file"]).ravel()
            corr = float(np.corrcoef(ma, mb)[0, 1]) if ma.std() > 0 and mb.std() > 0 else None
            entry: dict[str, Any] = {"subject": subject, "group": ra["group"], "method": method, "class": cls,
                                     "model_a": a, "model_b": b, "map_correlation": corr}
            for k in numeric:
                va, vb = ra.get(k), rb.get(k)
                entry[f"{k}_a"], entry[f"{k}_b"] = va, vb
                entry[f"{k}_diff"] = (va - vb) if isinstance(va, (int, float)) and isinstance(vb, (int, float)) \
                    else None
            paired.append(entry)
    return paired


def write_cohort_results(out: Path, cfg: CohortConfig, plan: CohortPlan,
                         records: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregates, comparisons, tables (and the report when asked); the manifest's ``cohort`` entry."""
    result: dict[str, Any] = {"common_grid": plan.common_grid, "grid_note": plan.grid_note,
                              "normalisation": "each map divided by its max |value| before mean and std "
                                               "(population std, ddof=0)"}
    like = None
    if plan.common_grid:
        like = grid_volume(plan, 0)
        result["aggregates"] = aggregate_maps(out, cfg, plan, records, like)
    else:
        log.warning("%s", plan.grid_note)
        result["aggregates"] = []
    result["comparisons"] = compare_models(out, cfg, result["aggregates"], like)
    result["tables"] = metrics_tables(out, plan, records, [m.name for m in cfg.models])
    if cfg.evaluation.report:
        from esegeta_engine.cohort.report import write_cohort_report

        try:
            result["report"] = write_cohort_report(out, plan, records, result).name
        except Exception as exc:  # the maps and tables are the results; the report is a view
            log.error("could not write the cohort report: %s", exc)
    return result
