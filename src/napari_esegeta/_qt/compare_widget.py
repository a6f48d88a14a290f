"""The Compare dock widget: side-by-side grid, 3D rendering toggle, saving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QListWidget,
    QListWidgetItem,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_esegeta import _compare as C
from napari_esegeta._components import component_layers, component_text, jump_to
from napari_esegeta._layers import is_input_layer, is_result_layer, next_rendering
from napari_esegeta._model import format_error
from napari_esegeta._records import layer_record
from napari_esegeta._qt._common import LayerCombo, set_status, status_label
from napari_esegeta._geometry import copy_geometry
from napari_esegeta._state import get_session
from napari_esegeta._view import PLANES, show_plane

_RENDER_TITLES = {"mip": "MIP", "attenuated_mip": "attenuated MIP", "translucent": "translucent"}


class CompareWidget(QWidget):
    """Arrange result layers side by side over the MRA, switch 3D rendering, save.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer (injected by napari).
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state: C.GridState | None = None
        self._steps: list[Any] = []  # *Side by side* steps left for later event-loop turns
        self.rendering = "translucent"
        self.base_combo = LayerCombo(napari_viewer, ("Image",), predicate=is_input_layer)
        self.view_combo = QComboBox()
        self.view_combo.addItems(["(napari default)", *PLANES, "3d"])
        self.view_combo.setToolTip("Radiological planes (patient's right on screen left) or 3D")
        self.view_combo.currentTextChanged.connect(self.set_view)
        self.results_list = QListWidget()
        self.results_list.setToolTip("Checked maps are compared and saved")
        self.results_list.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.compare_btn = QPushButton("Side by side")
        self.compare_btn.setCheckable(True)
        self.compare_btn.setToolTip("Each checked map over its own view of the image, cameras linked")
        self.compare_btn.toggled.connect(self._toggle_compare)
        self.render_btn = QPushButton()
        self.render_btn.setToolTip("3D rendering of every map: translucent (both signs) → MIP (strongest "
                                   "positives) → attenuated MIP → translucent")
        self.render_btn.clicked.connect(self.cycle_rendering)
        self.save_btn = QPushButton("Save checked maps…")
        self.save_btn.clicked.connect(self._save_dialog)
        self.shot_btn = QPushButton("Save screenshot…")
        self.shot_btn.clicked.connect(self._screenshot_dialog)
        self.grid_btn = QPushButton("Patch grid")
        self.grid_btn.setToolTip("Show the sliding window's patch borders of the checked map (a Labels layer): "
                                 "where seams can appear")
        self.grid_btn.clicked.connect(self.show_patch_grid)
        self.structures = QListWidget()  # one map per structure (target components): click to go there
        self.structures.setToolTip("Maps of single structures (Explain ▸ one map per structure): click one "
                                   "to move the view to its centroid and show its map")
        self.structures.setMaximumHeight(96)
        self.structures.itemClicked.connect(self._structure_clicked)
        self._structures_title = QLabel("Structures — click to go to one")
        self.status = status_label()

        form = QFormLayout()
        form.addRow("Image", self.base_combo)
        form.addRow("View", self.view_combo)
        row1 = QHBoxLayout()
        row1.addWidget(self.compare_btn)
        row1.addWidget(self.render_btn)
        row2 = QHBoxLayout()
        row2.addWidget(self.save_btn)
        row2.addWidget(self.shot_btn)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.results_list, 1)
        layout.addLayout(row1)
        layout.addLayout(row2)
        layout.addWidget(self.grid_btn)
        layout.addWidget(self._structures_title)
        layout.addWidget(self.structures)
        layout.addWidget(self.status)
        events = napari_viewer.layers.events
        for ev in (events.inserted, events.removed):
            ev.connect(self.refresh)
        get_session(napari_viewer).signals.run_finished.connect(self._run_finished)
        self._update_render_btn()
        self.refresh()

    def show_patch_grid(self) -> Any:
        """Add the patch borders of the first checked sliding-window map as a Labels layer (or say why not)."""
        from esegeta_engine.evaluation.seams import patch_grid
        from esegeta_engine.preprocess import AxisOrder

        layer = next((ly for ly in self.checked_layers() or self.result_layers()
                      if (layer_record(ly).execution or {}).get("mode") == "sliding_window"), None)
        if layer is None:
            set_status(self.status, "No sliding-window map: patch borders exist only with a patch size "
                       "(Model tab).", "info")
            return None
        ex = layer_record(layer).execution
        order = AxisOrder(get_session(self.viewer).preprocess.axis_order)
        shape = order.to_model(np.broadcast_to(np.uint8(0), layer.data.shape)).shape
        mask = np.ascontiguousarray(order.to_nifti(patch_grid(shape, ex["patch_size"], ex["overlap"])))
        return self.viewer.add_labels(mask.astype(np.uint8), name=f"patch grid · {layer.name}", opacity=0.35,
                                      **copy_geometry(layer))

    # -- result list -----------------------------------------------------------------------------

    def result_layers(self) -> list[Any]:
        """All result layers in the viewer (bottom to top)."""
        return [ly for ly in self.viewer.layers if is_result_layer(ly)]

    def refresh(self, *_: Any) -> None:
        """Rebuild the list of maps, keeping check marks."""
        try:
            checked = {self.results_list.item(i).text(): self.results_list.item(i).checkState()
                       for i in range(self.results_list.count())}
            self.results_list.clear()
        except RuntimeError:  # widget already deleted
            return
        for layer in self.result_layers():
            item = QListWidgetItem(layer.name)
            notes = "\n".join(layer_record(layer).notes or [])
            item.setToolTip(layer.name + (f"\n{notes}" if notes else ""))  # the list elides long names
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(checked.get(layer.name, Qt.CheckState.Checked))
            self.results_list.addItem(item)
        self._refresh_structures()

    def _refresh_structures(self) -> None:
        self.structures.clear()
        layers = component_layers(self.viewer)
        for layer in layers:
            item = QListWidgetItem(text := component_text(layer))
            item.setToolTip(text)
            item.setData(Qt.ItemDataRole.UserRole, layer.name)
            self.structures.addItem(item)
        self.structures.setVisible(bool(layers))
        self._structures_title.setVisible(bool(layers))

    def _structure_clicked(self, item: QListWidgetItem) -> None:
        name = item.data(Qt.ItemDataRole.UserRole)
        if name not in self.viewer.layers:
            return
        world = jump_to(self.viewer, self.viewer.layers[name])
        set_status(self.status, f"{name}: centroid at ({', '.join(f'{v:.1f}' for v in world)}) (world mm)", "ok")

    def checked_layers(self) -> list[Any]:
        """Result layers whose box is checked, in list order."""
        names = [self.results_list.item(i).text() for i in range(self.results_list.count())
                 if self.results_list.item(i).checkState() == Qt.CheckState.Checked]
        return [self.viewer.layers[n] for n in names if n in self.viewer.layers]

    def set_checked(self, names: list[str]) -> None:
        """Check exactly ``names``."""
        for i in range(self.results_list.count()):
            item = self.results_list.item(i)
            item.setCheckState(Qt.CheckState.Checked if item.text() in names else Qt.CheckState.Unchecked)

    def _run_finished(self, _names: list[str]) -> None:
        try:  # new maps keep their own rendering (translucent when signed) until the user cycles
            self.refresh()
        except RuntimeError:
            pass

    # -- grid ------------------------------------------------------------------------------------

    def _toggle_compare(self, on: bool) -> None:
        if on:
            self.compare()
        else:
            self.uncompare()

    def compare(self) -> bool:
        """Arrange the checked maps side by side (returns False with a message if impossible)."""
        base, results = self.base_combo.layer(), self.checked_layers()
        self.refresh()  # maps deleted meanwhile leave the list
        if base is None or not results:
            set_status(self.status, "Nothing to compare.\n→ choose the image and check at least one map",
                       "error")
            self.compare_btn.blockSignals(True)
            self.compare_btn.setChecked(False)
            self.compare_btn.blockSignals(False)
            return False
        if self.state is not None:
            C.restore_layout(self.viewer, self.state)
        self.state = C.begin_side_by_side(self.viewer)
        # one napari layer insertion per turn of the event loop, then the grid, then (after the grid's
        # first paint, when the viewboxes have their size) the cells fitted: no stall of them all together
        self._steps = [*C.side_by_side_steps(self.viewer, base, results, self.state), self._fit_view]
        self._next_step()
        self.compare_btn.blockSignals(True)
        self.compare_btn.setChecked(True)
        self.compare_btn.blockSignals(False)
        set_status(self.status, f"{len(results)} map(s) side by side over {base.name}, row by row, "
                   "cameras linked. Colour scales:\n" + "\n".join(C.limits_text(r) for r in results), "ok")
        return True

    @property
    def arranging(self) -> bool:
        """True while *Side by side* still has steps to run on later event-loop turns."""
        return bool(self._steps)

    def _next_step(self) -> None:
        if self._steps:
            try:
                self._steps.pop(0)()
            except Exception as exc:  # a base or map gone meanwhile: back to the layout before, one line
                self.uncompare()
                set_status(self.status, f"Side by side stopped: {format_error(exc)}\n→ press Side by side again",
                           "error")
                return
        if self._steps:
            QTimer.singleShot(0, self._next_step)

    def _fit_view(self) -> None:
        if self.state is not None:
            self.viewer.reset_view()

    def uncompare(self) -> None:
        """Go back to the layout before :meth:`compare` (steps not yet run are dropped)."""
        self._steps = []
        if self.state is not None:
            C.restore_layout(self.viewer, self.state)
            self.state = None
        self.compare_btn.blockSignals(True)
        self.compare_btn.setChecked(False)
        self.compare_btn.blockSignals(False)
        set_status(self.status, "")

    def set_view(self, plane: str) -> None:
        """Show a radiological plane or the 3D view."""
        if plane in (*PLANES, "3d"):
            show_plane(self.viewer, plane)

    # -- 3D rendering ----------------------------------------------------------------------------

    def _update_render_btn(self) -> None:
        self.render_btn.setText(f"3D: {_RENDER_TITLES[self.rendering]}")

    def cycle_rendering(self) -> str:
        """Translucent -> MIP -> attenuated MIP -> translucent for every map; returns the new mode."""
        self.rendering = next_rendering(self.rendering)
        self.apply_rendering()
        return self.rendering

    def apply_rendering(self) -> None:
        """Give every map the current 3D rendering."""
        C.set_rendering(self.result_layers(), self.rendering)
        self._update_render_btn()

    # -- saving ----------------------------------------------------------------------------------

    def save_maps(self, folder: str | Path) -> list[Path]:
        """Save the checked maps as NIfTI in ``folder`` (engine ``save_map``)."""
        layers = self.checked_layers()
        if not layers:
            set_status(self.status, "No map checked.\n→ check the maps to save", "error")
            return []
        try:
            written = C.save_results(layers, folder)
        except Exception as exc:
            set_status(self.status, f"Could not save: {format_error(exc)}", "error")
            return []
        set_status(self.status, f"Saved {len(written)} map(s) to {folder}.", "ok")
        return written

    def save_screenshot(self, path: str | Path) -> Path | None:
        """Save the canvas (the grid when comparing) as PNG."""
        try:
            out = C.save_screenshot(self.viewer, path)
        except Exception as exc:
            set_status(self.status, f"Could not save the screenshot: {format_error(exc)}", "error")
            return None
        set_status(self.status, f"Screenshot saved to {out}.", "ok")
        return out

    def _save_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder for the NIfTI maps")
        if folder:
            self.save_maps(folder)

    def _screenshot_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Screenshot", "esegeta_compare.png", "PNG (*.png)")
        if path:
            self.save_screenshot(path)
