"""One cohort job, run where a worker runs it: an ordinary single-volume run of one method and class.

Everything a job needs travels as a small picklable :class:`JobSpec` (paths,
hashes and config dumps, never arrays or models); the worker loads the model
once per process (and thread) and keeps it (:data:`_MODELS`, keyed by path, file hash,
device and thread), so a worker that runs many jobs of one model reads its weights once.
The result travels back as a :class:`JobOutcome` holding the map (float32, in
NIfTI order) and the per-map metrics.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from esegeta_engine.errors import EsegetaError

_MODELS: dict[tuple[str, str, str, str], Any] = {}
TRACE_ENV = "ESEGETA_COHORT_TRACE"
"""Environment variable naming a folder: each job start then leaves an empty file
``<key>.<pid>.<ns>`` there (a debugging aid that shows which jobs ran where and how often)."""


@dataclass(frozen=True)
class JobSpec:
    """What a worker needs to run one job (small and picklable)."""

    key: str
    model: dict[str, Any]
    model_sha: str
    volume: str
    cls: int
    method: dict[str, Any]
    preprocess: dict[str, Any]
    target: dict[str, Any]
    evaluation: dict[str, Any]
    run: dict[str, Any]
    execution: dict[str, Any] = field(default_factory=dict)
    ground_truth: str | None = None
    roi: str | None = None


@dataclass
class JobOutcome:
    """A finished job: the map and metrics, or why it failed."""

    key: str
    status: str
    array: np.ndarray | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    evaluations: int = 0
    model_inputs: int = 0
    error: str | None = None
    worker: str = ""
    device: str = ""
    target_label: str = ""
    notes: list[str] = field(default_factory=list)
    execution: dict[str, Any] = field(default_factory=dict)
    patch_evaluations: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    """The raw metric entries a run's extra files come from (faithfulness curves, the stability
    spread in NIfTI order: :func:`~esegeta_engine.evaluation.map_extras.portable_extras`)."""
    network_evaluations: int | None = None  # a deployed pipeline's planned network calls (the job's plan)


def worker_device(default: str) -> str:
    """The device this process should use: its Dask worker's assigned device, else ``default``."""
    try:
        from distributed import get_worker

        return getattr(get_worker(), "esegeta_device", None) or default
    except (ImportError, ValueError):  # not inside a Dask worker
        return default


TRUST_KEYS = ("trust_pickled", "trust_bundle")
"""Keys of a job's model dict that carry the command line's trust (never a config's)."""


def cached_source(model: dict[str, Any], sha: str, device: str) -> Any:
    """The loaded model source of ``model`` (a ModelConfig dump, plus trust keys) on ``device``, once per process.

    A model file, an nnU-Net folder or a MONAI bundle, through its registered source; the trust
    keys (``--trust-pickled``, ``--trust-bundle`` of the command) come with the job, never from a config.
    """
    from esegeta_engine.config import ModelConfig
    from esegeta_engine.models import Trust, load_source

    # one copy per thread: the threads of a device pool never share a module (model_guard and hooks)
    where = model.get("path") or model.get("nnunet") or model.get("bundle")
    memo = (str(where), sha, device, threading.current_thread().name)
    if memo not in _MODELS:
        cfg = ModelConfig(**{**{k: v for k, v in model.items() if k not in ("name", *TRUST_KEYS)},
                             "device": device})
        _MODELS[memo] = load_source(cfg, Trust(pickled=bool(model.get("trust_pickled", False)),
                                               bundle=bool(model.get("trust_bundle", False))))
    return _MODELS[memo]


def cached_model(model: dict[str, Any], sha: str, device: str) -> nn.Module:
    """The model of ``model`` (a ModelConfig dump) on ``device``, loaded once per process."""
    return cached_source(model, sha, device).module


def _trace(key: str) -> None:
    folder = os.environ.get(TRACE_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{key}.{os.getpid()}.{time.time_ns()}").touch()


def execute_job(spec: JobSpec, device: str | None = None, cancel: threading.Event | None = None) -> JobOutcome:
    """Run one job and return its outcome; user errors become a ``failed`` outcome, never an exception.

    Only the death of the process (or a bug in this function) makes a job
    end without an outcome; executors handle that. ``device`` overrides the model's (a
    device pool's thread); ``cancel`` stops the job at its next model evaluation.
    """
    _trace(spec.key)
    device = device or worker_device(spec.model.get("device", "cpu"))
    where = f"{socket.gethostname()}:{os.getpid()}" + (f":{device}" if device.startswith("cuda") else "")
    start = time.perf_counter()
    try:
        return _run(spec, device, where, start, cancel)
    except EsegetaError as exc:
        return JobOutcome(spec.key, "failed", error=str(exc), seconds=time.perf_counter() - start,
                          worker=where, device=device)
    except Exception as exc:  # recorded with its type: the run goes on
        return JobOutcome(spec.key, "failed", error=f"{type(exc).__name__}: {exc}",
                          seconds=time.perf_counter() - start, worker=where, device=device)


def _run(spec: JobSpec, device: str, where: str, start: float, cancel: threading.Event | None) -> JobOutcome:
    from esegeta_engine.config import parse_config
    from esegeta_engine.evaluation.evaluators import make_evaluators, scalar_metrics
    from esegeta_engine.evaluation.map_extras import portable_extras
    from esegeta_engine.explain import Explainer, JobFailed, MapReady
    from esegeta_engine.inputs import load_inputs, load_mask_on_grid

    model_cfg = {k: v for k, v in spec.model.items() if k not in ("name", *TRUST_KEYS)}
    target = {**spec.target, "classes": [spec.cls]}
    if spec.roi is not None:
        target["roi_mask"] = spec.roi
    if target.get("kind") == "outcome" and spec.ground_truth is not None:  # this subject's ground truth
        target["ground_truth"] = spec.ground_truth
    cfg = parse_config({"model": {**model_cfg, "device": device}, "volumes": [spec.volume],
                        "preprocess": spec.preprocess, "target": target, "methods": [spec.method],
                        "run": spec.run, "evaluation": spec.evaluation, "execution": spec.execution},
                       source="cohort job")
    loaded = cached_source(spec.model, spec.model_sha, device)
    cfg = loaded.configure(cfg)  # a deployed pipeline (nnU-Net, bundle) decides its own preprocessing
    model = loaded.module
    volumes, roi = load_inputs(cfg)
    explainer = Explainer(model, cfg.preprocess, cfg.target, cfg.model.output, seed=cfg.run.seed,
                          timeout_s=cfg.run.timeout_s, execution=cfg.execution)
    evaluators = make_evaluators(cfg.evaluation, cfg.run.seed)
    for event in explainer.iter_explain(volumes, cfg.methods, roi_mask=roi, evaluators=evaluators,
                                        threaded=False, cancel=cancel):
        if isinstance(event, MapReady):
            metrics = scalar_metrics(event.metrics)
            if spec.ground_truth is not None:
                mask = load_mask_on_grid(Path(spec.ground_truth), volumes, cfg.preprocess.spatial_dims,
                                         "ground-truth mask")
                metrics.update(_localisation(event.array, mask))
            return JobOutcome(spec.key, "ok", event.array, metrics, event.seconds, event.evaluations,
                              event.inputs_evaluated, worker=where, device=device,
                              target_label=event.job.cls_label, notes=list(event.notes),
                              execution=dict(event.execution), patch_evaluations=event.patch_evaluations,
                              extras=portable_extras(event.metrics, explainer.geometry(volumes[0])),
                              network_evaluations=getattr(event.job, "network_evaluations", None))
        if isinstance(event, JobFailed):
            return JobOutcome(spec.key, event.status, error=event.error, seconds=event.seconds,
                              evaluations=event.evaluations, worker=where, device=device,
                              target_label=event.job.cls_label)
    return JobOutcome(spec.key, "failed", error="the method produced no map", worker=where, device=device,
                      seconds=time.perf_counter() - start)


def _localisation(array: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    from esegeta_engine.evaluation.localisation import LOCALISATION_METRICS, localisation_scores

    spatial = array if array.ndim == mask.ndim else array.sum(-1)
    scores = localisation_scores(spatial, mask)
    return {k: (None if isinstance(v, float) and np.isnan(v) else v)
            for k, v in scores.items() if k in LOCALISATION_METRICS}
