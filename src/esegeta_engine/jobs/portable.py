"""A single run's jobs as portable specs, for executors that run them elsewhere.

A run is a cohort of one: with ``execution.executor`` other than ``inline`` (a device pool,
a Dask cluster, a registered executor), each planned job of ``esegeta run`` travels as the
same picklable :class:`~esegeta_engine.jobs.worker.JobSpec` a one-volume cohort sends, and
the worker runs it with the same function (:func:`~esegeta_engine.jobs.worker.execute_job`),
so the key, the record and the map's bytes are those of the cohort and of the inline run.

The model travels as its config (a file, an nnU-Net results folder or a MONAI bundle), the
sha256 of the files that define it (:func:`source_sha256`, the key of the worker's model
cache) and the command line's trust (``--trust-pickled``, ``--trust-bundle``), exactly as a
cohort's jobs carry it (:func:`~esegeta_engine.jobs.worker.cached_source` loads it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esegeta_engine.errors import ConfigError
from esegeta_engine.jobs.plan import Job
from esegeta_engine.jobs.worker import JobSpec

if TYPE_CHECKING:  # pragma: no cover
    from esegeta_engine.config import Config

__all__ = ["portable_specs", "source_sha256"]

LOCAL_ONLY = ("report", "randomisation", "localisation")
"""Evaluation parts the run does itself, after the maps come back (on the whole run)."""


def source_sha256(model: Any) -> str:
    """sha256 of a model file, or of the files that define a folder model (nnU-Net, bundle).

    A folder's hash covers each defining file's relative name and sha256
    (:func:`~esegeta_engine.models.sources.source_files`), never its logs or outputs.

    Raises
    ------
    ModelLoadError
        If the file or folder does not exist.
    """
    from esegeta_engine.io import file_sha256
    from esegeta_engine.models.sources import selected_source, source_files, source_path

    files = source_files(model)  # raises if it does not exist
    where = Path(source_path(model))  # type: ignore[arg-type]
    if selected_source(model) == "file" or not where.is_dir():
        return file_sha256(where)
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(where)).encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def portable_specs(cfg: Config, trust_pickled: bool = False,
                   trust_bundle: bool = False) -> Callable[[Job], JobSpec]:
    """``spec(job) -> JobSpec`` for the planned jobs of ``cfg``.

    ``cfg`` is the run's config as its model source configured it (a deployed pipeline's own
    preprocessing); the worker loads the same source and configures it the same way.

    Raises
    ------
    ConfigError
        The run needs what only this process has: structure components (known only after this
        process's prediction).
    """
    kind = cfg.execution.executor
    if cfg.target.components:
        raise ConfigError(f"executor {kind!r} needs every job known before it runs; target.components are "
                          "found from the prediction", "use execution.executor: inline with components")
    model = {**cfg.model.model_dump(mode="json"), "trust_pickled": trust_pickled, "trust_bundle": trust_bundle}
    sha = source_sha256(cfg.model)
    common = dict(preprocess=cfg.preprocess.model_dump(mode="json"), target=cfg.target.model_dump(mode="json"),
                  evaluation=cfg.evaluation.model_dump(mode="json", exclude=set(LOCAL_ONLY)),
                  run=cfg.run.model_dump(mode="json"), execution=cfg.execution.model_dump(mode="json"))

    def spec(job: Job) -> JobSpec:
        (vi,) = job.volumes
        method = {"name": job.spec.name, "params": dict(job.params), "layers": [job.layer] if job.layer else [],
                  "noise_tunnel": job.noise_tunnel}
        return JobSpec(job.key, model, sha, str(cfg.volumes[vi]), job.cls, method, **common)

    return spec
