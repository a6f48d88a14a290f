"""A single run's jobs as portable specs, for executors that run them elsewhere.

A run is a cohort of one: with ``execution.executor`` other than ``inline`` (a device pool,
a Dask cluster, a registered executor), each planned job of ``esegeta run`` travels as the
same picklable :class:`~esegeta_engine.jobs.worker.JobSpec` a one-volume cohort sends, and
the worker runs it with the same function (:func:`~esegeta_engine.jobs.worker.execute_job`),
so the key, the record and the map's bytes are those of the cohort and of the inline run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from esegeta_engine.errors import ConfigError
from esegeta_engine.jobs.plan import Job
from esegeta_engine.jobs.worker import JobSpec

if TYPE_CHECKING:  # pragma: no cover
    from esegeta_engine.config import Config

__all__ = ["portable_specs"]

LOCAL_ONLY = ("report", "randomisation", "localisation")
"""Evaluation parts the run does itself, after the maps come back (on the whole run)."""


def portable_specs(cfg: Config, trust_pickled: bool = False) -> Callable[[Job], JobSpec]:
    """``spec(job) -> JobSpec`` for the planned jobs of ``cfg``.

    Raises
    ------
    ConfigError
        The run needs what only this process has: a model folder (nnU-Net, MONAI bundle), a
        pickled module trusted on the command line, or structure components (known only
        after this process's prediction).
    """
    from esegeta_engine.io import file_sha256

    kind = cfg.execution.executor
    if cfg.model.path is None or cfg.model.nnunet is not None or cfg.model.bundle is not None:
        raise ConfigError(f"executor {kind!r} loads the model in each worker from a model file; nnU-Net and "
                          "MONAI bundle folders run inline", "use execution.executor: inline for this model")
    if trust_pickled:
        raise ConfigError(f"executor {kind!r} would load the pickled module again in each worker (it runs "
                          "code from the file)", "use execution.executor: inline with --trust-pickled")
    if cfg.target.components:
        raise ConfigError(f"executor {kind!r} needs every job known before it runs; target.components are "
                          "found from the prediction", "use execution.executor: inline with components")
    model = cfg.model.model_dump(mode="json")
    sha = file_sha256(cfg.model.path)
    common = dict(preprocess=cfg.preprocess.model_dump(mode="json"), target=cfg.target.model_dump(mode="json"),
                  evaluation=cfg.evaluation.model_dump(mode="json", exclude=set(LOCAL_ONLY)),
                  run=cfg.run.model_dump(mode="json"), execution=cfg.execution.model_dump(mode="json"))

    def spec(job: Job) -> JobSpec:
        (vi,) = job.volumes
        method = {"name": job.spec.name, "params": dict(job.params), "layers": [job.layer] if job.layer else [],
                  "noise_tunnel": job.noise_tunnel}
        return JobSpec(job.key, model, sha, str(cfg.volumes[vi]), job.cls, method, **common)

    return spec
