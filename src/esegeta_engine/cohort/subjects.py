"""Subject ids for a cohort's volumes: the shortest path suffix that tells them apart.

Many datasets keep one folder per subject with the same file name inside
(``sub-01/image.nii.gz``, ``sub-02/image.nii.gz``; BIDS adds ``anat/``). File names
alone then name every volume ``image``. :func:`derive_subject_ids` takes, for each
volume, the last *k* parts of its path (the file name without its NIfTI suffix and
the folders above it), with the smallest *k* that makes them unique, and drops the
parts every volume shares at the same place (``image``, ``anat``): ``sub-01``,
``sub-02``. How the ids were derived is returned as one line for the manifest and
``--dry-run``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from esegeta_engine.errors import ConfigError

_NIFTI = (".nii.gz", ".nii")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")


def _parts(path: Path) -> list[str]:
    """Path parts from the root down, the file name without its NIfTI suffix."""
    parts = list(path.parts)
    name = parts[-1]
    for suffix in _NIFTI:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return [*parts[:-1], name]


def derive_subject_ids(paths: Sequence[Path]) -> tuple[list[str], str]:
    """One id per path (same order) and how they were derived.

    Parameters
    ----------
    paths : sequence of Path
        The cohort's volume files (relative ones against the working folder; symlinks are
        not followed).

    Returns
    -------
    ids : list of str
        File-name stems when those are unique; else the shortest distinguishing suffix
        of the path, parts shared by all volumes dropped, joined with ``_``.
    rule : str
        One line for the manifest, e.g. ``"from the folder names (file names repeat: image)"``.

    Raises
    ------
    ConfigError
        A file listed twice (no suffix tells the two apart).
    """
    # absolute but not resolved: a datalad/git-annex file is a symlink into an object store
    split = [_parts(Path(os.path.abspath(p))) for p in paths]
    stems = [_slug(parts[-1]) or "volume" for parts in split]
    if len(set(stems)) == len(stems):
        return stems, "from the file names"
    longest = max(len(parts) for parts in split)
    for k in range(2, longest + 1):
        tails = [tuple(parts[-k:]) for parts in split]
        if len(set(tails)) < len(tails):
            continue
        # a part every volume shares at the same place tells nothing apart: drop it
        width = min(len(t) for t in tails)
        shared = {i for i in range(1, width + 1) if len({t[-i] for t in tails}) == 1}
        ids = [_slug("_".join(p for i, p in enumerate(t) if len(t) - i not in shared)) for t in tails]
        what = "the folder names" if k == 2 and shared == {1} else f"the last {k} parts of each path"
        if len(set(ids)) < len(ids) or not all(ids):  # dropping shared parts merged two: keep them
            ids, what = [_slug("_".join(t)) for t in tails], f"the last {k} parts of each path"
        if len(set(ids)) == len(ids):
            repeated = sorted({s for s in stems if stems.count(s) > 1})
            more = ", ..." if len(repeated) > 3 else ""
            return ids, f"from {what} (file names repeat: {', '.join(repeated[:3])}{more})"
    dupes = sorted({str(p) for p, parts in zip(paths, split) if split.count(parts) > 1})
    raise ConfigError(f"the cohort lists the same volume more than once: {dupes[:3]}",
                      "list each volume once")


def describe_subjects(volumes: Sequence[object], shown: int = 8) -> str:
    """One line for ``--dry-run``: the subject ids and how they were found."""
    ids = [getattr(v, "subject", "") for v in volumes]
    rules = sorted({getattr(v, "subject_from", "") for v in volumes} - {""})
    more = f", ... ({len(ids) - shown} more)" if len(ids) > shown else ""
    return f"subjects ({'; '.join(rules) or 'given'}): {', '.join(ids[:shown])}{more}"
