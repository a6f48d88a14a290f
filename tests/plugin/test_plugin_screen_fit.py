"""Every tab of the one dock fits a 1366×768 laptop screen (issue 19.2, 19.8).

The test walks the widgets of each tab (not a screenshot): every visible control lies inside
the window, and inside the horizontal extent of the scroll area that holds it (the tabs scroll
vertically only, so a control beyond the right edge could never be reached). A table's columns must fit its
own width too: its horizontal scroll range is 0 (the Evaluate table's last columns scrolled, issue 19).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gui

W, H = 1366, 768
CONTROLS = ("QAbstractButton", "QComboBox", "QAbstractSpinBox", "QLineEdit", "QLabel", "QListWidget",
            "QTableWidget", "QGroupBox", "QTabBar")


def _is_control(w) -> bool:
    return any(w.inherits(name) for name in CONTROLS) or type(w).__name__.startswith("FigureCanvas")


def _outside(dock, window) -> list[str]:
    """Visible controls of ``dock`` that stick out of the window or of their scroll area."""
    from qtpy.QtCore import QPoint, QRect
    from qtpy.QtWidgets import QAbstractScrollArea, QScrollArea, QWidget

    win = QRect(window.mapToGlobal(QPoint(0, 0)), window.size())
    bad = []
    for w in dock.findChildren(QWidget):
        if not w.isVisibleTo(window) or not _is_control(w) or w.width() <= 0:
            continue
        rect = QRect(w.mapToGlobal(QPoint(0, 0)), w.size())
        name = f"{type(w).__name__} {w.objectName() or getattr(w, 'text', lambda: '')()!r}"[:80]
        if w.inherits("QTableWidget") and w.horizontalScrollBar().maximum() > 0:  # columns beyond its right edge
            bad.append(f"{name}: its columns scroll sideways ({w.horizontalScrollBar().maximum()} steps)")
        area = w.parentWidget()
        while area is not None and not isinstance(area, QScrollArea):
            area = area.parentWidget()
        if isinstance(area, QScrollArea):
            view = QRect(area.viewport().mapToGlobal(QPoint(0, 0)), area.viewport().size())
            if rect.right() > view.right() + 1 or rect.left() < view.left() - 1:
                bad.append(f"{name}: x {rect.left()}..{rect.right()} outside its scroll area "
                           f"{view.left()}..{view.right()}")
            view = view.intersected(win)
            if not win.contains(QRect(view.topLeft(), view.size())):
                bad.append(f"{name}: its scroll area leaves the window")
        elif not win.contains(rect) and not isinstance(w.parentWidget(), QAbstractScrollArea):
            bad.append(f"{name}: {rect.left()},{rect.top()}..{rect.right()},{rect.bottom()} outside the window "
                       f"{win.right()}x{win.bottom()}")
    return bad


def test_every_tab_fits_1366x768(qtbot, make_napari_viewer) -> None:
    from qtpy.QtWidgets import QApplication

    from napari_esegeta._qt.main_widget import TABS

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.showNormal()
    window.resize(W, H)
    _, dock = viewer.window.add_plugin_dock_widget("napari-esegeta", "esegeta")
    for name in TABS:
        dock.show_tab(name)
        for _ in range(5):
            QApplication.processEvents()
        qtbot.wait(50)
        assert window.height() <= H and window.width() <= W, (name, window.size())
        bad = _outside(dock, window)
        assert not bad, f"{name} tab: " + "; ".join(bad[:6])
    # the Evaluate tab with every metric on (the longest form) and its table filled: two maps, every column
    ev = dock.show_tab("Evaluate")
    ev.form.set_checked(**{k: True for k in ev.form.checks})
    ev.columns = ev.options().columns()
    ev._setup_table()
    for name in ("integrated_gradients · vessel", "layer_gradcam@decoder.upcat_1.convs.conv_1.act · vessel"):
        ev._add_table_row({"layer": name, "method": name.split(" · ")[0], "target": "vessel",
                           **{c: -0.000123456789 for c in ev.columns}, "randomisation": "pass",
                           "notes": {"mass_inside": "no ground-truth voxels inside the map's support: undefined"}})
    QApplication.processEvents()
    qtbot.wait(50)
    assert len(ev.columns) > 8 and len(ev.table_text()) == 2  # every metric column, two maps
    assert not _outside(dock, window), _outside(dock, window)[:6]


def test_one_dock_one_menu_entry(make_napari_viewer) -> None:
    """The manifest contributes one widget; napari lists it once, under the name the docs give."""
    import npe2

    manifest = npe2.PluginManager.instance().get_manifest("napari-esegeta")
    assert [w.display_name for w in manifest.contributions.widgets] == ["esegeta"]
    viewer = make_napari_viewer()
    menu = viewer.window._qt_window.menuBar()
    plugins = next(a.menu() for a in menu.actions() if a.text().replace("&", "") == "Plugins")
    titles = [a.text().replace("&&", "&") for a in plugins.actions()]
    ours = [t for t in titles if "esegeta" in t]
    assert ours == ["esegeta (esegeta explainability)"], titles
    with open(_docs_plugin(), encoding="utf-8") as fh:
        assert "Plugins ▸ esegeta (esegeta explainability)" in fh.read()


def _docs_plugin() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parents[2] / "docs" / "plugin.md")
