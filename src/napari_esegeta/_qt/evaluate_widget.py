"""The Evaluate dock widget: metrics of attribution layers, randomisation stages, curves.

A run iterates :func:`napari_esegeta._evaluate.evaluate_groups` in a napari
worker (same pattern as the Explain widget): each map's row arrives as soon as
its metrics are done, randomisation stage maps become image layers with the
input's geometry (``method · stage k (layer)``), Cancel sets the event checked
at every model evaluation and keeps what is already shown. Progress from the
worker thread is stored and shown by a timer (no Qt calls from the worker).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from esegeta_engine.evaluation.api import METRIC_KEYS
from esegeta_engine.evaluation.localisation import LOCALISATION_METRICS
from esegeta_engine.evaluation.session import RANDOMISATION_KEYS
from esegeta_engine.explain import Progress
from napari_esegeta import _evaluate as E
from napari_esegeta import _run as R
from napari_esegeta._layers import is_result_layer
from napari_esegeta._model import format_error
from napari_esegeta._qt._common import CancellableRun, LayerCombo, RunControl, set_status, status_label
from napari_esegeta._qt.curves import CurvesCanvas
from napari_esegeta._qt.evaluate_form import EvaluationForm
from napari_esegeta._qt.metrics_table import MetricsTable
from napari_esegeta._state import get_session

PROGRESS_INTERVAL_S = 0.25
#: metric key -> the evaluator family whose note explains it
_FAMILY = {k: fam for fam, keys in {**METRIC_KEYS, "localisation": LOCALISATION_METRICS,
                                     "randomisation": RANDOMISATION_KEYS}.items() for k in keys}
STAGE_KEY = E.STAGE_KEY


def is_evaluable(layer: Any) -> bool:
    """Result layers made by the Explain widget (not randomisation stage layers)."""
    return (layer.__class__.__name__ == "Image" and is_result_layer(layer)
            and STAGE_KEY not in layer.metadata.get("esegeta", {}))


class EvaluateWidget(CancellableRun, QWidget):
    """Choose result layers and metrics, run them, show a table, curves and stage layers."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.worker: Any = None
        self.rows: list[dict[str, Any]] = []
        self.curves: dict[str, dict[str, Any]] = {}
        self.infos: list[E.MapInfo] = []
        self.columns: list[str] = []
        self.added: list[str] = []
        self.last_message = ""
        self.error_text = ""
        self.control = RunControl(self, self._show_progress, PROGRESS_INTERVAL_S)
        self._started = 0.0
        self._inputs: dict[str, Any] = {}

        self.map_list = QListWidget()
        self.map_list.setMaximumHeight(110)
        self.map_list.setToolTip("Attribution layers made by the Explain tab (all checked by default)")
        self.map_list.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.gt_combo = LayerCombo(napari_viewer, ("Labels",), allow_none=True)
        self.gt_combo.setToolTip("Ground-truth mask on the input's grid (for localisation)")
        maps_box = QGroupBox("Maps")
        mf = QVBoxLayout(maps_box)
        mf.addWidget(self.map_list)
        gt_row = QFormLayout()
        gt_row.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        gt_row.addRow("Ground truth", self.gt_combo)
        mf.addLayout(gt_row)

        self.form = EvaluationForm()  # generated from the engine's EvaluationConfig
        metrics_box = QGroupBox("Metrics")
        QVBoxLayout(metrics_box).addWidget(self.form)

        self.run_btn = QPushButton("Run")
        self.run_btn.clicked.connect(self.run)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.clicked.connect(self.cancel)
        self.cancel_btn.setEnabled(False)
        self.export_btn = QPushButton("Export CSV…")
        self.export_btn.clicked.connect(self._export_dialog)
        self.export_btn.setEnabled(False)
        buttons = QHBoxLayout()
        for b in (self.run_btn, self.cancel_btn, self.export_btn):
            buttons.addWidget(b)
        self.progress_label = status_label()  # wraps: the ETA at the end stays readable
        self.status = status_label()

        self.table = MetricsTable(self._cell_tip)  # a column per map: fits the dock, nothing scrolls sideways

        self.curves_canvas = CurvesCanvas()
        self.canvas = self.curves_canvas.widget

        layout = QVBoxLayout(self)
        layout.addWidget(maps_box)
        layout.addWidget(metrics_box)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_label)
        layout.addWidget(self.status)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.canvas)

        events = napari_viewer.layers.events
        for ev in (events.inserted, events.removed):
            ev.connect(self.refresh_maps)
        self.refresh_maps()

    # -- map list --------------------------------------------------------------------------------

    def refresh_maps(self, *_: Any) -> None:
        """List the result layers; keep unchecked ones unchecked, check new ones."""
        try:
            unchecked = {self.map_list.item(i).text() for i in range(self.map_list.count())
                         if self.map_list.item(i).checkState() != Qt.CheckState.Checked}
        except RuntimeError:  # deleted widget
            return
        self.map_list.clear()
        for layer in self.viewer.layers:
            if is_evaluable(layer):
                item = QListWidgetItem(layer.name)
                item.setToolTip(layer.name)
                item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                item.setCheckState(Qt.CheckState.Unchecked if layer.name in unchecked else Qt.CheckState.Checked)
                self.map_list.addItem(item)

    def checked_layers(self) -> list[Any]:
        """The checked result layers."""
        names = [self.map_list.item(i).text() for i in range(self.map_list.count())
                 if self.map_list.item(i).checkState() == Qt.CheckState.Checked]
        return [self.viewer.layers[n] for n in names if n in self.viewer.layers]

    def set_checked(self, names: list[str]) -> None:
        """Check exactly ``names``."""
        for i in range(self.map_list.count()):
            item = self.map_list.item(i)
            item.setCheckState(Qt.CheckState.Checked if item.text() in names else Qt.CheckState.Unchecked)

    def options(self) -> E.EvalOptions:
        """The form's :class:`EvalOptions` (raises ``ConfigError`` for an out-of-range value)."""
        return E.EvalOptions(config=self.form.config(), localisation=self.form.localisation)

    # -- running ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while a run's worker is alive."""
        return self.worker is not None

    def run(self) -> Any:
        """Start an evaluation; returns the worker (None if it could not start)."""
        from napari.qt.threading import create_worker

        if self.running:
            return None
        s = self.session
        try:
            if s.model is None:
                raise R.TargetError("no model loaded", "load the model the maps were made with (Model tab)")
            if s.busy:
                raise R.TargetError("the model is busy (a run or a prediction)", "wait, or cancel it first")
            opts = self.options()
            if not opts.columns():
                raise R.TargetError("no metric checked", "tick at least one metric")
            layers = self.checked_layers()
            if not layers:
                raise R.TargetError("no attribution layer checked", "run the Explain tab first, then tick maps")
            labels = {ly.name: ly for ly in self.viewer.layers if type(ly).__name__ == "Labels"}
            infos = [E.map_info(ly, labels) for ly in layers]
            groups: dict[str, list[E.MapInfo]] = {}
            for layer, info in zip(layers, infos):
                source = E.input_layer_of(layer)
                if not source or source not in self.viewer.layers:
                    raise R.TargetError(f"the input layer '{source}' of '{info.name}' is not in the "
                                        "viewer", "open the image the map explains again (same layer name)")
                groups.setdefault(source, []).append(info)
            gt_layer = self.gt_combo.layer()
            gt = np.asarray(gt_layer.data) if (gt_layer is not None and opts.localisation) else None
            inputs = {name: self.viewer.layers[name] for name in groups}
            work = [(R.volume_from_layer(inputs[name]), maps) for name, maps in groups.items()]
        except Exception as exc:
            set_status(self.status, format_error(exc), "error")
            return None
        self.infos = [m for _, maps in work for m in maps]
        self._sources = [name for name, maps in groups.items() for _ in maps]
        self._inputs = inputs
        self.columns = opts.columns()
        self.rows, self.curves, self.added = [], {}, []
        self.error_text, self.last_message = "", ""
        self._setup_table()
        self.curves_canvas.draw({})
        cancel = self.control.start()
        self._started = time.perf_counter()
        s.busy = True
        self.run_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.export_btn.setEnabled(False)
        set_status(self.status, f"Evaluating {len(self.infos)} map(s)…")
        self.progress_label.setText("preparing the input and the targets…")
        snapshots = {name: R.InputLayer.of(layer) for name, layer in inputs.items()}
        self.worker = create_worker(E.evaluate_layers, s.model, work, opts,
                                    sources=[snapshots[name] for name in self._sources], preprocess=s.preprocess,
                                    output=s.output, execution=s.execution, ground_truth=gt, cancel=cancel,
                                    on_progress=self.control.store, _start_thread=False)
        self.worker.yielded.connect(self._on_event)
        self.worker.finished.connect(self._on_finished)
        self.worker.start()
        return self.worker

    def _show_progress(self, ev: Progress) -> None:
        if self.running:
            self.progress_label.setText(ev.message)
            self.progress_label.setToolTip(ev.message)

    def _on_event(self, ev: Any) -> None:
        if isinstance(ev, Progress):
            self.last_message = ev.message
            if not self._cancel.is_set():
                self._show_progress(ev)
        elif isinstance(ev, E.RowReady):
            row = dict(ev.row)
            self.rows.append(row)
            if ev.curves is not None:
                self.curves[row["layer"]] = ev.curves
                self.curves_canvas.draw(self.curves)
            self._add_table_row(row)
        elif isinstance(ev, E.StagesReady):
            self._on_stages(ev)
        elif isinstance(ev, E.EvalError):
            self.error_text = ev.text

    def _on_stages(self, ev: E.StagesReady) -> None:
        info = self.infos[ev.index]
        row = next((r for r in self.rows if r["layer"] == info.name), None)
        if row is None:
            return
        notes = {**row.get("notes", {}), **ev.update.get("notes", {})}
        row.update({k: v for k, v in ev.update.items() if k != "notes"})
        row["notes"] = notes
        self._refresh_table()
        for data, kwargs in ev.layers:  # built in the worker: only napari's layer creation happens here
            layer = self.viewer.add_image(data, **kwargs)
            self.added.append(layer.name)

    def _on_finished(self) -> None:
        self.control.finish()
        self.worker = None
        self.session.busy = False
        self.run_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        self.export_btn.setEnabled(bool(self.rows))
        self.progress_label.setText("")
        took = time.perf_counter() - self._started
        text = f"{len(self.rows)} of {len(self.infos)} map(s) evaluated in {took:.1f} s"
        if self.added:
            text += f"; {len(self.added)} randomisation stage layer(s) added (hidden)"
        if self.cancel_requested_at is not None:
            text += f"; cancelled (stopped {self.last_cancel_latency:.2f} s after the click)"
        if self.error_text:
            set_status(self.status, text + ".\n" + self.error_text, "error")
        else:
            undefined = sum(1 for r in self.rows for c in self.columns if E.format_value(r.get(c)) == E.UNDEFINED)
            extra = f" {undefined} value(s) undefined: hover a cell for the reason." if undefined else ""
            set_status(self.status, text + "." + extra, "ok")

    # -- table -----------------------------------------------------------------------------------

    def headers(self) -> list[str]:
        """Column titles of the table."""
        return ["method", "target", *self.columns, "notes"]

    def _setup_table(self) -> None:
        self.table.start(self.headers())

    def _add_table_row(self, row: dict[str, Any]) -> None:
        self.table.add(row)

    @staticmethod
    def _cell_tip(row: dict[str, Any], key: str) -> str:
        """The note that explains a cell (the map's layer for its method and target)."""
        notes = row.get("notes", {})
        family = _FAMILY.get(key, key)
        tip = row["layer"] if key in ("method", "target") else next(
            (v for k, v in notes.items() if k in (family, "map") or key.startswith(k) or k.startswith(key)), "")
        if key == "randomisation" and row.get("randomisation_rule"):
            tip = (tip + "\n" if tip else "") + row["randomisation_rule"]
        return str(tip)

    def _refresh_table(self) -> None:
        self.table.update_rows(self.rows)

    def table_text(self) -> list[list[str]]:
        """The table's cells as shown, one list per map in ``headers()`` order (for tests and scripts)."""
        return self.table.text()

    def export_csv(self, path: str | Path) -> Path:
        """Write the results to ``path`` (CSV, NaN as ``undefined``)."""
        return E.write_csv(path, self.rows, self.columns)

    def _export_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export the evaluation", "esegeta_evaluation.csv",
                                              "CSV (*.csv)")
        if path:
            try:
                set_status(self.status, f"Saved {self.export_csv(path)}", "ok")
            except OSError as exc:
                set_status(self.status, format_error(exc) + "\n→ choose a writable folder", "error")
