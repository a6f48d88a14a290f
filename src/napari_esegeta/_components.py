"""Component targets in the viewer: which map layers explain one structure, and where it is (no Qt).

A ``target.components`` run gives one map per connected structure, named ``…__component-03`` by
the CLI and ``… · vessel #3`` here; its layer metadata holds the structure's class, size and centroid
(``metadata["esegeta"]["target_details"]``, NIfTI voxel indices and world mm). The Compare tab lists
them and :func:`jump_to` moves the view to a structure's centroid.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def component_details(layer: Any) -> dict[str, Any] | None:
    """The structure a map layer explains (``component``, ``class``, ``voxels``, centroids), or None."""
    details = ((getattr(layer, "metadata", None) or {}).get("esegeta") or {}).get("target_details")
    if isinstance(details, dict) and "component" in details and "centroid_voxel" in details:
        return details
    return None


def component_layers(viewer: Any) -> list[Any]:
    """Map layers of single structures, by class then rank (1 = largest)."""
    found = [ly for ly in viewer.layers if component_details(ly) is not None]
    return sorted(found, key=lambda ly: (component_details(ly)["class"], component_details(ly)["component"]))


def component_text(layer: Any) -> str:
    """``#3 · 412 voxels · (12.5, -40.2, 8.0) mm — saliency · vessel``."""
    d = component_details(layer) or {}
    mm = ", ".join(f"{v:.1f}" for v in d.get("centroid_mm", []))
    return f"#{d.get('component')} · {d.get('voxels')} voxels · ({mm}) mm — {layer.name}"


def centroid_world(layer: Any) -> np.ndarray:
    """The structure's centroid in napari world coordinates (through the layer's own transform)."""
    d = component_details(layer)
    if d is None:
        raise ValueError(f"{layer.name!r} does not explain a single structure")
    voxel = np.asarray(d["centroid_voxel"], dtype=float)[: layer.ndim]
    return np.asarray(layer.data_to_world(voxel), dtype=float)


def jump_to(viewer: Any, layer: Any) -> np.ndarray:
    """Move the slices and the camera to the structure's centroid; show that map. Returns the world point."""
    world = centroid_world(layer)
    axes = tuple(range(viewer.dims.ndim - len(world), viewer.dims.ndim))
    viewer.dims.set_point(axes, tuple(float(v) for v in world))
    displayed = list(viewer.dims.displayed)
    camera = viewer.camera
    center = [float(world[axes.index(a)]) for a in displayed if a in axes]
    if len(center) == len(displayed):
        camera.center = tuple(center)
    from napari_esegeta._layers import show_only

    show_only(viewer, layer)
    return world
