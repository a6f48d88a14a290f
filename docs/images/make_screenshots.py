"""Regenerate the screenshots of docs/plugin.md from a real napari session at laptop size.

    xvfb-run -a -s "-screen 0 1600x1200x24" .venv/bin/python docs/images/make_screenshots.py

Every image is taken with ``viewer.screenshot`` from a running 1366×768
viewer with the one esegeta dock: the sample phantom and the bundled U-Net,
a prediction, a run of four methods, the maps over the scan in 2D and 3D,
the Compare grid, and the Evaluate tab after scoring two maps (its form generated from
the evaluation config, each map scored on the execution it was made with).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent
WINDOW = (1366, 768)


def pump(app, seconds: float = 0.3) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.005)


def wait(app, condition, timeout: float = 600) -> None:
    end = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > end:
            raise TimeoutError
        app.processEvents()
        time.sleep(0.01)


def shot(viewer, app, name: str, canvas_only: bool = False) -> None:
    pump(app, 0.6)
    viewer.screenshot(str(OUT / name), canvas_only=canvas_only, flash=False)
    print("wrote", OUT / name)


def main() -> None:
    import napari
    import numpy as np
    from napari.settings import get_settings
    from qtpy.QtWidgets import QApplication

    get_settings()._save_on_change = False  # never change the user's napari settings from here
    viewer = napari.Viewer(title="napari-esegeta")
    app = QApplication.instance()
    window = viewer.window._qt_window
    window.showNormal()
    window.resize(*WINDOW)
    window.move(0, 0)

    # 1. File > Open Sample > napari-esegeta > TOF-MRA phantom + mask + bundled U-Net
    viewer.open_sample("napari-esegeta", "phantom_model")
    pump(app, 1.0)
    _, dock = viewer.window.add_plugin_dock_widget("napari-esegeta", "esegeta")
    wait(app, lambda: dock.session.model is not None or dock.model.status.property("status_kind") == "error")
    if dock.session.model is None:
        sys.exit(dock.model.status.text())
    image = viewer.layers["phantom TOF-MRA"]
    viewer.layers.selection.active = image
    dock.show_tab("Model")
    dock.show_view("axial")
    shot(viewer, app, "plugin_01_sample_model.png")

    # 2. predict: yellow prediction next to the cyan ground truth
    dock.model.image_combo.setCurrentText(image.name)
    dock.model.predict()
    wait(app, lambda: "prediction" in viewer.layers)
    dock.show_tab("Model")
    shot(viewer, app, "plugin_02_prediction.png")
    viewer.layers["prediction"].visible = False
    viewer.layers["ground truth"].visible = False

    # 3. target and methods (classes by name)
    ex = dock.show_tab("Explain")
    ex.kind_combo.setCurrentText("argmax")
    ex.classes_edit.setText("vessel")
    ex.methods.check("saliency")
    ex.methods.check("integrated_gradients", n_steps=8)
    ex.methods.check("occlusion", window=16, stride=16)
    ex.methods.check("layer_gradcam")
    pump(app, 0.5)
    ex.methods_scroll.ensureWidgetVisible(ex.methods.rows["integrated_gradients"].check, 0, 0)
    shot(viewer, app, "plugin_03_explain_form.png")

    # 4. run: maps stream in as layers, the newest one shown
    ex.run()
    wait(app, lambda: len(ex.added) >= 2 and "evaluations" in ex.progress_label.text())
    shot(viewer, app, "plugin_04_running.png")
    wait(app, lambda: not ex.running, 1200)
    print(ex.status.text())

    # 5. a signed map over the scan in 2D (the slice with most attribution), then in 3D
    ig = next(ly for ly in viewer.layers if ly.name.startswith("integrated_gradients"))
    for ly in viewer.layers:
        if "method" in ly.metadata.get("esegeta", {}):
            ly.visible = ly is ig
    ex.colorbar.show_layer(ig)
    viewer.layers.selection.active = ig  # the layer controls show the map on screen
    k = int(np.argmax(np.abs(ig.data).sum(axis=(0, 1))))
    dock.show_view("axial")
    viewer.dims.set_point(2, float(ig.data_to_world((0, 0, k))[2]))
    shot(viewer, app, "plugin_09_map_axial.png")
    dock.show_view("3d")
    shot(viewer, app, "plugin_05_result_3d.png")

    # 6. compare side by side (3D, linked cameras)
    cw = dock.show_tab("Compare")
    cw.refresh()
    cw.base_combo.setCurrentText(image.name)
    cw.compare()
    wait(app, lambda: not cw.arranging)  # one layer insertion per event-loop turn
    dock.show_view("3d")
    shot(viewer, app, "plugin_06_compare_grid.png")
    shot(viewer, app, "plugin_07_compare_canvas.png", canvas_only=True)
    dock.show_view("axial")
    viewer.dims.set_point(2, float(ig.data_to_world((0, 0, k))[2]))
    shot(viewer, app, "plugin_08_compare_axial.png", canvas_only=True)
    cw.uncompare()

    # 7. evaluate two maps against the ground truth (the whole tab at 1366x768)
    ev = dock.show_tab("Evaluate")
    ev.refresh_maps()
    ev.set_checked([ly.name for ly in viewer.layers if ly.name.startswith(("saliency", "integrated_gradients"))])
    ev.gt_combo.setCurrentText("ground truth")
    ev.form.set_checked(infidelity=True, faithfulness=True, localisation=True)
    ev.form.set_values("faithfulness", steps=8)
    ev.run()
    wait(app, lambda: not ev.running, 1200)
    print(ev.status.text())
    scroll = ev.table.parent()
    while scroll is not None and not hasattr(scroll, "ensureWidgetVisible"):
        scroll = scroll.parent()
    if scroll is not None:  # the scores, not only the form
        scroll.ensureWidgetVisible(ev.table)
    shot(viewer, app, "plugin_10_evaluate.png")
    dock.show_tab("Cohort")
    shot(viewer, app, "plugin_11_cohort_tab.png")
    viewer.close()


if __name__ == "__main__":
    main()
