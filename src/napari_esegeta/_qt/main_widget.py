"""The one esegeta dock: the whole workflow in tabs, sized for a 1366×768 laptop screen.

Model → Explain → Compare → Evaluate → Cohort are tabs of one dock widget, the
plugin's only widget (Plugins ▸ esegeta explainability ▸ esegeta). A row of buttons above the tabs
switches the main view between the radiological axial, coronal and sagittal
planes and 3D; orientation letters from the NIfTI geometry stay on the canvas.
Tabs other than Explain scroll inside the dock; Explain keeps Run, Cancel and
its status line visible and scrolls only its method list.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QPushButton,
    QScrollArea,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_esegeta._qt.cohort_widget import CohortWidget
from napari_esegeta._qt.compare_widget import CompareWidget
from napari_esegeta._qt.evaluate_widget import EvaluateWidget
from napari_esegeta._qt.explain_widget import ExplainWidget
from napari_esegeta._qt.model_widget import ModelWidget
from napari_esegeta._settings import ensure_preferred_reader
from napari_esegeta._view import has_world_geometry, show_plane, track_orientation_letters

TABS = ("Model", "Explain", "Compare", "Evaluate", "Cohort")
VIEWS = (("Axial", "axial"), ("Coronal", "coronal"), ("Sagittal", "sagittal"), ("3D", "3d"))


def _scrolled(widget: QWidget) -> QScrollArea:
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setWidget(widget)
    return area


class EsegetaWidget(QWidget):
    """Model, Explain, Compare, Evaluate and Cohort in one dock, with one-click radiological views.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer (injected by napari).
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.model = ModelWidget(napari_viewer)
        self.explain = ExplainWidget(napari_viewer)
        self.compare = CompareWidget(napari_viewer)
        self.evaluate = EvaluateWidget(napari_viewer)
        self.cohort = CohortWidget(napari_viewer)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(_scrolled(self.model), "Model")
        self.tabs.addTab(self.explain, "Explain")
        self.tabs.addTab(_scrolled(self.compare), "Compare")
        self.tabs.addTab(_scrolled(self.evaluate), "Evaluate")
        self.tabs.addTab(_scrolled(self.cohort), "Cohort")

        views = QHBoxLayout()
        views.setSpacing(2)
        self.view_buttons: dict[str, QPushButton] = {}
        for title, plane in VIEWS:
            btn = QPushButton(title)
            btn.setToolTip(f"{title} view" + (" (radiological: patient's right on screen left)"
                                               if plane != "3d" else ""))
            btn.clicked.connect(lambda _=False, p=plane: self.show_view(p))
            views.addWidget(btn)
            self.view_buttons[plane] = btn
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addLayout(views)
        layout.addWidget(self.tabs, 1)
        self.session = self.explain.session
        self.session.signals.model_changed.connect(self._model_loaded)
        self._oriented = False
        self.reader_patterns = ensure_preferred_reader()
        if self.reader_patterns:
            self.model.status.setText("NIfTI files (" + ", ".join(self.reader_patterns) + ") now open with "
                                      "napari-esegeta (File ▸ Preferences ▸ Plugins to change).")
        track_orientation_letters(napari_viewer)
        napari_viewer.layers.events.inserted.connect(self._layer_added)
        for layer in napari_viewer.layers:
            self._layer_added(layer=layer)

    def show_tab(self, name: str) -> QWidget:
        """Bring tab ``name`` (one of :data:`TABS`) to the front; returns its widget."""
        index = TABS.index(name)
        self.tabs.setCurrentIndex(index)
        return (self.model, self.explain, self.compare, self.evaluate, self.cohort)[index]

    def show_view(self, plane: str) -> None:
        """Axial, coronal or sagittal (radiological) plane, or 3D; the Compare tab's View box follows."""
        show_plane(self.viewer, plane)
        combo = self.compare.view_combo
        combo.blockSignals(True)  # the plane is shown already
        combo.setCurrentText(plane)
        combo.blockSignals(False)

    def _layer_added(self, event: Any = None, layer: Any = None) -> None:
        layer = layer if layer is not None else getattr(event, "value", None)
        if self._oriented or layer is None or not has_world_geometry(layer):
            return
        self._oriented = True  # the first NIfTI volume: the conventional axial view, once
        if self.viewer.dims.ndisplay == 2:
            show_plane(self.viewer, "axial")

    def _model_loaded(self, session: Any) -> None:
        try:
            if session.model is not None and self.tabs.currentIndex() == 0:
                self.tabs.setCurrentIndex(1)
        except RuntimeError:  # deleted widget
            self.session.signals.model_changed.disconnect(self._model_loaded)
