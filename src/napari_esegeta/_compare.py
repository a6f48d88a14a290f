"""Side-by-side comparison in napari's grid mode, and saving (no Qt).

napari 0.9 grid mode puts ``stride`` consecutive layers in each viewbox and
links the viewboxes' cameras. To show the MRA under every map, each chosen
result gets its own view of the base image (a second layer over the *same*
array, no copy), the pairs are moved to the bottom of the layer list as
``[base, map, base, map, ...]`` and the grid stride is set to 2; other layers
are hidden (hidden layers never occupy a viewbox). :func:`restore_layout`
undoes all of it.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from esegeta_engine.io import Volume, save_map
from napari_esegeta._geometry import copy_geometry, layer_to_nifti_affine
from napari_esegeta._reader import header_from_metadata

COPY_KEY = "esegeta_compare_base"


@dataclass
class GridState:
    """What :func:`arrange_side_by_side` changed, to undo it."""

    order: list[Any] = field(default_factory=list)
    visible: list[bool] = field(default_factory=list)
    grid: dict[str, Any] = field(default_factory=dict)
    copies: list[Any] = field(default_factory=list)
    overlays: list[tuple[Any, bool]] = field(default_factory=list)
    fonts: list[tuple[Any, float]] = field(default_factory=list)
    active: Any = None  # the selected layer before (the copies take the selection when added)


def _grid(viewer: Any) -> Any:
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


@contextlib.contextmanager
def _young_collection_only() -> Iterator[None]:
    """Within the block, ``gc.collect()`` scans only objects made inside it.

    napari ends a layer batch with a full ``gc.collect()`` (a workaround for OpenGL resources of
    *removed* layers on some Windows drivers): ≈ 0.5 s in a process holding torch and napari.
    Arranging the grid removes no layer, so the objects that existed before (``gc.freeze``) are
    left out of that one collection and put back afterwards (``gc.unfreeze``): nothing else changes.
    ``gc.unfreeze`` thaws the whole permanent generation, so where something else in the process
    froze objects first (a server's ``gc.freeze()`` before forking) the block freezes nothing and
    leaves theirs frozen: the collection is then a full one, as without this block.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _set_visible(layer: Any, visible: bool) -> None:
    """Only where it changes: napari redraws for every ``visible`` set and reslices a layer set visible."""
    if layer.visible != visible:
        layer.visible = visible


def _move_to(viewer: Any, layer: Any, position: int) -> None:
    current = viewer.layers.index(layer)
    if current != position:
        viewer.layers.move(current, position)


def begin_side_by_side(viewer: Any) -> GridState:
    """What :func:`restore_layout` needs to undo the arrangement, recorded before any change."""
    grid = _grid(viewer)
    return GridState(order=list(viewer.layers), visible=[ly.visible for ly in viewer.layers],
                     grid={"enabled": grid.enabled, "stride": grid.stride, "shape": grid.shape,
                           "spacing": grid.spacing}, active=viewer.layers.selection.active)


def add_base_copy(viewer: Any, base: Any, result: Any, state: GridState) -> Any:
    """Add one hidden view of ``base`` for ``result`` (shown by :func:`finish_side_by_side`).

    Hidden, so the canvas does not draw it over the current view before the grid exists.
    """
    copy = viewer.add_image(
        base.data, name=f"{base.name} ▸ {result.name}", colormap=base.colormap.name,
        contrast_limits=base.contrast_limits, gamma=base.gamma, rendering=base.rendering,
        blending="translucent", interpolation2d=base.interpolation2d, visible=False,
        metadata={COPY_KEY: True}, **copy_geometry(base))
    state.copies.append(copy)
    return copy


def _arrange(viewer: Any, results: list[Any], state: GridState, spacing: float) -> None:
    grid = _grid(viewer)
    # a map removed between the steps leaves the grid (its hidden copy goes with the undo)
    desired = [layer for pair in zip(state.copies, results) if all(ly in viewer.layers for ly in pair)
               for layer in pair]
    results = [r for r in results if r in desired]
    for position, layer in enumerate(desired):
        _move_to(viewer, layer, position)
    for layer in viewer.layers:
        _set_visible(layer, layer in desired)
    # the map's name in each cell; no napari colour-bar overlays: napari 0.9 crashes (segmentation
    # fault) once a layer whose colour bar was shown is removed, and maps are often removed
    for result in results:
        state.overlays.append((result, result.name_overlay.visible))
        result.name_overlay.visible = True
    grid.stride = 2
    grid.shape = (-1, -1)
    grid.spacing = spacing
    grid.enabled = True


def finish_side_by_side(viewer: Any, results: list[Any], state: GridState, spacing: float = 0.02) -> None:
    """Order ``[copy, map, copy, map, ...]``, show only those, switch the grid on: one redraw."""
    with _young_collection_only(), viewer.layers.batched_update():  # one scene-graph update and redraw
        _arrange(viewer, results, state, spacing)
    fit_names(viewer, results, state)
    viewer.reset_view()


def side_by_side_steps(viewer: Any, base: Any, results: list[Any], state: GridState,
                       spacing: float = 0.02) -> list[Any]:
    """The arrangement as steps, one napari layer insertion each, the grid last.

    The Compare tab runs one step per turn of the event loop, so the GUI stalls for one layer
    insertion at a time rather than for all of them and the grid's first paint together.
    """
    steps: list[Any] = [lambda result=result: add_base_copy(viewer, base, result, state) for result in results]
    return [*steps, lambda: finish_side_by_side(viewer, results, state, spacing)]


def arrange_side_by_side(viewer: Any, base: Any, results: list[Any], spacing: float = 0.02) -> GridState:
    """Show each result over its own view of ``base`` in a grid with linked cameras, in one go.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    base : napari.layers.Image
        The MRA shown under every result.
    results : list of napari.layers.Image
        The maps to compare (one grid cell each, in this order).
    spacing : float
        Gap between cells (fraction of a cell).

    Returns
    -------
    GridState
        Pass it to :func:`restore_layout` to go back.
    """
    state = begin_side_by_side(viewer)
    with _young_collection_only(), viewer.layers.batched_update():  # one scene-graph update and redraw
        for result in results:
            add_base_copy(viewer, base, result, state)
        _arrange(viewer, results, state, spacing)
    fit_names(viewer, results, state)
    viewer.reset_view()
    return state


def fit_names(viewer: Any, results: list[Any], state: Any = None) -> None:
    """Shrink each cell's name so it fits the cell (long names are otherwise cut at the cell's edge)."""
    canvas = getattr(viewer, "canvas", None)
    try:
        width = float(canvas.viewbox_size(viewer.layers)[1])
    except Exception:  # older napari: no per-cell size, keep the font
        return
    for result in results:
        overlay = result.name_overlay
        if state is not None:
            state.fonts.append((result, overlay.font_size))
        needed = 1.0 * len(result.name)  # about 1 px per character per point (napari's canvas font)
        overlay.font_size = float(max(6.0, min(overlay.font_size, (width - 24) / max(needed, 1.0))))


def restore_layout(viewer: Any, state: GridState) -> None:
    """Undo :func:`arrange_side_by_side` (layers removed meanwhile are skipped)."""
    grid = _grid(viewer)
    with viewer.layers.batched_update():  # one scene-graph update and redraw at the end
        grid.enabled = False
        for layer, name_visible in state.overlays:
            layer.name_overlay.visible = name_visible
        for layer, size in state.fonts:
            layer.name_overlay.font_size = size
        for copy in state.copies:
            if copy in viewer.layers:
                viewer.layers.remove(copy)
        position = 0
        for layer, visible in zip(state.order, state.visible):
            if layer in viewer.layers:
                _move_to(viewer, layer, position)
                _set_visible(layer, visible)
                position += 1
        grid.stride, grid.shape, grid.spacing = (state.grid["stride"], state.grid["shape"],
                                                 state.grid["spacing"])
        grid.enabled = state.grid["enabled"]
    if state.active is not None and state.active in viewer.layers:  # not an empty layer-controls panel
        viewer.layers.selection.active = state.active
    viewer.reset_view()


def limits_text(layer: Any) -> str:
    """``name: -0.31 … 0.31`` — the colour scale of a map, for the grid's legend."""
    lo, hi = (float(v) for v in layer.contrast_limits)
    return f"{layer.name}: {lo:.3g} … {hi:.3g}"


def is_compare_copy(layer: Any) -> bool:
    """True for the base-image views added by :func:`arrange_side_by_side`."""
    return bool((getattr(layer, "metadata", None) or {}).get(COPY_KEY))


def result_filename(layer: Any) -> str:
    """``<input>__<method[@layer]>__<target>.nii.gz``, as the CLI names maps."""
    import re

    from esegeta_engine.jobs.naming import map_filename

    from napari_esegeta._records import layer_record, provenance, record_label

    meta, record = provenance(layer), layer_record(layer)
    stem = re.sub(r"[^A-Za-z0-9._+-]+", "-", str(meta.get("input_layer", "volume"))).strip("-") or "volume"
    return map_filename(stem, record_label(record) if record is not None else layer.name,
                        meta.get("target_label", "target"))


def save_results(layers: list[Any], folder: str | Path) -> list[Path]:
    """Save result layers as NIfTI through the engine's ``save_map``.

    Each map is written with its layer's geometry, which is the input
    volume's (result layers copy it), and the input's header.
    """
    folder = Path(folder)
    written = []
    for layer in layers:
        data = np.asarray(layer.data, dtype=np.float32)
        like = Volume(data=data, affine=layer_to_nifti_affine(layer),
                      header=header_from_metadata(layer.metadata))
        written.append(save_map(data, like, folder / result_filename(layer)))
    return written


def save_screenshot(viewer: Any, path: str | Path, scale: float | None = None) -> Path:
    """Save the canvas (grid included) as PNG."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(path=str(path), canvas_only=True, scale=scale, flash=False)
    return path


def set_rendering(layers: list[Any], rendering: str) -> None:
    """Set the 3D rendering of result layers (mip, attenuated_mip, translucent)."""
    for layer in layers:
        layer.rendering = rendering
