"""Layer menu actions (npe2 ``menus``): explain this image, evaluate / compare these maps.

Each action opens the one esegeta dock on the right tab with the selected
layers chosen. napari injects the viewer by the ``Viewer`` annotation.
"""

from __future__ import annotations

from typing import Any

from napari.viewer import Viewer

from napari_esegeta._layers import is_input_layer, is_result_layer

PLUGIN = "napari-esegeta"
DOCK = "esegeta"


def open_dock(viewer: Any, tab: str) -> Any:
    """The docked :class:`EsegetaWidget` (added if needed) with ``tab`` in front."""
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, DOCK)
    widget.show_tab(tab)
    return widget


def _selected(viewer: Any, wanted: Any) -> list[Any]:
    chosen = [ly for ly in viewer.layers.selection if wanted(ly)]
    active = viewer.layers.selection.active
    if active is not None and wanted(active) and active not in chosen:
        chosen.insert(0, active)
    return chosen


def explain_image(viewer: Viewer) -> None:
    """Layers ▸ Visualize ▸ Explain this image (esegeta)."""
    widget = open_dock(viewer, "Explain")
    images = _selected(viewer, lambda ly: type(ly).__name__ == "Image" and is_input_layer(ly))
    if images:
        widget.explain.image_combo.setCurrentText(images[0].name)


def evaluate_maps(viewer: Viewer) -> None:
    """Layers ▸ Measure ▸ Evaluate these maps (esegeta)."""
    widget = open_dock(viewer, "Evaluate")
    maps = _selected(viewer, is_result_layer)
    if maps:
        widget.evaluate.set_checked([m.name for m in maps])


def compare_maps(viewer: Viewer) -> None:
    """Layers ▸ Visualize ▸ Compare these maps (esegeta): side by side over the scan."""
    widget = open_dock(viewer, "Compare")
    maps = _selected(viewer, is_result_layer)
    if maps:
        widget.compare.refresh()
        widget.compare.set_checked([m.name for m in maps])
        widget.compare.compare()
