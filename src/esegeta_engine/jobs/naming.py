"""Output names: one per job and volume, readable, and never shared by two jobs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def slug(text: str) -> str:
    """``text`` with every run of characters unsafe in file names replaced by ``-``."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")


def volume_stem(path: Path | None, index: int) -> str:
    """Name of a volume in output file names (its file name without the NIfTI suffix)."""
    if path is None:
        return f"volume{index}"
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return slug(name)


def map_filename(volume_stem: str, method_label: str, target_label: str) -> str:
    """File name of one map: ``<volume>__<method[@layer]>__<target>.nii.gz``."""
    return f"{volume_stem}__{slug(method_label)}__{slug(target_label)}.nii.gz"


class Names:
    """Distinct output names per job: the readable name, plus the job key where two jobs would share it.

    Parameters
    ----------
    reserved : mapping, optional
        File name -> key of maps already in the folder (a resumed run's): a job of another key
        gets another name, so an earlier map is never replaced by a different job's.
    """

    def __init__(self, reserved: Mapping[str, str] | None = None) -> None:
        self.owner: dict[str, str] = dict(reserved or {})

    def __call__(self, stem: str, job: Any) -> str:
        name = map_filename(stem, job.label, job.cls_label)
        if self.owner.setdefault(name, job.key) != job.key:
            name = name.replace(".nii.gz", f"__{job.key[:10]}.nii.gz")
            self.owner[name] = job.key
        return name
