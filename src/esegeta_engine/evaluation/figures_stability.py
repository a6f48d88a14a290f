"""The stability figure: a map next to its spread over ensemble members (or input noise).

Two rows of the same views as every other figure (three MIPs of a 3D volume in the plugin's
radiological convention, with the edge letters from the affine; a 2D image as it is): the
map the run wrote (the ensemble's, red +, blue −) and the per-voxel standard deviation of the
members' maps (:mod:`~esegeta_engine.evaluation.stability`), each row on its own scale with
its own colour bar, and the mean pairwise rank correlation in the title.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from esegeta_engine.evaluation.figures import (
    _as_spatial,
    _canonical,
    _colorbar,
    _figure,
    _panel,
    _project,
    _save,
    _scale,
    _spacing,
    _view_title,
    _views,
)

__all__ = ["report_stability", "stability_figure", "stability_title"]


def stability_title(spearman: float | None, n: int | None, source: str | None) -> str:
    """``mean pairwise |Spearman| 0.83 over 4 members`` (or ``… noisy inputs``)."""
    value = "undefined" if spearman is None or not np.isfinite(spearman) else f"{spearman:.3g}"
    over = "members" if source == "members" else "noisy inputs"
    return f"mean pairwise |Spearman| {value}" + (f" over {n} {over}" if n else "")


def stability_figure(volume: Any, attribution: Any, spread: Any, path: str | Path, *, title: str | None = None,
                     spearman: float | None = None, n: int | None = None, source: str | None = None,
                     spacing: Sequence[float] | None = None, affine: Any = None) -> Path:
    """The map (top row) and its stability spread (bottom row), views as in :func:`.figures.mip_figure`.

    Parameters
    ----------
    volume : array or None
        Grey image ``(x, y[, z][, c])``; None: black.
    attribution, spread : array
        The map and the per-voxel standard deviation of the members' maps, on the volume's grid.
    path : str or Path
        Output PNG.
    title : str, optional
        First title line; the second says the rank correlation (``spearman``, ``n``, ``source``).
    spacing, affine
        Voxel size (aspect ratio) and the volume's affine (orientation, edge letters).

    Returns
    -------
    Path
    """
    rows = []
    for m in (attribution, spread):
        v, a = _as_spatial(volume, m)
        v, a, sp, codes = _canonical(v, a, _spacing(spacing, v.ndim), affine)
        rows.append((a, [_project(v, a, ax, sp, codes) for ax in _views(v.ndim)]))
    views = _views(rows[0][0].ndim)
    fig = _figure(3.4 * len(views) + 1.6, 6.2)
    axes = fig.subplots(2, len(views), squeeze=False)
    for r, ((a, panels), name) in enumerate(zip(rows, ("map", "spread (std)"))):
        vmax = _scale(*[x for p in panels for x in p[1:3]])
        for c, (grey, pos, neg, aspect, letters) in enumerate(panels):
            _panel(axes[r, c], grey, pos, neg, vmax, aspect, _view_title(views[c]) if r == 0 else None,
                   letters=letters)
        axes[r, 0].set_ylabel(name, fontsize=9)
        _colorbar(fig, list(axes[r]), vmax, r == 0 and bool((a < 0).any()),
                  "attribution (red +, blue −)" if r == 0 else
                  f"std across {'members' if source == 'members' else 'noisy inputs'}")
    fig.suptitle("\n".join(t for t in (title, stability_title(spearman, n, source)) if t), fontsize=10)
    return _save(fig, path)


def report_stability(run_dir: Path, rec: Any, volume: Any, arr: np.ndarray, ndim: int, fig_dir: Path, title: str,
                     spacing: Any, affine: Any, notes: list[str]) -> tuple[Path, dict[str, Any]] | None:
    """The report's stability figure of ``rec``'s map (a :class:`MapRecord`) and its table row,
    when the run wrote a spread map (``None`` otherwise; an unreadable one is a note)."""
    from esegeta_engine.errors import VolumeError
    from esegeta_engine.evaluation.report import _load

    name = rec.extra.get("stability_map")
    if not name:
        return None
    try:
        spread = _load(run_dir / name, ndim)
    except VolumeError as exc:
        notes.append(f"stability map {exc.problem}; it is left out")
        return None
    m = rec.metrics or {}
    png = fig_dir / (str(name).removesuffix(".gz").removesuffix(".nii") + ".png")
    fig = stability_figure(volume, arr, spread, png, title=title, spearman=m.get("stability_spearman"),
                           n=m.get("stability_n"), source=m.get("stability_source"), spacing=spacing, affine=affine)
    return fig, {"map": rec.file, "spread map": name, "stability_spearman": m.get("stability_spearman"),
                 "stability_std_mean": m.get("stability_std_mean"), "maps compared": m.get("stability_n"),
                 "over": m.get("stability_over") or m.get("stability_source")}
