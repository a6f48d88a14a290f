"""The review meeting's GUI stalls, Evaluate's Cancel latency, and Evaluate's memory against Explain's.

1. Longest event-loop gap (a 5 ms QTimer in the GUI thread) while a map layer is added,
   while *Side by side* arranges two maps, and while the view switches to 3D — in the one dock,
   at 1366×768. ``--size sample`` uses the 64³ phantom; ``--size big`` a 197×233×189 phantom
   (whole-brain sized, :func:`esegeta_engine.sample.make_phantom`). The maps are smooth synthetic
   maps over the bright voxels (the GUI cost of adding a layer does not depend on how the map was
   made). "add map" is the Explain tab's path: the layer data (contrast limits, signedness) built
   in a worker thread, only napari's ``add_image`` on the GUI thread; "before" builds it on the
   GUI thread as the tab did until 19.6, measured in the same run.
2. Cancel latency, the click to the worker's end: in the Explain tab ``--cancel-delays`` seconds into a
   saliency run (the probe, the prediction pass or the method's forward/backward, on the sample and on
   the big volume, whole-volume execution) and, on the sample, in the Evaluate tab's randomisation.
   "before" switches off the checks inside one model evaluation (the engine until 19.8), in the same run.
3. Peak resident memory of evaluating a sliding-window map (infidelity + faithfulness, the one
   evaluation session) against explaining it (saliency), each in a fresh process on the same
   volume, model and execution (patch 32, overlap 0.25). Target: Evaluate ≤ 1.3× Explain.

Run under a display::

    xvfb-run -a -s "-screen 0 1366x768x24" .venv/bin/python benchmarks/bench_meeting_flow.py [--size big] [--repeats 3]

Targets: every gap ≤ 100 ms; Cancel ≤ 1 s; memory ratio ≤ 1.3.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
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
    from napari_esegeta._sample_data import phantom_volume_data

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer()
    viewer.window._qt_window.resize(1366, 768)
    shape = BIG if args.size == "big" else (64, 64, 64)
    data, kwargs, _ = phantom_volume_data(shape, 3)[0]
    image = viewer.add_image(data, **kwargs)
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

    def prepared(m, i: int):
        import types

        from napari_esegeta._run import PreparedMap

        data, kw = layer_data(m, i)  # built in the run's worker thread in the plugin
        return PreparedMap(types.SimpleNamespace(evaluations=1), data, kw)

    def arrival_before(p) -> None:
        """The Explain tab's map arrival until the fourth pass: add, then show only it (every map's
        ``visible`` set: napari redraws the canvas for each, and reslices the new one)."""
        layer = viewer.add_image(p.data, **p.kwargs)
        for other in viewer.layers:
            if other.name in names and other is not layer:
                other.visible = False
        layer.visible = True
        ex.colorbar.show_layer(layer)

    def compare_before(cw) -> None:
        """*Side by side* until the fourth pass: every change (layer added, moved, shown, grid field) its own
        scene-graph update and redraw, ``visible`` set on every layer."""
        import contextlib

        import napari_esegeta._compare as C

        saved = C._set_visible
        C._set_visible = lambda layer, visible: setattr(layer, "visible", visible)
        viewer.layers.batched_update = contextlib.nullcontext  # shadows the method on this instance
        try:
            cw.compare()
        finally:
            C._set_visible = saved
            del viewer.layers.batched_update

    def three_d_before() -> None:
        """The 3D button's napari calls without the dock's letter update (the letters kept their text hidden
        from the fourth pass: half the overlay events)."""
        from napari_esegeta._view import VIEW_3D, _camera

        viewer.dims.ndisplay = 3
        viewer.dims.order = (0, 1, 2)
        viewer.reset_view()
        _camera(viewer).set_view_direction(VIEW_3D[0], VIEW_3D[1])

    if args.cancel_only:
        cancel_latency(app, viewer, dock, args)
        return
    if args.preview_3d:
        preview_3d(app, viewer, args)
        return
    rows = {"add map, napari's add_image alone": [], "add map, the Explain tab's path (before)": [],
            "add map": [], "side by side (before)": [], "side by side": [], "3D (before)": [], "3D": []}
    names: set[str] = set()
    for r in range(args.repeats):
        dock.show_view("axial")
        _pump(app, 0.5)
        first = prepared(raw_map(), 1000 + r)  # a map already shown, as from an earlier run
        names.add(first.kwargs["name"])
        ex._on_event(first)
        _pump(app, 0.5)
        for name, act in (("add map, napari's add_image alone", lambda p: viewer.add_image(p.data, **p.kwargs)),
                          ("add map, the Explain tab's path (before)", arrival_before), ("add map", ex._on_event)):
            p = prepared(raw_map(), 100 * r + len(rows[name]))
            names.add(p.kwargs["name"])
            rows[name].append(meter.measure(app, lambda: act(p), settle=args.settle))
            viewer.layers.remove(p.kwargs["name"])
        viewer.layers.remove(first.kwargs["name"])
        if args.add_only:
            continue
        raws = [raw_map(), raw_map()]
        ex._on_event(prepared(raws[0], 2 * r))
        _pump(app, 0.5)
        maps = [(viewer.layers[-1].data, {"name": viewer.layers[-1].name}), layer_data(raws[1], 2 * r + 1)]
        viewer.add_image(maps[1][0], **maps[1][1])
        cw = dock.show_tab("Compare")
        cw.refresh()
        cw.set_checked([maps[0][1]["name"], maps[1][1]["name"]])
        rows["side by side (before)"].append(meter.measure(app, lambda: compare_before(cw), settle=args.settle))
        cw.uncompare()
        _pump(app, 0.5)
        rows["side by side"].append(meter.measure(app, cw.compare, settle=args.settle))
        cw.uncompare()
        _pump(app, 0.5)
        rows["3D (before)"].append(meter.measure(app, three_d_before, settle=args.settle))
        dock.show_view("axial")
        _pump(app, 0.5)
        rows["3D"].append(meter.measure(app, lambda: dock.show_view("3d"), settle=args.settle))
        dock.show_view("axial")
        for m in maps:
            viewer.layers.remove(m[1]["name"])
    for name, gaps in rows.items():
        if not gaps:
            continue
        print(f"RESULT {args.size} {shape}: longest event-loop gap, {name}: max {max(gaps) * 1000:.0f} ms, "
              f"median {statistics.median(gaps) * 1000:.0f} ms (target <= 100 ms)")
    if not args.no_cancel and not args.add_only:
        cancel_latency(app, viewer, dock, args)


class InEvaluationChecks:
    """Switch the cancel checks inside one model evaluation (between the network's modules) off and on:
    "before" is the engine until 19.8, which checked only between evaluations and patch batches."""

    def __init__(self) -> None:
        from esegeta_engine.forward import cancel_points, runner, sliding

        self.modules, self.real = (runner, sliding), cancel_points.cancel_points

    def set(self, on: bool) -> None:
        import contextlib

        for m in self.modules:
            m.cancel_points = self.real if on else (lambda check: contextlib.nullcontext())


def _click_cancel(app, tab, start, delay: float) -> tuple[float, str]:
    """Start a run with ``start()``, click Cancel ``delay`` seconds into its work; (latency, where it was)."""
    start()
    _pump(app, delay)
    if not tab.running and getattr(tab, "_probe_stopped", False):  # the estimate stopped it: "Run anyway"
        start()
        _pump(app, delay)
    if not tab.running:
        return float("nan"), "finished before the click"
    where = tab.progress_label.text() or "preparing"
    t = time.perf_counter()
    tab.cancel()
    _wait(app, lambda: not tab.running, 600)
    return time.perf_counter() - t, where


def cancel_latency(app, viewer, dock, args) -> None:
    """Cancel in the Explain tab (probe, prediction pass, saliency) and, on the sample, in the Evaluate
    tab's randomisation; the in-evaluation checks off (before) and on (now), interleaved in one run."""
    checks = InEvaluationChecks()
    mw = dock.model
    mw.use_bundled()
    _wait(app, lambda: mw.session.model is not None or mw.status.property("status_kind") == "error", 120)
    ex = dock.show_tab("Explain")
    ex.kind_combo.setCurrentText("argmax")
    ex.methods.check("saliency")
    size = "64^3" if args.size == "sample" else "x".join(map(str, BIG))
    rows: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for on in (False, True):
            checks.set(on)
            for delay in args.cancel_delays:
                latency, where = _click_cancel(app, ex, ex.run, delay)
                name = f"Explain Cancel {delay:g} s into the run, {'now' if on else 'before'}"
                rows.setdefault(name, []).append(latency)
                print(f"  {name}: {latency * 1000:.0f} ms (at: {where[:70]!r})", flush=True)
                for layer in [ly for ly in viewer.layers if ly.name in ex.added]:
                    viewer.layers.remove(layer)
    if args.size == "sample":
        checks.set(True)
        ex.run()  # one map to evaluate
        _wait(app, lambda: not ex.running, 600)
        ev = dock.show_tab("Evaluate")
        ev.refresh_maps()
        ev.form.set_checked(axioms=False, infidelity=False, faithfulness=False, randomisation=True)
        for r in range(args.repeats):
            for on in (False, True):
                checks.set(on)
                ev.run()
                _wait(app, lambda: "randomisation" in ev.last_message or "randomisation" in ev.progress_label.text(),
                      600)
                _pump(app, 1.0)
                t = time.perf_counter()
                ev.cancel()
                _wait(app, lambda: not ev.running, 600)
                rows.setdefault(f"Evaluate Cancel in the randomisation, {'now' if on else 'before'}",
                                []).append(time.perf_counter() - t)
    checks.set(True)
    for name, values in rows.items():
        ok = [v for v in values if v == v]
        if ok:
            print(f"RESULT {size}, bundled U-Net, whole volume: {name}: max {max(ok) * 1000:.0f} ms, "
                  f"median {statistics.median(ok) * 1000:.0f} ms over {len(ok)} (target <= 1000 ms)")


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


def memory_worker(kind: str, size: int) -> None:
    """One measurement in this fresh process: peak RSS growth of explaining or evaluating."""
    import resource

    import numpy as np
    import torch

    from esegeta_engine import sample
    from esegeta_engine.config import ExecutionConfig, MethodConfig, PreprocessConfig, TargetConfig
    from esegeta_engine.evaluation.api import evaluation_config
    from esegeta_engine.evaluation.session import EvaluationSession, MapToScore
    from esegeta_engine.explain import Explainer, MapReady
    from esegeta_engine.io import Volume
    from esegeta_engine.models import load_model

    torch.set_num_threads(1)
    info = sample.sample_info()["models"]["unet3d_vessels"]
    net = load_model(sample.unet_paths()["state"], class_path=info["class_path"], kwargs=info["kwargs"])
    ph = sample.make_phantom((size,) * 3, seed=3)
    vol = Volume(ph.volume.astype(np.float32), ph.affine)
    pre = PreprocessConfig(normalisation="minmax")
    exe = ExecutionConfig(patch_size=32, overlap=0.25)
    target = TargetConfig(classes=[1])
    explainer = Explainer(net, pre, target, execution=exe)
    # the map is made before the baseline in the evaluate process (it is read from a file in practice)
    if kind == "evaluate":
        ready = next(e for e in explainer.iter_explain([vol], [MethodConfig(name="saliency")]) if isinstance(e, MapReady))
        del explainer
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if kind == "explain":
        next(e for e in explainer.iter_explain([vol], [MethodConfig(name="saliency")]) if isinstance(e, MapReady))
    else:
        session = EvaluationSession(net, evaluation_config(axioms=False, infidelity=True, faithfulness=True,
                                                           n_perturb_samples=4, steps=5), preprocess=pre)
        info_ = MapToScore(name="m", method="saliency", params={}, cls=1, target=target, array=ready.array,
                           target_label="vessel", execution=ready.execution)
        list(session.score(vol, [info_]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"kind": kind, "growth_mb": (peak - base) / 1024, "peak_mb": peak / 1024}))


def memory(args) -> None:
    out = {}
    for kind in ("explain", "evaluate"):
        res = subprocess.run([sys.executable, __file__, "--memory-worker", kind, "--memory-size", str(args.memory_size)],
                             capture_output=True, text=True, check=True)
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])
    ratio = out["evaluate"]["peak_mb"] / out["explain"]["peak_mb"]
    print(f"RESULT peak RSS on a {args.memory_size}^3 phantom, sliding window 32: explain {out['explain']['peak_mb']:.0f} MB "
          f"(+{out['explain']['growth_mb']:.0f}), evaluate {out['evaluate']['peak_mb']:.0f} MB "
          f"(+{out['evaluate']['growth_mb']:.0f}); ratio {ratio:.2f} (target <= 1.3)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("sample", "big"), default="sample")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-cancel", action="store_true")
    ap.add_argument("--cancel-only", action="store_true", help="only the Cancel latencies (no stall rows)")
    ap.add_argument("--add-only", action="store_true", help="only the add-map stall rows (no Cancel)")
    ap.add_argument("--preview-3d", action="store_true",
                    help="experiment: a multiscale map layer against a full-resolution one in 3D")
    ap.add_argument("--cancel-delays", type=float, nargs="+", default=[2.0, 8.0],
                    help="seconds into an Explain run at which Cancel is clicked")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds of event loop watched after each action")
    ap.add_argument("--memory", action="store_true", help="only the memory comparison")
    ap.add_argument("--memory-size", type=int, default=96, help="phantom edge for the memory comparison")
    ap.add_argument("--memory-worker", choices=("explain", "evaluate"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker, args.memory_size)
    elif args.memory:
        memory(args)
    else:
        gui(args)


if __name__ == "__main__":
    main()
