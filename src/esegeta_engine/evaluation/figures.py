"""PNG figures of attribution maps over the grey volume (matplotlib, no pyplot).

Every figure is a :class:`matplotlib.figure.Figure` drawn by its own Agg
canvas, so nothing touches pyplot's global state or needs a display.
Positive attribution is drawn in red and negative in blue over the grey
image, with opacity growing with magnitude; 3D volumes are shown as maximum
intensity projections (MIPs) along each axis, with the aspect ratio of the
voxel spacing. Arrays are in NIfTI axis order ``(x, y[, z])``.

**One orientation convention, the plugin's (radiological).** With the affine,
a 3D volume is first put in the closest RAS voxel order (oblique and flipped
scans alike), then every view is drawn as napari-esegeta shows it: axial with
the patient's right on the left and anterior up, coronal with right on the left
and superior up, sagittal with anterior on the left and superior up. The edge
letters of every panel come from :func:`display_views`, which the tests compare
with the plugin's canvas letters.

matplotlib is an optional dependency (``pip install 'napari-esegeta[report]'``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from esegeta_engine.errors import EsegetaError, VolumeError
from esegeta_engine.io import atomic_write

__all__ = ["axis_codes", "comparison_grid", "curves_figure", "display_views", "mip_figure", "montage_figure",
           "randomisation_strip"]

DPI = 100
RED = (0.95, 0.05, 0.02)
BLUE = (0.15, 0.5, 1.0)
ALPHA_MAX = 0.85
FLOOR = 0.04  # magnitudes below this share of the scale stay transparent
GREY_MAX = 0.7  # the brightest voxel is drawn light grey, not white, so red stays red on vessels
SIGN_LABEL = "attribution (red +, blue −)"
_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


def axis_codes(affine: Any) -> tuple[str, ...] | None:
    """Anatomical direction each voxel axis increases towards (``("R", "A", "S")`` for RAS),
    from a 4x4 affine (nibabel's ``aff2axcodes``); ``None`` without a usable affine."""
    if affine is None:
        return None
    try:
        from nibabel.orientations import aff2axcodes

        codes = tuple(aff2axcodes(np.asarray(affine, dtype=float)))
    except Exception:  # a singular or malformed affine: draw without letters
        return None
    return codes if all(c in _OPPOSITE for c in codes) else None


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - optional dependency
        raise EsegetaError("figures and reports need matplotlib",
                           "pip install 'napari-esegeta[report]'") from None
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=DPI, facecolor="white", format=path.suffix.lstrip(".") or "png")
    return path


def _as_spatial(volume: Any, attribution: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays on one 2D/3D grid: extra trailing axes averaged (volume) or summed (map)."""
    a = np.squeeze(np.asarray(attribution, dtype=np.float32))
    v = np.zeros_like(a) if volume is None else np.squeeze(np.asarray(volume, dtype=np.float32))
    d = min(v.ndim, a.ndim, 3)
    if d < 2:
        raise VolumeError(f"cannot draw a map of shape {a.shape} over a volume of shape {v.shape}",
                          "give 2D or 3D arrays")
    if v.ndim > d:
        v = v.reshape(*v.shape[:d], -1).mean(-1)
    if a.ndim > d:
        a = a.reshape(*a.shape[:d], -1).sum(-1)
    if v.shape != a.shape:
        raise VolumeError(f"attribution map of shape {a.shape} does not match the volume of shape {v.shape}",
                          "draw maps on the grid of the volume they explain")
    return v, np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    sp = tuple(float(s) for s in spacing)[:ndim]
    return sp if len(sp) == ndim and all(s > 0 for s in sp) else (1.0,) * ndim


#: the planes of the three views of an RAS volume: view axis -> name
PLANES = {2: "axial", 1: "coronal", 0: "sagittal"}


def _views(ndim: int, axes: Sequence[int] = (2, 1, 0)) -> list[int | None]:
    return [None] if ndim == 2 else list(axes)


def _view_title(axis: int | None, kind: str = "MIP") -> str:
    return "image" if axis is None else f"{PLANES[axis]} {kind}"


def _canonical(v: np.ndarray, a: np.ndarray, spacing: tuple[float, ...],
               affine: Any) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], tuple[str, ...] | None]:
    """The arrays in the closest RAS voxel order (3D with an affine), their spacing and axis codes."""
    codes = axis_codes(affine)
    if v.ndim != 3 or codes is None:
        return v, a, spacing, codes
    from nibabel.orientations import apply_orientation, io_orientation

    ornt = io_orientation(np.asarray(affine, dtype=float))[:3]
    sp = [1.0, 1.0, 1.0]
    for i, (out, _) in enumerate(ornt):
        sp[int(out)] = spacing[i]
    return apply_orientation(v, ornt), apply_orientation(a, ornt), tuple(sp), ("R", "A", "S")


def _display(arr: np.ndarray, radiological: bool) -> np.ndarray:
    """A 2D ``(h, v)`` array as shown: rows from the top (high ``v``), columns from the left
    (high ``h`` in the radiological views, low ``h`` for a 2D image)."""
    shown = arr.T[::-1]
    return np.ascontiguousarray(shown[:, ::-1] if radiological else shown)


def _letters(codes: tuple[str, ...] | None, rest: tuple[int, int], radiological: bool) -> dict[str, str] | None:
    if codes is None or max(rest) >= len(codes):
        return None
    h, v = codes[rest[0]], codes[rest[1]]
    left, right = (h, _OPPOSITE[h]) if radiological else (_OPPOSITE[h], h)
    return {"top": v, "bottom": _OPPOSITE[v], "left": left, "right": right}


def _project(v: np.ndarray, a: np.ndarray, axis: int | None, spacing: tuple[float, ...],
             codes: tuple[str, ...] | None = None, index: int | None = None) -> tuple:
    """(grey, positive, negative, aspect, letters) of one view as displayed: the MIP along ``axis``
    (the slice ``index`` when given; 2D: the image)."""
    if axis is None:
        grey, pos, neg, rest = v, np.clip(a, 0, None), np.clip(-a, 0, None), (0, 1)
    elif index is not None:
        grey, m = np.take(v, index, axis), np.take(a, index, axis)
        pos, neg = np.clip(m, 0, None), np.clip(-m, 0, None)
        rest = tuple(i for i in range(3) if i != axis)
    else:
        grey = v.max(axis)
        pos, neg = np.clip(a, 0, None).max(axis), np.clip(-a, 0, None).max(axis)
        rest = tuple(i for i in range(3) if i != axis)
    radio = axis is not None
    return (_display(grey, radio), _display(pos, radio), _display(neg, radio), spacing[rest[1]] / spacing[rest[0]],
            _letters(codes, rest, radio))


def display_views(volume: Any, attribution: Any, *, affine: Any = None,
                  spacing: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """The views a figure draws, as displayed: name, grey image (row 0 at the top), edge letters.

    3D: axial, coronal and sagittal MIPs in the plugin's radiological convention; 2D: the image.
    """
    v, a = _as_spatial(volume, attribution)
    v, a, sp, codes = _canonical(v, a, _spacing(spacing, v.ndim), affine)
    return [{"name": _view_title(ax).split()[0], "grey": p[0], "map": p[1] - p[2], "letters": p[4]}
            for ax, p in ((ax, _project(v, a, ax, sp, codes)) for ax in _views(v.ndim))]


def _scale(*arrays: np.ndarray) -> float:
    """Robust display maximum: 99th percentile of the non-zero magnitudes."""
    vals = np.concatenate([np.abs(x).ravel() for x in arrays])
    vals = vals[:: max(1, vals.size // 4_000_000)]  # a regular sample is plenty for large volumes
    vals = vals[vals > 0]
    return float(np.percentile(vals, 99.0)) if vals.size else 1.0


def _alpha(mag: np.ndarray) -> np.ndarray:
    return ALPHA_MAX * np.clip((mag - FLOOR) / (1 - FLOOR), 0, 1) ** 0.5


def _overlay(pos: np.ndarray, neg: np.ndarray, vmax: float) -> np.ndarray:
    """RGBA image: the dominant sign's colour, opacity by magnitude."""
    p, q = np.clip(pos / vmax, 0, 1), np.clip(neg / vmax, 0, 1)
    red = p >= q
    rgba = np.empty(p.shape + (4,), dtype=np.float32)
    rgba[..., :3] = np.where(red[..., None], RED, BLUE)
    rgba[..., 3] = _alpha(np.where(red, p, q))
    return rgba


def _panel(ax: Any, grey: np.ndarray, pos: np.ndarray, neg: np.ndarray, vmax: float, aspect: float,
           title: str | None = None, window: tuple[float, float] | None = None,
           letters: dict[str, str] | None = None) -> None:
    """Draw one displayed view (row 0 at the top) with its edge letters."""
    lo, hi = window if window is not None else np.percentile(grey, (1.0, 99.7))
    top = lo + max(hi - lo, 1e-6) / GREY_MAX
    ax.imshow(grey, cmap="gray", origin="upper", aspect=aspect, vmin=lo, vmax=top, interpolation="nearest")
    ax.imshow(_overlay(pos, neg, vmax), origin="upper", aspect=aspect, interpolation="nearest")
    ax.set(xticks=[], yticks=[])
    ax.spines[:].set_visible(False)
    if letters:
        style = {"transform": ax.transAxes, "fontsize": 8, "color": "#ffd400", "fontweight": "bold",
                 "ha": "center", "va": "center"}
        for x, y, edge in ((0.96, 0.5, "right"), (0.04, 0.5, "left"), (0.5, 0.95, "top"), (0.5, 0.05, "bottom")):
            ax.text(x, y, letters[edge], **style)
    if title:
        ax.set_title(title, fontsize=9)


def _colorbar(fig: Any, axes: Any, vmax: float, signed: bool, label: str = SIGN_LABEL) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    t = np.linspace(-1 if signed else 0, 1, 256)
    colours = np.array([(*(RED if x >= 0 else BLUE), a) for x, a in zip(t, _alpha(np.abs(t)))])
    sm = ScalarMappable(norm=Normalize(-vmax if signed else 0, vmax), cmap=ListedColormap(colours))
    cb = fig.colorbar(sm, ax=axes, shrink=0.85, aspect=25, pad=0.01)
    cb.set_label(label, fontsize=8)
    cb.ax.tick_params(labelsize=7)


def mip_figure(volume: Any, attribution: Any, path: str | Path, *, title: str | None = None,
               spacing: Sequence[float] | None = None, affine: Any = None) -> Path:
    """Three MIPs (one view for 2D) of the grey volume with the map overlaid.

    Parameters
    ----------
    volume : array or None
        Grey image ``(x, y[, z][, c])``; channels are averaged. None: black.
    attribution : array
        The map on the same grid (extra trailing axes are summed).
    path : str or Path
        Output PNG.
    title : str, optional
        Figure title.
    spacing : sequence of float, optional
        Voxel size per axis (mm) for the aspect ratio.
    affine : array, optional
        The volume's 4x4 affine: orientation letters (R/L, A/P, S/I) on every panel edge.

    Returns
    -------
    Path
    """
    v, a = _as_spatial(volume, attribution)
    v, a, sp, codes = _canonical(v, a, _spacing(spacing, v.ndim), affine)
    views = [_project(v, a, ax, sp, codes) for ax in _views(v.ndim)]
    vmax = _scale(*[x for view in views for x in view[1:3]])
    fig = _figure(4.0 * len(views) + 1.0, 4.0)
    axes = fig.subplots(1, len(views), squeeze=False)[0]
    for ax, axis, (grey, pos, neg, aspect, letters) in zip(axes, _views(v.ndim), views):
        _panel(ax, grey, pos, neg, vmax, aspect, _view_title(axis), letters=letters)
    _colorbar(fig, list(axes), vmax, bool((a < 0).any()))
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _slices(a: np.ndarray, axis: int, n: int) -> list[int]:
    """``n`` slice indices spread over the extent of the map along ``axis``."""
    profile = np.abs(a).sum(axis=tuple(i for i in range(a.ndim) if i != axis))
    where = np.flatnonzero(profile > 0.01 * profile.max()) if profile.max() > 0 else np.arange(a.shape[axis])
    lo, hi = int(where[0]), int(where[-1])
    return sorted({int(round(i)) for i in np.linspace(lo, hi, max(1, n))})


def montage_figure(volume: Any, attribution: Any, path: str | Path, *, axis: int = 2, n_slices: int = 12,
                   title: str | None = None, spacing: Sequence[float] | None = None,
                   affine: Any = None) -> Path:
    """A grid of slices along ``axis`` with the map overlaid (2D: the image).

    Parameters
    ----------
    volume, attribution, path, title, spacing, affine
        As for :func:`mip_figure`.
    axis : int
        Slicing axis of the RAS-ordered volume (2: axial, 1: coronal, 0: sagittal slices).
    n_slices : int
        At most this many slices, spread evenly over the part of the volume
        the map covers (fewer for thin volumes). All share one colour scale.

    Returns
    -------
    Path
    """
    v, a = _as_spatial(volume, attribution)
    v, a, sp, codes = _canonical(v, a, _spacing(spacing, v.ndim), affine)
    vmax = _scale(a)
    window = tuple(np.percentile(v, (1.0, 99.7)))
    if v.ndim == 2:
        panels = [(None, _project(v, a, None, sp, codes))]
    else:
        panels = [(i, _project(v, a, axis, sp, codes, index=i)) for i in _slices(a, axis, n_slices)]
    ncols = min(len(panels), max(1, int(np.ceil(np.sqrt(len(panels) * 4 / 3)))))
    nrows = int(np.ceil(len(panels) / ncols))
    fig = _figure(2.5 * ncols + 1.0, 2.5 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.set_axis_off()
    for ax, (i, (grey, pos, neg, aspect, letters)) in zip(axes.ravel(), panels):
        label = "image" if i is None else f"{PLANES[axis]} {i}"
        _panel(ax, grey, pos, neg, vmax, aspect, label, window, letters)
    _colorbar(fig, axes.ravel().tolist(), vmax, bool((a < 0).any()))
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _grid(volume: Any, rows: list[tuple[str, list[Any]]], col_titles: list[str], path: str | Path,
          views: list[int | None], title: str | None, spacing: Sequence[float] | None,
          per_panel: bool, affine: Any = None) -> Path:
    """Rows of MIP panels scaled to a robust maximum per row (or per panel)."""
    ncols = len(col_titles)
    fig = _figure(2.9 * ncols + 1.4, 2.6 * len(rows) + 0.6)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    signed = False
    for r, (name, maps) in enumerate(rows):
        panels = []
        for m, axis in zip(maps, views):
            v, a = _as_spatial(volume, m)
            v, a, sp, codes = _canonical(v, a, _spacing(spacing, v.ndim), affine)
            panels.append(_project(v, a, axis, sp, codes))
            signed |= bool((a < 0).any())
        row_max = _scale(*[x for p in panels for x in p[1:3]])
        for c, (grey, pos, neg, aspect, letters) in enumerate(panels):
            vmax = _scale(pos, neg) if per_panel else row_max
            _panel(axes[r, c], grey, pos, neg, vmax, aspect, col_titles[c] if r == 0 else None, letters=letters)
        axes[r, 0].set_ylabel(name, fontsize=9)
    _colorbar(fig, axes.ravel().tolist(), 1.0, signed, "attribution / per-map scale (red +, blue −)")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def comparison_grid(volume: Any, maps: Mapping[str, Any], path: str | Path, *, title: str | None = None,
                    spacing: Sequence[float] | None = None, affine: Any = None) -> Path:
    """Methods (rows) × views (three MIPs; 2D: one) of several maps of one volume.

    Each map is scaled to its own robust maximum, so the patterns compare,
    not the magnitudes (which differ between methods by orders of magnitude).

    Parameters
    ----------
    volume : array or None
        Grey image, as for :func:`mip_figure`.
    maps : dict
        Row label (method) -> map on the volume's grid.
    path, title, spacing, affine
        As for :func:`mip_figure`.

    Returns
    -------
    Path
    """
    if not maps:
        raise ValueError("comparison_grid needs at least one map")
    ndim = _as_spatial(volume, next(iter(maps.values())))[0].ndim
    views = _views(ndim)
    rows = [(name, [m] * len(views)) for name, m in maps.items()]
    return _grid(volume, rows, [_view_title(a) for a in views], path, views, title, spacing, False, affine)


def randomisation_strip(volume: Any, maps: Mapping[str, Sequence[Any]], stage_names: Sequence[str],
                        path: str | Path, *, axis: int = 2, title: str | None = None,
                        spacing: Sequence[float] | None = None, affine: Any = None) -> Path:
    """Methods (rows) × randomisation stages (columns), MIPs along ``axis``.

    ``maps[method]`` holds one map per stage, in the order of ``stage_names``
    (e.g. original, then cascading layer randomisation). Each map is scaled
    to its own maximum, as in Adebayo et al. (2018). Other parameters are as
    for :func:`mip_figure`; ``axis`` is the projection axis (3D only).

    Returns
    -------
    Path
    """
    if not maps:
        raise ValueError("randomisation_strip needs at least one method")
    for name, stage_maps in maps.items():
        if len(stage_maps) != len(stage_names):
            raise ValueError(f"{name!r} has {len(stage_maps)} maps for {len(stage_names)} stages")
    ndim = _as_spatial(volume, next(iter(maps.values()))[0])[0].ndim
    view: int | None = None if ndim == 2 else axis
    rows = [(name, list(stage_maps)) for name, stage_maps in maps.items()]
    return _grid(volume, rows, list(stage_names), path, [view] * len(stage_names), title, spacing, True,
                 affine)


from esegeta_engine.evaluation.figures_curves import curves_figure  # noqa: E402  (re-exported)
