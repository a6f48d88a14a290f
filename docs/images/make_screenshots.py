"""Regenerate the screenshots of docs/plugin.md from a real napari session.

    xvfb-run -a -s "-screen 0 1920x1200x24" .venv/bin/python docs/images/make_screenshots.py

Every image is taken with ``viewer.screenshot`` from the running viewer:
the sample phantom, the bundled U-Net, a run of four methods, the grid.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent


def pump(app, seconds: float = 0.3) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.005)


def wait(app, condition, timeout: float = 300) -> None:
    end = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > end:
            raise TimeoutError
        app.processEvents()
        time.sleep(0.01)


def shot(viewer, app, name: str, canvas_only: bool = False) -> None:
    pump(app, 0.5)
    viewer.screenshot(str(OUT / name), canvas_only=canvas_only, flash=False)
    print("wrote", OUT / name)


def main() -> None:
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(title="napari-esegeta")
    app = QApplication.instance()
    viewer.window._qt_window.resize(1700, 1050)
    viewer.window._qt_window.move(0, 0)

    # 1. File > Open Sample > napari-esegeta > TOF-MRA phantom + mask + bundled U-Net
    viewer.open_sample("napari-esegeta", "phantom_model")
    pump(app, 1.0)
    model_dock, mw = viewer.window.add_plugin_dock_widget("napari-esegeta", "Model")
    explain_dock, ew = viewer.window.add_plugin_dock_widget("napari-esegeta", "Explain")
    wait(app, lambda: mw.session.model is not None or mw.status.property("status_kind") == "error")
    if mw.session.model is None:
        sys.exit(mw.status.text())
    image = viewer.layers["phantom TOF-MRA"]
    viewer.layers["ground truth"].visible = False
    from napari_esegeta._view import show_plane

    viewer.layers.selection.active = image
    show_plane(viewer, "3d")
    shot(viewer, app, "plugin_01_sample_model.png")

    # 2. predict
    mw.image_combo.setCurrentText(image.name)
    mw.predict()
    wait(app, lambda: any(ly.name.startswith("prediction") for ly in viewer.layers))
    shot(viewer, app, "plugin_02_prediction.png")
    viewer.layers[-1].visible = False

    # 3. target and methods
    ew.kind_combo.setCurrentText("argmax")
    ew.methods.check("saliency")
    ew.methods.check("integrated_gradients", n_steps=8)
    ew.methods.check("occlusion", window=8)
    ew.methods.check("layer_gradcam")
    model_dock.hide()  # room for the Explain widget
    pump(app, 0.5)
    ew.methods_scroll.ensureWidgetVisible(ew.methods.rows["integrated_gradients"].check, 0, 0)
    shot(viewer, app, "plugin_03_explain_form.png")

    # 4. run: maps stream in as layers
    ew.run()
    wait(app, lambda: len(ew.added) >= 1)
    shot(viewer, app, "plugin_04_running.png")
    wait(app, lambda: not ew.running, 900)
    print(ew.status.text())
    show_plane(viewer, "3d")
    for ly in viewer.layers:
        ly.visible = ly is image or ly.name.startswith("integrated_gradients")
    shot(viewer, app, "plugin_05_result_3d.png")

    # 5. compare side by side (3D, linked cameras), then save
    explain_dock.hide()  # room for the Compare widget
    _, cw = viewer.window.add_plugin_dock_widget("napari-esegeta", "Compare")
    for ly in viewer.layers:
        ly.visible = True
    for name in list(viewer.layers):
        if name.name.startswith("prediction") or "ground truth" in name.name:
            name.visible = False
    cw.refresh()
    cw.base_combo.setCurrentText(image.name)
    cw.compare()
    show_plane(viewer, "3d")
    shot(viewer, app, "plugin_06_compare_grid.png")
    shot(viewer, app, "plugin_07_compare_canvas.png", canvas_only=True)
    show_plane(viewer, "axial")
    import numpy as np

    ig = next(ly for ly in viewer.layers if ly.name.startswith("integrated_gradients"))
    k = int(np.argmax(np.abs(ig.data).sum(axis=(0, 1))))  # the axial slice with most attribution
    viewer.dims.set_point(2, float(ig.data_to_world((0, 0, k))[2]))
    shot(viewer, app, "plugin_08_compare_axial.png", canvas_only=True)
    viewer.close()


if __name__ == "__main__":
    main()
