"""Methods grouped by family, each with a check box and a generated parameter form.

Everything is generated from the engine's registry (``list_methods()``):
method names, families, titles, parameter editors, whether a method needs a
model layer (a layer picker filled from ``list_layers(model)``) and whether it
can be wrapped in a SmoothGrad noise tunnel (a form generated from the
engine's ``NoiseTunnelConfig``).
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QVBoxLayout,
    QWidget,
)

from esegeta_engine.config import NoiseTunnelConfig
from esegeta_engine.methods import MethodSpec, list_methods
from napari_esegeta._model import default_layer
from napari_esegeta._params import params_from_model
from napari_esegeta._qt._common import ParamForm, compact_combo

FAMILY_TITLES = {"gradient": "Gradient methods", "perturbation": "Perturbation methods",
                 "layer": "Layer methods", "visualisation": "Feature visualisation"}


class MethodRow(QWidget):
    """One method: check box, and (while checked) its parameters."""

    def __init__(self, spec: MethodSpec) -> None:
        super().__init__()
        self.spec = spec
        self.check = QCheckBox(spec.title)
        notes = []
        if spec.needs_hooks:
            notes.append("needs a Python model (not TorchScript)")
        if spec.needs_batch:
            notes.append("needs several volumes")
        self.check.setToolTip(f"{spec.name}: {spec.summary}" + (f"\n{spec.reference}" if spec.reference else "")
                              + ("\n" + "; ".join(notes) if notes else ""))
        self.check.setObjectName(f"method_{spec.name}")
        self.details = QWidget()
        dl = QVBoxLayout(self.details)
        dl.setContentsMargins(0, 0, 0, 0)
        self.form = ParamForm(spec.params)
        dl.addWidget(self.form)
        self.layer_combo: QComboBox | None = None
        if spec.needs_layer:
            self.layer_combo = compact_combo()
            self.layer_combo.setToolTip("Model layer (module name) to attribute to")
            lf = QFormLayout()
            lf.setContentsMargins(18, 0, 0, 0)
            lf.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
            lf.addRow("model layer", self.layer_combo)
            dl.addLayout(lf)
        self.nt_check: QCheckBox | None = None
        self.nt_form: ParamForm | None = None
        if spec.noise_tunnel:
            self.nt_check = QCheckBox("SmoothGrad noise tunnel")
            self.nt_check.setToolTip("Average the method over noisy copies of the input (Smilkov et al. 2017)")
            self.nt_form = ParamForm(params_from_model(NoiseTunnelConfig, skip=("batch_size",)))
            self.nt_form.setVisible(False)
            self.nt_check.toggled.connect(self.nt_form.setVisible)
            box = QVBoxLayout()
            box.setContentsMargins(18, 0, 0, 0)
            box.addWidget(self.nt_check)
            box.addWidget(self.nt_form)
            dl.addLayout(box)
        self.details.setVisible(False)
        self.check.toggled.connect(self.details.setVisible)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self.check)
        layout.addWidget(self.details)

    def set_layers(self, layers: list[tuple[str, str]]) -> None:
        """Fill the layer picker from ``list_layers(model)``."""
        if self.layer_combo is None:
            return
        current = self.layer_combo.currentData()
        self.layer_combo.clear()
        for name, kind in layers:
            self.layer_combo.addItem(f"{name}  ({kind})", name)
        pick = current if current in [n for n, _ in layers] else default_layer(layers)
        if pick is not None:
            self.layer_combo.setCurrentIndex(self.layer_combo.findData(pick))

    def selected_layer(self) -> str | None:
        """The chosen model layer name (layer methods only)."""
        return None if self.layer_combo is None else self.layer_combo.currentData()

    def noise_tunnel(self) -> dict[str, Any] | None:
        """Noise-tunnel settings, or None when off."""
        if self.nt_check is None or self.nt_form is None or not self.nt_check.isChecked():
            return None
        return self.nt_form.values()


class MethodPanel(QWidget):
    """All registered methods, grouped by family."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, MethodRow] = {}
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        groups: dict[str, QVBoxLayout] = {}
        for spec in list_methods():
            if spec.family not in groups:
                box = QGroupBox(FAMILY_TITLES.get(spec.family, spec.family.title()))
                box.setObjectName(f"family_{spec.family}")
                groups[spec.family] = QVBoxLayout(box)
                groups[spec.family].setSpacing(2)
                layout.addWidget(box)
            row = MethodRow(spec)
            groups[spec.family].addWidget(row)
            self.rows[spec.name] = row
        layout.addStretch(1)

    def set_model_layers(self, layers: list[tuple[str, str]]) -> None:
        """Refresh every layer picker."""
        for row in self.rows.values():
            row.set_layers(layers)

    def check(self, name: str, checked: bool = True, **params: Any) -> MethodRow:
        """Check method ``name`` and set some of its parameters (used by tests and scripts)."""
        row = self.rows[name]
        row.check.setChecked(checked)
        if params:
            row.form.set_values(params)
        return row

    def checked(self) -> list[MethodRow]:
        """Rows of checked methods, in registry order."""
        return [r for r in self.rows.values() if r.check.isChecked()]
