"""A colour bar over napari's canvas for the newest attribution map.

napari 0.9's own per-layer colour-bar overlay crashes the process (a
segmentation fault at the next repaint) once a layer whose colour bar was
shown is removed, at least with software OpenGL; maps are removed often, so
the plugin draws its own bar: a small Qt widget laid over the canvas's top
right corner, painted from the layer's colormap and contrast limits and
updated when they change.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import QEvent, QObject, QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QFont, QLinearGradient, QPainter, QPen
from qtpy.QtWidgets import QWidget

from napari_esegeta._state import unwrap_viewer

BAR_SIZE = (120, 190)
MARGIN = 12
STOPS = 32


def _canvas_widget(viewer: Any) -> QWidget | None:
    """The Qt widget of napari's canvas (None when napari's internals differ)."""
    try:
        return unwrap_viewer(viewer).window._qt_viewer.canvas.native
    except AttributeError:
        return None


def _label(value: float) -> str:
    return f"{value:.3g}"


class CanvasColorBar(QWidget):
    """Colour bar of one image layer, drawn over the canvas's top right corner.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer whose canvas gets the bar.
    """

    def __init__(self, viewer: Any) -> None:
        self._canvas = _canvas_widget(viewer)
        super().__init__(self._canvas)
        self.viewer = viewer
        self.layer: Any = None
        self.setAttribute(Qt.WidgetAttribute.WA_TransparentForMouseEvents)
        self.resize(*BAR_SIZE)
        self.hide()
        if self._canvas is not None:
            self._canvas.installEventFilter(self)
        viewer.layers.events.removed.connect(self._removed)
        viewer.canvas.grid.events.enabled.connect(self._changed)  # one bar for one view: not over a grid

    @property
    def available(self) -> bool:
        """False when napari's canvas widget could not be found (no bar is drawn)."""
        return self._canvas is not None

    def show_layer(self, layer: Any) -> None:
        """Show ``layer``'s colormap and contrast limits (follows their changes)."""
        self._disconnect()
        self.layer = layer
        for name in ("contrast_limits", "colormap", "visible", "name"):
            getattr(layer.events, name).connect(self._changed)
        self._changed()

    def clear(self) -> None:
        """Hide the bar and forget its layer."""
        self._disconnect()
        self.layer = None
        self.hide()

    def colors(self) -> np.ndarray:
        """RGBA of the bar from its low to its high end (``STOPS`` x 4)."""
        if self.layer is None:
            return np.zeros((0, 4))
        return np.asarray(self.layer.colormap.map(np.linspace(0.0, 1.0, STOPS)), dtype=float)

    def _disconnect(self) -> None:
        if self.layer is None:
            return
        for name in ("contrast_limits", "colormap", "visible", "name"):
            try:
                getattr(self.layer.events, name).disconnect(self._changed)
            except (TypeError, ValueError, RuntimeError):
                pass

    def _changed(self, *_: Any) -> None:
        try:
            visible = (self.layer is not None and self.layer.visible and self.available
                       and not self.viewer.canvas.grid.enabled)
            self.setVisible(bool(visible))
            if visible:
                self._place()
                self.raise_()
                self.update()
        except RuntimeError:  # the widget was deleted with its viewer
            pass

    def _removed(self, event: Any) -> None:
        if getattr(event, "value", None) is self.layer:
            try:
                self.clear()
            except RuntimeError:
                pass

    def _place(self) -> None:
        if self._canvas is not None:
            self.move(self._canvas.width() - self.width() - MARGIN, MARGIN)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        """Stay in the corner when the canvas is resized."""
        if event.type() == QEvent.Type.Resize and self.isVisible():
            self._place()
        return False

    def paintEvent(self, _event: Any) -> None:  # noqa: N802 (Qt's name)
        """Box, title, gradient (high end up) and the limits (and 0 for signed maps)."""
        if self.layer is None:
            return
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        p.fillRect(self.rect(), QColor(20, 22, 28, 200))
        font = QFont(p.font())
        font.setPointSizeF(8.5)
        p.setFont(font)
        p.setPen(QPen(QColor(235, 235, 235)))
        title = p.fontMetrics().elidedText(self.layer.name, Qt.TextElideMode.ElideMiddle, self.width() - 8)
        p.drawText(QRectF(4, 2, self.width() - 8, 16), Qt.AlignmentFlag.AlignLeft, title)
        bar = QRectF(8, 24, 18, self.height() - 34)
        p.fillRect(bar, QColor(0, 0, 0))  # transparent colours read as "nothing drawn here"
        grad = QLinearGradient(QPointF(0, bar.bottom()), QPointF(0, bar.top()))
        for i, rgba in enumerate(self.colors()):
            grad.setColorAt(i / (STOPS - 1), QColor.fromRgbF(*(float(c) for c in rgba)))
        p.fillRect(bar, grad)
        p.setPen(QPen(QColor(200, 200, 200)))
        p.drawRect(bar)
        lo, hi = (float(v) for v in self.layer.contrast_limits)
        ticks = [(hi, bar.top()), (lo, bar.bottom())]
        if lo < 0 < hi:
            ticks.append((0.0, bar.bottom() - (0 - lo) / (hi - lo) * bar.height()))
        for value, y in ticks:
            p.drawLine(QPointF(bar.right(), y), QPointF(bar.right() + 4, y))
            p.drawText(QRectF(bar.right() + 7, y - 8, self.width() - bar.right() - 9, 16),
                       Qt.AlignmentFlag.AlignVCenter | Qt.AlignmentFlag.AlignLeft, _label(value))
        p.end()
