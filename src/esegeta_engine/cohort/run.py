"""Drive a cohort: plan, (resume), execute, write each map as it arrives, then the cohort results.

The manifest (``manifest.json``, ``"kind": "cohort"``) is rewritten atomically
after every job, so it is valid whenever the run stops; ``resume=True``
keeps every earlier result whose job key matches the plan and whose file still
has the recorded sha256, and runs only the rest, on any executor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from esegeta_engine import __version__
from esegeta_engine.cohort.config import CohortConfig
from esegeta_engine.cohort.plan import CohortJob, CohortPlan, grid_volume, plan_cohort
from esegeta_engine.jobs.worker import JobOutcome, JobSpec
from esegeta_engine.io import Volume, file_sha256, save_map, write_json
from esegeta_engine.jobs.folder import claim_folder
from esegeta_engine.jobs.plan import KEY_VERSION
from esegeta_engine.jobs.record import MapRecord
from esegeta_engine.jobs.resume import ResumeState
from esegeta_engine.methods import get_method
from esegeta_engine.pipeline import MANIFEST, environment
from esegeta_engine.runguard import write_final_manifest

log = logging.getLogger("esegeta_engine")


@dataclass
class CohortResult:
    """What a cohort run produced (or, for a dry run, would produce)."""

    plan: CohortPlan
    out_dir: Path
    status: str
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0

    @property
    def maps(self) -> list[MapRecord]:
        """:attr:`records` (the manifest's JSON) read as :class:`MapRecord` s."""
        return [MapRecord.from_json(r) for r in self.records]

    @property
    def failed(self) -> list[dict[str, Any]]:
        """Records whose status is not ``ok``."""
        return [raw for raw, rec in zip(self.records, self.maps) if not rec.ok]


def job_specs(cfg: CohortConfig, plan: CohortPlan, jobs: list[CohortJob]) -> list[JobSpec]:
    """The picklable job descriptions a worker runs."""
    models = {m.name: {**m.model_dump(mode="json"), **plan.trust} for m in cfg.models}
    common = dict(preprocess=cfg.preprocess.model_dump(mode="json"),
                  target=cfg.target.model_dump(mode="json"),
                  evaluation=cfg.evaluation.model_dump(mode="json", exclude={"report"}),
                  run=cfg.run.model_dump(mode="json"),
                  execution=cfg.execution.model_dump(mode="json"))
    specs = []
    for j in jobs:
        v = plan.volumes[j.volume]
        method = cfg.methods[j.method_index].model_dump(mode="json")
        if j.layer is not None:  # one job per layer, as in single runs
            method["layers"] = [j.layer]
        specs.append(JobSpec(j.key, models[j.model], plan.model_sha[j.model], str(v.path), j.cls, method, **common,
                             ground_truth=str(v.ground_truth) if v.ground_truth else None,
                             roi=str(v.roi) if v.roi and cfg.target.kind == "roi" else None))
    return specs


def _resume_state(cfg: CohortConfig, plan: CohortPlan, out: Path) -> ResumeState:
    """The earlier cohort in ``out`` (refused when it used other weights or volumes under the same names)."""
    return ResumeState.load(out, kind="cohort", model_keys=plan.model_key, model_files=plan.model_sha,
                            volumes={v.subject: v.content for v in plan.volumes}, overwrite=cfg.output.overwrite)


def _manifest(cfg: CohortConfig, plan: CohortPlan, executor: str) -> dict[str, Any]:
    return {
        "kind": "cohort", "status": "running", "executor": executor,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.model_dump(mode="json"), "environment": environment(), "seed": cfg.run.seed,
        "key_version": KEY_VERSION,
        "plan": {"jobs": len(plan.jobs), "estimated_model_evaluations": plan.estimated_evaluations,
                 "common_grid": plan.common_grid, "grid_note": plan.grid_note},
        "models": [{"name": m.name, "path": str(m.path or m.nnunet or m.bundle), "sha256": plan.model_sha[m.name],
                    "key": plan.model_key.get(m.name)} for m in cfg.models],
        "volumes": [{"subject": v.subject, "subject_from": v.subject_from, "group": v.group, "path": str(v.path),
                     "sha256": v.sha256, "content": v.content,
                     "shape": list(v.shape), "affine": v.affine.tolist(),
                     "ground_truth": str(v.ground_truth) if v.ground_truth else None} for v in plan.volumes],
        "results": [],
    }


def _record(job: CohortJob, plan: CohortPlan, cfg: CohortConfig, o: JobOutcome, **extra: Any) -> dict[str, Any]:
    method = cfg.methods[job.method_index]
    return MapRecord(key=job.key, model=job.model, subject=job.subject, group=plan.volumes[job.volume].group,
                     method=method.name, label=job.method, layer=job.layer, cls=job.cls,
                     target=o.target_label or f"{cfg.target.kind}-{job.cls}", status=o.status,
                     seconds=round(o.seconds, 3),
                     noise_tunnel=method.noise_tunnel.model_dump() if method.noise_tunnel else None,
                     params=get_method(method.name).resolve_params(method.params), model_evaluations=o.evaluations, expected_evaluations=job.cost,
                     model_inputs=o.model_inputs, worker=o.worker, device=o.device, metrics=o.metrics,
                     error=o.error, execution=o.execution or None, **extra,
                     extra={} if o.network_evaluations is None else  # as single runs: planned network calls
                     {"expected_network_evaluations": o.network_evaluations}).to_json()


def run_cohort(cfg: CohortConfig, *, executor: str | None = None, dry_run: bool = False, resume: bool = False,
               on_job: Callable[[dict[str, Any], int, int], None] | None = None,
               plan: CohortPlan | None = None, cancel: threading.Event | None = None) -> CohortResult:
    """Run a cohort (see the module docstring).

    Parameters
    ----------
    cfg : CohortConfig
        The validated cohort config.
    executor : {"inline", "local", "dask"}, optional
        Overrides ``cfg.cohort.executor``.
    dry_run : bool
        Plan and return; nothing is written and no worker starts.
    resume : bool
        Keep valid results of an earlier run in the output folder; run the rest.
    on_job : callable, optional
        ``on_job(record, done, total)`` after each job.
    plan : CohortPlan, optional
        ``plan_cohort(cfg)`` when the caller made it already (e.g. to print it first).
    cancel : threading.Event, optional
        Set from any thread (the CLI sets it on SIGINT/SIGTERM): no job starts after it, the
        inline job in flight stops at its next model evaluation, and the manifest says
        ``cancelled`` with every finished map kept.

    Raises
    ------
    EsegetaError
        Problems found before work starts (inputs, grids, unreachable scheduler).
    """
    from esegeta_engine.cohort.aggregate import write_cohort_results
    from esegeta_engine.evaluation.evaluators import CURVES_KEY
    from esegeta_engine.evaluation.map_extras import map_extras
    from esegeta_engine.jobs.executors import make_executor

    plan = plan or plan_cohort(cfg)
    log.info("%s", plan.describe())
    out = cfg.output.dir
    if dry_run:
        return CohortResult(plan, out, "planned")
    inputs = [v.path for v in plan.volumes] + [m.path or m.nnunet or m.bundle for m in cfg.models]
    runner = make_executor(cfg.cohort, executor, cancel)  # an unreachable scheduler fails here, before any write
    try:
        folder = claim_folder(out, overwrite=cfg.output.overwrite, resume=resume, inputs=inputs)
    except BaseException:
        runner.close()
        raise
    try:
        previous = _resume_state(cfg, plan, out) if resume else ResumeState(out, None)
        kept = {j.key: rec for j in plan.jobs if (rec := previous.done(j.key, j.subject, j.file)) is not None}
        todo = [j for j in plan.jobs if j.key not in kept]
        folder.open_log()
    except BaseException:
        runner.close()
        folder.close()
        raise
    manifest = _manifest(cfg, plan, runner.name)
    manifest["results"] = [kept[j.key].to_json() for j in plan.jobs if j.key in kept]
    manifest["resumed"] = len(kept)
    path = out / MANIFEST
    write_json(manifest, path)
    log.info("napari-esegeta %s cohort on %s: %d jobs to run, %d kept from before; %s", __version__,
             runner.description, len(todo), len(kept), plan.grid_note)
    by_key = {j.key: j for j in plan.jobs}
    grids: dict[int, Volume] = {}
    started = time.perf_counter()
    done = len(kept)
    curves: dict[str, Any] = {}
    try:
        for outcome in runner.map(job_specs(cfg, plan, todo)):
            job = by_key[outcome.key]
            extra: dict[str, Any] = {}
            if outcome.status == "ok" and outcome.array is not None:
                grid = grid_volume(plan, job.volume, grids)
                written = save_map(outcome.array, grid, out / job.file)
                extra = {"file": job.file, "sha256": file_sha256(written)}
                # the same extra files as a single run's (the worker sent what they are made from)
                extra["extra"] = map_extras(outcome.extras, outcome.array, grid, out, job.file, None,
                                            cfg.evaluation, None)[1]
                if CURVES_KEY in outcome.extras:
                    curves[job.file] = outcome.extras[CURVES_KEY]
                    write_json(curves, out / "curves.json")
            else:
                log.warning("%s · %s · %s · class %d: %s (%s)", job.model, job.subject, job.method, job.cls,
                            outcome.status, outcome.error)
            rec = _record(job, plan, cfg, outcome, **extra)
            manifest["results"].append(rec)
            write_json(manifest, path)
            done += 1
            if on_job is not None:
                on_job(rec, done, len(plan.jobs))
            if cancel is not None and cancel.is_set():
                break
        if cancel is not None and cancel.is_set():
            manifest["status"] = "cancelled"
        else:
            manifest["status"] = "completed"
            manifest["cohort"] = write_cohort_results(out, cfg, plan, manifest["results"])
    except (KeyboardInterrupt, GeneratorExit):
        manifest["status"] = "cancelled"
        raise
    except BaseException as exc:
        manifest["status"] = "failed"
        manifest["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        try:
            runner.close()
        finally:
            manifest["duration_s"] = round(time.perf_counter() - started, 3)
            complete = manifest["status"] == "completed"
            written = {r.file for r in map(MapRecord.from_json, manifest["results"]) if r.file}
            manifest["results"].extend(r.replace(planned=False if complete else None).to_json()
                                       for r in previous.unplanned({(j.key, j.subject) for j in plan.jobs}, written))
            try:
                write_final_manifest(manifest, path)
                log.info("cohort %s in %.1f s; manifest: %s", manifest["status"], manifest["duration_s"], path)
            finally:
                folder.close()
    return CohortResult(plan, out, manifest["status"], manifest["results"], len(kept))
