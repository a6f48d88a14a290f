"""The one esegeta dock in a real napari window: fit at 1366×768, maps, classes, cost, views, menus."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from qtpy.QtWidgets import QApplication

from plugin_helpers import wait_until

pytestmark = pytest.mark.gui

LAPTOP = (1366, 768)


def _pump(seconds: float = 0.3) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.01)


def _shot_dir(tmp_path: Path) -> Path:
    """ESEGETA_SHOTS=folder keeps the screenshots for a person to look at."""
    folder = Path(os.environ.get("ESEGETA_SHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def laptop(make_napari_viewer):
    """A shown 1366×768 napari window with the phantom, its mask and the one esegeta dock."""
    from napari_esegeta._qt.main_widget import EsegetaWidget
    from napari_esegeta._sample_data import phantom_mask_data, phantom_volume_data

    viewer = make_napari_viewer(show=True)
    for data, kwargs, kind in phantom_volume_data((32, 32, 32), 3) + phantom_mask_data((32, 32, 32), 3):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    dock = EsegetaWidget(viewer)
    viewer.window.add_dock_widget(dock, name="esegeta", area="right")
    window = viewer.window._qt_window
    window.showNormal()
    window.resize(*LAPTOP)
    _pump(0.5)
    yield viewer, dock
    if dock.explain.running:
        dock.explain.cancel()
        wait_until(_Waiter(), lambda: not dock.explain.running, 10)


class _Waiter:
    """qtbot-like ``waitUntil`` for the fixture's teardown."""

    def waitUntil(self, condition, timeout: int) -> None:  # noqa: N802 (pytest-qt's name)
        end = time.perf_counter() + timeout / 1000
        while not condition() and time.perf_counter() < end:
            _pump(0.02)


def _load(qtbot, dock) -> None:
    dock.model.use_bundled()
    wait_until(qtbot, lambda: dock.session.model is not None
               or dock.model.status.property("status_kind") == "error", 60)
    assert dock.session.model is not None, dock.model.status.text()


def _run(qtbot, explain, timeout: float = 600) -> None:  # a wait, not a time limit (loaded machines)
    assert explain.run() is not None, explain.status.text()
    wait_until(qtbot, lambda: not explain.running, timeout)


def _inside_window(widget, window) -> bool:
    top_left = widget.mapTo(window, widget.rect().topLeft())
    bottom_right = widget.mapTo(window, widget.rect().bottomRight())
    return (widget.isVisible() and top_left.y() >= 0 and top_left.x() >= 0
            and bottom_right.y() < window.height() and bottom_right.x() < window.width())


def test_dock_fits_a_laptop_screen(qtbot, laptop, tmp_path, bundled_model):
    """At 1366×768 the Explain tab shows Run, Cancel and the status line without scrolling."""
    viewer, dock = laptop
    window = viewer.window._qt_window
    _load(qtbot, dock)
    assert dock.tabs.currentWidget() is dock.explain  # loading a model moves on to Explain
    ex = dock.explain
    ex.status.setText("Two lines of status:\nthe problem and its fix.")
    _pump(0.5)
    assert (window.width(), window.height()) == LAPTOP  # the dock did not make the window grow
    for widget in (ex.run_btn, ex.cancel_btn, ex.progress_label, ex.status):
        assert _inside_window(widget, window), widget
    # the methods list scrolls inside the tab, the tab itself does not
    assert ex.methods_scroll.verticalScrollBar().maximum() > 0
    shot = viewer.screenshot(str(_shot_dir(tmp_path) / "dock_1366x768.png"), canvas_only=False, flash=False)
    assert shot.shape[:2] == (LAPTOP[1], LAPTOP[0])
    for name in ("Model", "Compare", "Evaluate"):  # every tab is reachable and fits (scrolling inside)
        page = dock.show_tab(name)
        _pump(0.2)
        assert page.isVisible() and dock.height() <= LAPTOP[1]


def test_maps_read_over_the_scan(qtbot, laptop, tmp_path, bundled_model):
    """Signed map diverging around 0, unsigned low end transparent, only the newest shown, colour bar."""
    viewer, dock = laptop
    _load(qtbot, dock)
    ex = dock.explain
    ex.classes_edit.setText("vessel")  # class names shown and accepted
    assert "vessel" in ex.classes_edit.toolTip()
    ex.methods.check("saliency")
    ex.methods.check("input_x_gradient")
    ex.methods.check("occlusion", window=8, stride=8)
    _run(qtbot, ex)
    assert ex.status.property("status_kind") in ("ok", "warning"), ex.status.text()
    maps = [ly for ly in viewer.layers if "method" in ly.metadata.get("esegeta", {})]
    assert len(maps) == 3 and all(m.name.endswith(" · vessel") for m in maps), [m.name for m in maps]
    assert all(m.metadata["esegeta"]["class_name"] == "vessel" for m in maps)
    visible = [m for m in maps if m.visible]
    bar = ex.colorbar
    assert visible == [maps[-1]] and bar.isVisible() and bar.layer.name == maps[-1].name
    np.testing.assert_allclose(bar.colors()[-1], maps[-1].colormap.map(np.array([1.0]))[0])
    canvas = bar.parentWidget()
    assert bar.geometry().right() < canvas.width() and bar.geometry().top() >= 0  # over the canvas
    signed = [m for m in maps if m.metadata["esegeta"]["signed"]]
    unsigned = [m for m in maps if not m.metadata["esegeta"]["signed"]]
    assert signed and unsigned
    for m in signed:
        lo, hi = m.contrast_limits
        assert lo == -hi < 0
        assert m.colormap.map(np.array([0.5]))[0, 3] == pytest.approx(0.0)  # 0 is see-through
        assert m.rendering == "translucent"
    for m in unsigned:
        assert m.contrast_limits[0] == 0.0 and m.colormap.map(np.array([0.0]))[0, 3] == 0.0
    # the scan stays visible under the newest map: the canvas is not one flat colour
    dock.show_view("axial")
    shot = viewer.screenshot(str(_shot_dir(tmp_path) / "maps_axial.png"), canvas_only=True, flash=False)
    assert shot[..., :3].std() > 10
    window_shot = viewer.screenshot(str(_shot_dir(tmp_path) / "maps_window.png"), canvas_only=False, flash=False)
    corner = window_shot[bar.mapTo(viewer.window._qt_window, bar.rect().center()).y(),
                         bar.mapTo(viewer.window._qt_window, bar.rect().center()).x(), :3]
    assert corner.std() > 0 or corner.mean() > 0  # the bar is painted in the window
    viewer.canvas.grid.enabled = True  # one bar for one view: hidden over a grid
    assert not bar.isVisible()
    viewer.canvas.grid.enabled = False
    assert bar.isVisible()
    # removing maps (the one with the bar too) leaves napari running, the bar hides
    for m in maps:
        viewer.layers.remove(m)
        _pump(0.3)
    assert not bar.isVisible() and bar.layer is None
    # prediction and ground truth: distinct colours
    dock.model.predict()
    wait_until(qtbot, lambda: "prediction" in viewer.layers, 60)
    pred, truth = viewer.layers["prediction"], viewer.layers["ground truth"]
    assert not np.allclose(pred.colormap.map(np.array([1]))[0], truth.colormap.map(np.array([1]))[0])


def test_unknown_class_is_refused_before_any_work(qtbot, laptop, bundled_model):
    viewer, dock = laptop
    _load(qtbot, dock)
    assert dock.session.class_names == ("background", "vessel")
    assert dock.model.names_edit.text() == "background, vessel"
    ex = dock.explain
    ex.methods.check("saliency")
    ex.classes_edit.setText("tumour")
    n_layers = len(viewer.layers)
    t0 = time.perf_counter()
    assert ex.run() is None
    assert time.perf_counter() - t0 < 1.0 and not ex.running
    assert ex.status.property("status_kind") == "error"
    assert "tumour" in ex.status.text() and "vessel (1)" in ex.status.text()
    assert len(viewer.layers) == n_layers
    # names typed by the user replace the metadata's
    dock.model.names_edit.setText("bg, artery")
    dock.model.names_edit.editingFinished.emit()
    assert dock.session.class_names == ("bg", "artery") and "artery" in ex.classes_edit.toolTip()


def test_long_run_asks_for_a_second_click(qtbot, laptop, bundled_model, monkeypatch):
    from esegeta_engine.explain import Explainer

    viewer, dock = laptop
    _load(qtbot, dock)
    monkeypatch.setattr(Explainer, "estimate", lambda self, volumes, methods, *rest: 10 ** 6, raising=False)
    ex = dock.explain
    ex.methods.check("saliency")
    assert ex.run() is None and not ex.running
    assert "1,000,000 model evaluations" in ex.status.text() and ex.run_btn.text() == "Run anyway"
    _run(qtbot, ex)  # the second click runs it
    assert ex.status.property("status_kind") in ("ok", "warning"), ex.status.text()
    assert ex.run_btn.text() == "Run" and dock.session.seconds_per_evaluation > 0


def test_layers_removed_mid_run_or_before_compare(qtbot, laptop, bundled_model):
    viewer, dock = laptop
    _load(qtbot, dock)
    ex = dock.explain
    image = viewer.layers["phantom TOF-MRA"]
    ex.methods.check("saliency")
    ex.methods.check("occlusion", window=4, stride=4)
    assert ex.run() is not None
    wait_until(qtbot, lambda: any("saliency" in ly.name for ly in viewer.layers), 300)
    viewer.layers.remove(image)
    assert "was removed during the run" in ex.status.text()
    wait_until(qtbot, lambda: not ex.running, 900)  # a wait, not a time limit (loaded machines)
    maps = [ly for ly in viewer.layers if "method" in ly.metadata.get("esegeta", {})]
    assert {m.metadata["esegeta"]["method"] for m in maps} == {"saliency", "occlusion"}
    np.testing.assert_allclose(maps[0].affine.affine_matrix, image.affine.affine_matrix)
    # a map deleted before Compare
    cw = dock.compare
    viewer.add_image(image.data, name="scan again", **{k: getattr(image, k) for k in ("scale", "translate")})
    cw.base_combo.setCurrentText("scan again")
    cw.set_checked([maps[0].name])
    viewer.layers.remove(maps[0])
    assert not cw.compare()
    assert cw.status.property("status_kind") == "error" and "Nothing to compare" in cw.status.text()
    assert maps[1] in viewer.layers


def test_radiological_views_and_letters(laptop, tmp_path):
    """Axial view: the patient's right (RAS+ x high) is on the screen's left, under the letter R."""
    from napari_esegeta._view import LETTER_POSITIONS

    viewer, dock = laptop
    image = viewer.layers["phantom TOF-MRA"]
    for layer in list(viewer.layers):
        layer.visible = False
    right = np.zeros(image.data.shape, dtype=np.float32)
    centre = image.world_to_data((0.0, 0.0, 0.0))
    xs = np.arange(image.data.shape[0])
    world_x = np.array([image.data_to_world((x, centre[1], centre[2]))[0] for x in xs])
    right[world_x > np.median(world_x)] = 1.0  # the patient's right half bright
    viewer.add_image(right, name="right half", contrast_limits=(0, 1), **{
        k: getattr(image, k) for k in ("scale", "translate", "rotate", "shear")},
        metadata={"nifti": image.metadata["nifti"]})
    letters = {}
    for plane, button in dock.view_buttons.items():
        button.click()
        _pump(0.2)
        shown = [viewer.canvas.overlays[f"esegeta_orientation_{p}"] for p in LETTER_POSITIONS]
        letters[plane] = {p: o.text if o.visible else "" for p, o in zip(LETTER_POSITIONS, shown)}  # what is drawn
    assert letters["3d"] == {p: "" for p in LETTER_POSITIONS} and viewer.dims.ndisplay == 3
    dock.view_buttons["axial"].click()
    _pump(0.3)
    assert viewer.dims.ndisplay == 2 and viewer.dims.order == (2, 1, 0)
    assert letters["axial"]["middle_left"] == "R" and letters["axial"]["top_center"] == "A"
    assert letters["coronal"]["top_center"] == "S" and letters["sagittal"]["middle_left"] == "A"
    shot = viewer.screenshot(str(_shot_dir(tmp_path) / "axial_right_half.png"), canvas_only=True, flash=False)
    grey = shot[..., :3].astype(float).mean(axis=2)
    half = grey.shape[1] // 2
    assert grey[:, :half].mean() > 2 * grey[:, half:].mean() + 5  # bright R half on screen left


def test_menu_actions_open_the_dock(make_napari_viewer, tmp_path):
    import nibabel as nib

    from napari_esegeta import _actions
    from napari_esegeta._settings import ensure_preferred_reader

    viewer = make_napari_viewer()
    ensure_preferred_reader()
    path = tmp_path / "scan.nii.gz"
    affine = np.diag([-0.8, 0.8, 1.5, 1.0])
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32), affine), path)
    (layer,) = viewer.open(str(path), plugin=None)  # the preferred reader: no builtins, no question
    assert "nifti" in layer.metadata
    np.testing.assert_allclose(np.subtract(layer.data_to_world((1, 0, 0)), layer.data_to_world((0, 0, 0))),
                               [-0.8, 0, 0], atol=1e-6)
    viewer.layers.selection.active = layer
    _actions.explain_image(viewer)
    _, dock = viewer.window.add_plugin_dock_widget("napari-esegeta", "esegeta")
    assert dock.tabs.currentWidget() is dock.explain and dock.explain.image_combo.currentText() == layer.name
    _actions.evaluate_maps(viewer)
    assert dock.tabs.currentIndex() == 3


def test_menu_contributions_reach_napari_menus(make_napari_viewer):
    """The manifest's ``menus`` put the layer actions in napari's Layers menus, runnable by command id."""
    from napari._app_model import get_app_model

    viewer = make_napari_viewer()
    app = get_app_model()
    def ids(menu: str) -> set:
        return {item.command.id for item in app.menus.get_menu(menu) if hasattr(item, "command")}

    visualize, measure = ids("napari/layers/visualize"), ids("napari/layers/measure")
    assert {"napari-esegeta.explain_image", "napari-esegeta.compare_maps"} <= visualize
    assert "napari-esegeta.evaluate_maps" in measure
    app.commands.execute_command("napari-esegeta.evaluate_maps").result()  # napari injects the viewer
    _, dock = viewer.window.add_plugin_dock_widget("napari-esegeta", "esegeta")
    assert dock.tabs.currentIndex() == 3
