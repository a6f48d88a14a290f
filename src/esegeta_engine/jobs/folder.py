"""The output folder of a run or a cohort: claimed, locked, cleaned and logged the same way.

:func:`claim_folder` is what single runs (:mod:`esegeta_engine.pipeline`) and cohorts
(:mod:`esegeta_engine.cohort.run`) both call before writing anything: it creates the folder,
takes its lock (a second run into it is refused), refuses a folder holding another run's
results unless ``overwrite`` or ``resume`` (resume does its own, stricter checks), refuses
inputs stored under names the run writes, removes ``.part`` leftovers of an interrupted run
and opens the log without following a symbolic link. :meth:`RunFolder.close` undoes the log
and the lock whatever happened.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from esegeta_engine.runguard import (RUN, OutputLock, check_previous_run, close_log, make_output_folder,
                                     open_log, protect_inputs, remove_part_files)

log = logging.getLogger("esegeta_engine")


@dataclass
class RunFolder:
    """A claimed output folder: its lock, its log handler and the run id its log filters on."""

    path: Path
    lock: OutputLock
    handler: logging.Handler | None = None
    run_id: str = ""
    _token: object | None = None

    def open_log(self) -> RunFolder:
        """Attach this run's log (``esegeta.log``, never through a link) for the calling context."""
        self.run_id = f"{os.getpid()}-{id(self)}-{time.time_ns()}"
        self._token = RUN.set(self.run_id)
        self.handler = open_log(self.path, log, self.run_id)
        return self

    def close(self) -> None:
        """Detach the log and release the lock (idempotent, safe from another thread)."""
        if self.handler is not None:
            close_log(self.handler, log)
            self.handler = None
        if self._token is not None:
            try:
                RUN.reset(self._token)  # type: ignore[arg-type]
            except ValueError:  # closed from another context (a GUI cancel)
                pass
            self._token = None
        self.lock.release()


def claim_folder(out: Path, *, overwrite: bool, resume: bool, inputs: Iterable[Path | None] = (),
                 stems: Iterable[str] = ()) -> RunFolder:
    """Create, lock and check the output folder (see the module docstring); the log is not open yet.

    Raises
    ------
    EsegetaError
        The folder is in use, holds another run (without ``overwrite``/``resume``), holds an
        input under a name the run writes, or cannot be written.
    """
    folder = make_output_folder(out)
    lock = OutputLock(folder).acquire()
    try:
        check_previous_run(folder, overwrite or resume)
        protect_inputs(folder, list(inputs), list(stems))
        maps = folder / "maps"  # a cohort's maps/<model>/ folders
        subs = [f"maps/{d.name}" for d in maps.iterdir() if d.is_dir() and not d.is_symlink()] \
            if maps.is_dir() and not maps.is_symlink() else []
        remove_part_files(folder, subs)
    except BaseException:
        lock.release()
        raise
    return RunFolder(folder, lock)
