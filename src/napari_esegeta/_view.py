"""Radiological viewing planes for volumes in NIfTI (x, y, z) order (no Qt).

Layers keep NIfTI voxel order and world coordinates are RAS+ mm, so the
world axes are (x: left -> right, y: posterior -> anterior, z: inferior ->
superior). The planes follow the radiological convention: the patient's
right on the left of the screen, anterior / superior up.
"""

from __future__ import annotations

from typing import Any

#: plane -> (dims order, (vertical, horizontal) camera orientation)
PLANES: dict[str, tuple[tuple[int, int, int], tuple[str, str]]] = {
    "axial": ((2, 1, 0), ("up", "left")),
    "coronal": ((1, 2, 0), ("up", "left")),
    "sagittal": ((0, 2, 1), ("up", "left")),
}


#: 3D view: (view direction, up direction) in world (x, y, z)
VIEW_3D = ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0))


def _camera(viewer: Any) -> Any:
    """``viewer.scene.camera`` (napari >= 0.9), else the legacy ``viewer.camera``."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def show_plane(viewer: Any, plane: str) -> None:
    """Show ``plane`` (axial, coronal, sagittal) in 2D, or ``3d``.

    Parameters
    ----------
    viewer : napari.Viewer
        A viewer whose layers are 3D.
    plane : str
        ``axial``, ``coronal``, ``sagittal`` or ``3d``.
    """
    if plane == "3d":  # axial MIP seen from the feet, anterior up (radiological)
        viewer.dims.ndisplay = 3
        viewer.dims.order = (0, 1, 2)
        viewer.reset_view()
        _camera(viewer).set_view_direction(VIEW_3D[0], VIEW_3D[1])
        return
    if viewer.dims.ndim != 3:
        return
    order, orientation = PLANES[plane]
    viewer.dims.ndisplay = 2
    viewer.dims.order = order
    _camera(viewer).orientation2d = orientation
    viewer.reset_view()


#: world axis -> (letter at its low end, letter at its high end); world is RAS+ mm
WORLD_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))
#: dims slider labels of RAS+ world axes
WORLD_AXIS_LABELS = ("x (R-L)", "y (A-P)", "z (S-I)")
#: canvas positions of the orientation letters
LETTER_POSITIONS = ("top_center", "bottom_center", "middle_left", "middle_right")
_LETTER_KEY = "esegeta_orientation_"


def has_world_geometry(layer: Any) -> bool:
    """True for layers placed in RAS+ world space from a NIfTI affine (this plugin's reader)."""
    meta = getattr(layer, "metadata", None) or {}
    return "nifti" in meta and getattr(layer, "ndim", 0) == 3


def axis_codes(affine: Any) -> tuple[str, ...]:
    """The voxel axes' orientation letters of a NIfTI affine, e.g. ``('L', 'A', 'S')``."""
    import nibabel as nib
    import numpy as np

    return tuple(str(c) for c in nib.orientations.aff2axcodes(np.asarray(affine, dtype=float)))


def orientation_letters(displayed: tuple[int, int], orientation2d: tuple[str, str]) -> dict[str, str]:
    """The letter at each edge of a 2D view of RAS+ world axes.

    Parameters
    ----------
    displayed : (int, int)
        The world axes shown (vertical, horizontal), napari's ``dims.displayed``.
    orientation2d : (str, str)
        The camera's 2D orientation: where the vertical axis grows (``up`` /
        ``down``) and where the horizontal one grows (``left`` / ``right``).

    Returns
    -------
    dict
        ``{"top_center": "A", "bottom_center": "P", "middle_left": "R", "middle_right": "L"}``
        for the radiological axial view.
    """
    vertical, horizontal = displayed
    v_low, v_high = WORLD_LETTERS[vertical]
    h_low, h_high = WORLD_LETTERS[horizontal]
    top, bottom = (v_high, v_low) if orientation2d[0] == "up" else (v_low, v_high)
    left, right = (h_high, h_low) if orientation2d[1] == "left" else (h_low, h_high)
    return {"top_center": top, "bottom_center": bottom, "middle_left": left, "middle_right": right}


def update_orientation_letters(viewer: Any, *_: Any) -> dict[str, str]:
    """Write the current 2D view's orientation letters on the canvas (hidden in 3D / non-NIfTI)."""
    from napari.components.overlays import TextOverlay

    overlays = viewer.canvas.overlays
    show = viewer.dims.ndisplay == 2 and viewer.dims.ndim == 3 and not viewer.canvas.grid.enabled and any(
        has_world_geometry(ly) for ly in viewer.layers)
    letters: dict[str, str] = {}
    if show:
        displayed = tuple(viewer.dims.displayed)[-2:]
        orient = tuple(str(o) for o in _camera(viewer).orientation2d)
        letters = orientation_letters(displayed, orient)  # type: ignore[arg-type]
    if show and tuple(viewer.dims.axis_labels) != WORLD_AXIS_LABELS:
        viewer.dims.axis_labels = WORLD_AXIS_LABELS
    for pos in LETTER_POSITIONS:
        key = _LETTER_KEY + pos
        if key not in overlays:  # no background box: 4 boxes cost 80-170 ms of a map's insertion frame
            overlays[key] = TextOverlay(position=pos, font_size=14, color=(1.0, 0.85, 0.2, 1.0), box=False)
        if letters:  # hidden letters keep their text: napari re-places every overlay for each change
            overlays[key].text = letters[pos]
        overlays[key].visible = bool(letters)
    return letters


def track_orientation_letters(viewer: Any) -> None:
    """Keep the orientation letters up to date as planes, layers and cameras change."""
    update = lambda *_: update_orientation_letters(viewer)  # noqa: E731
    viewer.dims.events.order.connect(update)
    viewer.dims.events.ndisplay.connect(update)
    viewer.layers.events.inserted.connect(update)
    viewer.layers.events.removed.connect(update)
    viewer.canvas.grid.events.enabled.connect(update)
    cam_events = _camera(viewer).events
    for name in ("orientation2d", "orientation"):
        if hasattr(cam_events, name):
            getattr(cam_events, name).connect(update)
    update()
