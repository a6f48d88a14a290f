"""The Explain dock widget: input, target, methods, Run / Cancel.

A run iterates ``Explainer.iter_explain`` in a napari ``thread_worker``; each ``MapReady`` becomes a
layer as soon as its job ends (the newest map is the only one visible, with a colour bar over the
canvas; the others stay in the layer list), napari's progress bar shows the method and the model
evaluations, and Cancel sets the engine's cancel event (checked between the network's layers), keeping
the layers already added. One run at a time per viewer (Cancel first to start another).

Cost: before any method, the worker times one patch (:mod:`esegeta_engine.jobs.probe`)
and the status shows the run's estimated time and memory; above :data:`WARN_SECONDS`
(or a huge evaluation count with no rate yet) Run asks for a second click. During a
run the status shows evaluations done of the expected total and an ETA
(:mod:`napari_esegeta._cost`). Maps arrive with their layer data built in the worker.
"""

from __future__ import annotations

import time
from typing import Any

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from esegeta_engine.explain import JobFailed, Progress
from napari_esegeta import _cost
from napari_esegeta import _run as R
from napari_esegeta._layers import add_prepared, is_input_layer, show_only
from napari_esegeta._model import default_layer, format_error
from napari_esegeta._qt._common import (
    CancellableRun,
    LayerCombo,
    RunControl,
    compact_combo,
    progress_label,
    set_status,
    status_label,
)
from napari_esegeta._qt.colorbar import CanvasColorBar
from napari_esegeta._qt.method_panel import MethodPanel
from napari_esegeta._qt.voxel_pick import VOXEL_LAYER, VoxelPicking  # noqa: F401 (VOXEL_LAYER re-exported)
from napari_esegeta._state import Session, get_session

PROGRESS_INTERVAL_S = 0.25
WARN_SECONDS = 120.0  # ask for a second click on Run above this estimate
METHODS_MIN_HEIGHT = 120


class ExplainWidget(VoxelPicking, CancellableRun, QWidget):
    """Choose a target and methods, run them, stream the maps in as layers.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer (injected by napari).
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.worker: Any = None
        self.voxel: tuple[int, ...] | None = None
        self.added: list[str] = []
        self.failures: list[str] = []
        self.axiom_warnings: list[str] = []
        self.control = RunControl(self, self._progress, PROGRESS_INTERVAL_S)
        self._pbar: Any = None
        self._target: Any = None
        self._roi_name: str | None = None
        self._input_layer: Any = None
        self._run_started = 0.0
        self._rate = _cost.RateMeter()
        self._evaluations_done = 0
        self._confirmed_plan: Any = None
        self._plan, self._probe_stopped, self.last_estimate = None, False, None  # last_estimate: the probe's

        self.image_combo = LayerCombo(napari_viewer, ("Image",), predicate=is_input_layer)
        self.kind_combo = QComboBox()
        self.kind_combo.addItems(R.target_kinds())
        self.kind_combo.setToolTip("argmax: the predicted region of each class; otsu: Otsu-thresholded "
                                   "foreground; roi: a region you paint; voxel: one voxel you click; "
                                   "classification: a classifier's class score; channel: the mean "
                                   "activation of one channel (filter) of a model layer")
        self.classes_edit = QLineEdit()
        self.classes_edit.setPlaceholderText("default (the predicted foreground classes)")
        self.activation_combo = QComboBox()
        self.activation_combo.addItems(R.activation_choices())
        self.roi_combo = LayerCombo(napari_viewer, ("Labels",))
        self.pick_btn = QPushButton("Pick voxel")
        self.pick_btn.setCheckable(True)
        self.pick_btn.setToolTip("Then click on the image in the viewer (2D view)")
        self.pick_btn.toggled.connect(self._toggle_picking)
        self.voxel_label = QLabel("no voxel")
        self.target_layer_combo = compact_combo()
        self.target_layer_combo.setToolTip("Model layer whose channel is explained")
        self.channel_spin = QSpinBox()
        self.channel_spin.setRange(0, 100_000)
        self.channel_spin.setToolTip("Channel (filter) index of that layer")
        self.frozen_check = QCheckBox("freeze region from the unperturbed prediction")
        self.frozen_check.setChecked(True)
        self.components_check = QCheckBox("one map per structure (connected component)")
        self.components_check.setToolTip("Each structure explained on its own; Compare ▸ Structures jumps to each")

        target_box = QGroupBox("Target")
        tf = QFormLayout(target_box)
        tf.addRow("Image", self.image_combo)
        tf.addRow("Kind", self.kind_combo)
        tf.addRow("Classes", self.classes_edit)
        tf.addRow("Activation", self.activation_combo)
        self._roi_row = QLabel("ROI layer")
        tf.addRow(self._roi_row, self.roi_combo)
        voxel_row = QHBoxLayout()
        voxel_row.addWidget(self.pick_btn)
        voxel_row.addWidget(self.voxel_label, 1)
        self._voxel_row = QLabel("Voxel")
        tf.addRow(self._voxel_row, voxel_row)
        self._target_layer_row, self._channel_row = QLabel("Layer"), QLabel("Channel")
        tf.addRow(self._target_layer_row, self.target_layer_combo)
        tf.addRow(self._channel_row, self.channel_spin)
        tf.addRow(self.frozen_check)
        tf.addRow(self.components_check)
        self.kind_combo.currentTextChanged.connect(self._kind_changed)

        self.methods = MethodPanel()
        scroll = self.methods_scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(self.methods)
        scroll.setMinimumHeight(METHODS_MIN_HEIGHT)

        self.run_btn = QPushButton("Run")
        self.run_btn.clicked.connect(self.run)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.clicked.connect(self.cancel)
        self.cancel_btn.setEnabled(False)
        self.status = status_label()
        self.progress_label = progress_label()
        self._last_progress = 0.0
        self.model_label = QLabel()
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_btn)
        buttons.addWidget(self.cancel_btn)

        layout = QVBoxLayout(self)
        layout.addWidget(self.model_label)
        layout.addWidget(target_box)
        layout.addWidget(scroll, 1)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_label)
        layout.addWidget(self.status)
        self.session.signals.model_changed.connect(self._model_changed)
        napari_viewer.layers.events.removed.connect(self._layer_removed)
        self.colorbar = CanvasColorBar(napari_viewer)  # over the canvas: goes when this widget goes
        self.destroyed.connect(self.colorbar.deleteLater)
        self._model_changed(self.session)
        self._kind_changed(self.kind_combo.currentText())

    # -- form state ------------------------------------------------------------------------------

    def _model_changed(self, session: Session) -> None:
        from esegeta_engine.models import list_layers

        try:
            self.model_label.setText(f"Model: {session.model_name}" if session.model is not None
                                     else "Model: none (load one in the Model tab)")
            layers = list_layers(session.model) if session.model is not None else []
            self.methods.set_model_layers(layers)
            self._set_target_layers(layers)
            names = session.class_names
            self.classes_edit.setPlaceholderText(
                "default (predicted foreground)" + (f": {', '.join(names[1:])}" if len(names) > 1 else ""))
            self.classes_edit.setToolTip(
                "Classes to explain, by name or index, comma-separated"
                + (": " + ", ".join(f"{n} ({i})" for i, n in enumerate(names)) if names else
                   " (type the class names in the Model tab to use names)"))
        except RuntimeError:  # the widget was deleted before the signal was disconnected
            self.session.signals.model_changed.disconnect(self._model_changed)

    def _kind_changed(self, kind: str) -> None:
        for w in (self._roi_row, self.roi_combo):
            w.setVisible(kind == "roi")
        for w in (self._voxel_row, self.pick_btn, self.voxel_label):
            w.setVisible(kind == "voxel")
        for w in (self._target_layer_row, self.target_layer_combo, self._channel_row, self.channel_spin):
            w.setVisible(kind == "channel")
        self.components_check.setVisible(kind in R.COMPONENT_KINDS)

    def _set_target_layers(self, layers: list[tuple[str, str]]) -> None:
        current = self.target_layer_combo.currentData()
        self.target_layer_combo.clear()
        for name, kind in layers:
            self.target_layer_combo.addItem(f"{name}  ({kind})", name)
        pick = current if current in [n for n, _ in layers] else default_layer(layers)
        if pick is not None:
            self.target_layer_combo.setCurrentIndex(self.target_layer_combo.findData(pick))

    # -- running ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while a run's worker is alive."""
        return self.worker is not None

    def run(self) -> Any:
        """Start a run with the form's settings; returns the worker (None if not started)."""
        from napari.qt.threading import create_worker

        if self.running:
            return None
        s = self.session
        try:
            if s.model is None:
                raise R.TargetError("no model loaded", "load one in the Model tab "
                                    "(or 'Use bundled sample model')")
            if s.busy:
                raise R.TargetError("the model is busy (prediction running)", "wait a moment")
            layer = self.image_combo.layer()
            if layer is None:
                raise R.TargetError("no input image", "open a NIfTI volume (or File ▸ Open Sample)")
            rows = self.methods.checked()
            if not rows:
                raise R.TargetError("no method checked", "tick at least one method")
            kind = self.kind_combo.currentText()
            roi = self.roi_combo.layer()
            target = R.make_target(kind, R.parse_classes(self.classes_edit.text(), s.class_names),
                                   self.activation_combo.currentText(), self.voxel,
                                   roi.name if roi is not None else None, self.frozen_check.isChecked(),
                                   self.target_layer_combo.currentData(), self.channel_spin.value(),
                                   self.components_check.isChecked() and kind in R.COMPONENT_KINDS)
            methods = [R.make_method(r.spec.name, r.form.values(), r.selected_layer(), r.noise_tunnel())
                       for r in rows]
            volume = R.volume_from_layer(layer)
            roi_mask = R.roi_from_layer(roi, volume.data.shape) if kind == "roi" else None
            refused = R.refused_text(methods, target, s.execution, s.preprocess, volume.data.shape,
                                     s.model)
        except Exception as exc:
            set_status(self.status, format_error(exc), "error")
            return None
        if refused:  # refused on the click: no worker, no model evaluation
            set_status(self.status, refused, "error")
            return None
        plan = (layer.name, tuple(m.model_dump_json() for m in methods), target.model_dump_json())
        confirmed = plan == self._confirmed_plan
        if not self._cost_accepted(s, volume, target, methods, plan):
            return None
        self._plan, self._probe_stopped, self.last_estimate = plan, False, None
        cancel = self.control.start()
        self._target, self._input_layer = target, layer
        self._roi_name = roi.name if (kind == "roi" and roi is not None) else None
        self.added, self.failures, self.axiom_warnings = [], [], []
        self._run_started = time.perf_counter()
        self._rate = _cost.RateMeter(self._run_started)
        self._evaluations_done = 0
        s.busy = True
        self.run_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        set_status(self.status, f"Running {len(methods)} method(s) on {layer.name}…")
        self.progress_label.setText("preparing the input and the target…")
        self._last_progress = 0.0
        from napari.utils import progress

        # created now (on the click) rather than mid-run: napari's bar costs ~0.1 s to build
        self._pbar = progress(total=len(methods), desc="esegeta: preparing")
        # maps come with their layer data built in the worker (contrast limits, seams, trust)
        self.worker = create_worker(R.explain_layers, s.model, volume, methods, input_layer=R.InputLayer.of(layer),
                                    roi_layer=self._roi_name, class_names=tuple(s.class_names),
                                    axis_order=s.preprocess.axis_order, preprocess=s.preprocess,
                                    target=target, output=s.output, roi_mask=roi_mask,
                                    cancel=cancel, on_progress=self.control.store,
                                    execution=s.execution, probe=not confirmed, probe_limit_s=WARN_SECONDS,
                                    _start_thread=False)
        self.worker.yielded.connect(self._on_event)
        self.worker.finished.connect(self._on_finished)
        self.worker.start()
        return self.worker

    def _progress(self, ev: Progress) -> None:
        """Show progress: napari's bar per job (it costs ~20 ms a call), a label within a job."""
        from napari.utils import progress

        if self.worker is None:  # late event after the run ended
            return
        now = time.perf_counter()
        new_job = self._pbar is None or ev.done != self._pbar.n or ev.message.endswith("starting") \
            or ev.total != self._pbar.total
        if not new_job and now - self._last_progress < PROGRESS_INTERVAL_S:
            return  # throttled
        self._last_progress = now
        step = f"{min(ev.done + 1, ev.total)}/{ev.total}"
        if not self._cancel.is_set() and ev.message != "finished":
            message = R.named_message(ev.message, self.session.class_names)
            self.progress_label.setText(text := f"[{step}] {message}" + self._rate.text(ev, now))
            self.progress_label.setToolTip(text)
        if not new_job:
            return
        # napari's progress bar may process Qt events (re-entrancy): touch it last
        pbar = self._pbar
        if pbar is None:
            pbar = self._pbar = progress(total=max(ev.total, 1), desc="esegeta")
        pbar.total = max(ev.total, 1)
        job = R.named_message(ev.message, self.session.class_names).split(":")[0]
        pbar.set_description(f"esegeta {step}: {job}")
        if ev.done > pbar.n:
            pbar.update(ev.done - pbar.n)

    def _on_event(self, ev: Any) -> None:
        if isinstance(ev, Progress):
            self._progress(ev)
        elif isinstance(ev, R.PreparedMap):  # only the insertion of the layer built in the worker happens here
            layers = add_prepared(self.viewer, ev.data, ev.kwargs, ev.layers)
            self.added.extend(ly.name for ly in layers)
            # the other maps are hidden on the next event-loop turn (napari redraws for each): a gap of its own
            QTimer.singleShot(0, lambda new=layers[-1]: new in self.viewer.layers and show_only(self.viewer, new))
            self.colorbar.show_layer(layers[-1])
            self._evaluations_done += int(ev.event.evaluations or 0)
            axiom = ev.kwargs["metadata"]["esegeta"].get("axiom") or {}
            if axiom.get("axiom_status") == "warning":  # the map misses its method's completeness
                self.axiom_warnings.append(f"{layers[0].name}: {axiom.get('axiom_note', '')}")
        elif isinstance(ev, R.Estimated):  # one patch timed before any method ran
            self.last_estimate = ev.estimate
            if ev.stopped:  # nothing else ran: the second click starts it
                self._probe_stopped, self._confirmed_plan = True, self._plan
            else:
                set_status(self.status, f"Running on {self._input_layer.name}: estimated {ev.estimate.text()}."
                           + _cost.cancel_note(ev.estimate))
        elif isinstance(ev, JobFailed) and ev.status != "cancelled":
            self.failures.append(R.failure_text(ev))
        elif isinstance(ev, R.RunError):
            self.failures.append(ev.text)

    def _on_finished(self) -> None:
        self.control.finish()
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.worker = None
        self.session.busy = False
        self.run_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        took = time.perf_counter() - self._run_started
        self.progress_label.setText("")
        if self._probe_stopped:
            self.run_btn.setText("Run anyway")
            set_status(self.status, f"This run is estimated at {self.last_estimate.text()}.\n→ click 'Run anyway' to "
                       "start it, or use fewer methods, classes or a coarser window"
                       + _cost.cancel_note(self.last_estimate), "error")
            return
        text = f"{len(self.added)} map(s) added in {took:.1f} s"
        if self.cancel_requested_at is not None:
            text += f"; cancelled (stopped {self.last_cancel_latency:.2f} s after the click)"
        if len(self.added) > 1:
            text += "; one map is shown at a time: the others are in the layer list"
        if self._evaluations_done and took > 0:
            self.session.seconds_per_evaluation = took / self._evaluations_done
        if self.axiom_warnings:
            text += ".\ncompleteness check: " + "\n".join(self.axiom_warnings)
        if self.failures:
            set_status(self.status, text + ".\n" + "\n".join(self.failures), "error")
        else:  # a missed completeness check is a warning (amber), not a success
            set_status(self.status, text + ".", "warning" if self.axiom_warnings else "ok")
        self.session.signals.run_finished.emit(list(self.added))

    # -- cost and lost layers --------------------------------------------------------------------

    def _cost_accepted(self, s: Session, volume: Any, target: Any, methods: list[Any], plan: Any) -> bool:
        """False (with a warning) the first time Run is clicked for a run estimated to be long."""
        evaluations = _cost.estimate_evaluations(s.model, volume, methods, preprocess=s.preprocess,
                                                 target=target, output=s.output, execution=s.execution)
        seconds = _cost.estimate_seconds(evaluations, s.seconds_per_evaluation)
        if not _cost.too_long(evaluations, seconds, WARN_SECONDS) or plan == self._confirmed_plan:
            self._confirmed_plan = None
            self.run_btn.setText("Run")
            return True
        self._confirmed_plan = plan
        self.run_btn.setText("Run anyway")
        set_status(self.status, _cost.long_run_text(evaluations, seconds), "error")
        return False

    def _layer_removed(self, event: Any) -> None:
        try:
            if self.running and getattr(event, "value", None) is self._input_layer is not None:
                set_status(self.status, f"The input layer '{event.value.name}' was removed during the run; "
                           "the run goes on and its maps keep that layer's geometry.", "info")
        except RuntimeError:  # widget deleted
            pass

