"""The time limit as a real limit: model work on a thread the run can abandon.

A job's deadline is checked by the :class:`~esegeta_engine.forward.scoring.EvaluationMonitor` at every
model evaluation and patch batch, which stops any method that keeps calling the model. Two
things escape that check: a forward pass that never returns (a model stuck in C code or
waiting on a lock cannot be interrupted from inside its thread) and work before the first
check. So every job and every prediction pass runs on a *model thread* while the caller
waits with a watchdog:

1. at the deadline the watchdog sets the monitor's ``abort`` flag: a model that returns
   stops at its next evaluation (the job is ``timeout``, the run goes on);
2. if the thread is still inside the model :func:`grace_s` seconds later, the job is
   *abandoned*: it fails with a message saying so, the caller moves on and the next job
   runs on a fresh model thread. The abandoned thread is a daemon; its monitor stays
   aborted, so if its forward ever returns it stops at its next check and writes nothing.

One model thread per calling thread is kept alive between jobs, so torch's intra-op thread
pool is created once (the cost that made per-job threads slower than the caller's thread).
"""

from __future__ import annotations

import contextvars
import queue
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, TypeVar

from esegeta_engine.errors import Cancelled, MethodTimeout
from esegeta_engine.forward.scoring import EvaluationMonitor
from esegeta_engine.timebudget import TimeLimitError

T = TypeVar("T")

POLL_S = 0.05
"""How often the waiting caller looks at the job (and yields progress)."""


def grace_s(timeout_s: float) -> float:
    """Seconds a model call may run past the deadline before its job is abandoned.

    One model evaluation of a large 3D network may legitimately take tens of seconds,
    so the grace is a tenth of the limit, at least 5 s and at most 60 s.
    """
    return min(60.0, max(5.0, 0.1 * timeout_s))


class Abandoned(MethodTimeout):
    """A model call did not return within the grace period after the deadline."""


class _ModelThread:
    """A daemon thread that runs submitted calls one after the other."""

    def __init__(self) -> None:
        self.tasks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.lost = False
        self.thread = threading.Thread(target=self._loop, name="esegeta-model", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            task = self.tasks.get()
            if task is None:
                return
            fn, box, done = task
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the waiting caller
                box["error"] = exc
            finally:
                done.set()

    def submit(self, fn: Callable[[], Any]) -> tuple[dict[str, Any], threading.Event]:
        box: dict[str, Any] = {}
        done = threading.Event()
        self.tasks.put((_in_context(fn), box, done))
        return box, done


def _in_context(fn: Callable[[], T]) -> Callable[[], T]:
    ctx = contextvars.copy_context()  # the caller's context (the run its log lines belong to)
    return lambda: ctx.run(fn)


_local = threading.local()
_abandoned = 0  # threads left running since the process started (for tests and the log)


def abandoned_threads() -> int:
    """How many model threads were abandoned in this process (stuck in a call past its grace)."""
    return _abandoned


def _model_thread() -> _ModelThread:
    worker = getattr(_local, "worker", None)
    if worker is None or worker.lost:
        worker = _local.worker = _ModelThread()
    return worker


def watch(fn: Callable[[], T], *, abort: threading.Event, timeout_s: float | None,
          what: str = "the job", grace: float | None = None,
          clock: Callable[[], float] = time.monotonic) -> Generator[None, None, T]:
    """Run ``fn`` on the model thread, yielding ``None`` every :data:`POLL_S` while it runs.

    Parameters
    ----------
    fn : callable
        The work (it must check ``abort`` through its monitor to stop cooperatively).
    abort : threading.Event
        Set at the deadline (the monitor's ``abort``): the work stops at its next check.
    timeout_s : float or None
        The limit, from now. ``None``: no limit (the work still runs on the model thread).
    what : str
        Named in the message of an abandoned job.
    grace : float, optional
        Seconds past the deadline before abandoning (default :func:`grace_s`).

    Returns
    -------
    The value of ``fn`` (through ``StopIteration``); its exception is re-raised.

    Raises
    ------
    Abandoned
        The work was still inside one model call ``grace`` seconds after the deadline.
    """
    global _abandoned
    worker = _model_thread()
    box, done = worker.submit(fn)
    deadline = None if timeout_s is None else clock() + timeout_s
    give_up: float | None = None
    try:
        while not done.wait(POLL_S):
            yield None
            now = clock()
            if deadline is not None and now > deadline and give_up is None:
                abort.set()  # a model that returns stops at its next evaluation
                give_up = now + (grace_s(timeout_s or 0.0) if grace is None else grace)
            if give_up is not None and now > give_up and not done.is_set():
                worker.lost = True  # the next job gets a fresh model thread
                _abandoned += 1
                raise Abandoned(
                    f"exceeded the time limit of {timeout_s:g} s and {what} did not stop within "
                    f"{give_up - deadline:.3g} s more (stuck inside one model call or one step between "
                    "calls), so it was abandoned (its thread is left running in the background and can no "
                    "longer write anything)")
    except BaseException:  # abandoned, or the caller stopped waiting (GUI cancel, Ctrl-C): stop the work
        if not done.is_set():
            abort.set()
            worker.lost = True  # never queue the next job behind work that is still running
        raise
    if "error" in box:
        raise box["error"]
    return box.get("value")  # type: ignore[return-value]


def run_watched(fn: Callable[[], T], *, abort: threading.Event, timeout_s: float | None,
                what: str = "the job", grace: float | None = None) -> T:
    """:func:`watch` without the progress ticks: block until ``fn`` returns, fails or is abandoned."""
    gen = watch(fn, abort=abort, timeout_s=timeout_s, what=what, grace=grace)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


def prediction_pass(fn: Callable[[EvaluationMonitor], T], timeout_s: float | None,
                    cancel: threading.Event | None = None) -> tuple[T, float]:
    """Run the prediction pass ``fn(monitor)`` under the time limit; return its value and seconds.

    Raises
    ------
    TimeLimitError
        The pass passed (or was projected past) the limit, or was abandoned.
    Cancelled
        ``cancel`` was set during the pass.
    """
    monitor = EvaluationMonitor(cancel)
    monitor.start(timeout_s)
    start = time.perf_counter()
    try:
        out = run_watched(lambda: fn(monitor), abort=monitor.abort, timeout_s=timeout_s,
                          what="the prediction pass")
    except (TimeLimitError, Cancelled):
        raise
    except MethodTimeout as exc:
        raise TimeLimitError(f"the prediction pass (the unperturbed forward that freezes the target) {exc}",
                             "raise the time limit (--timeout or run.timeout_s), or explain an ROI crop of the "
                             "volume; check that the model returns on this input") from None
    return out, time.perf_counter() - start


def exit_process(code: int) -> None:
    """End the process with ``code`` now if a model thread was abandoned; return otherwise.

    At interpreter shutdown an abandoned thread still inside torch's C++ code is unwound
    in a way C++ cannot survive ("terminate called without an active exception", status
    134), after the run's files are all written. The command line calls this last, so it
    exits with its own status instead (output streams flushed, no finalisation).
    """
    if not _abandoned:
        return
    import os
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
