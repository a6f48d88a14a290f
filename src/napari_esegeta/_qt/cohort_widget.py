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
        self._worker: Any = None
        self.shown: list[Any] = []  # the layers the last selection added
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

    @property
    def running(self) -> bool:
        """True while the selection's NIfTI files are being read."""
        return self._worker is not None

    def show_selection(self) -> Any:
        """Read the subject's image, its map and the aggregate in a worker thread; then add them and put
        the maps side by side (:meth:`_on_read`). Returns the worker (None when nothing is read)."""
        from napari.qt.threading import create_worker

        if self.run is None or self.running:
            return None
        run, choice = self.run, (self.subject.currentText(), self.model.currentText(), self.method.currentText())

        def work() -> Any:  # NIfTI reads and layer statistics: whole volumes, never on the GUI thread
            try:
                return cohort_layers(run, *choice)
            except EsegetaError as exc:  # a message, not an exception: the worker would raise it
                return exc.problem

        self.shown = []
        self.show_btn.setEnabled(False)
        set_status(self.status, f"Reading {choice[0]} · {choice[1]} · {choice[2]}…")
        self._worker = create_worker(work, _start_thread=False)
        self._worker.returned.connect(self._on_read)
        self._worker.finished.connect(self._on_finished)
        self._worker.start()
        return self._worker

    def _on_read(self, data: Any) -> None:
        if isinstance(data, str):
            set_status(self.status, data, "error")
            return
        layers = [getattr(self.viewer, f"add_{kind}")(arr, **kwargs) for arr, kwargs, kind in data]
        if len(layers) > 2:
            arrange_side_by_side(self.viewer, layers[0], layers[1:])
            set_status(self.status, "Side by side: " + " | ".join(ly.name for ly in layers[1:]), "ok")
        else:
            set_status(self.status, "no aggregate for this cohort: " + (self.run.grid_note if self.run else ""))
        self.shown = layers

    def _on_finished(self) -> None:
        self._worker = None
        self.show_btn.setEnabled(self.run is not None and bool(self.run.methods))
