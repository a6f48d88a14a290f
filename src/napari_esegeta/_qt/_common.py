"""Small Qt building blocks: layer pickers, status labels, generated parameter forms."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QSizePolicy,
    QSpinBox,
    QWidget,
)

from esegeta_engine.methods import Param
from napari_esegeta._params import format_value, parse_text, tooltip, uses_line_edit

ERROR_STYLE = "color: #ff5555;"
OK_STYLE = "color: #7fd17f;"
WARNING_STYLE = "color: #ffb347;"  # amber: done, with something to read
INFO_STYLE = ""


def set_status(label: QLabel, text: str, kind: str = "info") -> None:
    """Show ``text`` in ``label``; ``kind`` is info, ok (green), warning (amber) or error (red)."""
    label.setText(text)
    label.setStyleSheet({"error": ERROR_STYLE, "ok": OK_STYLE, "warning": WARNING_STYLE}.get(kind, INFO_STYLE))
    label.setProperty("status_kind", kind)


def status_label() -> QLabel:
    """A word-wrapped, selectable label for messages."""
    label = QLabel("")
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


def progress_label() -> QLabel:
    """Two fixed, wrapped lines: the ETA at the end stays readable, and updating it never relayouts the dock."""
    label = QLabel("")
    label.setWordWrap(True)
    label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
    label.setFixedHeight(2 * label.fontMetrics().lineSpacing() + 4)
    return label


def compact_combo() -> QComboBox:
    """A combo box whose width does not follow its longest entry (narrow docks)."""
    w = QComboBox()
    w.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    w.setMinimumContentsLength(8)
    return w


class LayerCombo(QComboBox):
    """A combo box listing the viewer's layers of some types, kept up to date.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    layer_types : tuple of str
        Layer class names to list, e.g. ``("Image",)``.
    allow_none : bool
        Add a ``(none)`` entry.
    predicate : callable, optional
        Extra filter on layers.
    """

    def __init__(self, viewer: Any, layer_types: tuple[str, ...], allow_none: bool = False,
                 predicate: Any = None) -> None:
        super().__init__()
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(10)
        self._viewer = viewer
        self._types = layer_types
        self._allow_none = allow_none
        self._predicate = predicate
        events = viewer.layers.events
        for ev in (events.inserted, events.removed, events.reordered):
            ev.connect(self.refresh)
        self.refresh()

    def _wanted(self, layer: Any) -> bool:
        return layer.__class__.__name__ in self._types and (self._predicate is None or self._predicate(layer))

    def refresh(self, *_: Any) -> None:
        """Rebuild the list, keeping the current choice when it still exists."""
        current = self.currentText()
        self.blockSignals(True)
        self.clear()
        if self._allow_none:
            self.addItem("(none)")
        for layer in reversed(list(self._viewer.layers)):
            if self._wanted(layer):
                self.addItem(layer.name)
                try:
                    layer.events.name.connect(self.refresh)
                except (AttributeError, TypeError, ValueError):
                    pass
        idx = self.findText(current)
        self.setCurrentIndex(idx if idx >= 0 else 0)
        self.blockSignals(False)
        self.currentTextChanged.emit(self.currentText())

    def layer(self) -> Any:
        """The chosen layer, or None."""
        name = self.currentText()
        if name in self._viewer.layers:
            layer = self._viewer.layers[name]
            return layer if self._wanted(layer) else None
        return None


class ParamForm(QWidget):
    """A form generated from registry :class:`Param` objects.

    ``int``/``float`` with bounds -> spin boxes, ``bool`` -> check box, ``str``
    with choices -> combo box, ``ints``, free text and optional ("auto")
    numbers -> line edits. The help text (with range and default) is the tooltip.
    """

    def __init__(self, params: Sequence[Param], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.params = tuple(params)
        self.editors: dict[str, QWidget] = {}
        layout = QFormLayout(self)
        layout.setContentsMargins(18, 0, 0, 4)
        layout.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        for p in self.params:
            editor = self._editor(p)
            editor.setToolTip(tooltip(p))
            editor.setObjectName(f"param_{p.name}")
            label = QLabel(p.name.replace("_", " "))
            label.setToolTip(tooltip(p))
            layout.addRow(label, editor)
            self.editors[p.name] = editor

    @staticmethod
    def _editor(p: Param) -> QWidget:
        if p.kind == "bool":
            w = QCheckBox()
            w.setChecked(bool(p.default))
            return w
        if p.kind == "str" and p.choices:
            w = compact_combo()
            w.addItems(list(p.choices))
            if p.default in p.choices:
                w.setCurrentText(p.default)
            return w
        if uses_line_edit(p):
            w = QLineEdit(format_value(p, p.default))
            w.setPlaceholderText("auto" if p.default is None else "")
            return w
        if p.kind == "int":
            w = QSpinBox()
            w.setRange(int(max(p.minimum if p.minimum is not None else -2**31 + 1, -2**31 + 1)),
                       int(min(p.maximum if p.maximum is not None else 2**31 - 1, 2**31 - 1)))
            w.setValue(int(p.default))
            return w
        w = QDoubleSpinBox()
        w.setDecimals(4)
        w.setRange(p.minimum if p.minimum is not None else -1e9, p.maximum if p.maximum is not None else 1e9)
        w.setSingleStep(0.01 if abs(p.default) < 1 else 0.1)
        w.setValue(float(p.default))
        return w

    def values(self) -> dict[str, Any]:
        """Current values; empty "auto" fields are left out (the default applies)."""
        out: dict[str, Any] = {}
        for p in self.params:
            w = self.editors[p.name]
            if isinstance(w, QCheckBox):
                out[p.name] = w.isChecked()
            elif isinstance(w, QComboBox):
                out[p.name] = w.currentText()
            elif isinstance(w, QLineEdit):
                value = parse_text(p, w.text())
                if value is not None:
                    out[p.name] = value
            elif isinstance(w, QSpinBox):
                out[p.name] = int(w.value())
            else:
                out[p.name] = float(w.value())
        return out

    def set_values(self, values: dict[str, Any]) -> None:
        """Set some values (unknown names raise ``KeyError``)."""
        for name, value in values.items():
            w = self.editors[name]
            p = next(q for q in self.params if q.name == name)
            if isinstance(w, QCheckBox):
                w.setChecked(bool(value))
            elif isinstance(w, QComboBox):
                w.setCurrentText(str(value))
            elif isinstance(w, QLineEdit):
                w.setText(format_value(p, value))
            else:
                w.setValue(value)


class RunControl:
    """Cancel, cancel latency and within-method progress of a widget's worker runs.

    The engine reports progress from the worker thread through :meth:`store`
    (one attribute assignment, no Qt call); a QTimer on the GUI thread hands the
    latest report to ``show``. The cancel event is also set when the widget is
    destroyed, so closing the viewer mid-run stops the worker.

    Parameters
    ----------
    widget : QWidget
        Owner of the timer.
    show : callable
        Called on the GUI thread with the latest progress report.
    interval_s : float
        How often progress is shown.
    """

    def __init__(self, widget: Any, show: Any, interval_s: float) -> None:
        from qtpy.QtCore import QTimer

        self.event = threading.Event()
        self.requested_at: float | None = None
        self.latency: float | None = None
        self._latest: Any = None
        self._show = show
        self._poll = QTimer(widget)
        self._poll.setInterval(int(interval_s * 1000))
        self._poll.timeout.connect(self._tick)
        widget.destroyed.connect(lambda *_: self.event.set())

    def start(self) -> threading.Event:
        """A fresh cancel event for a new run; starts showing progress."""
        self.event = threading.Event()
        self.requested_at = self.latency = None
        self._latest = None
        self._poll.start()
        return self.event

    def store(self, report: Any) -> None:
        """Worker thread: remember the latest progress report."""
        self._latest = report

    def _tick(self) -> None:
        report, self._latest = self._latest, None
        if report is not None and not self.event.is_set():
            self._show(report)

    def request(self) -> bool:
        """Ask the run to stop at the next model evaluation; False if already asked."""
        if self.event.is_set():
            return False
        self.requested_at = time.perf_counter()
        self.event.set()
        return True

    def finish(self) -> None:
        """The worker ended: stop showing progress and measure the cancel latency."""
        self._poll.stop()
        self._latest = None
        if self.requested_at is not None:
            self.latency = time.perf_counter() - self.requested_at


class CancellableRun:
    """Mixin for widgets that run a worker with a :class:`RunControl` ``self.control``.

    The widget provides ``running``, ``cancel_btn`` and ``progress_label``.
    """

    @property
    def cancel_requested_at(self) -> float | None:
        """When Cancel was clicked in the current run (perf_counter), if it was."""
        return self.control.requested_at  # type: ignore[attr-defined]

    @property
    def last_cancel_latency(self) -> float | None:
        """Seconds from the Cancel click to the worker's end, for the last cancelled run."""
        return self.control.latency  # type: ignore[attr-defined]

    @property
    def _cancel(self) -> threading.Event:
        return self.control.event  # type: ignore[attr-defined]

    def cancel(self) -> None:
        """Stop the run at the next model evaluation; what it already produced stays."""
        if not self.running or not self.control.request():  # type: ignore[attr-defined]
            return
        self.cancel_btn.setEnabled(False)  # type: ignore[attr-defined]
        self.progress_label.setText("Cancelling…")  # type: ignore[attr-defined]
