"""What a run costs: the engine's pre-run estimate, a running rate and an ETA (no Qt).

The engine counts model evaluations; the GUI turns them into time with the
rate it measures (seconds per evaluation of the last run for the pre-run
warning, evaluations per second of the current run for the ETA).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from esegeta_engine.jobs.probe import format_duration

#: warn about a run needing more evaluations than this when no rate is measured yet
WARN_EVALUATIONS = 2000
#: say how long Cancel can take when one layer of a whole-volume evaluation runs longer than this
CANCEL_NOTE_S = 3.0


def estimate_evaluations(model: Any, volume: Any, methods: Sequence[Any], **explainer_kwargs: Any) -> int | None:
    """Model evaluations the engine expects for ``methods`` on ``volume`` (None when unknown).

    Uses ``Explainer.estimate(volumes, methods)`` (no model evaluation); any problem
    there is left for the run itself to report.
    """
    from esegeta_engine.explain import Explainer

    try:
        total = Explainer(model, **explainer_kwargs).estimate([volume], list(methods))
    except Exception:  # the run reports it with problem and fix
        return None
    return None if total is None else int(total)


def estimate_seconds(evaluations: int | None, seconds_per_evaluation: float | None) -> float | None:
    """``evaluations`` x the measured rate, None when either is unknown."""
    if evaluations is None or not seconds_per_evaluation:
        return None
    return evaluations * seconds_per_evaluation


def too_long(evaluations: int | None, seconds: float | None, limit_s: float) -> bool:
    """True when the estimate exceeds ``limit_s`` (or, with no rate, :data:`WARN_EVALUATIONS`)."""
    if seconds is not None:
        return seconds > limit_s
    return evaluations is not None and evaluations > WARN_EVALUATIONS


def long_run_text(evaluations: int, seconds: float | None) -> str:
    """The warning of a run estimated to be long, with what to do."""
    took = f"≈ {format_seconds(seconds)} at the last measured rate" if seconds is not None \
        else "no rate measured yet"
    return (f"This run needs about {evaluations:,} model evaluations ({took}).\n"
            "→ click 'Run anyway' to start it, or use fewer methods, classes or a coarser window")


def cancel_note(estimate: Any) -> str:
    """What the estimate says of Cancel on a whole-volume run whose slowest layer is long ('' otherwise).

    Cancel is checked between the network's layers; a layer over a whole scan cannot be stopped
    midway. A patch size is the remedy, but it explains the sliding-window function instead of the
    whole-volume one, so it is named, not applied.
    """
    wait = getattr(estimate, "cancel_wait_seconds", 0.0)
    if getattr(estimate, "evaluation_line", None) is None or wait <= CANCEL_NOTE_S:
        return ""
    return (f"\nCancel waits for the layer running: up to ≈ {format_duration(wait)} on this volume. A patch size "
            "(Model tab) keeps each step short, but then the sliding-window function is explained.")


format_seconds = format_duration  # one formatter for the probe's estimate and the ETA


class RateMeter:
    """Evaluations done / expected in the whole run, and an ETA from the measured rate.

    Reads the engine's ``Progress`` events (``run_evaluations``, ``run_expected``: None
    while some method cannot tell its cost in advance, and then no total or ETA is shown).
    """

    def __init__(self, start: float | None = None) -> None:
        self.evaluations = 0
        self.expected: int | None = None
        self._start = start

    def update(self, event: Any, now: float) -> None:
        """Take in a progress event seen at ``now`` (perf_counter seconds)."""
        if self._start is None:
            self._start = now
        self.evaluations = int(event.run_evaluations)
        self.expected = None if event.run_expected is None else int(event.run_expected)

    def eta(self, now: float) -> float | None:
        """Seconds left at the rate measured so far (None without a total or a rate)."""
        if self.expected is None or self._start is None or self.evaluations <= 0:
            return None
        elapsed = now - self._start
        if elapsed <= 0:
            return None
        return max(self.expected - self.evaluations, 0) * elapsed / self.evaluations

    def text(self, event: Any, now: float) -> str:
        """`` · run 120/500 · ETA 1 min 20 s``; empty without the run's expected total.

        (The engine's own message already counts the running job's evaluations.)
        """
        self.update(event, now)
        if self.expected is None:
            return ""
        out = f" · run {self.evaluations:,}/{self.expected:,}"
        eta = self.eta(now)
        return out + (f" · ETA {format_seconds(eta)}" if eta is not None else "")
