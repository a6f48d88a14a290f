"""The score model: user model -> selected output -> target scores ``(N, K)``.

:func:`make_score_model` is the one factory every caller uses (explain, evaluation,
randomisation, the plugin): it puts the execution form between the user's model
and the target — whole-volume (padded to sizes the network takes, cropped back) or
sliding-window (patch-wise, see :mod:`esegeta_engine.forward.sliding`) — and
mixed precision (autocast around the network only; targets and gradients stay fp32).

Every model evaluation of every method goes through :class:`ScoreModel`,
which makes it the one place where the engine counts evaluations for progress
and checks cancellation and the per-method deadline. Both checks raise an
exception that Captum propagates, so a long Captum call stops at the next
model evaluation from whatever thread asked for it — no signals involved.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from esegeta_engine.errors import Cancelled, MethodTimeout
from esegeta_engine.forward.runner import ExecutionForm, bind_monitor, build_runner
from esegeta_engine.models import OutputSelector
from esegeta_engine.targets import Target


class EvaluationMonitor:
    """Counts model evaluations and enforces cancellation and deadlines.

    Parameters
    ----------
    cancel : threading.Event, optional
        Set it (from any thread) to stop at the next model evaluation.
    on_evaluation : callable, optional
        Called with the running count after each evaluation (progress).
    """

    def __init__(
        self,
        cancel: threading.Event | None = None,
        on_evaluation: Callable[[int], None] | None = None,
    ) -> None:
        self.cancel = cancel or threading.Event()
        self.abort = threading.Event()  # stops the current job only (stuck past its time limit)
        self.on_evaluation = on_evaluation
        self.count = 0
        self.samples = 0
        self.patches = 0  # patch evaluations (sliding-window execution)
        self.deadline: float | None = None
        self.timeout_s: float | None = None
        # called before every patch batch with its size: projects a pass past the deadline
        # (see esegeta_engine.watchdog.PatchBudget)
        self.budget: Callable[[int], None] | None = None

    def for_job(self) -> EvaluationMonitor:
        """A monitor of its own for one job (same cancel): an abandoned job's stays aborted."""
        return EvaluationMonitor(self.cancel)

    def start(self, timeout_s: float | None) -> None:
        """Reset the counters and arm a deadline ``timeout_s`` seconds from now."""
        self.count = 0
        self.samples = 0
        self.patches = 0
        self.abort.clear()
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def check(self) -> None:
        """Raise :class:`Cancelled` or :class:`MethodTimeout` if due."""
        if self.cancel.is_set():
            raise Cancelled("cancelled by the user")
        if self.abort.is_set():
            raise MethodTimeout(f"exceeded the time limit of {self.timeout_s:g} s")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise MethodTimeout(f"exceeded the time limit of {self.timeout_s:g} s")

    def patch_batch(self, n: int) -> None:
        """Checked before every patch batch, so cancel stops within one patch batch."""
        self.check()
        if self.budget is not None:
            self.budget(n)
        self.patches += n

    def evaluated(self, batch: int) -> None:
        """Record one model evaluation of ``batch`` inputs."""
        self.count += 1
        self.samples += batch
        if self.on_evaluation is not None:
            self.on_evaluation(self.count)


class ScoreModel(nn.Module):
    """``x -> target(select(model(x)))``: the function every method explains.

    Parameters
    ----------
    model : nn.Module
        The user's model (shared, never modified for good).
    target : Target
        Turns the selected output into ``(N, K)`` scores.
    output : int, str or None
        Output selection for models returning tuples/lists/dicts.
    monitor : EvaluationMonitor, optional
        Progress, cancellation and deadline checks.
    form : ExecutionForm, optional
        Whole-volume (default: the model called once on the input) or sliding-window,
        padding and precision; build it with :func:`make_score_model`.
    """

    def __init__(
        self,
        model: nn.Module,
        target: Target,
        output: int | str | None = None,
        monitor: EvaluationMonitor | None = None,
        form: ExecutionForm | None = None,
    ) -> None:
        super().__init__()
        self._monitor = monitor or EvaluationMonitor()
        self.form = form or ExecutionForm()
        # the user's model is reachable through one child only: hook-based methods walk the
        # module tree (``Module.apply``) and must meet each of its modules once
        net: nn.Module = OutputSelector(model, output)
        stitched = getattr(target, "on_sliding_window", None)
        if self.form.sliding is not None and callable(stitched):
            # a layer-channel target: each patch's output becomes its channel map, blended like
            # any network output (esegeta_engine.channel_target.ChannelMap)
            from esegeta_engine.channel_target import ChannelMap

            target = stitched()
            net = ChannelMap(net, target)
        self.target = target
        self.runner = build_runner(net, self.form, self._monitor)
        bind = getattr(model, "bind_monitor", None)  # a deployed pipeline's own patches count and cancel
        self._bind_model = bind if callable(bind) else None
        if self._bind_model is not None:
            self._bind_model(self._monitor.patch_batch)
        self._handed: tuple[torch.Tensor, torch.Tensor] | None = None  # see :meth:`handing_over`

    @contextlib.contextmanager
    def handing_over(self, x: torch.Tensor, scores: torch.Tensor) -> Iterator[None]:
        """Within the block, an input equal to ``x`` scores ``scores`` (counted as an evaluation, no
        network call): a method that summed them from its own patches hands them over (DeepLIFT's
        ``F(x0)``), so hooks on this model (the completeness check's tap) see them."""
        before, self._handed = self._handed, (x.detach(), scores.detach())
        try:
            yield
        finally:
            self._handed = before

    @property
    def monitor(self) -> EvaluationMonitor:
        """Counting, cancel and deadline of every evaluation."""
        return self._monitor

    @monitor.setter
    def monitor(self, monitor: EvaluationMonitor) -> None:
        # replaced after building (the randomisation watches its own cancel): the checks before each
        # patch batch and between the network's modules move to it too
        self._monitor = monitor
        bind_monitor(self.runner, monitor)
        if self._bind_model is not None:
            self._bind_model(monitor.patch_batch)

    @property
    def net(self) -> OutputSelector:
        """The user's model with its output selection (inside the runner)."""
        return self.runner.net

    @property
    def notes(self) -> list[str]:
        """What the execution form changed about the explained function (for the map's notes)."""
        return list(getattr(self.net, "notes", []))

    @property
    def patchwise(self) -> bool:
        """True when the model runs as a sliding window of patches."""
        return self.form.sliding is not None

    def model_output(self, x: torch.Tensor) -> torch.Tensor:
        """The selected raw model output (no target), counted as an evaluation."""
        self.monitor.check()
        out = self.runner(x)
        self.monitor.evaluated(x.shape[0])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        handed = self._handed
        if handed is not None and handed[0].shape == x.shape and torch.equal(handed[0], x.detach()):
            self.monitor.check()
            self.monitor.evaluated(x.shape[0])
            return handed[1].clone()
        # a layer-channel target reads an activation captured by a hook during this pass only
        with self.target.capture(self.net.model):
            return self.target(self.model_output(x))


def make_score_model(
    model: nn.Module,
    target: Target,
    *,
    output: int | str | None = None,
    monitor: EvaluationMonitor | None = None,
    form: ExecutionForm | None = None,
) -> ScoreModel:
    """Build the score model of ``model`` for ``target`` (the one factory every caller uses).

    Parameters
    ----------
    model : nn.Module
        The user's model (shared, never modified for good).
    target : Target
        Output -> ``(N, K)`` scores.
    output : int, str or None
        Output selection for multi-output models.
    monitor : EvaluationMonitor, optional
        Counting, cancellation and deadline.
    form : ExecutionForm, optional
        Whole volume or sliding window, padding, precision (see
        :func:`esegeta_engine.forward.runner.execution_form`).
    """
    return ScoreModel(model, target, output, monitor, form)
