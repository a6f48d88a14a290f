"""Refusing, before it starts, work whose expected cost cannot fit in the time limit.

Two rules, both derived from what the run has already measured (never from a guess
about the hardware); docs/execution.md states them for users:

1. **The prediction pass** (the unperturbed forward that freezes the target) of a
   sliding window knows its patch count before it starts. :class:`PatchBudget` times its
   first :data:`PROBE_BATCHES` patch batches (the probe costs nothing extra: they are
   part of the pass) and projects the rest at that rate; a projected end past the
   deadline stops the pass there with one line naming the patch count, the measured rate
   and the fixes. (After the probe the plain deadline applies.)
2. **A job** makes at least its expected number of model evaluations, and each one
   runs the network over at least the inputs of the prediction pass — all of them, or
   for a sliding window restricted to a target's support, the patches that touch it;
   under the perturbation reuse of a sliding window only the first call is a full pass.
   :func:`refuse_job` refuses a job whose lower bound (evaluations x measured pass
   seconds) is more than :data:`MARGIN` times the limit, so that a pass slowed by
   warm-up (first-call allocation, kernel selection) cannot refuse a job that would fit.
   A pass shorter than :data:`MIN_PASS_S` is not used: its time is mostly fixed start-up
   cost, not the per-evaluation cost (the deadline still holds for those jobs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from esegeta_engine.errors import MethodError

PROBE_BATCHES = 2
"""Patch batches timed before a sliding-window prediction pass is projected."""
MARGIN = 2.0
"""A job is refused when its lower-bound cost is more than this many times the limit."""
MIN_PASS_S = 0.5
"""Prediction passes shorter than this (seconds) are not used to refuse jobs."""

_FIX = ("raise the time limit (--timeout or run.timeout_s), use a larger patch size or less overlap "
        "(execution.patch_size, execution.overlap), or explain an ROI crop of the volume")


class TimeLimitError(MethodError):
    """Work refused or stopped because it cannot finish within the time limit."""


class PatchBudget:
    """Projects a patch pass from its first batches; raises if it cannot end before the deadline.

    Parameters
    ----------
    total : int
        Patches the pass will evaluate.
    deadline : float
        ``clock()`` value of the deadline.
    timeout_s : float
        The limit (for the message).
    what : str
        Named in the message ("the prediction pass").
    clock : callable, optional
        Monotonic seconds (default ``time.monotonic``).
    """

    def __init__(self, total: int, deadline: float, timeout_s: float, what: str = "the prediction pass",
                 clock: Callable[[], float] | None = None) -> None:
        self.total = int(total)
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.what = what
        self.clock = clock or (lambda: time.monotonic())  # looked up per call (tests speed it up)
        self.calls = 0
        self.patches_done = 0
        self.first: float | None = None
        self.batch = 1

    def __call__(self, n: int) -> None:
        """Called before each patch batch of ``n`` patches."""
        now = self.clock()
        if self.first is None:
            self.first, self.batch = now, max(1, int(n))
        self.calls += 1
        if self.calls == PROBE_BATCHES + 1 and self.patches_done < self.total:
            per_patch = (now - self.first) / max(1, self.patches_done)
            remaining = self.total - self.patches_done
            projected = now + per_patch * remaining
            if projected > self.deadline:
                per_batch = per_patch * self.batch
                whole = per_patch * self.total
                raise TimeLimitError(
                    f"{self.what} needs {self.total} patches ({math.ceil(self.total / self.batch)} batches of "
                    f"{self.batch}); its first {PROBE_BATCHES} batches took {per_batch:.3g} s each, so it "
                    f"would take about {whole:.0f} s, more than the time limit of {self.timeout_s:g} s", _FIX)
        self.patches_done += int(n)


def arm_pass_budget(score_model: Any, x: Any, monitor: Any, what: str = "the prediction pass") -> None:
    """Give ``monitor`` a :class:`PatchBudget` for one sliding-window pass of ``x`` (no-op otherwise)."""
    if not getattr(score_model, "patchwise", False) or monitor.deadline is None or monitor.timeout_s is None:
        monitor.budget = None
        return
    runner = score_model.runner
    grid = runner.grid(tuple(x.shape[2:]), x.device)
    total = len(runner.active_patches(grid)) * int(x.shape[0])
    monitor.budget = PatchBudget(total, monitor.deadline, monitor.timeout_s, what)


def support_fraction(score_model: Any, x: Any) -> float:
    """Share of the prediction pass's patches a job's score model evaluates per call (1 when whole)."""
    if not getattr(score_model, "patchwise", False):
        return 1.0
    runner = score_model.runner
    grid = runner.grid(tuple(x.shape[2:]), x.device)
    return len(runner.active_patches(grid)) / max(1, len(grid))


def lower_bound_s(job: Any, pass_s: float, fraction: float = 1.0, reuse: bool = False) -> float | None:
    """Seconds a job needs at least: evaluations x (share of) one measured prediction pass.

    ``reuse``: a sliding window's perturbation reuse, where only the first call is a full pass.
    """
    n = getattr(job, "expected_evaluations", None)
    if n is None or pass_s <= 0:
        return None
    return pass_s * fraction * (min(n, 1) if reuse else n)


def refuse_job(job: Any, timeout_s: float | None, pass_s: float | None, fraction: float = 1.0,
               reuse: bool = False) -> str | None:
    """Why ``job`` is refused before it starts (see the module docstring), or ``None`` to run it."""
    if timeout_s is None or pass_s is None or pass_s < MIN_PASS_S:
        return None
    need = lower_bound_s(job, pass_s, fraction, reuse)
    if need is None or need <= MARGIN * timeout_s:
        return None
    return (f"not started: {job.expected_evaluations} model evaluations at {pass_s * fraction:.3g} s or more each "
            f"(the measured prediction pass) need at least {need:.0f} s, more than {MARGIN:g} x the time limit "
            f"of {timeout_s:g} s; fix: {_FIX}, or lower the method's evaluations (steps, samples, window)")


def job_refusal(explainer: Any, job: Any, x: Any, target: Any, support: Any = None) -> str | None:
    """:func:`refuse_job` for ``job`` of ``explainer`` on input ``x`` (builds no model evaluation)."""
    pass_s, timeout_s = getattr(explainer, "_pass_s", None), getattr(explainer, "timeout_s", None)
    if pass_s is None or timeout_s is None or getattr(job, "expected_evaluations", None) is None:
        return None
    try:
        sm = explainer.make_score_model(target, x, support=support)
        fraction = support_fraction(sm, x)
    except Exception:  # the job itself will report why it cannot be built
        return None
    reuse = sm.patchwise and getattr(job.spec, "patchwise", None) == "perturbation"
    return refuse_job(job, timeout_s, pass_s, fraction, reuse)
