"""The review meeting's GUI stalls, Evaluate's Cancel latency, and Evaluate's memory against Explain's.

1. Longest event-loop gap (a 5 ms QTimer in the GUI thread) while a map layer is added,
   while *Side by side* arranges two maps, and while the view switches to 3D — in the one dock,
   at 1366×768. ``--size sample`` uses the 64³ phantom; ``--size big`` a 197×233×189 phantom
   (whole-brain sized, :func:`esegeta_engine.sample.make_phantom`). The maps are smooth synthetic
   maps over the bright voxels (the GUI cost of adding a layer does not depend on how the map was
   made). "add map" is the Explain tab's path: the layer data and napari's layer model built in
   the worker thread, only ``viewer.layers.append`` on the GUI thread; "last wave" called
   ``add_image`` on the GUI thread. *Side by side* now adds one base view per event-loop turn and
   the grid on the next ("one turn": all of it together, as last wave). Each row that ends in
   "(floor)" is napari's or Mesa's own single call, measured in the same run: a gap no code of
   ours can go under (one layer insertion; one 3D frame of the same layers, a camera turn).
2-3. Cancel latency and Evaluate's memory: ``meeting_flow_cancel.py`` (run through this script).
4. ``--floor-insert``: napari's bare ``add_image`` of the same map in a viewer without the dock against ours,
   interleaved, 2D and 3D, as a ratio: ``meeting_flow_floor.py``.
5. ``--profile-insert``: one insertion's time split into ours, napari's Qt, vispy/OpenGL and napari's model
   (cProfile), with no dock and with the dock: ``meeting_flow_profile.py``.

Run under a display::

    xvfb-run -a -s "-screen 0 1366x768x24" .venv/bin/python benchmarks/bench_meeting_flow.py [--size big] [--repeats 3]

Targets: every gap ≤ 100 ms; Cancel ≤ 1 s; memory ratio ≤ 1.3.
"""

from __future__ import annotations

import argparse
import statistics
import time

BIG = (197, 233, 189)


def _pump(app, seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.001)


def _wait(app, condition, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError("timed out")
        app.processEvents()
        time.sleep(0.002)


class GapMeter:
    """Ticks of a 5 ms timer in the GUI thread; the longest gap in a window is the stall."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.ticks: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(5)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))
        self.timer.start()

    def measure(self, app, action, settle: float = 1.5) -> float:
        _pump(app, 0.3)
        start = time.perf_counter()
        action()
        _pump(app, settle)
        # the click and the window's end bound the ticks: a stall longer than the window still counts
        ts = [start, *(t for t in self.ticks if t >= start), time.perf_counter()]
        return max(b - a for a, b in zip(ts, ts[1:]))


def gui(args) -> None:
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_esegeta._geometry import copy_geometry
    from napari_esegeta._layers import result_layer_data

    app = QApplication.instance() or QApplication([])
    if args.floor_insert:
        from meeting_flow_floor import floor_insert

        floor_insert(app, args)
        return
    viewer = napari.Viewer()
    viewer.window._qt_window.resize(1366, 768)
    if args.profile_insert:
        from meeting_flow_profile import profile_insert

        profile_insert(app, viewer, args)
        return
    shape = BIG if args.size == "big" else (64, 64, 64)
    image = _add_scan(viewer, shape)
    data = image.data
    bright = np.asarray(data) > np.percentile(data, 97)  # the vessels, roughly
    _, dock = viewer.window.add_plugin_dock_widget("napari-esegeta", "esegeta")
    _pump(app, 1.0)
    meter = GapMeter()
    rng = np.random.default_rng(0)

    def raw_map():
        from scipy.ndimage import gaussian_filter

        return gaussian_filter(rng.standard_normal(shape).astype(np.float32), 4) * bright

    def layer_data(m, i: int):
        data, kw, _ = result_layer_data(m, method="saliency", method_label=f"saliency{i}", target_label="vessel",
                                        provenance={"class": 1, "target": "argmax", "input_layer": image.name},
                                        geometry=copy_geometry(image), nifti=image.metadata.get("nifti"))
        return data, kw

    ex = dock.show_tab("Explain")

    def prepared(m, i: int, prebuilt: bool = True):
        """What the run's worker thread yields: the layer data and (now) napari's layer model built there."""
        import types

        from napari_esegeta._layers import image_layers
        from napari_esegeta._run import PreparedMap

        data, kw = layer_data(m, i)
        return PreparedMap(types.SimpleNamespace(evaluations=1), data, kw, image_layers(data, kw) if prebuilt else None)

    if args.cancel_only:
        from meeting_flow_cancel import cancel_latency

        cancel_latency(app, viewer, dock, args)
        return
    if args.preview_3d:
        preview_3d(app, viewer, args)
        return
    rows: dict[str, list[float]] = {name: [] for name in ROWS}
    floors = {"add map, napari's add_image alone (floor)": lambda p: viewer.add_image(p.data, **p.kwargs),
              "add map, napari's layers.append of a prebuilt layer (floor)": lambda p: viewer.layers.append(p.layers[0]),
              "add map, last wave (add_image on the GUI thread)": ex._on_event, "add map": ex._on_event}
    for r in range(args.repeats):
        dock.show_view("axial")
        _pump(app, 0.5)
        first = prepared(raw_map(), 1000 + r)  # a map already shown, as from an earlier run
        ex._on_event(first)
        _pump(app, 0.5)
        for name, act in floors.items():
            p = prepared(raw_map(), 100 * r + len(rows[name]), prebuilt="last wave" not in name)
            rows[name].append(meter.measure(app, lambda: act(p), settle=args.settle))
            viewer.layers.remove(p.kwargs["name"])
        viewer.layers.remove(first.kwargs["name"])
        if args.add_only:
            continue
        ex._on_event(prepared(raw_map(), 2 * r))
        _pump(app, 0.5)
        maps = [viewer.layers[-1].name, prepared(raw_map(), 2 * r + 1)]
        ex._on_event(maps[1])
        maps[1] = maps[1].kwargs["name"]
        _pump(app, 0.5)
        cw = dock.show_tab("Compare")
        cw.refresh()
        cw.set_checked(maps)
        side_by_side(app, viewer, cw, meter, rows, args)
        three_d(app, viewer, dock, meter, rows, args)
        for m in maps:
            viewer.layers.remove(m)
    for name, gaps in rows.items():
        if gaps:
            print(f"RESULT {args.size} {shape}: longest event-loop gap, {name}: max {max(gaps) * 1000:.0f} ms, "
                  f"median {statistics.median(gaps) * 1000:.0f} ms over {len(gaps)} (target <= 100 ms)", flush=True)
    if not args.no_cancel and not args.add_only:
        from meeting_flow_cancel import cancel_latency

        cancel_latency(app, viewer, dock, args)


ROWS = ("add map, napari's add_image alone (floor)", "add map, napari's layers.append of a prebuilt layer (floor)",
        "add map, last wave (add_image on the GUI thread)", "add map",
        "side by side, one napari layer insertion alone (floor)", "side by side, one turn (last wave)",
        "side by side", "3D", "3D, one frame of the same layers (floor)", "back to 2D")


def _add_scan(viewer, shape):
    from napari_esegeta._sample_data import phantom_volume_data

    data, kwargs, _ = phantom_volume_data(shape, 3)[0]
    return viewer.add_image(data, **kwargs)


def side_by_side(app, viewer, cw, meter, rows, args) -> None:
    """*Side by side* of the two checked maps: in one turn (last wave's) and in steps (now), and the floor:
    one hidden base view added alone, as each step adds one."""
    from qtpy.QtCore import QTimer

    import napari_esegeta._compare as C

    base, results = cw.base_combo.layer(), cw.checked_layers()

    def one_turn() -> None:
        cw.state = C.arrange_side_by_side(viewer, base, results)
        QTimer.singleShot(0, cw._fit_view)

    rows["side by side, one turn (last wave)"].append(meter.measure(app, one_turn, settle=args.settle))
    cw.uncompare()
    _pump(app, 0.5)
    rows["side by side"].append(meter.measure(app, cw.compare, settle=args.settle))
    cw.uncompare()
    _pump(app, 0.5)
    state = C.begin_side_by_side(viewer)
    rows["side by side, one napari layer insertion alone (floor)"].append(
        meter.measure(app, lambda: C.add_base_copy(viewer, base, results[0], state), settle=args.settle))
    C.restore_layout(viewer, state)
    _pump(app, 0.5)


def three_d(app, viewer, dock, meter, rows, args) -> None:
    """The 3D button, then one more frame of the same layers (a camera turn: Mesa's raycasting alone), then
    back to the axial plane."""
    dock.show_view("axial")
    _pump(app, 0.5)
    rows["3D"].append(meter.measure(app, lambda: dock.show_view("3d"), settle=args.settle))
    angles = tuple(viewer.camera.angles)
    rows["3D, one frame of the same layers (floor)"].append(
        meter.measure(app, lambda: setattr(viewer.camera, "angles", (angles[0] + 10, *angles[1:])), settle=args.settle))
    rows["back to 2D"].append(meter.measure(app, lambda: dock.show_view("axial"), settle=args.settle))


def preview_3d(app, viewer, args) -> None:
    """Experiment (not the plugin's path): the map as a full-resolution layer against a multiscale layer
    (full, 2x, 4x) in 3D, where napari renders the lowest level; add_image time and one rendered frame
    (``viewer.screenshot``), interleaved in one run, the scan (full resolution) underneath."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    shape = BIG if args.size == "big" else (64, 64, 64)
    m = gaussian_filter(np.random.default_rng(0).standard_normal(shape).astype(np.float32), 4)
    levels = [m, m[::2, ::2, ::2], m[::4, ::4, ::4]]
    viewer.dims.ndisplay = 3
    rows: dict[str, list[tuple[float, float]]] = {"full resolution": [], "multiscale, lowest level 4x": []}
    for _ in range(args.repeats):
        for name in rows:
            multi = name != "full resolution"
            t = time.perf_counter()
            layer = viewer.add_image(levels if multi else m, multiscale=multi, rendering="mip", colormap="magma",
                                     blending="translucent", opacity=0.8)
            added = time.perf_counter() - t
            _pump(app, 0.5)
            t = time.perf_counter()
            viewer.screenshot(canvas_only=True)
            rows[name].append((added, time.perf_counter() - t))
            viewer.layers.remove(layer)
            _pump(app, 0.3)
    viewer.dims.ndisplay = 2
    for name, v in rows.items():
        print(f"RESULT {args.size} {shape} 3D map layer, {name}: add_image median "
              f"{statistics.median(a for a, _ in v) * 1000:.0f} ms, one rendered frame median "
              f"{statistics.median(f for _, f in v) * 1000:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("sample", "big"), default="sample")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-cancel", action="store_true")
    ap.add_argument("--cancel-only", action="store_true", help="only the Cancel latencies (no stall rows)")
    ap.add_argument("--add-only", action="store_true", help="only the add-map stall rows (no Cancel)")
    ap.add_argument("--profile-insert", action="store_true",
                    help="where one map insertion's time goes (cProfile): no dock against the esegeta dock")
    ap.add_argument("--floor-insert", action="store_true",
                    help="bare napari's add_image of the same map (no dock) against ours, interleaved, 2D and 3D "
                         "(screen 2800x800: two windows side by side)")
    ap.add_argument("--preview-3d", action="store_true",
                    help="experiment: a multiscale map layer against a full-resolution one in 3D")
    ap.add_argument("--cancel-delays", type=float, nargs="+", default=[2.0, 8.0],
                    help="seconds into an Explain run at which Cancel is clicked")
    ap.add_argument("--patch", type=int, default=None, help="Cancel rows under a sliding window of this patch")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds of event loop watched after each action")
    ap.add_argument("--memory", action="store_true", help="only the memory comparison")
    ap.add_argument("--memory-size", type=int, default=96, help="phantom edge for the memory comparison")
    ap.add_argument("--memory-worker", choices=("explain", "evaluate"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_worker:
        from meeting_flow_cancel import memory_worker

        memory_worker(args.memory_worker, args.memory_size)
    elif args.memory:
        from meeting_flow_cancel import memory

        memory(args)
    else:
        gui(args)


if __name__ == "__main__":
    main()
