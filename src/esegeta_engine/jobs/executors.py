"""Executors: who runs the jobs. Same jobs, same function, same results whichever.

Every executor has one seam, ``map(specs) -> outcomes`` (and ``close``), over picklable
:class:`~esegeta_engine.jobs.worker.JobSpec` s run by :func:`~esegeta_engine.jobs.worker.execute_job`.
Executors are registered by name in :mod:`esegeta_engine.jobs.registry` (the factories
``make_*`` below); single runs and cohorts make them with the same
:func:`~esegeta_engine.jobs.registry.make_executor`.

* ``inline``: in this process, one job after another. It also takes :class:`LocalJob` s:
  a single run's jobs on the model already loaded and the input already prepared, whose
  outcomes are the job's own events (progress while it runs, then its map or failure).
* ``pool``: in this process, one thread per device of ``cohort.devices`` (each device runs one
  job at a time; GPU work releases the GIL), no Dask needed.
* ``local``: a :class:`distributed.LocalCluster` of worker processes, one thread
  each: N CPU workers, or one worker per device of ``cohort.devices`` (that
  device set in the worker).
* ``dask``: an existing scheduler reached through its address.

Dask does the scheduling: jobs are submitted up front and their outcomes are
yielded as they complete. A job whose worker process dies is rescheduled by
Dask; a LocalCluster started here allows one such retry
(``distributed.scheduler.allowed-failures = 1``), after which the job is
recorded as failed. On an existing cluster that scheduler's own setting
governs (Dask's default allows 3).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from esegeta_engine.errors import ConfigError
from esegeta_engine.jobs.worker import JobOutcome, JobSpec, execute_job

if TYPE_CHECKING:  # pragma: no cover
    from esegeta_engine.jobs.events import Event

log = logging.getLogger("esegeta_engine")


@dataclass
class LocalJob:
    """A planned job that runs here, on the session's loaded model and prepared input.

    ``run()`` yields the job's events (:class:`~esegeta_engine.jobs.events.Progress` while it
    runs, then :class:`~esegeta_engine.jobs.events.MapReady` or
    :class:`~esegeta_engine.jobs.events.JobFailed`). Only executors with ``local = True``
    take these; the others are given a portable :class:`JobSpec` of the same job.
    """

    key: str
    run: Callable[[], Iterator[Event]]


def portable_spec(portable: Callable[[Any], JobSpec] | None, job: Any) -> JobSpec:
    """``portable(job)``: the picklable spec of a planned job, for an executor that runs it elsewhere.

    Raises
    ------
    ConfigError
        No ``portable`` was given, or the job explains several volumes in one batch.
    """
    if portable is None:
        raise ConfigError("this executor runs jobs elsewhere, and nothing said how to describe them",
                          "run through esegeta_engine.pipeline (`esegeta run`), or use executor inline")
    if len(job.volumes) != 1:
        raise ConfigError(f"{job.label} explains all volumes in one batch, which only the inline executor runs",
                          "use execution.executor: inline for this method")
    return portable(job)


def run_jobs(runner: Any, jobs: Sequence[Any], run_here: Callable[[Any], Iterator[Event]],
             skipped: Callable[[Any], Any], portable: Callable[[Any], JobSpec] | None,
             finished: Callable[[Any, JobOutcome], Any], cancel: threading.Event) -> Iterator[Any]:
    """One planned group's jobs through ``runner.map``: their events, in the order they happen.

    A local runner (``inline``) gets a :class:`LocalJob` per job (``run_here(job)`` yields its
    events, skipping a resumed job itself); any other gets the portable spec of every job not
    ``skipped`` (``skipped(job)`` returns its progress event, or None), and each
    :class:`JobOutcome` comes back as its event then ``finished(job, outcome)``.
    """
    from esegeta_engine.jobs.events import outcome_event

    specs: list[JobSpec | LocalJob] = []
    for job in jobs:
        if getattr(runner, "local", False):
            specs.append(LocalJob(job.key, partial(run_here, job)))
        elif (event := skipped(job)) is not None:
            yield event
        else:
            specs.append(portable_spec(portable, job))
    by_key = {job.key: job for job in jobs}
    for item in runner.map(specs):
        if not isinstance(item, JobOutcome):  # a local job's own events
            yield item
            continue
        job = by_key[item.key]
        yield outcome_event(job, item)
        yield finished(job, item)
        if cancel.is_set():
            return


class InlineExecutor:
    """Run jobs in this process, in plan order; ``cancel`` stops the job in flight and the rest."""

    name = "inline"
    description = "inline (this process)"
    local = True
    """Takes :class:`LocalJob` s (a single run's jobs on its loaded model) as well as specs."""

    def __init__(self, cancel: threading.Event | None = None) -> None:
        self.cancel = cancel

    def map(self, specs: Sequence[JobSpec | LocalJob]) -> Iterator[JobOutcome | Event]:
        """Yield each job's outcome as it finishes (a local job's events as they happen)."""
        for spec in specs:
            if self.cancel is not None and self.cancel.is_set():
                return
            if isinstance(spec, LocalJob):
                yield from spec.run()
            else:
                yield execute_job(spec, cancel=self.cancel)

    def close(self) -> None:
        """Nothing to release."""


class DevicePool:
    """One worker thread per device, each running one job at a time on its device (in this process).

    Parameters
    ----------
    devices : list of str
        Devices, e.g. ``["cuda:0", "cuda:1"]`` (``["cpu"]`` runs inline in a thread).
    cancel : threading.Event, optional
        Stops the jobs in flight at their next model evaluation; no job starts after it.
    """

    name = "pool"

    def __init__(self, devices: Sequence[str], cancel: threading.Event | None = None) -> None:
        self.devices = list(devices)
        self.cancel = cancel or threading.Event()
        self.description = f"pool ({len(self.devices)} device threads: {', '.join(self.devices)})"

    def map(self, specs: Sequence[JobSpec]) -> Iterator[JobOutcome]:
        """Start one thread per device pulling jobs in plan order; yield outcomes as they complete."""
        todo: queue.Queue[JobSpec] = queue.Queue()
        for spec in specs:
            todo.put(spec)
        done: queue.Queue[JobOutcome | None] = queue.Queue()
        stop = threading.Event()  # closed early: no thread takes another job

        def work(device: str) -> None:
            try:
                while not (self.cancel.is_set() or stop.is_set()):
                    try:
                        spec = todo.get_nowait()
                    except queue.Empty:
                        return
                    done.put(execute_job(spec, device=device, cancel=self.cancel))
            finally:
                done.put(None)  # this device is finished

        threads = [threading.Thread(target=work, args=(d,), name=f"esegeta-{d}", daemon=True)
                   for d in self.devices]
        for t in threads:
            t.start()
        running = len(threads)
        try:
            while running:
                outcome = done.get()
                if outcome is None:
                    running -= 1
                else:
                    yield outcome
        finally:
            stop.set()
            for t in threads:
                t.join()

    def close(self) -> None:
        """Nothing to release (the threads end with :meth:`map`)."""


def _worker_plugin(devices: list[str] | None, threads: int | None) -> Any:
    from distributed import WorkerPlugin

    class EsegetaWorker(WorkerPlugin):
        """Assign each worker its device (by worker name) and its torch thread count."""

        name = "esegeta-worker"

        def setup(self, worker: Any) -> None:
            if devices:
                try:
                    index = int(worker.name)
                except (TypeError, ValueError):
                    index = abs(hash(str(worker.name)))
                worker.esegeta_device = devices[index % len(devices)]
            if threads is not None:
                import torch

                torch.set_num_threads(threads)  # this worker process is ours: one job, one thread

    return EsegetaWorker()


class DaskExecutor:
    """Run jobs on a Dask cluster, streaming outcomes back as they complete.

    Parameters
    ----------
    client : distributed.Client
        Connected client.
    cluster : distributed.LocalCluster, optional
        A cluster started for this run (closed by :meth:`close`).
    """

    def __init__(self, client: Any, cluster: Any = None, name: str = "dask") -> None:
        self.client = client
        self.cluster = cluster
        self.name = name
        self.description = f"{name} ({len(client.scheduler_info().get('workers', {}))} workers at " \
                           f"{client.scheduler.address})"

    def map(self, specs: Sequence[JobSpec]) -> Iterator[JobOutcome]:
        """Submit every job, then yield outcomes in completion order."""
        from distributed import as_completed

        if not specs:
            return
        futures = self.client.map(execute_job, list(specs), key=[f"esegeta-job-{s.key}" for s in specs],
                                  pure=False)
        keys = {f.key: s.key for f, s in zip(futures, specs)}
        try:
            for fut in as_completed(futures, loop=self.client.loop):
                yield self._outcome(fut, keys[fut.key])
                fut.release()
        finally:
            for f in futures:  # cancelled or closed early: stop what has not run
                if not f.done():
                    f.cancel()

    @staticmethod
    def _outcome(fut: Any, key: str) -> JobOutcome:
        from distributed.scheduler import KilledWorker

        try:
            return fut.result()
        except KilledWorker as exc:
            return JobOutcome(key, "failed", error="the worker process running this job died, and again on "
                              f"its retry (out of memory or killed?): {exc}")
        except Exception as exc:  # a bug in the job function itself: record it, keep going
            return JobOutcome(key, "failed", error=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        """Close the client, and the cluster when this executor started it."""
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def start_local(workers: int = 2, devices: list[str] | None = None) -> DaskExecutor:
    """A LocalCluster of worker processes with one thread each (one per device when given)."""
    import dask
    from distributed import Client, LocalCluster

    n = len(devices) if devices else workers
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                               silence_logs=logging.ERROR)
    client = Client(cluster)
    client.register_plugin(_worker_plugin(devices, None if devices else 1))
    return DaskExecutor(client, cluster, "local")


def connect(address: str, timeout_s: float = 5.0) -> DaskExecutor:
    """Connect to a running scheduler.

    Raises
    ------
    ConfigError
        At once for a malformed address; within about ``timeout_s`` when nothing answers at ``address``.
    """
    from distributed import Client

    from esegeta_engine.cohort.scheduler_address import check_scheduler_address

    address = check_scheduler_address(address)  # a malformed one never reaches Client (10 s hang)
    try:
        client = Client(address, timeout=f"{timeout_s}s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ConfigError(f"no Dask scheduler answered at {address!r} within {timeout_s:g} s "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                          "start one (`dask scheduler` and `dask worker ADDRESS`), check cohort.scheduler, "
                          "or use --executor local") from None
    if not client.scheduler_info().get("workers"):
        log.warning("the Dask scheduler at %s has no workers yet: jobs wait until one joins", address)
    return DaskExecutor(client, None, "dask")


def make_inline(settings: Any, cancel: threading.Event | None = None) -> InlineExecutor:
    """``inline``: this process, one job after another."""
    return InlineExecutor(cancel)


def make_pool(settings: Any, cancel: threading.Event | None = None) -> DevicePool:
    """``pool``: one thread per device of ``settings.devices`` (default ``[cpu]``)."""
    return DevicePool(settings.devices or ["cpu"], cancel)


def make_local(settings: Any, cancel: threading.Event | None = None) -> DaskExecutor:
    """``local``: a Dask LocalCluster of ``settings.workers`` processes (or one per device)."""
    return start_local(settings.workers, settings.devices)


def make_dask(settings: Any, cancel: threading.Event | None = None) -> DaskExecutor:
    """``dask``: the scheduler at ``settings.scheduler``."""
    if not settings.scheduler:
        raise ConfigError("executor 'dask' needs a scheduler address",
                          "set cohort.scheduler (execution.scheduler for a single run) or pass "
                          "--scheduler tcp://host:8786")
    return connect(settings.scheduler, settings.connect_timeout_s)


def make_executor(settings: Any, kind: str | None = None, cancel: threading.Event | None = None) -> Any:
    """The executor named by ``kind`` (or ``settings.executor``), connected and ready.

    See :func:`esegeta_engine.jobs.registry.make_executor` (this is the same function).
    """
    from esegeta_engine.jobs.registry import make_executor as make

    return make(settings, kind, cancel)
