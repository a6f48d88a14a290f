"""The Model dock widget: load a model, set its preprocessing, predict.

Loading and prediction run in napari thread workers; every problem is shown
in a red label in the widget (problem and fix), never as a traceback.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from esegeta_engine.errors import BundleTrustError, EsegetaError, PickledModuleError
from napari_esegeta import _model as M
from napari_esegeta._geometry import copy_geometry
from napari_esegeta._layers import is_input_layer, prediction_layer_data
from napari_esegeta._qt._common import LayerCombo, set_status, status_label
from napari_esegeta._run import RunError, predict_labels, volume_from_layer
from napari_esegeta._state import get_session


PATCH_TIP = ("Sliding-window execution with the network's training patch size (one size or one per axis): maps "
             "of the function you deploy, memory bounded, Cancel within a patch. Empty: the whole volume in one pass.")


class ModelWidget(QWidget):
    """Load a TorchScript file or a state dict + class, then predict on an image layer.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer (injected by napari).
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self._worker: Any = None
        self._predict_worker: Any = None

        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("TorchScript (.pt) or state dict (.pt/.pth)")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        path_row = QHBoxLayout()
        path_row.addWidget(self.path_edit)
        path_row.addWidget(browse)
        folder = QPushButton("Folder…")
        folder.setToolTip("an nnU-Net v2 results folder or a MONAI bundle (recognised by its files)")
        folder.clicked.connect(self._browse_folder)
        path_row.addWidget(folder)
        self.class_edit = QLineEdit()
        self.class_edit.setPlaceholderText("package.module:Class (state dicts only)")
        self.kwargs_edit = QPlainTextEdit()
        self.kwargs_edit.setPlaceholderText('{"in_channels": 1, "out_channels": 2}')
        self.kwargs_edit.setFixedHeight(54)
        self.kwargs_edit.setToolTip("Constructor keyword arguments of the class, as JSON")
        self.device_combo = QComboBox()
        self.device_combo.addItems(M.available_devices())
        self.output_edit = QLineEdit()
        self.output_edit.setPlaceholderText("auto (single tensor); index or key otherwise")
        self.output_edit.setToolTip("Which output to explain when the model returns a tuple, list or dict")
        self.norm_combo = QComboBox()
        self.norm_combo.addItems(M.normalisation_choices())
        self.axis_combo = QComboBox()
        self.axis_combo.addItems(M.axis_order_choices())
        self.axis_combo.setToolTip("The model's spatial axes in NIfTI terms (zyx: SimpleITK/numpy order)")
        self.names_edit = QLineEdit()
        self.names_edit.setPlaceholderText("e.g. background, vessel (index order)")
        self.names_edit.setToolTip("The model's class names, so targets and layers use them")
        self.names_edit.editingFinished.connect(self._names_typed)
        self.channels_spin = QSpinBox()
        self.channels_spin.setRange(1, 64)
        self.patch_edit = QLineEdit()
        self.patch_edit.setPlaceholderText("whole volume; e.g. 96 for real-sized scans")
        self.patch_edit.setToolTip(PATCH_TIP)
        self.patch_edit.editingFinished.connect(self._execution_changed)
        self.precision_combo = QComboBox()
        self.precision_combo.addItems(M.PRECISIONS)
        self.precision_combo.setToolTip("Autocast precision of the network (bf16 on CPUs, fp16 on GPUs); "
                                        "maps that turn non-finite are redone in fp32")
        self.precision_combo.currentTextChanged.connect(self._execution_changed)
        self.load_btn = QPushButton("Load model")
        self.load_btn.clicked.connect(self.load)
        self.bundled_btn = QPushButton("Use bundled sample model")
        self.bundled_btn.clicked.connect(self.use_bundled)
        self.status = status_label()
        self.image_combo = LayerCombo(napari_viewer, ("Image",), predicate=is_input_layer)
        self.predict_btn = QPushButton("Predict")
        self.predict_btn.clicked.connect(self.predict)

        form = QFormLayout()
        form.addRow("Model file", path_row)
        form.addRow("Class", self.class_edit)
        form.addRow("Class kwargs", self.kwargs_edit)
        form.addRow("Device", self.device_combo)
        form.addRow("Output", self.output_edit)
        form.addRow("Normalisation", self.norm_combo)
        form.addRow("Axis order", self.axis_combo)
        form.addRow("Channels", self.channels_spin)
        form.addRow("Class names", self.names_edit)
        form.addRow("Patch size", self.patch_edit)
        form.addRow("Precision", self.precision_combo)
        buttons = QHBoxLayout()
        buttons.addWidget(self.load_btn)
        buttons.addWidget(self.bundled_btn)
        predict_row = QHBoxLayout()
        predict_row.addWidget(self.image_combo, 1)
        predict_row.addWidget(self.predict_btn)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(QLabel("Predict on image:"))
        layout.addLayout(predict_row)
        layout.addStretch(1)
        self._update_buttons()

    # -- loading ---------------------------------------------------------------------------------

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Model file", "", "PyTorch (*.pt *.pth *.ts);;All (*)")
        if path:
            self.path_edit.setText(path)

    def _browse_folder(self) -> None:
        from esegeta_engine.models import detect_source

        path = QFileDialog.getExistingDirectory(self, "nnU-Net results folder or MONAI bundle")
        if path:
            self.path_edit.setText(path)
            kind = {"nnunet": "nnU-Net v2 results folder", "bundle": "MONAI bundle"}.get(detect_source(path) or "")
            set_status(self.status, f"{kind}: click Load." if kind else
                       "Neither an nnU-Net results folder nor a MONAI bundle.", "ok" if kind else "error")

    def request(self) -> M.ModelRequest:
        """The :class:`~napari_esegeta._model.ModelRequest` of the form (raises EsegetaError)."""
        return M.ModelRequest(
            path=self.path_edit.text().strip(), class_path=self.class_edit.text().strip(),
            kwargs=M.parse_kwargs(self.kwargs_edit.toPlainText()),
            device=self.device_combo.currentText(), output=M.parse_output(self.output_edit.text()),
            preprocess=M.make_preprocess(self.norm_combo.currentText(), self.axis_combo.currentText(),
                                         self.channels_spin.value()),
            class_names=M.parse_class_names(self.names_edit.text()))

    def show_request(self, req: M.ModelRequest) -> None:
        """Fill the form from ``req``."""
        import json

        self.path_edit.setText(req.path)
        self.class_edit.setText(req.class_path)
        self.kwargs_edit.setPlainText(json.dumps(req.kwargs) if req.kwargs else "")
        self.output_edit.setText("" if req.output is None else str(req.output))
        self.norm_combo.setCurrentText(req.preprocess.normalisation)
        self.axis_combo.setCurrentText(req.preprocess.axis_order)
        self.channels_spin.setValue(req.preprocess.in_channels)
        self.names_edit.setText(", ".join(req.class_names))
        if self.device_combo.findText(req.device) >= 0:
            self.device_combo.setCurrentText(req.device)

    def use_bundled(self) -> None:
        """Fill the form with the bundled U-Net and load it."""
        try:
            req = M.bundled_request(self.device_combo.currentText())
        except Exception as exc:
            set_status(self.status, M.format_error(exc), "error")
            return
        self.show_request(req)
        self.load(req)

    def load(self, req: M.ModelRequest | None = None) -> Any:
        """Load the model of the form (or ``req``) in a worker thread; returns the worker."""
        from napari.qt.threading import create_worker

        if self.session.busy:
            set_status(self.status, "A run is using the model; cancel it or wait before loading another.",
                       "error")
            return None
        try:
            req = req if isinstance(req, M.ModelRequest) else self.request()
        except Exception as exc:
            set_status(self.status, M.format_error(exc), "error")
            return None
        set_status(self.status, f"Loading {req.label}…")
        self.load_btn.setEnabled(False)
        self.bundled_btn.setEnabled(False)

        def work() -> Any:
            try:
                return M.load_request_pair(req)
            except (PickledModuleError, BundleTrustError) as exc:  # only the user can decide to run its code
                return req, exc
            except Exception as exc:  # shown in the widget, never a traceback
                return req, RunError(M.format_error(exc))

        self._worker = create_worker(work, _start_thread=False)
        self._worker.returned.connect(self._on_loaded)
        self._worker.finished.connect(self._update_buttons)
        self._worker.start()
        return self._worker

    def _on_loaded(self, result: tuple[M.ModelRequest, Any]) -> None:
        req, model = result
        if isinstance(model, PickledModuleError):
            if confirm_pickled(self, req.path):
                self.load(dataclasses.replace(req, trust_pickled=True))
                return
            model = RunError(M.format_error(model))
        if isinstance(model, BundleTrustError):
            if confirm_pickled(self, req.path, what="a MONAI bundle whose config runs Python code"):
                self.load(dataclasses.replace(req, trust_bundle=True))
                return
            model = RunError(M.format_error(model))
        if isinstance(model, RunError):
            set_status(self.status, f"Could not load the model: {model.text}", "error")
            return
        from esegeta_engine.models import list_layers

        self.session.set_model(model, req.label, req.preprocess, req.output, req.class_names)
        self._follow_window(model)
        n = sum(p.numel() for p in model.parameters())
        set_status(self.status, f"Loaded {req.label} on {req.device}: {n:,} parameters, "
                   f"{len(list_layers(model))} layers.", "ok")

    def _follow_window(self, model: Any) -> None:
        """A folder's pipeline runs its own window: grey out the patch size (no second window on top)."""
        window = M.own_window(model)
        self.patch_edit.setEnabled(window is None)
        if window is None:
            self.patch_edit.setToolTip(PATCH_TIP)
            return
        self.patch_edit.clear()
        self.patch_edit.setToolTip(f"Not used: this folder's own sliding window runs the network — {window}.")
        self._execution_changed()

    def _names_typed(self) -> None:
        names = M.parse_class_names(self.names_edit.text())
        if self.session.model is not None and names != self.session.class_names:
            self.session.set_class_names(names)

    def _execution_changed(self, *_: Any) -> None:
        """Patch size / precision typed: every later prediction and run uses them."""
        try:
            self.session.execution = M.parse_execution(self.patch_edit.text(), self.precision_combo.currentText())
        except EsegetaError as exc:
            self.session.execution = None
            set_status(self.status, M.format_error(exc), "error")
            return
        e = self.session.execution
        if e is not None and e.patch_size is not None:
            set_status(self.status, f"Sliding-window execution: patch {e.patch_size}, overlap {e.overlap}, "
                                    f"{e.precision}; layer methods, CAMs, DeepLIFT and LRP need the whole volume.")
        elif e is not None:
            set_status(self.status, f"Whole-volume execution in {e.precision}.")

    def _update_buttons(self, *_: Any) -> None:
        self.load_btn.setEnabled(True)
        self.bundled_btn.setEnabled(True)
        self.predict_btn.setEnabled(self._predict_worker is None)

    # -- prediction ------------------------------------------------------------------------------

    def predict(self) -> Any:
        """Predict on the chosen image in a worker; adds a Labels layer. Returns the worker."""
        from napari.qt.threading import create_worker

        layer = self.image_combo.layer()
        s = self.session
        if s.model is None:
            set_status(self.status, "No model loaded.\n→ load one first (or use the bundled sample model)",
                       "error")
            return None
        if layer is None:
            set_status(self.status, "No image layer to predict on.\n→ open a NIfTI volume", "error")
            return None
        if s.busy:
            set_status(self.status, "The model is busy with a run.\n→ wait for it or cancel it", "error")
            return None
        volume = volume_from_layer(layer)
        s.busy = True
        set_status(self.status, f"Predicting on {layer.name}…")
        self.predict_btn.setEnabled(False)
        self._predict_worker = create_worker(predict_labels, s.model, volume, s.preprocess, s.output,
                                             s.execution, _start_thread=False)
        self._predict_worker.returned.connect(lambda labels: self._on_predicted(labels, layer))
        self._predict_worker.finished.connect(self._predict_done)
        self._predict_worker.start()
        return self._predict_worker

    def _predict_done(self) -> None:
        self._predict_worker = None
        self.session.busy = False
        self._update_buttons()

    def _on_predicted(self, labels: Any, layer: Any) -> None:
        if isinstance(labels, RunError):
            set_status(self.status, f"Prediction failed: {labels.text}", "error")
            return
        data, kwargs, _ = prediction_layer_data(labels, model_name=self.session.model_name,
                                                geometry=copy_geometry(layer),
                                                nifti=(layer.metadata or {}).get("nifti"))
        self.viewer.add_labels(data, **kwargs)
        set_status(self.status, f"Prediction added: {int((labels > 0).sum()):,} foreground voxels.", "ok")


def confirm_pickled(parent: QWidget | None, path: str, what: str = "a pickled PyTorch module") -> bool:
    """Ask whether to load the model at ``path`` whose loading runs code, naming it; ``False`` unless confirmed."""
    answer = QMessageBox.warning(
        parent, "Run code from this model?",
        f"{path}\n\nis {what}: loading it runs Python code stored in it, "
        "with your rights. Load it only if you trust where it came from.\n\nLoad this file?",
        QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
    return answer == QMessageBox.StandardButton.Yes
