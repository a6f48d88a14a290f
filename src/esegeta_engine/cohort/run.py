"""Drive a cohort: plan, (resume), execute, write each map as it arrives, then the cohort results.

The manifest (``manifest.json``, ``"kind": "cohort"``) is rewritten atomically
after every job, so it is valid whenever the run stops; ``resume=True``
keeps every earlier result whose job key matches the plan and whose file still
has the recorded sha256, and runs only the rest, on any executor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from esegeta_engine import __version__
from esegeta_engine.cohort.config import CohortConfig
from esegeta_engine.cohort.plan import CohortJob, CohortPlan, file_sha256, grid_volume, plan_cohort
from esegeta_engine.cohort.worker import JobOutcome, JobSpec
from esegeta_engine.errors import ConfigError
from esegeta_engine.io import Volume, save_map, write_json
from esegeta_engine.pipeline import MANIFEST, environment

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
    def failed(self) -> list[dict[str, Any]]:
        """Records whose status is not ``ok``."""
        return [r for r in self.records if r["status"] != "ok"]


def job_specs(cfg: CohortConfig, plan: CohortPlan, jobs: list[CohortJob]) -> list[JobSpec]:
    """The picklable job descriptions a worker runs."""
    models = {m.name: m.model_dump(mode="json") for m in cfg.models}
    common = dict(preprocess=cfg.preprocess.model_dump(mode="json"),
                  target=cfg.target.model_dump(mode="json"),
                  evaluation=cfg.evaluation.model_dump(mode="json", exclude={"report"}),
                  run=cfg.run.model_dump(mode="json"),
                  execution=cfg.execution.model_dump(mode="json"))
    specs = []
    for j in jobs:
        v = plan.volumes[j.volume]
        specs.append(JobSpec(j.key, models[j.model], plan.model_sha[j.model], str(v.path), j.cls,
                             cfg.methods[j.method_index].model_dump(mode="json"), **common,
                             ground_truth=str(v.ground_truth) if v.ground_truth else None,
                             roi=str(v.roi) if v.roi and cfg.target.kind == "roi" else None))
    return specs


def _previous(out: Path, plan: CohortPlan) -> dict[str, dict[str, Any]]:
    """Earlier ok results still valid for this plan, by job key."""
    import json

    path = out / MANIFEST
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("resume: %s is unreadable; every job runs again", path)
        return {}
    planned = {j.key: j for j in plan.jobs}
    keep = {}
    for r in old.get("results", []):
        job = planned.get(r.get("key", ""))
        f = out / r.get("file", "") if r.get("file") else None
        if r.get("status") == "ok" and job and f is not None and f.is_file() and r.get("file") == job.file \
                and file_sha256(f) == r.get("sha256"):
            keep[job.key] = r
    return keep


def _manifest(cfg: CohortConfig, plan: CohortPlan, executor: str) -> dict[str, Any]:
    return {
        "kind": "cohort", "status": "running", "executor": executor,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.model_dump(mode="json"), "environment": environment(), "seed": cfg.run.seed,
        "plan": {"jobs": len(plan.jobs), "estimated_model_evaluations": plan.estimated_evaluations,
                 "common_grid": plan.common_grid, "grid_note": plan.grid_note},
        "models": [{"name": m.name, "path": str(m.path), "sha256": plan.model_sha[m.name]} for m in cfg.models],
        "volumes": [{"subject": v.subject, "subject_from": v.subject_from, "group": v.group, "path": str(v.path), "sha256": v.sha256,
                     "shape": list(v.shape), "affine": v.affine.tolist(),
                     "ground_truth": str(v.ground_truth) if v.ground_truth else None} for v in plan.volumes],
        "results": [],
    }


def _record(job: CohortJob, plan: CohortPlan, o: JobOutcome, **extra: Any) -> dict[str, Any]:
    v = plan.volumes[job.volume]
    rec = {"key": job.key, "model": job.model, "subject": job.subject, "group": v.group, "method": job.method,
           "class": job.cls, "status": o.status, "seconds": round(o.seconds, 3),
           "model_evaluations": o.evaluations, "model_inputs": o.model_inputs, "worker": o.worker,
           "device": o.device, "metrics": o.metrics}
    if o.error:
        rec["error"] = o.error
    return {**rec, **extra}


def run_cohort(cfg: CohortConfig, *, executor: str | None = None, dry_run: bool = False, resume: bool = False,
               on_job: Callable[[dict[str, Any], int, int], None] | None = None,
               plan: CohortPlan | None = None) -> CohortResult:
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

    Raises
    ------
    EsegetaError
        Problems found before work starts (inputs, grids, unreachable scheduler).
    """
    from esegeta_engine.cohort.aggregate import write_cohort_results
    from esegeta_engine.cohort.executors import make_executor

    plan = plan or plan_cohort(cfg)
    log.info("%s", plan.describe())
    out = cfg.output.dir
    if dry_run:
        return CohortResult(plan, out, "planned")
    if (out / MANIFEST).exists() and not (cfg.output.overwrite or resume):
        raise ConfigError(f"output folder {str(out)!r} already holds a run ({MANIFEST})",
                          "use --resume to finish it, or choose another output.dir (--out), or --overwrite")
    kept = _previous(out, plan) if resume else {}
    todo = [j for j in plan.jobs if j.key not in kept]
    runner = make_executor(cfg.cohort, executor)  # an unreachable scheduler fails here, before any work
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "esegeta.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    manifest = _manifest(cfg, plan, runner.name)
    manifest["results"] = [kept[j.key] for j in plan.jobs if j.key in kept]
    manifest["resumed"] = len(kept)
    path = out / MANIFEST
    write_json(manifest, path)
    log.info("napari-esegeta %s cohort on %s: %d jobs to run, %d kept from before; %s", __version__,
             runner.description, len(todo), len(kept), plan.grid_note)
    by_key = {j.key: j for j in plan.jobs}
    grids: dict[int, Volume] = {}
    started = time.perf_counter()
    done = len(kept)
    try:
        for outcome in runner.map(job_specs(cfg, plan, todo)):
            job = by_key[outcome.key]
            extra: dict[str, Any] = {}
            if outcome.status == "ok" and outcome.array is not None:
                written = save_map(outcome.array, grid_volume(plan, job.volume, grids), out / job.file)
                extra = {"file": job.file, "sha256": file_sha256(written)}
            else:
                log.warning("%s · %s · %s · class %d: %s (%s)", job.model, job.subject, job.method, job.cls,
                            outcome.status, outcome.error)
            rec = _record(job, plan, outcome, **extra)
            manifest["results"].append(rec)
            write_json(manifest, path)
            done += 1
            if on_job is not None:
                on_job(rec, done, len(plan.jobs))
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
        runner.close()
        manifest["duration_s"] = round(time.perf_counter() - started, 3)
        write_json(manifest, path)
        log.info("cohort %s in %.1f s; manifest: %s", manifest["status"], manifest["duration_s"], path)
        log.removeHandler(handler)
        handler.close()
    return CohortResult(plan, out, manifest["status"], manifest["results"], len(kept))
