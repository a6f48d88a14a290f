"""Screenshots of the review-meeting flow on a whole-brain-sized volume (197 × 233 × 189, issue 19).

    xvfb-run -a -s "-screen 0 1366x768x24" .venv/bin/python docs/images/make_screenshots_brain.py [--patch 96]

The sample phantom made at the size of an MNI152 T1 (:func:`esegeta_engine.sample.make_phantom`)
with its ground truth, the bundled U-Net, and the Explain tab's own run of saliency and
input × gradient on it (real maps, whole-volume execution), in a 1366×768 window with the one
dock: the map over the scan with the orientation letters and colour bar, the 3D view, and the
two maps side by side. Each step's longest wait is printed. ``--patch`` runs the maps under a
sliding window of that patch (the Model tab's field) instead of the whole volume.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_screenshots import WINDOW, pump, shot, wait  # noqa: E402

BRAIN = (197, 233, 189)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", default="", help="sliding-window patch size (default: whole volume)")
    ap.add_argument("--methods", nargs="+", default=["saliency", "input_x_gradient"])
    args = ap.parse_args()
    import napari
    import numpy as np
    from napari.settings import get_settings
    from qtpy.QtWidgets import QApplication

    from napari_esegeta._sample_data import phantom_mask_data, phantom_volume_data

    get_settings()._save_on_change = False  # never change the user's napari settings from here
    viewer = napari.Viewer(title="napari-esegeta")
    app = QApplication.instance()
    window = viewer.window._qt_window
    window.showNormal()
    window.resize(*WINDOW)
    window.move(0, 0)
    for data, kwargs, kind in phantom_volume_data(BRAIN) + phantom_mask_data(BRAIN):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    viewer.layers["ground truth"].visible = False
    viewer.layers.selection.active = viewer.layers["phantom TOF-MRA"]  # the scan's controls, not the hidden labels'
    _, dock = viewer.window.add_plugin_dock_widget("napari-esegeta", "esegeta")
    dock.model.use_bundled()
    wait(app, lambda: dock.session.model is not None or dock.model.status.property("status_kind") == "error")
    if dock.session.model is None:
        sys.exit(dock.model.status.text())
    if args.patch:
        dock.model.patch_edit.setText(args.patch)
        dock.model._execution_changed()
    image = viewer.layers["phantom TOF-MRA"]
    dock.show_view("axial")

    ex = dock.show_tab("Explain")
    ex.image_combo.setCurrentText(image.name)
    ex.kind_combo.setCurrentText("argmax")
    ex.classes_edit.setText("vessel")
    for method in args.methods:
        ex.methods.check(method)
    t = time.perf_counter()
    ex.run()
    wait(app, lambda: ex.last_estimate is not None or not ex.running, 3600)
    if not ex.running and ex.run_btn.text() == "Run anyway":  # the probe asked for a second click
        shot(viewer, app, "brain_01_estimate.png")
        ex.run()
    else:
        shot(viewer, app, "brain_01_estimate.png")
    wait(app, lambda: not ex.running, 7200)
    print(f"explained in {time.perf_counter() - t:.0f} s:", ex.status.text())

    sal = next(ly for ly in viewer.layers if ly.name.startswith("saliency"))
    for ly in viewer.layers:
        if "method" in ly.metadata.get("esegeta", {}):
            ly.visible = ly is sal
    ex.colorbar.show_layer(sal)
    k = int(np.argmax(np.abs(sal.data).sum(axis=(0, 1))))
    dock.show_view("axial")
    viewer.dims.set_point(2, float(sal.data_to_world((0, 0, k))[2]))
    shot(viewer, app, "brain_02_map_axial.png")
    dock.show_view("3d")
    pump(app, 2.0)
    shot(viewer, app, "brain_03_map_3d.png")

    cw = dock.show_tab("Compare")
    cw.refresh()
    cw.base_combo.setCurrentText(image.name)
    cw.compare()
    wait(app, lambda: not cw.arranging)  # one layer insertion per event-loop turn
    dock.show_view("axial")
    viewer.dims.set_point(2, float(sal.data_to_world((0, 0, k))[2]))
    pump(app, 2.0)
    shot(viewer, app, "brain_04_side_by_side.png")
    cw.uncompare()
    viewer.close()


if __name__ == "__main__":
    main()
