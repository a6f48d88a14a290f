"""Config -> run -> files: NIfTI maps with the source geometry and a manifest.

``iter_run`` drives :class:`~esegeta_engine.explain.Explainer` from a
:class:`~esegeta_engine.config.Config`, writes each map atomically as soon as
its job finishes and rewrites the JSON manifest after every job, so a crash,
a timeout or a cancel never loses the results already produced. ``run``
drains it (the CLI adds a tqdm bar on top).
"""

from __future__ import annotations

import logging
import os
import platform
import re
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
from esegeta_engine.explain import Event, Explainer, JobFailed, MapReady, Progress
from esegeta_engine.jobs.plan import model_fingerprint
from esegeta_engine.jobs.resume import ResumeState, file_sha256
from esegeta_engine.io import Volume, load_volume, save_map, write_json
from esegeta_engine.methods import get_method
from esegeta_engine.evaluation.api import localisation_metrics
from esegeta_engine.evaluation.evaluators import CURVES_KEY, scalar_metrics
from esegeta_engine.evaluation.session import EvaluationSession
from esegeta_engine.evaluation.localisation import LOCALISATION_METRICS
from esegeta_engine.evaluation.map_extras import expected_metric_evaluations, map_extras, refresh_trust
from esegeta_engine.models import load_model
from esegeta_engine.runguard import (MANIFEST, RUN, OutputLock, check_previous_run, close_log, make_output_folder,
                                     open_log, protect_inputs, remove_part_files, write_final_manifest)

log = logging.getLogger("esegeta_engine")


@dataclass
class RunResult:
    """What a run produced."""

    out_dir: Path
    manifest_path: Path
    status: str
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> list[dict[str, Any]]:
        """Records whose status is not ``ok``."""
        return [r for r in self.records if r["status"] != "ok"]


def environment() -> dict[str, str]:
    """Versions of the packages that determine the numbers."""
    import captum
    import nibabel
    import torch

    return {"napari_esegeta": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "captum": captum.__version__, "numpy": np.__version__,
            "nibabel": nibabel.__version__, "platform": platform.platform()}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")


def volume_stem(path: Path | None, index: int) -> str:
    """Name of a volume in output file names (its file name without the NIfTI suffix)."""
    return _stem(path, index)


def _stem(path: Path | None, index: int) -> str:
    if path is None:
        return f"volume{index}"
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return _slug(name)


def map_filename(volume_stem: str, method_label: str, target_label: str) -> str:
    """File name of one map: ``<volume>__<method[@layer]>__<target>.nii.gz``."""
    return f"{volume_stem}__{_slug(method_label)}__{_slug(target_label)}.nii.gz"


class _Names:
    """Distinct output names per job: the readable name, plus the job key where two jobs would share it."""

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}

    def __call__(self, stem: str, job: Any) -> str:
        name = map_filename(stem, job.label, job.cls_label)
        if self.owner.setdefault(name, job.key) != job.key:
            name = name.replace(".nii.gz", f"__{job.key[:10]}.nii.gz")
            self.owner[name] = job.key
        return name


def _claim_output(cfg: Config, stems: list[str], resume: bool = False) -> OutputLock:
    """Create and lock the output folder and check it is safe to write (see :mod:`runguard`)."""
    out = make_output_folder(cfg.output.dir)
    lock = OutputLock(out).acquire()
    try:
        check_previous_run(out, cfg.output.overwrite or resume)
        loc = cfg.evaluation.localisation
        protect_inputs(out, [*cfg.volumes, cfg.target.roi_mask, cfg.target.ground_truth, loc.mask if loc else None,
                             cfg.model.path],
                       stems)
        remove_part_files(out)
    except BaseException:
        lock.release()
        raise
    return lock


def load_inputs(cfg: Config) -> tuple[list[Volume], np.ndarray | None]:
    """Load and check the volumes (and the ROI mask) named in ``cfg``."""
    p = cfg.preprocess
    volumes = [load_volume(v, spatial_dims=p.spatial_dims, channels=p.in_channels) for v in cfg.volumes]
    batch_only = [m.name for m in cfg.methods if get_method(m.name).needs_batch]
    if batch_only and len({v.data.shape for v in volumes}) > 1:
        raise VolumeError(f"{', '.join(batch_only)} explains all volumes as one batch, which needs "
                          "volumes of one shape, got " + ", ".join(str(v.data.shape) for v in volumes),
                          "resample or crop them to a common grid, or run that method separately")
    roi = None
    if cfg.target.kind == "roi" and cfg.target.roi_mask is not None:
        roi = load_mask_on_grid(cfg.target.roi_mask, volumes, p.spatial_dims, "ROI mask")
    if cfg.target.kind == "outcome" and cfg.target.ground_truth is not None:
        from esegeta_engine.regions import load_ground_truth

        roi = load_ground_truth(cfg.target.ground_truth, volumes, p.spatial_dims)  # labels, NIfTI order
    return volumes, roi


def load_mask_on_grid(path: Path, volumes: list[Volume], spatial_dims: int, what: str) -> np.ndarray:
    """Read a mask NIfTI and check it lies on every volume's grid (shape and affine).

    Raises
    ------
    VolumeError
        Naming the mask, the volume and what differs.
    """
    m = load_volume(path, spatial_dims=spatial_dims)
    for v in volumes:
        name = v.path.name if v.path else "the volume"
        if m.data.shape != v.data.shape[:spatial_dims]:
            raise VolumeError(f"{what} {m.path.name} has shape {m.data.shape} but {name} has "
                              f"{v.data.shape[:spatial_dims]}", "give the mask on the volume's grid")
        if not np.allclose(m.affine, v.affine, atol=1e-3):
            raise VolumeError(f"{what} {m.path.name} and {name} have different geometry (affines differ)",
                              "resample the mask onto the volume")
    return m.data != 0


def iter_run(cfg: Config, cancel: threading.Event | None = None, *, threaded: bool = False,
             on_progress: Callable[[Progress], None] | None = None,
             resume: bool = False, trust_pickled: bool = False) -> Generator[Event, None, RunResult]:
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
    log.info("napari-esegeta %s: loading model %s", __version__, cfg.model.path)
    model = load_model(cfg.model.path, format=cfg.model.format, class_path=cfg.model.class_path,
                       kwargs=cfg.model.kwargs, trust_pickled=trust_pickled, device=cfg.model.device)
    volumes, roi = load_inputs(cfg)
    gt_mask, gt_note = _load_ground_truth(cfg, volumes)
    stems = [_stem(v.path, i) for i, v in enumerate(volumes)]
    if len(set(stems)) < len(stems):
        stems = [f"{i:02d}-{s}" for i, s in enumerate(stems)]
    lock = _claim_output(cfg, stems, resume)
    out = cfg.output.dir
    try:
        # a folder of another model or other volumes is refused before anything in it changes
        previous = (ResumeState.load(out, model_fingerprint(model), stems) if resume
                    else ResumeState(out, None))
        run_id = f"{os.getpid()}-{id(cfg)}-{time.time_ns()}"
        run_token = RUN.set(run_id)
        handler = open_log(out, log, run_id)
    except BaseException:
        lock.release()
        raise
    started = time.perf_counter()
    manifest: dict[str, Any] = {
        "status": "running",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.model_dump(mode="json"),
        "environment": environment(),
        "seed": cfg.run.seed,
        "device": cfg.model.device,
        "volumes": [],
        "results": [],
    }
    manifest_path = out / MANIFEST
    try:
        explainer = Explainer(model, cfg.preprocess, cfg.target, cfg.model.output,
                              seed=cfg.run.seed, timeout_s=cfg.run.timeout_s, execution=cfg.execution)
        manifest["model_key"] = explainer.model_key
        names = _Names()
        truth = (roi != 0) if cfg.target.kind == "outcome" and roi is not None else None
        for i, v in enumerate(volumes):
            entry: dict[str, Any] = {"stem": stems[i], "path": str(v.path), "shape": list(v.data.shape),
                                     "spacing_mm": list(v.spacing), "affine": v.affine.tolist()}
            if cfg.output.save_prediction and cfg.target.kind != "classification":
                pred = explainer.predict(v)
                entry["prediction"] = save_map(pred, v, out / f"{stems[i]}__prediction.nii.gz",
                                               dtype=np.uint8).name
            manifest["volumes"].append(entry)
        write_json(manifest, manifest_path)
        ev = cfg.evaluation
        curves: dict[str, Any] = {}
        def skip(job: Any) -> bool:
            kept = [previous.done(job, stems[vi]) for vi in job.volumes]
            if not all(kept):
                return False
            for vi, rec in zip(job.volumes, kept):
                names(stems[vi], job)  # reserve its name
                manifest["results"].append({**rec, "resumed": True})
            write_json(manifest, manifest_path)
            return True

        for event in explainer.iter_explain(volumes, cfg.methods, roi_mask=roi, cancel=cancel,
                                            evaluators=EvaluationSession(model, ev, seed=cfg.run.seed).evaluators(),
                                            threaded=threaded, on_progress=on_progress, skip=skip):
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
                if event.notes:
                    extra["notes"] = event.notes
                if event.patch_evaluations:
                    extra["patch_evaluations"] = event.patch_evaluations
                manifest["results"].append(_record(job, "ok", event.seconds, event.evaluations,
                                                   volume=stems[event.volume], file=name,
                                                   model_inputs=event.inputs_evaluated,
                                                   stats=_stats(event.array), metrics=metrics,
                                                   key=job.key, sha256=file_sha256(path),
                                                   execution=event.execution, **extra))
                refresh_trust(manifest["results"][-1:])
                if CURVES_KEY in event.metrics:
                    curves[name] = event.metrics[CURVES_KEY]
                    write_json(curves, out / "curves.json")
                write_json(manifest, manifest_path)
            elif isinstance(event, JobFailed):
                for vi in event.job.volumes:
                    manifest["results"].append(_record(event.job, event.status, event.seconds,
                                                       event.evaluations, volume=stems[vi],
                                                       error=event.error))
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
        try:
            write_final_manifest(manifest, manifest_path)
            if cfg.evaluation.report and manifest["status"] in ("completed", "cancelled"):
                manifest["report"] = _report(out, cfg)
                write_final_manifest(manifest, manifest_path)
            log.info("run %s in %.1f s; manifest: %s", manifest["status"], manifest["duration_s"],
                     manifest_path)
        finally:
            close_log(handler, log)
            try:
                RUN.reset(run_token)
            except ValueError:  # the generator was closed from another thread (a GUI cancel)
                pass
            lock.release()
    return RunResult(out, manifest_path, manifest["status"], manifest["results"])


def _load_ground_truth(cfg: Config, volumes: list[Volume]) -> tuple[np.ndarray | None, str | None]:
    """The ground-truth mask, or ``None`` and why localisation is undefined (a mask on
    another grid must not cost the run its maps and other metrics)."""
    loc = cfg.evaluation.localisation
    if loc is None:
        return None, None
    try:
        mask = load_mask_on_grid(loc.mask, volumes, cfg.preprocess.spatial_dims, "ground-truth mask")
    except VolumeError as exc:
        log.warning("localisation is undefined: %s", exc)
        return None, f"undefined: {exc.problem}"
    if not mask.any():
        log.warning("ground-truth mask %s is empty: localisation scores are undefined", loc.mask.name)
    return mask, None


def _randomisation(explainer: Explainer, volumes: list[Volume], cfg: Config, roi: Any, stems: list[str],
                   records: list[dict[str, Any]], out: Path, cancel: Any) -> Generator[Event, None, list]:
    from esegeta_engine.evaluation.evaluators import run_randomisation_phase
    from esegeta_engine.evaluation.figures import randomisation_strip

    def classes_of(vi: int) -> list[tuple[int, str]]:
        seen = {(r["class"], r["target"]) for r in records if r["volume"] == stems[vi] and r["status"] == "ok"}
        return sorted(seen)

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


def _record(job: Any, status: str, seconds: float, evaluations: int, **extra: Any) -> dict[str, Any]:
    return {"method": job.spec.name, "layer": job.layer, "target": job.cls_label, "class": job.cls,
            "noise_tunnel": job.noise_tunnel, "params": {k: v for k, v in job.params.items()},
            "status": status, "seconds": round(seconds, 3), "model_evaluations": evaluations,
            "expected_evaluations": job.expected_evaluations, "key": job.key,
            **({"target_details": job.details} if getattr(job, "details", None) else {}), **extra}


def _stats(arr: np.ndarray) -> dict[str, float]:
    return {"min": float(arr.min()), "max": float(arr.max()), "sum": float(arr.sum()),
            "abs_mean": float(np.abs(arr).mean())}


def run(cfg: Config, cancel: threading.Event | None = None,
        on_event: Callable[[Event], None] | None = None, resume: bool = False, *,
        trust_pickled: bool = False) -> RunResult:
    """Run ``cfg`` to the end (see :func:`iter_run`); ``on_event`` sees every event and progress."""
    gen = iter_run(cfg, cancel, on_progress=on_event, resume=resume, trust_pickled=trust_pickled)
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_event is not None:
            on_event(event)
