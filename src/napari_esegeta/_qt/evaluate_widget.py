"""The Evaluate dock widget: metrics of attribution layers, randomisation stages, curves.

A run iterates :func:`napari_esegeta._evaluate.evaluate_groups` in a napari
worker (same pattern as the Explain widget): each map's row arrives as soon as
its metrics are done, randomisation stage maps become image layers with the
input's geometry (``method · stage k (layer)``), Cancel sets the event checked
at every model evaluation and keeps what is already shown. Progress from the
worker thread is stored and shown by a timer (no Qt calls from the worker).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from esegeta_engine.explain import Progress
from napari_esegeta import _evaluate as E
from napari_esegeta import _run as R
from napari_esegeta._geometry import copy_geometry
from napari_esegeta._layers import is_result_layer, result_layer_data
from napari_esegeta._model import format_error
from napari_esegeta._qt._common import CancellableRun, LayerCombo, RunControl, set_status, status_label
from napari_esegeta._state import get_session

PROGRESS_INTERVAL_S = 0.25
STAGE_KEY = "randomisation_stage"


def is_evaluable(layer: Any) -> bool:
    """Result layers made by the Explain widget (not randomisation stage layers)."""
    return (layer.__class__.__name__ == "Image" and is_result_layer(layer)
            and STAGE_KEY not in layer.metadata.get("esegeta", {}))


class _Item(QTableWidgetItem):
    """A table cell sorting numbers as numbers (undefined last)."""

    def __init__(self, value: Any) -> None:
        super().__init__(E.format_value(value))
        self.key = value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # numbers line up
            self.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.setToolTip(repr(float(value)))

    def __lt__(self, other: Any) -> bool:
        a, b = self.key, getattr(other, "key", None)
        na = isinstance(a, (int, float)) and not isinstance(a, bool)
        nb = isinstance(b, (int, float)) and not isinstance(b, bool)
        if na and nb:
            a_nan, b_nan = math.isnan(a), math.isnan(b)
            if a_nan or b_nan:
                return b_nan and not a_nan
            return a < b
        return str(self.text()) < str(other.text())


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
        self.map_list.setToolTip("Attribution layers made by the Explain widget (all checked by default)")
        self.gt_combo = LayerCombo(napari_viewer, ("Labels",), allow_none=True)
        self.gt_combo.setToolTip("Ground-truth mask on the input's grid (for localisation)")
        maps_box = QGroupBox("Maps")
        mf = QVBoxLayout(maps_box)
        mf.addWidget(self.map_list)
        gt_row = QHBoxLayout()
        gt_row.addWidget(QLabel("Ground truth"))
        gt_row.addWidget(self.gt_combo, 1)
        mf.addLayout(gt_row)

        d = E.EvalOptions()  # the engine's defaults, as `esegeta run` uses them
        self.axioms_check = QCheckBox("axiom checks (completeness, 2 model calls)")
        self.axioms_check.setChecked(d.axioms)
        self.axioms_check.setToolTip("|sum(map) - (F(x) - F(baseline))| / |F(x) - F(baseline)| for methods "
                                     "that promise it (IG, DeepLIFT, SHAP, conductance)")
        self.infidelity_check = QCheckBox("infidelity")
        self.infidelity_check.setChecked(d.infidelity)
        self.samples_spin = QSpinBox()
        self.samples_spin.setRange(1, 10000)
        self.samples_spin.setValue(d.n_perturb_samples)
        self.noise_spin = QDoubleSpinBox()
        self.noise_spin.setDecimals(3)
        self.noise_spin.setRange(0.001, 10.0)
        self.noise_spin.setSingleStep(0.01)
        self.noise_spin.setValue(d.noise_scale)
        self.infidelity_check.setToolTip("Yeh et al. 2019; lower is better (the map as it is in the layer)")
        self.sensitivity_check = QCheckBox("sensitivity (re-runs the method)")
        self.sensitivity_check.setToolTip("Max-sensitivity, Yeh et al. 2019; lower is more robust")
        self.faithfulness_check = QCheckBox("faithfulness (deletion / insertion)")
        self.faithfulness_check.setChecked(True)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(2, 100)
        self.steps_spin.setValue(d.steps)
        self.baseline_combo = QComboBox()
        self.baseline_combo.addItems(list(E.BASELINES))
        self.baseline_combo.setCurrentText(d.baseline)
        self.contrast_check = QCheckBox("class contrast (re-runs the method for another class)")
        self.contrast_check.setChecked(d.class_contrast)
        self.contrast_check.setToolTip("flags a map that does not change when another class is explained")
        self.localisation_check = QCheckBox("localisation (needs ground truth)")
        self.randomisation_check = QCheckBox("randomisation (re-runs the method)")
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(list(E.MODES))
        self.stages_spin = QSpinBox()
        self.stages_spin.setRange(0, 100)
        self.stages_spin.setSpecialValueText("all")
        self.stages_spin.setValue(d.max_stages or 0)
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(0.01, 1.0)
        self.threshold_spin.setSingleStep(0.05)
        self.threshold_spin.setValue(d.threshold)
        self.calibrate_check = QCheckBox("calibrated (null of two random networks, footprint removed)")
        self.calibrate_check.setChecked(d.calibrate and d.footprint)
        metrics_box = QGroupBox("Metrics")
        form = QFormLayout(metrics_box)
        form.addRow(self.axioms_check)
        form.addRow(self.infidelity_check)
        inf_row = QHBoxLayout()
        inf_row.addWidget(QLabel("samples"))
        inf_row.addWidget(self.samples_spin)
        inf_row.addWidget(QLabel("noise"))
        inf_row.addWidget(self.noise_spin)
        form.addRow(inf_row)
        form.addRow(self.sensitivity_check)
        form.addRow(self.faithfulness_check)
        faith_row = QHBoxLayout()
        faith_row.addWidget(QLabel("steps"))
        faith_row.addWidget(self.steps_spin)
        faith_row.addWidget(QLabel("baseline"))
        faith_row.addWidget(self.baseline_combo, 1)
        form.addRow(faith_row)
        form.addRow(self.contrast_check)
        form.addRow(self.localisation_check)
        form.addRow(self.randomisation_check)
        rand_row = QHBoxLayout()
        rand_row.addWidget(QLabel("mode"))
        rand_row.addWidget(self.mode_combo, 1)
        rand_row.addWidget(QLabel("max stages"))
        rand_row.addWidget(self.stages_spin)
        rand_row.addWidget(QLabel("threshold"))
        rand_row.addWidget(self.threshold_spin)
        form.addRow(rand_row)
        form.addRow(self.calibrate_check)

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
        self.progress_label = QLabel("")
        self.progress_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.progress_label.setFixedHeight(self.progress_label.fontMetrics().height() + 4)
        self.status = status_label()

        self.table = QTableWidget(0, 0)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setMinimumHeight(120)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.setTextElideMode(Qt.TextElideMode.ElideNone)  # numbers whole; the table scrolls
        self.table.setWordWrap(False)
        self.table.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self.table.setSortingEnabled(True)
        self.table.horizontalHeader().setToolTip("Click a column title to sort by it")

        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 2.2), facecolor="#262930", layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(170)
        self.lines_drawn = 0
        self._draw_curves()


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
        """The form's :class:`EvalOptions`."""
        return E.EvalOptions(
            axioms=self.axioms_check.isChecked(), n_perturb_samples=self.samples_spin.value(),
            class_contrast=self.contrast_check.isChecked(),
            noise_scale=self.noise_spin.value(), threshold=self.threshold_spin.value(),
            calibrate=self.calibrate_check.isChecked(), footprint=self.calibrate_check.isChecked(),
            infidelity=self.infidelity_check.isChecked(), sensitivity=self.sensitivity_check.isChecked(),
            faithfulness=self.faithfulness_check.isChecked(), localisation=self.localisation_check.isChecked(),
            randomisation=self.randomisation_check.isChecked(), steps=self.steps_spin.value(),
            baseline=self.baseline_combo.currentText(), mode=self.mode_combo.currentText(),
            max_stages=self.stages_spin.value() or None)

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
                raise R.TargetError("no model loaded", "load the model the maps were made with (Model widget)")
            if s.busy:
                raise R.TargetError("the model is busy (a run or a prediction)", "wait, or cancel it first")
            opts = self.options()
            if not opts.columns():
                raise R.TargetError("no metric checked", "tick at least one metric")
            layers = self.checked_layers()
            if not layers:
                raise R.TargetError("no attribution layer checked", "run the Explain widget first, then tick maps")
            labels = {ly.name: ly for ly in self.viewer.layers if type(ly).__name__ == "Labels"}
            infos = [E.map_info(ly, labels) for ly in layers]
            groups: dict[str, list[E.MapInfo]] = {}
            for info in infos:
                if not info.input_layer or info.input_layer not in self.viewer.layers:
                    raise R.TargetError(f"the input layer '{info.input_layer}' of '{info.name}' is not in the "
                                        "viewer", "open the image the map explains again (same layer name)")
                groups.setdefault(info.input_layer, []).append(info)
            gt_layer = self.gt_combo.layer()
            gt = np.asarray(gt_layer.data) if (gt_layer is not None and opts.localisation) else None
            inputs = {name: self.viewer.layers[name] for name in groups}
            work = [(R.volume_from_layer(inputs[name]), maps) for name, maps in groups.items()]
        except Exception as exc:
            set_status(self.status, format_error(exc), "error")
            return None
        self.infos = [m for _, maps in work for m in maps]
        self._inputs = inputs
        self.columns = opts.columns()
        self.rows, self.curves, self.added = [], {}, []
        self.error_text, self.last_message = "", ""
        self._setup_table()
        self._draw_curves()
        cancel = self.control.start()
        self._started = time.perf_counter()
        s.busy = True
        self.run_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.export_btn.setEnabled(False)
        set_status(self.status, f"Evaluating {len(self.infos)} map(s)…")
        self.progress_label.setText("preparing the input and the targets…")
        self.worker = create_worker(E.evaluate_groups, s.model, work, opts, preprocess=s.preprocess,
                                    output=s.output, ground_truth=gt, cancel=cancel,
                                    on_progress=self.control.store, _start_thread=False)
        self.worker.yielded.connect(self._on_event)
        self.worker.finished.connect(self._on_finished)
        self.worker.start()
        return self.worker

    def _show_progress(self, ev: Progress) -> None:
        if self.running:
            self.progress_label.setText(ev.message)

    def _on_event(self, ev: Any) -> None:
        if isinstance(ev, Progress):
            self.last_message = ev.message
            if not self._cancel.is_set():
                self.progress_label.setText(ev.message)
        elif isinstance(ev, E.RowReady):
            row = dict(ev.row)
            self.rows.append(row)
            if ev.curves is not None:
                self.curves[row["layer"]] = ev.curves
                self._draw_curves()
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
        input_layer = self._inputs.get(info.input_layer)
        if input_layer is None:
            return
        for k, stage_layer, arr in ev.stages:
            prov = {"params": info.params, "layer": info.model_layer, "noise_tunnel": info.noise_tunnel,
                    "target": info.target.kind, "class": info.cls, "input_layer": input_layer.name,
                    STAGE_KEY: k, "randomised_layer": stage_layer, "source_layer": info.name,
                    "mode": self.mode_combo.currentText()}
            data, kwargs, _ = result_layer_data(arr, method=info.method, method_label=info.label,
                                                target_label=info.target_label, provenance=prov,
                                                geometry=copy_geometry(input_layer),
                                                nifti=(input_layer.metadata or {}).get("nifti"))
            kwargs["name"] = E.stage_layer_name(info, k, stage_layer)
            kwargs["visible"] = False  # many volumes in additive blending would hide each other
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
        self.table.setSortingEnabled(False)
        self.table.clear()
        self.table.setRowCount(0)
        self.table.setColumnCount(len(self.headers()))
        self.table.setHorizontalHeaderLabels([h.replace("_", " ") for h in self.headers()])

    def _add_table_row(self, row: dict[str, Any]) -> None:
        self.table.setSortingEnabled(False)
        r = self.table.rowCount()
        self.table.insertRow(r)
        self._fill_row(r, row)
        self.table.setSortingEnabled(True)

    def _fill_row(self, r: int, row: dict[str, Any]) -> None:
        notes = row.get("notes", {})
        for c, key in enumerate(self.headers()):
            value = E.notes_text(notes) if key == "notes" else row.get(key)
            item = _Item(value)
            tip = row["layer"] if key in ("method", "target") else next(
                (v for k, v in notes.items() if key.startswith(k) or k.startswith(key)
                 or (k == "faithfulness" and key in E.METRIC_COLUMNS["faithfulness"])
                 or (k == "localisation" and key in E.METRIC_COLUMNS["localisation"])
                 or (k == "randomisation" and key in E.METRIC_COLUMNS["randomisation"])), "")
            if key == "randomisation" and row.get("randomisation_rule"):
                tip = (tip + "\n" if tip else "") + row["randomisation_rule"]
            if tip:
                item.setToolTip(str(tip))
            item.setData(Qt.ItemDataRole.UserRole, row["layer"])
            self.table.setItem(r, c, item)

    def _refresh_table(self) -> None:
        self.table.setSortingEnabled(False)
        by_layer = {r["layer"]: r for r in self.rows}
        for i in range(self.table.rowCount()):
            name = self.table.item(i, 0).data(Qt.ItemDataRole.UserRole)
            if name in by_layer:
                self._fill_row(i, by_layer[name])
        self.table.setSortingEnabled(True)

    def table_text(self) -> list[list[str]]:
        """The table's cells as shown (for tests and scripts)."""
        return [[self.table.item(i, j).text() for j in range(self.table.columnCount())]
                for i in range(self.table.rowCount())]

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

    # -- curves ----------------------------------------------------------------------------------

    def _draw_curves(self) -> None:
        fig = self.figure
        fig.clear()
        fg = "#d0d0d0"
        axes = fig.subplots(1, 2, sharey=True)
        self.lines_drawn = 0
        for ax, kind in zip(axes, ("deletion", "insertion")):
            ax.set_facecolor("#1e1f24")
            ax.set_title(f"{kind} (lower AUC better)" if kind == "deletion" else f"{kind} (higher better)",
                         color=fg, fontsize=8)
            ax.set_xlabel("fraction of voxels", color=fg, fontsize=7)
            ax.tick_params(colors=fg, labelsize=7)
            for spine in ax.spines.values():
                spine.set_color("#555")
            for i, (name, c) in enumerate(self.curves.items()):
                y = np.array([np.nan if v is None else v for v in c[f"{kind}_norm"]], dtype=float)
                ax.plot(c["fractions"], y, color=f"C{i % 10}", lw=1.3, label=name.split(" · ")[0])
                self.lines_drawn += 1
        axes[0].set_ylabel("score / unperturbed", color=fg, fontsize=7)
        if self.curves:
            axes[1].legend(fontsize=6, facecolor="#262930", labelcolor=fg, edgecolor="#555")
        self.canvas.draw_idle()
