"""Events of a run: progress with run-wide evaluation totals, finished maps, failed jobs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from esegeta_engine.jobs.plan import Job
from esegeta_engine.methods import MethodContext


@dataclass(frozen=True)
class Progress:
    """Progress of a run: ``done`` of ``total`` jobs, with a message.

    Attributes
    ----------
    evaluations : int
        Model evaluations of the current job so far.
    run_evaluations : int
        Model evaluations of the whole run so far.
    run_expected : int or None
        Expected model evaluations of the whole run (None while some job's count is unknown).
    """

    done: int
    total: int
    message: str
    evaluations: int = 0
    run_evaluations: int = 0
    run_expected: int | None = None


@dataclass
class MapReady:
    """A finished attribution map for one volume, in NIfTI axis order.

    ``metrics`` holds what the evaluators computed for this map (NaN or an
    ``<name>_error`` entry where one could not be computed).
    """

    job: Job
    volume: int
    array: np.ndarray
    seconds: float
    evaluations: int
    metrics: dict[str, Any] = field(default_factory=dict)
    inputs_evaluated: int = 0
    notes: list[str] = field(default_factory=list)
    execution: dict[str, Any] = field(default_factory=dict)
    patch_evaluations: int = 0


Evaluator = Callable[["Job", MethodContext, torch.Tensor], dict[str, Any]]
"""``evaluator(job, context, attribution) -> {metric: value}``, run after each job in its
worker thread; ``attribution`` is on the input grid, ``(N, C or 1, *spatial)``."""


@dataclass
class JobFailed:
    """A job that failed, timed out or was cancelled; the run goes on (unless cancelled)."""

    job: Job
    status: str  # "failed" | "timeout" | "cancelled"
    error: str
    seconds: float
    evaluations: int


Event = Progress | MapReady | JobFailed


def outcome_event(job: Job, outcome: Any) -> MapReady | JobFailed:
    """The event of ``job`` from the :class:`~esegeta_engine.jobs.worker.JobOutcome` of an executor
    that ran it elsewhere (a device pool, Dask): what the in-process run would have yielded."""
    if outcome.status == "ok" and outcome.array is not None:
        return MapReady(job, job.volumes[0], outcome.array, outcome.seconds, outcome.evaluations,
                        {**outcome.metrics, **getattr(outcome, "extras", {})}, outcome.model_inputs, list(outcome.notes),
                        dict(outcome.execution), outcome.patch_evaluations)
    return JobFailed(job, outcome.status, outcome.error or "the job produced no map", outcome.seconds,
                     outcome.evaluations)


def _of(job: Job) -> str:
    return f" of {job.expected_evaluations}" if job.expected_evaluations else ""


def score_evaluations(metrics: Any) -> int:
    """The scores' model evaluations in a map's metrics (their ``<score>_evaluations``), or rows of them."""
    rows = metrics if isinstance(metrics, list) else [metrics or {}]
    return sum(v for row in rows for k, v in row.items() if k.endswith("_evaluations") and isinstance(v, int))


class RunState:
    """Run-wide evaluation counts for progress totals and ETAs."""

    def __init__(self, expected: int | None) -> None:
        self.expected = expected
        self.finished_evaluations = 0
        self.job_evaluations = 0
        self.score_evaluations = 0  # the last job's scores (ROAD, MPRT, ...: their ``*_evaluations``)

    def finished(self, job: Job, evaluations: int, expected: int | None = None) -> None:
        """``evaluations`` made by ``job``; ``expected``: what the estimate counted for it
        (default the method's own, ``job.expected_evaluations``)."""
        expected = job.expected_evaluations if expected is None else expected
        self.finished_evaluations += evaluations
        if self.expected is not None and expected is not None:
            # the estimate used the job's predicted count: replace it by what it really made
            self.expected += evaluations - expected

    def skipped(self, job: Job, expected: int | None = None) -> None:
        expected = job.expected_evaluations if expected is None else expected
        if self.expected is not None and expected is not None:
            self.expected -= expected

    def progress(self, done: int, total: int, message: str, evaluations: int = 0) -> Progress:
        return Progress(done, total, message, evaluations, self.finished_evaluations + evaluations,
                        self.expected)
