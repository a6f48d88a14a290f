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
