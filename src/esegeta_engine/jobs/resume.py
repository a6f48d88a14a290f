"""Resuming a run or a cohort: which finished maps are kept, and which folders are refused.

A map is kept only when all of these hold: the previous manifest records it ``ok`` under the
same job key (which covers the method, its parameters, the target, the model's weights and the
volume's content), the manifest was written with the same key scheme, the model's fingerprint
and the volume's content hash recorded in the manifest are those of this run, and its file is a
regular file inside the run folder (no symbolic link, no ``..``) with the recorded SHA-256.
Everything else is redone. A folder holding another model's or another volume's run, a cohort
where a single run is resumed (or the reverse), or maps without a manifest is refused with one
line unless ``--overwrite`` is given. Maps of an earlier plan that the current plan does not
contain stay in the manifest (``planned: false``), never orphaned.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from esegeta_engine.errors import ConfigError
from esegeta_engine.io import file_sha256
from esegeta_engine.jobs.plan import KEY_VERSION
from esegeta_engine.jobs.record import MapRecord

__all__ = ["ResumeState", "file_sha256", "inside_regular_file"]

log = logging.getLogger("esegeta_engine")
MANIFEST = "manifest.json"


def inside_regular_file(out: Path, relative: str | None) -> Path | None:
    """``out / relative`` when it is a regular file inside ``out`` reached through no link, else None."""
    if not relative or Path(relative).is_absolute():
        return None
    root = out.resolve()
    path = root / relative
    try:
        if path.resolve().parent != path.parent.resolve() or not path.resolve().is_relative_to(root):
            return None
        current = root
        for part in Path(relative).parts:  # no component (folder or file) may be a link
            current = current / part
            if current.is_symlink():
                return None
        return path if path.is_file() else None
    except OSError:
        return None


def _refuse(out: Path, what: str, overwrite: bool) -> None:
    if overwrite:
        log.warning("not resuming in %s: it holds %s; --overwrite replaces it", out, what)
        return
    raise ConfigError(f"cannot resume in {out}: it holds {what}",
                      "resume with the same inputs, write to a new folder (--out), or --overwrite to replace it")


def _holds_maps(out: Path) -> bool:
    if any(p.name.endswith((".nii", ".nii.gz")) for p in out.glob("*__*")):
        return True
    maps = out / "maps"
    return maps.is_dir() and any(maps.rglob("*.nii*"))


class ResumeState:
    """Finished maps of a previous run in the same folder, checked before they are kept.

    Parameters
    ----------
    out : Path
        The output folder.
    previous : dict or None
        Its manifest (None: nothing to resume).
    """

    def __init__(self, out: Path, previous: Mapping[str, Any] | None) -> None:
        self.out = out
        self.previous = dict(previous or {})
        self.records: dict[tuple[str, str], MapRecord] = {}
        self._used: set[tuple[str, str]] = set()
        for rec in _readable(self.previous.get("results") or []):
            if rec.ok and rec.key and rec.file and rec.sha256:
                self.records[(rec.key, rec.volume or rec.subject or "")] = rec

    @classmethod
    def load(cls, out: Path, *, kind: str = "run", model_keys: Mapping[str, str] | None = None,
             volumes: Mapping[str, str] | None = None, overwrite: bool = False,
             model_files: Mapping[str, str] | None = None) -> ResumeState:
        """Read ``out``'s manifest for ``--resume``, refusing a folder of another run.

        Parameters
        ----------
        kind : {"run", "cohort"}
            What resumes.
        model_keys : mapping
            Model name (``""`` for a single run) -> weights fingerprint.
        volumes : mapping
            Volume stem (single run) or subject (cohort) -> content hash.
        overwrite : bool
            Replace a folder that would be refused (log it) instead of refusing.
        model_files : mapping, optional
            Cohort model name -> SHA-256 of its file (what older cohort manifests recorded).

        Raises
        ------
        ConfigError
            The folder holds another model's, another volume's or another kind of run, maps
            without a manifest, or an unreadable manifest (one line each, naming the fix).
        """
        path = out / MANIFEST
        if not path.is_file():
            if path.is_symlink() or _holds_maps(out):
                _refuse(out, "maps but no manifest, so nothing says which run made them", overwrite)
            return cls(out, None)
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot resume: {path} is not a readable manifest ({exc})",
                              "run without --resume into a new folder, or --overwrite") from None
        if not isinstance(previous, dict):
            raise ConfigError(f"cannot resume: {path} is not a manifest", "run into a new folder")
        old_kind = previous.get("kind") or "run"
        if old_kind != kind:
            _refuse(out, f"a {'cohort' if old_kind == 'cohort' else 'single run'}, not a "
                    f"{'cohort' if kind == 'cohort' else 'single run'}", overwrite)
            return cls(out, None)
        has_maps = any(rec.ok for rec in _readable(previous.get("results") or []))
        problem = _identity_problem(previous, kind, model_keys or {}, volumes or {}, has_maps, model_files or {})
        if problem:
            _refuse(out, problem, overwrite)
            return cls(out, None)
        if has_maps and previous.get("key_version") != KEY_VERSION:
            log.warning("resume: %s was written by another version of esegeta whose job keys differ: its maps "
                        "are not reused and every job runs again", out)
            previous = {**previous, "results": []}
        return cls(out, previous)

    def done(self, key: str, volume: str, file: str | None = None) -> MapRecord | None:
        """The previous record of job ``key`` on ``volume`` if its map is complete and may be kept."""
        rec = self.records.get((key, volume))
        if rec is None or (file is not None and rec.file != file):
            return None
        path = inside_regular_file(self.out, rec.file)
        try:
            if path is None or file_sha256(path) != rec.sha256:
                return None
        except OSError:
            return None
        self._used.add((key, volume))
        return rec.replace(resumed=True)

    def files(self) -> dict[str, str]:
        """File name -> key of every previous map (new jobs of other keys must not take these names)."""
        return {r.file: r.key for r in self.records.values() if r.file}

    def unplanned(self, planned: Iterable[tuple[str, str]] = (), written: Iterable[str] = ()) -> list[MapRecord]:
        """Previous maps of jobs not in ``planned`` ((key, volume) pairs) whose files are intact and were
        not rewritten by this run (``written``), marked ``planned: false``."""
        skip = self._used | set(planned)
        taken = set(written)
        kept = []
        for (key, volume), rec in self.records.items():
            if (key, volume) in skip or rec.file in taken:
                continue
            path = inside_regular_file(self.out, rec.file)
            try:
                if path is not None and file_sha256(path) == rec.sha256:
                    kept.append(rec.replace(resumed=True, planned=False))
            except OSError:
                continue
        return kept


def _readable(results: Any) -> list[MapRecord]:
    """The entries of a manifest's ``results`` that are map records (others are ignored)."""
    out = []
    for r in results if isinstance(results, list) else []:
        try:
            out.append(MapRecord.from_json(r))
        except (ValueError, TypeError):
            continue
    return out


def _identity_problem(previous: Mapping[str, Any], kind: str, model_keys: Mapping[str, str],
                      volumes: Mapping[str, str], has_maps: bool, model_files: Mapping[str, str]) -> str | None:
    """Why ``previous`` is another run's folder (None when it is this run's)."""
    if kind == "run":
        old_model = previous.get("model_key")
        if old_model and model_keys.get("") and old_model != model_keys[""]:
            return "a run of another model (weights differ)"
        if has_maps and not old_model:
            return "maps whose model is not recorded (no model fingerprint in its manifest)"
        old = {v.get("stem"): v.get("content") for v in previous.get("volumes", []) if isinstance(v, dict)}
    else:
        for m in previous.get("models", []):
            name = m.get("name") if isinstance(m, dict) else None
            if name in model_keys and m.get("key") not in (None, model_keys[name]):
                return f"a cohort run of other weights under the model name {name!r}"
            if name in model_files and m.get("sha256") not in (None, model_files[name]) and m.get("key") is None:
                return f"a cohort run of another model file under the model name {name!r}"
        old = {v.get("subject"): v.get("content") for v in previous.get("volumes", []) if isinstance(v, dict)}
    if old and set(old) != set(volumes):
        return f"a run of other volumes ({', '.join(sorted(str(s) for s in old))})"
    changed = sorted(s for s, h in old.items() if h and volumes.get(s) and h != volumes[s])
    if changed:
        return f"a run of other volumes under the same names ({', '.join(changed)}: content differs)"
    return None
