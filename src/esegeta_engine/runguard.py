"""What keeps a run from losing anything: the output folder's lock and checks.

A run takes :class:`OutputLock` on its output folder (a second run into the
same folder is refused while the first runs, and told who holds it), refuses a
folder that holds another run's results (unless ``overwrite``) or an input file
under a name the run would write, removes the ``.part`` leftovers of an
interrupted run, and opens its log without following a symbolic link. A
failed run that wrote no maps does not block a rerun.
"""

from __future__ import annotations

import contextvars
import errno
import fcntl
import json
import logging
import os
import re
import socket
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from esegeta_engine.errors import ConfigError, OutputError
from esegeta_engine.io import output_error, write_json

MANIFEST = "manifest.json"
LOCK = ".esegeta.lock"
LOG = "esegeta.log"
FIXED_OUTPUTS = (MANIFEST, LOG, "curves.json", "randomisation.json", "report.html", "metrics.csv",
                 "metrics.json", LOCK)
"""Names a run writes whatever its inputs (maps are ``<volume stem>__...``)."""
_PART = re.compile(r"^\..+\.part(\.nii\.gz|\.nii|\.[A-Za-z0-9]+)?$")
_PART_FOLDERS = (".", "randomisation", "figures")


class OutputLock:
    """An exclusive lock on an output folder, held for the whole run.

    The lock is an ``flock`` on ``<folder>/.esegeta.lock``, which also records
    the holder (pid, host, start time) for the message a second run gets. The
    kernel releases it when the holder dies, so the lock of a killed run is
    stale and taken over without asking.

    Raises
    ------
    OutputError
        On :meth:`acquire`, when another live run holds the folder.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        """Take the lock (refusing if held), and record this process as the holder."""
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise OutputError(f"{self.path} is a symbolic link", "remove it; the lock is a plain "
                                      "file the run creates") from None
                raise output_error(exc, self.path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputError(f"output folder {str(self.path.parent)!r} is in use by another run "
                                  f"({holder})", "wait for it to finish, or choose another output folder "
                                  "(--out)") from None
            try:  # the file we locked may have been removed by a finishing run in between
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                info = {"pid": os.getpid(), "host": socket.gethostname(),
                        "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
                return self
            os.close(fd)
        raise OutputError(f"could not lock the output folder {str(self.path.parent)!r}",
                          "another run keeps starting there; choose another output folder")

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # an unwritable folder: the flock is what counts
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet recorded itself"


def make_output_folder(out: Path) -> Path:
    """Create ``out`` (and its parents), with a readable error when that is impossible.

    Raises
    ------
    OutputError
        A file is in the way, or the folder cannot be created or written.
    """
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {str(out)!r} is a file", "choose a folder for output.dir (--out)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, out) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write into the output folder {str(out)!r}",
                          "choose an output folder you can write to")
    return out


def wrote_maps(manifest: dict[str, Any]) -> bool:
    """True if the run of ``manifest`` wrote any map (so a rerun would replace results)."""
    results = manifest.get("results") or []
    return bool(manifest.get("randomisation")) or any(
        isinstance(r, dict) and r.get("status") == "ok" for r in results)


def check_previous_run(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding another run's results unless ``overwrite``.

    A previous run that wrote no map holds nothing to lose and does not block
    a rerun: one that ended ``failed`` or ``cancelled``, or one still marked
    ``running`` (the caller holds the folder's lock, so that run is dead).

    Raises
    ------
    ConfigError
        The folder holds a run with results (or an unreadable manifest).
    """
    path = out / MANIFEST
    if overwrite or not (path.exists() or path.is_symlink()):
        return
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    if (isinstance(previous, dict) and previous.get("status") in ("failed", "cancelled", "running")
            and not wrote_maps(previous)):
        return
    raise previous_run_error(out, previous)


def previous_run_error(out: Path, previous: Any) -> ConfigError:
    """The one-line refusal of a folder holding a run, saying how to continue or replace it."""
    status = previous.get("status") if isinstance(previous, dict) else None
    maps = sum(isinstance(r, dict) and r.get("status") == "ok" for r in previous.get("results") or []) \
        if isinstance(previous, dict) else 0
    if status in ("running", "cancelled", "failed"):
        why = "was killed or interrupted" if status == "running" else f"ended {status}"
        return ConfigError(f"output folder {str(out)!r} holds an unfinished run ({MANIFEST} says {status!r}: it "
                           f"{why}) with {maps} finished map(s)",
                           "pass --resume to keep its finished maps and run the rest, --overwrite to start again "
                           "over it, or choose another output folder (--out)")
    what = "a finished run" if status == "completed" else "a run"
    return ConfigError(f"output folder {str(out)!r} already holds {what} ({MANIFEST})",
                       "choose another output folder (--out); --resume keeps its matching maps and runs what is "
                       "missing, --overwrite (output.overwrite: true) replaces it")


def protect_inputs(out: Path, inputs: Iterable[Path | None], stems: Iterable[str]) -> None:
    """Refuse a run that would write over one of its own inputs.

    An input inside the output folder whose name the run could write (a fixed
    name, or ``<volume stem>__...``) would be replaced; the run stops before
    writing anything.

    Raises
    ------
    OutputError
        Naming the input.
    """
    root = out.resolve()
    prefixes = tuple(f"{s}__" for s in stems)
    for p in inputs:
        if p is None:
            continue
        real = Path(p).resolve()
        try:
            rel = real.relative_to(root)
        except ValueError:
            continue
        name = rel.name
        top = len(rel.parts) == 1 and (name in FIXED_OUTPUTS or name.startswith(prefixes))
        if top or (len(rel.parts) > 1 and rel.parts[0] in ("randomisation", "figures")):
            raise OutputError(f"the input {str(p)!r} is in the output folder under a name this run writes "
                              f"({name}); it would be overwritten",
                              "move the input out of the output folder, or choose another output folder")


def remove_part_files(out: Path, extra: Iterable[str] = ()) -> list[Path]:
    """Delete the ``.part`` files an interrupted run left (call while holding the lock).

    ``extra``: more sub-folders (relative to ``out``) to clean, e.g. a cohort's ``maps/<model>``.
    """
    removed = []
    for sub in (*_PART_FOLDERS, *extra):
        folder = out / sub
        if not folder.is_dir() or folder.is_symlink():
            continue
        for p in folder.iterdir():
            if _PART.match(p.name) and (p.is_file() or p.is_symlink()):
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


RUN: contextvars.ContextVar[str | None] = contextvars.ContextVar("esegeta_run", default=None)
"""The run the current thread works for: a run's log handler takes only that run's records, so
two runs in one process (two napari docks, a GUI run beside a script) never share a log."""


class _ThisRun(logging.Filter):
    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id

    def filter(self, record: logging.LogRecord) -> bool:
        return RUN.get() == self.run_id


def open_log(out: Path, logger: logging.Logger, run_id: str | None = None) -> logging.Handler:
    """Attach a handler appending to ``out/esegeta.log``, never following a symbolic link.

    With ``run_id``, the handler keeps only records logged while :data:`RUN` is that id
    (set by the run in its thread; worker threads inherit it through their context).

    Raises
    ------
    OutputError
        The log path is a symbolic link (or cannot be opened).
    """
    path = out / LOG
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(f"{path} is a symbolic link; the log is not written through links",
                              "remove the link (or choose another output folder)") from None
        raise output_error(exc, path) from None
    handler = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    if run_id is not None:
        handler.addFilter(_ThisRun(run_id))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


def close_log(handler: logging.Handler, logger: logging.Logger) -> None:
    """Detach and close a handler from :func:`open_log`."""
    logger.removeHandler(handler)
    handler.close()
    stream = getattr(handler, "stream", None)
    if stream is not None:
        stream.close()


def write_final_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Write the manifest's last state; on a full disk, still record how the run ended.

    Writing a new file needs free blocks; when there are none the status is
    written over the existing manifest in place (a compact record that fits
    in the blocks it already has), so the folder never says ``running`` for a
    run that ended.

    Raises
    ------
    OutputError
        When even that is impossible.
    """
    try:
        write_json(manifest, path)
        return
    except OutputError as first:
        error = first
    # what --resume needs to keep finished maps stays: keys, checksums, fingerprints, volumes' content
    brief = {key: manifest[key] for key in ("kind", "status", "created", "seed", "device", "duration_s",
                                            "key_version", "model_key") if key in manifest}
    brief["error"] = f"{manifest.get('error') or ''} (manifest shortened: {error.problem})".strip()
    brief["models"] = [{k: m.get(k) for k in ("name", "sha256", "key")} for m in manifest.get("models", [])]
    brief["volumes"] = [{k: v.get(k) for k in ("stem", "subject", "content", "sha256") if k in v}
                        for v in manifest.get("volumes", [])]
    brief["results"] = [{k: r[k] for k in ("key", "method", "label", "layer", "target", "class", "model",
                                           "subject", "volume", "status", "file", "sha256") if k in r}
                        for r in manifest.get("results", [])]
    for candidate in (brief, {key: brief[key] for key in ("status", "created", "error")}):
        text = json.dumps(candidate, separators=(",", ":"), default=str).encode()
        try:
            with open(path, "r+b") as fh:
                if len(text) > os.fstat(fh.fileno()).st_size:
                    continue
                fh.write(text)
                fh.truncate(len(text))
            return
        except OSError:
            break
    raise error
