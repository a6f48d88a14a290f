"""Picking the target voxel with a click on the image (the Explain tab's voxel target)."""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_esegeta._geometry import copy_geometry, layer_to_nifti_affine, voxel_to_world
from napari_esegeta._qt._common import set_status

VOXEL_LAYER = "esegeta target voxel"


class VoxelPicking:
    """Mixin for the Explain widget: ``pick_btn`` arms a click; the voxel gets a marker layer.

    The widget provides ``viewer``, ``image_combo``, ``pick_btn``, ``voxel_label``, ``status``
    and ``voxel``.
    """

    def _toggle_picking(self, on: bool) -> None:
        callbacks = self.viewer.mouse_drag_callbacks
        if on and self._pick not in callbacks:
            callbacks.append(self._pick)
        elif not on and self._pick in callbacks:
            callbacks.remove(self._pick)

    def _pick(self, viewer: Any, event: Any) -> None:
        layer = self.image_combo.layer()
        if layer is None or event.type != "mouse_press":
            return
        self.set_voxel(layer.world_to_data(event.position))
        self.pick_btn.setChecked(False)

    def set_voxel(self, data_position: Any) -> tuple[int, ...] | None:
        """Choose the target voxel from a position in the input layer's data coordinates."""
        layer = self.image_combo.layer()
        if layer is None:
            return None
        idx = tuple(int(v) for v in np.round(np.asarray(data_position, dtype=float)))
        if len(idx) != layer.data.ndim or not all(0 <= i < s for i, s in zip(idx, layer.data.shape)):
            set_status(self.status, f"Voxel {idx} is outside the image {layer.data.shape}.\n"
                       "→ click inside the volume", "error")
            return None
        self.voxel = idx
        world = voxel_to_world(layer_to_nifti_affine(layer), idx[:3]) if len(idx) == 3 else idx
        self.voxel_label.setText(f"{idx} → ({', '.join(f'{w:.1f}' for w in world)}) mm")
        geometry = copy_geometry(layer)
        if VOXEL_LAYER in self.viewer.layers:
            marker = self.viewer.layers[VOXEL_LAYER]
            marker.data = np.array([idx], dtype=float)
        else:
            self.viewer.add_points(np.array([idx], dtype=float), name=VOXEL_LAYER, symbol="cross",
                                   size=4, face_color="lime", border_color="lime", **geometry)
        return idx
