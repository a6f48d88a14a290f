"""Where one map insertion's event-loop time goes: our handlers against napari's, vispy's and Qt's (issue 19).

Run through ``bench_meeting_flow.py --profile-insert``. One prebuilt map layer (napari's ``Image``, built off
the GUI thread as the Explain tab does) is appended to the viewer and the event loop is run for ``--settle``
seconds (the first paint included), under :mod:`cProfile`: first with **no dock** (napari alone), then with
**the esegeta dock** open, as the Explain tab adds it (``_on_event``: insertion, hiding the other maps on the
next turn, the colour bar). Each function's own time is put in one bucket by the file it is in (a C function,
such as an OpenGL or Qt call, goes to the bucket of whoever called it, pro rata):

* ours: ``napari_esegeta`` (layer-list handlers: combo boxes, map lists, orientation letters, colour bar);
* napari Qt: ``napari/_qt`` (layer controls, layer list, dims sliders, the canvas widget);
* vispy / OpenGL: ``napari/_vispy`` and ``vispy`` (the visual, its texture upload, Mesa's paint under them);
* napari model: the rest of ``napari`` (layer model, events, slicing);
* other: psygnal, numpy, the Qt bindings' Python side and the rest;
* Qt's own C++: what ``processEvents`` spends outside Python (widget layout and paint, event dispatch).

The event-loop gap (longest interval between ticks of a 5 ms timer) is measured in the same windows, without
the profiler, interleaved: no dock, then dock, ``--repeats`` times.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time

from bench_meeting_flow import GapMeter, _add_scan, _pump

BUCKETS = ("ours (napari_esegeta)", "napari Qt (layer controls, layer list)", "vispy / OpenGL (visual, paint)",
           "napari model (layers, events, slicing)", "other (psygnal, numpy, Python's Qt bindings)",
           "Qt's own C++ (widget layout and paint, event dispatch)")


def _bucket(filename: str) -> int | None:
    f = filename.replace("\\", "/")
    if "napari_esegeta" in f:
        return 0
    if "/benchmarks/" in f or f.endswith("bench_meeting_flow.py") or f.endswith("meeting_flow_profile.py"):
        return None  # the benchmark's own pumping and sleeping: not the event loop's work
    if "napari/_qt" in f:
        return 1
    if "napari/_vispy" in f or "/vispy/" in f or "OpenGL" in f:
        return 2
    if "/napari/" in f:
        return 3
    if f == "~":
        return -1  # a C function: its callers' bucket
    return 4


def split(stats: pstats.Stats) -> list[float]:
    """Seconds of own time per bucket (C functions attributed to their callers' buckets)."""
    out = [0.0] * len(BUCKETS)
    for (filename, _, name), (_, _, tt, _, callers) in stats.stats.items():  # type: ignore[attr-defined]
        b = _bucket(filename)
        if b is None:
            continue
        if b >= 0:
            out[b] += tt
            continue
        if name in ("<built-in method time.sleep>",):
            continue
        share = [(_bucket(c[0]), ctt) for c, (_, _, ctt, _) in callers.items()]
        if "processEvents" in name:  # Qt's C++ under the event loop (Python callbacks inside it are counted apart)
            out[5] += tt
            continue
        share = [(cb, ctt) for cb, ctt in share if cb is not None]
        total = sum(ctt for _, ctt in share) or 0.0
        for cb, ctt in share:
            out[4 if cb == -1 else cb] += tt * (ctt / total if total else 1 / len(share))
    return out


def under_ours(stats: pstats.Stats) -> tuple[float, list[tuple[float, str]]]:
    """Seconds spent inside our functions, callees included (napari, vispy, Qt work they start): the sum of
    the cumulative time of our entry points (our functions not called by ours), less napari's insertion of the
    layer that the Explain tab's handler calls; and the largest entry points (insertion included)."""
    entries = []
    for (filename, line, name), (_, _, _, ct, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if _bucket(filename) == 0 and not any(_bucket(c[0]) == 0 for c in callers):
            entries.append((ct, f"{filename.split('napari_esegeta')[-1].lstrip('/')}:{line} {name}"))
    entries.sort(reverse=True)
    # napari's insertion itself, which our Explain handler calls (``add_prepared`` -> ``viewer.layers.append``)
    insertion = sum(v[3] for k, v in stats.stats.items() if _bucket(k[0]) == 0 and k[2] == "add_prepared")  # type: ignore[attr-defined]
    return sum(ct for ct, _ in entries) - insertion, entries[:4]


def profile_insert(app, viewer, args) -> None:
    """Gap and cProfile split of one map insertion, with no dock and with the esegeta dock."""
    import types

    import numpy as np
    from scipy.ndimage import gaussian_filter

    from napari_esegeta._geometry import copy_geometry
    from napari_esegeta._layers import image_layers, result_layer_data
    from napari_esegeta._run import PreparedMap

    shape = (197, 233, 189) if args.size == "big" else (64, 64, 64)
    image = _add_scan(viewer, shape)
    bright = np.asarray(image.data) > np.percentile(image.data, 97)
    rng = np.random.default_rng(0)
    meter = GapMeter()
    counter = [0]

    def prepared() -> PreparedMap:
        counter[0] += 1
        m = gaussian_filter(rng.standard_normal(shape).astype(np.float32), 4) * bright
        data, kw, _ = result_layer_data(m, method="saliency", method_label=f"saliency{counter[0]}",
                                        target_label="vessel",
                                        provenance={"class": 1, "target": "argmax", "input_layer": image.name},
                                        geometry=copy_geometry(image), nifti=image.metadata.get("nifti"))
        return PreparedMap(types.SimpleNamespace(evaluations=1), data, kw, image_layers(data, kw))

    dock_box: dict[str, object] = {}

    def add(with_dock: bool):
        p = prepared()
        if with_dock:
            ex = dock_box["dock"].show_tab("Explain")  # type: ignore[attr-defined]
            return p, lambda: ex._on_event(p)
        return p, lambda: viewer.layers.append(p.layers[0])

    gaps: dict[bool, list[float]] = {False: [], True: []}
    splits: dict[bool, list[list[float]]] = {False: [], True: []}
    walls: dict[bool, list[float]] = {False: [], True: []}
    tops: dict[bool, list[tuple[float, str]]] = {}
    _pump(app, 1.0)
    for with_dock in (False, True):
        if with_dock:
            _, dock_box["dock"] = viewer.window.add_plugin_dock_widget("napari-esegeta", "esegeta")
            dock_box["dock"].show_view("axial")  # type: ignore[attr-defined]
            _pump(app, 1.0)
        for _ in range(args.repeats):
            p, act = add(with_dock)  # the gap, no profiler
            gaps[with_dock].append(meter.measure(app, act, settle=args.settle))
            viewer.layers.remove(p.kwargs["name"])
            _pump(app, 0.5)
            p, act = add(with_dock)  # the split, under the profiler
            prof = cProfile.Profile()
            start = time.perf_counter()
            prof.enable()
            act()
            _pump(app, args.settle)
            prof.disable()
            walls[with_dock].append(time.perf_counter() - start)
            st = pstats.Stats(prof)
            splits[with_dock].append([*split(st), under_ours(st)[0]])
            tops[with_dock] = under_ours(st)[1]
            viewer.layers.remove(p.kwargs["name"])
            _pump(app, 0.5)
    size = "x".join(map(str, shape))
    for with_dock in (False, True):
        where = "with the esegeta dock" if with_dock else "no dock (napari alone)"
        med = [statistics.median(s[i] for s in splits[with_dock]) for i in range(len(BUCKETS) + 1)]
        med, inside = med[:-1], med[-1]
        parts = ", ".join(f"{name} {v * 1000:.0f} ms" for name, v in zip(BUCKETS, med))
        print(f"RESULT {size} one map insertion, {where}: longest event-loop gap median "
              f"{statistics.median(gaps[with_dock]) * 1000:.0f} ms (max {max(gaps[with_dock]) * 1000:.0f}) over "
              f"{len(gaps[with_dock])}; profiled work in {args.settle:g} s after it (median of {len(splits[with_dock])}): "
              f"total {sum(med) * 1000:.0f} ms = {parts}; inside our handlers, callees included, napari's insertion (layers.append) left out: {inside * 1000:.0f} ms"
              + ("" if not tops[with_dock] else " (largest: " + "; ".join(
                  f"{n} {t * 1000:.0f} ms" for t, n in tops[with_dock]) + ")"), flush=True)
