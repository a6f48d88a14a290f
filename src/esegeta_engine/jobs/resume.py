"""Resuming a run: which jobs' outputs are already complete and match their key.

A job is done when the previous manifest records it ``ok`` with the same key, and its
map file exists with the recorded SHA-256 (a truncated or replaced file does not
count). Everything else is redone. A folder written by another model or for other
volumes is refused, so ``--resume`` never mixes two runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from esegeta_engine.errors import ConfigError
from esegeta_engine.jobs.plan import Job


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ResumeState:
    """Finished results of a previous run in the same folder.

    Parameters
    ----------
    out : Path
        The output folder.
    previous : dict or None
        Its manifest (None: nothing to resume).
    """

    def __init__(self, out: Path, previous: dict[str, Any] | None) -> None:
        self.out = out
        self.previous = previous or {}
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        for r in self.previous.get("results", []):
            if r.get("status") == "ok" and r.get("key") and r.get("file") and r.get("sha256"):
                self.records[(r["key"], r.get("volume", ""))] = r

    @classmethod
    def load(cls, out: Path, model_key: str, volume_stems: list[str]) -> ResumeState:
        """Read ``out``'s manifest for ``--resume``, refusing another model's or volumes' run.

        Raises
        ------
        ConfigError
            If the folder holds a run of another model or of other volumes.
        """
        path = out / "manifest.json"
        if not path.is_file():
            return cls(out, None)
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot resume: {path} is not a readable manifest ({exc})",
                              "run without --resume into a new folder") from None
        if not isinstance(previous, dict):
            raise ConfigError(f"cannot resume: {path} is not a manifest", "run into a new folder")
        old_model = previous.get("model_key")
        if old_model and old_model != model_key:
            raise ConfigError(f"cannot resume in {out}: it holds a run of another model (weights differ)",
                              "resume with the same model, or write to a new folder (--out)")
        old_stems = [v.get("stem") for v in previous.get("volumes", [])]
        if old_stems and set(old_stems) != set(volume_stems):
            raise ConfigError(f"cannot resume in {out}: it holds a run of other volumes ({', '.join(old_stems)})",
                              "resume with the same volumes, or write to a new folder (--out)")
        return cls(out, previous)

    def done(self, job: Job, volume_stem: str) -> dict[str, Any] | None:
        """The previous record of ``job`` on that volume if its output is complete and matches."""
        rec = self.records.get((job.key, volume_stem))
        if rec is None:
            return None
        path = self.out / rec["file"]
        try:
            if path.is_file() and file_sha256(path) == rec["sha256"]:
                return rec
        except OSError:
            return None
        return None
