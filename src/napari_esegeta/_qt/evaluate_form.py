"""The Evaluate tab's metric form, generated from the engine's ``EvaluationConfig``.

Each optional section of :class:`~esegeta_engine.config.EvaluationConfig` (axioms,
infidelity, faithfulness, randomisation, ... and any section the engine adds later) is a
check box with its parameters underneath, generated from the section's pydantic fields
exactly as the method forms are generated from the registry (:func:`params_from_model`).
Localisation's mask is the ground-truth layer picked above the form, not a file.
Every row is vertical, so the form fits a narrow dock.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from qtpy.QtWidgets import QCheckBox, QVBoxLayout, QWidget

from esegeta_engine.config import EvaluationConfig, format_validation_error
from napari_esegeta._params import params_from_model
from napari_esegeta._qt._common import ParamForm

#: Fields never shown: files (the ground-truth layer replaces the mask), method filters
#: (the checked layers are the methods), memory knobs of the batch runner.
SKIP = ("mask", "methods", "max_examples_per_batch")
#: Checked when the tab opens (the axioms follow the engine's default: on).
DEFAULT_ON = ("infidelity", "faithfulness")
#: Short titles; a section without one is titled by its field name.
TITLES = {"axioms": "axiom checks (completeness)",
          "sensitivity": "sensitivity (re-runs the method)",
          "faithfulness": "faithfulness (deletion / insertion)",
          "localisation": "localisation (ground truth)",
          "randomisation": "randomisation (re-runs the method)",
          "class_contrast": "class contrast (re-runs it)"}


def sections() -> dict[str, type[BaseModel]]:
    """The optional sections of ``EvaluationConfig``: field name -> sub-model."""
    out = {}
    for name, f in EvaluationConfig.model_fields.items():
        args = [a for a in typing.get_args(f.annotation) if a is not type(None)]
        if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            out[name] = args[0]
    return out


class EvaluationForm(QWidget):
    """Check boxes and generated parameter forms for every evaluation section."""

    def __init__(self) -> None:
        super().__init__()
        self.checks: dict[str, QCheckBox] = {}
        self.forms: dict[str, ParamForm] = {}
        self.models = sections()
        defaults = EvaluationConfig()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(1)
        for name, model in self.models.items():
            check = QCheckBox(TITLES.get(name, name.replace("_", " ")))
            check.setObjectName(f"metric_{name}")
            check.setToolTip((model.__doc__ or name).strip() + ("\nTwo model calls per map." if name == "axioms" else "")
                             + ("\nRe-runs the method for another class." if name == "class_contrast" else ""))
            check.setChecked(getattr(defaults, name) is not None or name in DEFAULT_ON)
            form = ParamForm(params_from_model(model, skip=SKIP))
            form.setVisible(check.isChecked() and bool(form.params))
            check.toggled.connect(lambda on, f=form: f.setVisible(on and bool(f.params)))
            layout.addWidget(check)
            layout.addWidget(form)
            self.checks[name], self.forms[name] = check, form

    def checked(self, name: str) -> bool:
        """Whether section ``name`` is switched on."""
        return name in self.checks and self.checks[name].isChecked()

    def set_checked(self, **on: bool) -> None:
        """Switch sections on or off (``randomisation=True``)."""
        for name, value in on.items():
            self.checks[name].setChecked(value)

    def set_values(self, name: str, **values: Any) -> None:
        """Set parameters of one section (``set_values("faithfulness", steps=4)``)."""
        self.forms[name].set_values(values)

    def config(self) -> EvaluationConfig:
        """The :class:`EvaluationConfig` of the form (localisation is the caller's: see ``localisation``).

        Raises
        ------
        ConfigError
            Naming the section and the value that is out of range.
        """
        values: dict[str, Any] = {name: None for name in self.models}
        for name, model in self.models.items():
            if name == "localisation" or not self.checked(name):
                continue
            try:
                values[name] = model(**self.forms[name].values())
            except ValidationError as exc:
                raise format_validation_error(exc, f"evaluation.{name}") from None
        return EvaluationConfig(**values)

    @property
    def localisation(self) -> bool:
        """Whether localisation is asked for (scored against the chosen ground-truth layer)."""
        return self.checked("localisation")
