"""Config -> run -> files: NIfTI maps with the source geometry and a manifest.

``iter_run`` drives :class:`~esegeta_engine.explain.Explainer` from a
:class:`~esegeta_engine.config.Config`, writes each map atomically as soon as
its job finishes and rewrites the JSON manifest after every job, so a crash,
a timeout or a cancel never loses the results already produced. ``run``
drains it (the CLI adds a tqdm bar on top).
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from esegeta_engine import __version__
from esegeta_engine.config import Config
from esegeta_engine.errors import EsegetaError, VolumeError
from esegeta_engine.evaluation.api import localisation_metrics
from esegeta_engine.evaluation.evaluators import CURVES_KEY, scalar_metrics
from esegeta_engine.evaluation.session import EvaluationSession
from esegeta_engine.evaluation.localisation import LOCALISATION_METRICS
from esegeta_engine.evaluation.costs import counted_evaluations
from esegeta_engine.evaluation.map_extras import expected_metric_evaluations, map_extras, refresh_trust
from esegeta_engine.explain import Event, Explainer, JobFailed, MapReady, Progress
from esegeta_engine.inputs import load_ground_truth, load_inputs, load_mask_on_grid
from esegeta_engine.io import Volume, file_sha256, save_map, write_json
from esegeta_engine.jobs.folder import claim_folder
from esegeta_engine.jobs.portable import portable_specs
from esegeta_engine.jobs.registry import make_executor
from esegeta_engine.jobs.naming import Names, map_filename, slug, volume_stem
from esegeta_engine.jobs.plan import KEY_VERSION, array_fingerprint
from esegeta_engine.jobs.record import MapRecord, map_stats
from esegeta_engine.jobs.resume import ResumeState
from esegeta_engine.models import Trust, load_source, source_path
from esegeta_engine.predict import write_prediction
from esegeta_engine.runguard import MANIFEST, write_final_manifest

__all__ = ["RunResult", "environment", "iter_run", "load_inputs", "load_mask_on_grid", "map_filename", "run",
           "volume_stem"]

log = logging.getLogger("esegeta_engine")


@dataclass
class RunResult:
    """What a run produced."""

    out_dir: Path
    manifest_path: Path
    status: str
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def maps(self) -> list[MapRecord]:
        """:attr:`records` (the manifest's JSON) read as :class:`MapRecord` s."""
        return [MapRecord.from_json(r) for r in self.records]

    @property
    def failed(self) -> list[dict[str, Any]]:
        """Records whose status is not ``ok``."""
        return [raw for raw, rec in zip(self.records, self.maps) if not rec.ok]


def environment() -> dict[str, str]:
    """Versions of the packages that determine the numbers."""
    import captum
    import nibabel
    import torch

    return {"napari_esegeta": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "captum": captum.__version__, "numpy": np.__version__,
            "nibabel": nibabel.__version__, "platform": platform.platform()}


_slug = slug  # file-name slugs (used by the randomisation outputs below)


def iter_run(cfg: Config, cancel: threading.Event | None = None, *, threaded: bool = False,
             on_progress: Callable[[Progress], None] | None = None,
             resume: bool = False, trust_pickled: bool = False,
             trust_bundle: bool = False) -> Generator[Event, None, RunResult]:
    """Run ``cfg``, yielding events; returns the :class:`RunResult`.

    With ``resume``, a folder holding an earlier run of the same model and volumes keeps
    every map that is complete and matches its job key; only the other jobs run.

    Methods run in the calling thread by default (fastest); progress within a
    method goes to ``on_progress``. ``threaded=True`` runs each method in a
    worker thread and yields that progress as events instead (see
    :meth:`Explainer.iter_explain`). ``trust_pickled`` lets a fully pickled
    module load; it is the caller's decision (``--trust-pickled``), never the
    config's.

    Nothing is written until the model, the volumes and the masks have been
    read and checked; the output folder is then locked for the whole run.

    Raises
    ------
    EsegetaError
        For problems found before any method runs (bad files, model, target,
        an output folder in use or holding inputs). Problems inside a method
        are recorded in the manifest instead.
    """
    log.info("napari-esegeta %s: loading model %s", __version__, source_path(cfg.model))
    loaded = load_source(cfg.model, Trust(pickled=trust_pickled, bundle=trust_bundle))
    cfg = loaded.configure(cfg)  # a deployed pipeline (nnU-Net, bundle) does its own preprocessing
    model = loaded.module
    bad_classes = loaded.class_error(cfg.target.kind, cfg.target.classes, cfg.target.components)
    if bad_classes is not None:  # before the prediction pass and before anything is written
        raise bad_classes
    try:
        volumes, roi = load_inputs(cfg)
    except VolumeError as exc:
        raise loaded.volume_error(exc) from None
    gt_mask, gt_note = load_ground_truth(cfg, volumes)
    stems = [volume_stem(v.path, i) for i, v in enumerate(volumes)]
    if len(set(stems)) < len(stems):
        stems = [f"{i:02d}-{s}" for i, s in enumerate(stems)]
    explainer = Explainer(model, cfg.preprocess, cfg.target, cfg.model.output,
                          seed=cfg.run.seed, timeout_s=cfg.run.timeout_s, execution=cfg.execution)
    contents = [array_fingerprint(v.data) for v in volumes]
    loc = cfg.evaluation.localisation
    # a run is a cohort of one: its jobs go through the same executor seam (an unreachable
    # scheduler or a model no worker can load fails here, before anything is written)
    portable = None if cfg.execution.executor == "inline" else portable_specs(cfg, trust_pickled, trust_bundle)
    runner = make_executor(cfg.execution, cancel=cancel)
    try:
        folder = claim_folder(cfg.output.dir, overwrite=cfg.output.overwrite, resume=resume, stems=stems,
                              inputs=[*cfg.volumes, cfg.target.roi_mask, cfg.target.ground_truth,
                                      loc.mask if loc else None, source_path(cfg.model)])
    except BaseException:
        runner.close()
        raise
    out = folder.path
    try:
        # a folder of another model or other volumes is refused before anything in it changes
        previous = (ResumeState.load(out, kind="run", model_keys={"": explainer.model_key},
                                     volumes=dict(zip(stems, contents)), overwrite=cfg.output.overwrite)
                    if resume else ResumeState(out, None))
        folder.open_log()
    except BaseException:
        runner.close()
        folder.close()
        raise
    started = time.perf_counter()
    manifest: dict[str, Any] = {
        "status": "running",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.model_dump(mode="json"),
        "environment": environment(),
        "seed": cfg.run.seed,
        "device": cfg.model.device,
        "key_version": KEY_VERSION,
        "model_key": explainer.model_key,
        "model": {**loaded.description, "class_names": loaded.class_names, "attribution_grid": loaded.grid},
        "volumes": [],
        "results": [],
    }
    manifest_path = out / MANIFEST
    planned: set[tuple[str, str]] = set()  # (key, volume) of every job this run planned
    try:
        # methods and scores (randomisation phase included), before any input is prepared
        manifest["estimated_model_evaluations"] = explainer.estimate(volumes, cfg.methods, cfg.evaluation)
        names = Names()  # a job redone with other settings rewrites its own map; other maps stay
        truth = (roi != 0) if cfg.target.kind == "outcome" and roi is not None else None
        for i, v in enumerate(volumes):
            entry: dict[str, Any] = {"stem": stems[i], "path": str(v.path), "content": contents[i],
                                     "shape": list(v.data.shape), "spacing_mm": list(v.spacing),
                                     "affine": v.affine.tolist()}
            if cfg.output.save_prediction and cfg.target.kind != "classification":
                entry.update(write_prediction(explainer, v, out, stems[i], loaded.outputs,
                                              cfg.output.probabilities))
            manifest["volumes"].append(entry)
        write_json(manifest, manifest_path)
        ev = cfg.evaluation
        curves: dict[str, Any] = {}
        def skip(job: Any) -> bool:
            planned.update((job.key, stems[vi]) for vi in job.volumes)
            kept = [previous.done(job.key, stems[vi], names(stems[vi], job)) for vi in job.volumes]
            if not all(kept):
                return False
            manifest["results"].extend(rec.to_json() for rec in kept if rec is not None)
            write_json(manifest, manifest_path)
            return True

        for event in explainer.iter_explain(volumes, cfg.methods, roi_mask=roi, cancel=cancel,
                                            evaluators=EvaluationSession(model, ev, seed=cfg.run.seed).evaluators(),
                                            threaded=threaded, on_progress=on_progress, skip=skip,
                                            evaluation=ev, executor=runner, portable=portable):
            if isinstance(event, MapReady):
                job = event.job
                name = names(stems[event.volume], job)
                path = save_map(event.array, volumes[event.volume], out / name)
                metrics = scalar_metrics(event.metrics)
                if metrics.get("axiom_status") == "warning":
                    log.warning("%s · %s: completeness check: %s", job.label, job.cls_label, metrics["axiom_note"])
                if not job.spec.evaluable:  # volumes, not maps: nothing to localise
                    pass
                elif gt_mask is not None:
                    metrics.update(localisation_metrics(event.array, gt_mask))
                elif gt_note:
                    metrics.update({k: None for k in LOCALISATION_METRICS}, note=gt_note)
                elif truth is not None:  # an outcome target's ground truth
                    metrics.update(localisation_metrics(event.array, truth))
                more, extra = map_extras(event.metrics, event.array, volumes[event.volume], out, name,
                                         explainer.geometry(volumes[event.volume]), ev,
                                         gt_mask if gt_mask is not None else truth)
                metrics.update(more)
                if extra.get("metric_evaluations") is not None:
                    extra["expected_metric_evaluations"] = expected_metric_evaluations(ev, job, model)
                manifest["results"].append(_record(
                    job, "ok", event.seconds, event.evaluations, volume=stems[event.volume], file=name,
                    model_inputs=event.inputs_evaluated, stats=map_stats(event.array), metrics=metrics,
                    sha256=file_sha256(path), execution=event.execution, notes=event.notes or None,
                    patch_evaluations=event.patch_evaluations or None, extra=extra).to_json())
                refresh_trust(manifest["results"][-1:])
                if CURVES_KEY in event.metrics:
                    curves[name] = event.metrics[CURVES_KEY]
                    write_json(curves, out / "curves.json")
                write_json(manifest, manifest_path)
            elif isinstance(event, JobFailed):
                for vi in event.job.volumes:
                    manifest["results"].append(_record(event.job, event.status, event.seconds,
                                                       event.evaluations, volume=stems[vi],
                                                       error=event.error).to_json())
                write_json(manifest, manifest_path)
            yield event
        cancelled = cancel is not None and cancel.is_set()
        if ev.randomisation is not None and not cancelled:
            manifest["randomisation"] = yield from _randomisation(explainer, volumes, cfg, roi, stems,
                                                                  manifest["results"], out, cancel)
            refresh_trust(manifest["results"], manifest["randomisation"])
            write_json(manifest, manifest_path)
            cancelled = cancel is not None and cancel.is_set()
        manifest["status"] = "cancelled" if cancelled else "completed"
    except EsegetaError as exc:
        manifest["status"] = "failed"
        manifest["error"] = str(exc)
        raise
    except (GeneratorExit, KeyboardInterrupt):
        manifest["status"] = "cancelled"
        raise
    except BaseException as exc:
        manifest["status"] = "failed"
        manifest["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        manifest["duration_s"] = round(time.perf_counter() - started, 3)
        manifest["model_evaluations"] = counted_evaluations(manifest)  # what the estimate counts
        # earlier maps this run did not keep or reach stay recorded (never orphaned)
        complete = manifest["status"] == "completed"
        manifest["results"].extend(r.replace(planned=False if complete else None).to_json()
                                   for r in previous.unplanned(planned, _files(manifest)))
        try:
            write_final_manifest(manifest, manifest_path)
            if cfg.evaluation.report and manifest["status"] in ("completed", "cancelled"):
                manifest["report"] = _report(out, cfg)
                write_final_manifest(manifest, manifest_path)
            log.info("run %s in %.1f s; manifest: %s", manifest["status"], manifest["duration_s"],
                     manifest_path)
        finally:
            try:
                runner.close()
            finally:
                folder.close()
    return RunResult(out, manifest_path, manifest["status"], manifest["results"])


def _randomisation(explainer: Explainer, volumes: list[Volume], cfg: Config, roi: Any, stems: list[str],
                   records: list[dict[str, Any]], out: Path, cancel: Any) -> Generator[Event, None, list]:
    from esegeta_engine.evaluation.evaluators import run_randomisation_phase
    from esegeta_engine.evaluation.figures import randomisation_strip

    maps = [MapRecord.from_json(r) for r in records]

    def classes_of(vi: int) -> list[tuple[int, str]]:
        return sorted({(r.cls, r.target) for r in maps if r.volume == stems[vi] and r.ok})

    results = yield from run_randomisation_phase(explainer, volumes, cfg.methods, cfg.evaluation,
                                                 classes_of, roi_mask=roi, cancel=cancel)
    summary = []
    folder = out / "randomisation"
    for vi, cls, label, res in results:
        order = explainer.geometry(volumes[vi])
        entry = {"volume": stems[vi], "class": cls, "target": label, **res.to_dict(), "files": {}}
        strips: dict[str, list[np.ndarray]] = {}
        for method, stage_maps in res.maps.items():
            entry["files"][method] = {}
            original = order.to_nifti(np.asarray(res.original_maps[method])[0])
            strips[method] = [original]
            for k, stage in enumerate(res.stages, start=1):
                if stage not in stage_maps:  # this stage failed for this method: recorded in errors
                    strips[method].append(np.zeros_like(original))
                    continue
                nifti = order.to_nifti(np.asarray(stage_maps[stage])[0])
                name = f"{stems[vi]}__{_slug(method)}__{_slug(label)}__{res.mode}-{k:02d}-{_slug(stage)}.nii.gz"
                save_map(nifti, volumes[vi], folder / name)
                entry["files"][method][stage] = name
                strips[method].append(nifti)
        if strips and cfg.preprocess.in_channels == 1:
            fig = randomisation_strip(volumes[vi].data, strips, ["original", *res.stages],
                                      out / "figures" / f"randomisation__{stems[vi]}__{_slug(label)}__{res.mode}.png",
                                      affine=volumes[vi].affine)
            entry["figure"] = str(fig.relative_to(out))
        summary.append(entry)
        write_json(summary, out / "randomisation.json")
    return summary


def _report(out: Path, cfg: Config) -> str | None:
    from esegeta_engine.evaluation.report import build_report_from_run

    try:
        mask = cfg.evaluation.localisation.mask if cfg.evaluation.localisation else None
        return build_report_from_run(out, mask=mask).name
    except Exception as exc:  # the maps and the manifest are the results; a report is a view
        log.error("could not write the report: %s", exc, exc_info=not isinstance(exc, EsegetaError))
        return None


def _files(manifest: dict[str, Any]) -> set[str]:
    return {r.file for r in map(MapRecord.from_json, manifest["results"]) if r.file}


def _record(job: Any, status: str, seconds: float, evaluations: int, extra: dict[str, Any] | None = None,
            **fields: Any) -> MapRecord:
    details = {"target_details": job.details} if getattr(job, "details", None) else {}
    if getattr(job, "network_evaluations", None) is not None:  # a deployed pipeline's patches x mirrors x folds
        details["expected_network_evaluations"] = job.network_evaluations
    return MapRecord(key=job.key, method=job.spec.name, target=job.cls_label, cls=job.cls, status=status,
                     layer=job.layer, noise_tunnel=job.noise_tunnel, params=dict(job.params),
                     seconds=round(seconds, 3), model_evaluations=evaluations,
                     expected_evaluations=job.expected_evaluations, extra={**details, **(extra or {})}, **fields)


def run(cfg: Config, cancel: threading.Event | None = None,
        on_event: Callable[[Event], None] | None = None, resume: bool = False, *,
        trust_pickled: bool = False, trust_bundle: bool = False) -> RunResult:
    """Run ``cfg`` to the end (see :func:`iter_run`); ``on_event`` sees every event and progress."""
    gen = iter_run(cfg, cancel, on_progress=on_event, resume=resume, trust_pickled=trust_pickled,
                   trust_bundle=trust_bundle)
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_event is not None:
            on_event(event)
