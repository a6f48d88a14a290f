"""The Cohort dock widget: open a cohort run folder, pick subject / model / method, show side by side."""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLineEdit, QPushButton, QWidget

from esegeta_engine.errors import EsegetaError
from napari_esegeta._cohort import CohortRun, cohort_layers
from napari_esegeta._compare import arrange_side_by_side
from napari_esegeta._qt._common import set_status, status_label


class CohortWidget(QWidget):
    """Subject map next to the cohort's aggregate map (thin: logic in :mod:`napari_esegeta._cohort`).

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer (injected by napari).
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.run: CohortRun | None = None
        self.folder = QLineEdit()
        self.folder.setPlaceholderText("cohort output folder (holds manifest.json)")
        self.folder.returnPressed.connect(lambda: self.open_folder(self.folder.text()))
        browse = QPushButton("Open…")
        browse.clicked.connect(self._browse)
        self.subject, self.model, self.method = QComboBox(), QComboBox(), QComboBox()
        self.show_btn = QPushButton("Show subject and cohort mean")
        self.show_btn.clicked.connect(self.show_selection)
        self.status = status_label()
        row = QHBoxLayout()
        row.addWidget(self.folder)
        row.addWidget(browse)
        form = QFormLayout(self)
        form.addRow("Run", row)
        form.addRow("Subject", self.subject)
        form.addRow("Model", self.model)
        form.addRow("Method", self.method)
        form.addRow(self.show_btn)
        form.addRow(self.status)
        self.show_btn.setEnabled(False)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Cohort run folder")
        if folder:
            self.open_folder(folder)

    def open_folder(self, folder: str) -> None:
        """Read the cohort folder and fill the choices."""
        try:
            self.run = CohortRun.open(folder)
        except EsegetaError as exc:
            self.run = None
            self.show_btn.setEnabled(False)
            set_status(self.status, exc.problem + (f" → {exc.fix}" if exc.fix else ""), "error")
            return
        self.folder.setText(str(folder))
        for combo, items in ((self.subject, self.run.subjects), (self.model, self.run.models),
                             (self.method, self.run.methods)):
            combo.clear()
            combo.addItems(items)
        self.show_btn.setEnabled(bool(self.run.methods))
        set_status(self.status, self.run.grid_note)

    def show_selection(self) -> list[Any]:
        """Add the subject's image, its map and the aggregate; put the maps side by side."""
        if self.run is None:
            return []
        try:
            data = cohort_layers(self.run, self.subject.currentText(), self.model.currentText(),
                                 self.method.currentText())
        except EsegetaError as exc:
            set_status(self.status, exc.problem, "error")
            return []
        layers = [getattr(self.viewer, f"add_{kind}")(arr, **kwargs) for arr, kwargs, kind in data]
        if len(layers) > 2:
            arrange_side_by_side(self.viewer, layers[0], layers[1:])
        else:
            set_status(self.status, "no aggregate for this cohort: " + self.run.grid_note)
        return layers
