"""The floor of one map insertion: napari's bare ``add_image`` of the same array, against ours (issue 19).

Run through ``bench_meeting_flow.py --floor-insert`` on a screen wide enough for two 1366×768 windows side by
side (``xvfb-run -a -s "-screen 0 2800x800x24"``). Two viewers in one process, each with the same scan and one
earlier map shown (as in a meeting, where a second map is added):

* **bare napari**: no plugin dock, ever; the map is added with ``viewer.add_image(data, **kwargs)`` with
  exactly our layer arguments (same float32 array, colormap, contrast limits, blending, opacity, rendering,
  geometry), the earlier map hidden first, so the same layers are on screen after it as after ours — what a
  user typing ``add_image`` would get at best (napari builds the layer on the GUI thread here);
* **ours**: the esegeta dock open, the map added by the Explain tab's handler (``_on_event``: the layer
  built off the GUI thread is inserted, the other maps hidden on the next turn, the colour bar updated).

The two are interleaved (the order alternates each repeat) in the 2D (axial) and 3D views, so a machine's
load skews both alike. Each insertion's window (``--settle`` seconds, the first paint included) gives the
longest event-loop gap (a 5 ms timer) and the GUI thread's CPU time (``time.thread_time``: what load
changes least; Mesa's own rendering threads are not in it). The ratio ours / bare is what our code and call
pattern add to napari's own cost, which no plugin can go under.
"""

from __future__ import annotations

import statistics
import time

from bench_meeting_flow import GapMeter, _add_scan, _pump


class _Window:
    """One viewer with the scan and a map already shown; ``insert`` adds one more map as it would be added."""

    def __init__(self, shape, x: int, dock: bool) -> None:
        import napari

        self.viewer = napari.Viewer()
        qt = self.viewer.window._qt_window
        qt.resize(1366, 768)
        qt.move(x, 0)
        self.image = _add_scan(self.viewer, shape)
        self.explain = None
        if dock:
            _, main = self.viewer.window.add_plugin_dock_widget("napari-esegeta", "esegeta")
            main.show_view("axial")
            self.explain = main.show_tab("Explain")
        self.count = 0

    def prepared(self, raw):
        import types

        from napari_esegeta._geometry import copy_geometry
        from napari_esegeta._layers import image_layers, result_layer_data
        from napari_esegeta._run import PreparedMap

        self.count += 1
        data, kw, _ = result_layer_data(raw, method="saliency", method_label=f"saliency{self.count}",
                                        target_label="vessel",
                                        provenance={"class": 1, "target": "argmax", "input_layer": self.image.name},
                                        geometry=copy_geometry(self.image), nifti=self.image.metadata.get("nifti"))
        return PreparedMap(types.SimpleNamespace(evaluations=1), data, kw,
                           image_layers(data, kw) if self.explain is not None else None)

    def insert(self, p) -> None:
        from napari_esegeta._layers import is_result_layer

        if self.explain is None:  # bare napari, the same arguments and the same maps on screen after it
            for layer in self.viewer.layers:
                if is_result_layer(layer) and layer.visible:
                    layer.visible = False
            self.viewer.add_image(p.data, **p.kwargs)
        else:
            self.explain._on_event(p)  # ours: the Explain tab's path


def floor_insert(app, args) -> None:
    """Interleaved bare-napari and esegeta insertions of the same map, 2D and 3D; prints medians and ratios."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    from bench_meeting_flow import BIG

    shape = BIG if args.size == "big" else (64, 64, 64)
    windows = {"bare napari": _Window(shape, 0, dock=False), "ours": _Window(shape, 1400, dock=True)}
    rng = np.random.default_rng(0)
    bright = np.asarray(windows["ours"].image.data) > np.percentile(windows["ours"].image.data, 97)

    def raw():
        return gaussian_filter(rng.standard_normal(shape).astype(np.float32), 4) * bright

    for w in windows.values():  # the map already shown
        w.insert(w.prepared(raw()))
    _pump(app, 1.5)
    meter = GapMeter()
    rows: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for ndisplay in (2, 3):
        for w in windows.values():
            w.viewer.dims.ndisplay = ndisplay
        _pump(app, 2.0)
        for r in range(args.repeats):
            order = list(windows.items()) if r % 2 == 0 else list(reversed(list(windows.items())))
            for name, w in order:
                p = w.prepared(raw())
                before = time.thread_time()
                gap = meter.measure(app, lambda w=w, p=p: w.insert(p), settle=args.settle)
                rows.setdefault((name, ndisplay), []).append((gap, time.thread_time() - before))
                w.viewer.layers.remove(p.kwargs["name"])
                for layer in w.viewer.layers:  # the earlier map visible again, as before the insertion
                    layer.visible = True
                _pump(app, 0.8)
    size = "x".join(map(str, shape))
    for ndisplay in (2, 3):
        view = "axial (2D)" if ndisplay == 2 else "3D"
        med = {name: (statistics.median(g for g, _ in rows[(name, ndisplay)]),
                      statistics.median(c for _, c in rows[(name, ndisplay)])) for name in windows}
        for name in windows:
            gaps = [g for g, _ in rows[(name, ndisplay)]]
            print(f"RESULT {size} {view}, one map insertion, {name}: longest event-loop gap median "
                  f"{med[name][0] * 1000:.0f} ms (min {min(gaps) * 1000:.0f}, max {max(gaps) * 1000:.0f}) over "
                  f"{len(gaps)}; GUI-thread CPU in the {args.settle:g} s window median {med[name][1] * 1000:.0f} ms",
                  flush=True)
        gb, cb = med["bare napari"]
        for name in list(windows)[1:]:
            go, co = med[name]
            print(f"RESULT {size} {view}, {name} / bare napari: gap {go / gb:.2f}x ({go * 1000:.0f} / {gb * 1000:.0f} "
                  f"ms), GUI-thread CPU {co / cb:.2f}x ({co * 1000:.0f} / {cb * 1000:.0f} ms); target gap <= 100 ms",
                  flush=True)
