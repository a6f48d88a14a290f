"""``esegeta evaluate RUN_DIR``: re-evaluate a finished run's maps and update their records and report.

The run's own config (in its manifest) names the model, the volumes, the preprocessing, the
target and the execution; each map is read from its file and scored by the one
:class:`~esegeta_engine.evaluation.session.EvaluationSession` on the execution recorded with
it (so a sliding-window map is scored through the same sliding window). The metrics are merged
into each record (``metrics``; ``evaluation_notes``), the curves into ``curves.json``, the
randomisation (``--randomisation MODE``) into ``randomisation.json`` and the manifest, and the
report is rebuilt when the run had one (or ``report=True``). The folder is locked while this
runs; every file is rewritten atomically, so an interrupted evaluation leaves the run as it was
or with the maps evaluated so far.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from esegeta_engine.config import Config, EvaluationConfig, LocalisationConfig, RandomisationConfig, parse_config
from esegeta_engine.errors import ConfigError
from esegeta_engine.evaluation.session import EvaluationSession, MapScored, MapToScore
from esegeta_engine.explain import Progress

log = logging.getLogger("esegeta_engine")

__all__ = ["evaluate_run", "iter_evaluate_run", "record_to_map"]


def record_to_map(record: dict[str, Any], cfg: Config, array: np.ndarray,
                  roi: np.ndarray | None = None) -> MapToScore:
    """A manifest record (one map, read as a :class:`~esegeta_engine.jobs.record.MapRecord`) and its
    file's data -> what the session scores."""
    from esegeta_engine.jobs.record import MapRecord

    rec = MapRecord.from_json(record)
    # components: the class is a column of the structures of the configured classes
    target = cfg.target if cfg.target.components else cfg.target.model_copy(update={"classes": [rec.cls]})
    region = cfg.target.kind in ("roi", "outcome")
    return MapToScore(name=str(rec.file or rec.method), method=rec.method, params=dict(rec.params or {}),
                      cls=rec.cls, target=target, array=np.asarray(array, dtype=np.float32), layer=rec.layer,
                      noise_tunnel=rec.noise_tunnel, target_label=rec.target, label=rec.label or rec.method,
                      execution=rec.execution or None, roi_mask=roi if region else None,
                      roi_key=cfg.target.kind if region else None)


def _evaluation(cfg: Config, metrics: Sequence[str] | None, mask: Path | None,
                randomisation: str | None) -> EvaluationConfig:
    """The run's evaluation sections, or the ``metrics`` named, plus the mask and randomisation asked for."""
    from esegeta_engine.evaluation.api import evaluation_config

    ev = cfg.evaluation
    if metrics:
        known = [k for k in ("axioms", "infidelity", "sensitivity", "faithfulness", "class_contrast")]
        unknown = sorted(set(metrics) - set(known))
        if unknown:
            raise ConfigError(f"unknown metric(s) {', '.join(unknown)}", f"use some of: {', '.join(known)}")
        ev = evaluation_config(**{k: k in metrics for k in known})
    update: dict[str, Any] = {}
    if mask is not None:
        update["localisation"] = LocalisationConfig(mask=Path(mask))
    if randomisation:
        update["randomisation"] = (ev.randomisation or RandomisationConfig()).model_copy(update={"mode": randomisation})
    return ev.model_copy(update=update)


def iter_evaluate_run(run_dir: str | Path, *, metrics: Sequence[str] | None = None, mask: str | Path | None = None,
                      randomisation: str | None = None, report: bool | None = None, trust_pickled: bool = False,
                      trust_bundle: bool = False, cancel: threading.Event | None = None,
                      on_progress: Callable[[Progress], None] | None = None) -> Generator[Any, None, dict[str, Any]]:
    """Re-evaluate the maps of ``run_dir``; yields progress and :class:`MapScored`; returns the manifest.

    Raises
    ------
    ConfigError
        No readable manifest, or an unknown metric.
    EsegetaError
        The model, a volume or the mask cannot be read (nothing is changed then).
    """
    from esegeta_engine.io import write_json
    from esegeta_engine.models import Trust, load_source
    from esegeta_engine.pipeline import _randomisation, load_inputs, load_mask_on_grid
    from esegeta_engine.runguard import MANIFEST, OutputLock

    out = Path(run_dir).resolve()
    manifest = _read_manifest(out / MANIFEST)
    cfg = parse_config(manifest["config"], base=out)
    cfg.output.dir = out
    evaluation = _evaluation(cfg, metrics, Path(mask).resolve() if mask else None, randomisation)
    cfg = cfg.model_copy(update={"evaluation": evaluation})
    model = load_source(cfg.model, Trust(pickled=trust_pickled, bundle=trust_bundle)).module  # any registered source
    volumes, roi = load_inputs(cfg)
    gt = load_mask_on_grid(evaluation.localisation.mask, volumes, cfg.preprocess.spatial_dims, "ground-truth mask") \
        if evaluation.localisation else None
    stems = [v.get("stem") for v in manifest.get("volumes", [])]
    cancel = cancel or threading.Event()
    session = EvaluationSession(model, evaluation.model_copy(update={"randomisation": None}),
                                preprocess=cfg.preprocess, output=cfg.model.output, seed=cfg.run.seed,
                                execution=cfg.execution, cancel=cancel, on_progress=on_progress)
    records = [r for r in manifest.get("results", []) if r.get("status") == "ok" and r.get("file")
               and r.get("volume") in stems]
    session.total = len(records) * session.per_map_steps(gt is not None)
    curves_path = out / "curves.json"
    curves = _read_json(curves_path) if curves_path.is_file() else {}
    lock = OutputLock(out).acquire()
    try:
        for vi, stem in enumerate(stems):
            mine = [r for r in records if r["volume"] == stem]
            maps = [record_to_map(r, cfg, _read_map(out / r["file"]), roi) for r in mine]
            for ev in session.score(volumes[vi], maps, gt):
                if isinstance(ev, MapScored):
                    rec = mine[ev.index]
                    rec["metrics"] = {**(rec.get("metrics") or {}), **_jsonable(ev.metrics)}
                    if ev.notes:
                        rec["evaluation_notes"] = ev.notes
                    if ev.curves is not None:
                        curves[rec["file"]] = ev.curves
                        write_json(curves, curves_path)
                    write_json(manifest, out / MANIFEST)
                yield ev
        if evaluation.randomisation is not None:
            from esegeta_engine.explain import Explainer

            explainer = Explainer(model, cfg.preprocess, cfg.target, cfg.model.output, seed=cfg.run.seed,
                                  execution=cfg.execution)  # the run's target and execution, as its maps
            manifest["randomisation"] = yield from _randomisation(explainer, volumes, cfg, roi, stems,
                                                                  manifest["results"], out, cancel)
        manifest.setdefault("evaluations", []).append({
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "evaluation": evaluation.model_dump(mode="json"), "maps": len(records)})
        write_json(manifest, out / MANIFEST)
        if report or (report is None and (manifest.get("report") or cfg.evaluation.report)):
            from esegeta_engine.evaluation.report import build_report_from_run

            manifest["report"] = build_report_from_run(out, mask=mask).name
            write_json(manifest, out / MANIFEST)
    finally:
        lock.release()
    return manifest


def evaluate_run(run_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """:func:`iter_evaluate_run` to the end; returns the updated manifest."""
    gen = iter_evaluate_run(run_dir, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def _read_map(path: Path) -> np.ndarray:
    import nibabel as nib

    try:
        return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    except (OSError, ValueError) as exc:  # a deleted or broken map: that map's metrics say so
        log.warning("cannot read the map %s: %s", path.name, exc)
        return np.full((1,), np.nan, np.float32)


def _read_json(path: Path) -> Any:
    from esegeta_engine.yamlsafe import read_json_record

    return read_json_record(path)  # bounded depth: the embedded config is parsed next


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = _read_json(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"no readable run manifest at {path} ({type(exc).__name__})",
                          "give the output folder of an `esegeta run` (it holds manifest.json)") from None
    if not isinstance(manifest, dict) or "config" not in manifest:
        raise ConfigError(f"{path} is not a single-run manifest (no config)",
                          "give a single run's folder; cohorts are evaluated per subject folder")
    return manifest


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (float, np.floating)):
            v = None if not np.isfinite(v) else float(v)
        elif isinstance(v, np.integer):
            v = int(v)
        out[k] = v
    return out
