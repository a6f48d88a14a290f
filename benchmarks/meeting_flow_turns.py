"""What fills the longest event-loop gap of one map insertion, bare napari against ours (issue 19).

Every Qt event dispatched on the GUI thread is timed (a ``QApplication.notify`` wrapper: the event type and
the receiver of each dispatch over 3 ms that starts inside the gap, nested ones with their depth), and so is
vispy's draw of each visible visual in the window. The two viewers are the floor benchmark's
(``meeting_flow_floor.py``: bare ``add_image`` without the dock, ours through the Explain tab), alternated,
in the axial view. This found the orientation letters' background boxes (eight extra visuals in every frame)::

    QT_API=pyqt6 PYTHONPATH=src:benchmarks xvfb-run -a -s "-screen 0 2800x800x24" \\
        .venv/bin/python benchmarks/meeting_flow_turns.py [--size big] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

DISPATCHES: list[tuple[float, float, int, str, str]] = []  # start, seconds, depth, event type, receiver
DRAWS: list[tuple[str, float]] = []  # visual class, seconds
_ON = [False]
_DEPTH = [0]


def _app():
    from qtpy.QtCore import QEvent
    from qtpy.QtWidgets import QApplication

    class TimedApp(QApplication):
        def notify(self, obj, ev):  # noqa: D102 (Qt's)
            if not _ON[0]:
                return super().notify(obj, ev)
            start = time.perf_counter()
            _DEPTH[0] += 1
            try:
                return super().notify(obj, ev)
            finally:
                _DEPTH[0] -= 1
                took = time.perf_counter() - start
                if took > 0.003:
                    kind = getattr(QEvent.Type(ev.type()), "name", str(ev.type()))
                    name = f"{type(obj).__name__} {obj.objectName() if hasattr(obj, 'objectName') else ''}"
                    DISPATCHES.append((start, took, _DEPTH[0], kind, name.strip()))

    return TimedApp(["meeting_flow_turns"])


def _time_visual_draws() -> None:
    from vispy.visuals import visual

    real = visual.Visual.draw

    def draw(self):
        if not (_ON[0] and self.visible):
            return real(self)
        start = time.perf_counter()
        out = real(self)
        DRAWS.append((type(self).__name__, time.perf_counter() - start))
        return out

    visual.Visual.draw = draw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("sample", "big"), default="sample")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    app = _app()  # before napari makes its own
    _time_visual_draws()
    import numpy as np
    from scipy.ndimage import gaussian_filter

    from bench_meeting_flow import BIG, GapMeter, _pump
    from meeting_flow_floor import _Window

    shape = BIG if args.size == "big" else (64, 64, 64)
    windows = {"bare napari": _Window(shape, 0, dock=False), "ours": _Window(shape, 1400, dock=True)}
    rng = np.random.default_rng(0)
    bright = np.asarray(windows["ours"].image.data) > np.percentile(windows["ours"].image.data, 97)
    for w in windows.values():  # the map already shown
        w.insert(w.prepared(gaussian_filter(rng.standard_normal(shape).astype(np.float32), 4) * bright))
    _pump(app, 2.0)
    meter = GapMeter()
    for r in range(args.repeats):
        for name, w in (list(windows.items()) if r % 2 == 0 else list(windows.items())[::-1]):
            p = w.prepared(gaussian_filter(rng.standard_normal(shape).astype(np.float32), 4) * bright)
            _pump(app, 0.3)
            DISPATCHES.clear()
            DRAWS.clear()
            _ON[0] = True
            start = time.perf_counter()
            w.insert(p)
            call = time.perf_counter() - start
            _pump(app, 2.0)
            _ON[0] = False
            ticks = [start, *(t for t in meter.ticks if t >= start), time.perf_counter()]
            gap, a, b = max((t1 - t0, t0, t1) for t0, t1 in zip(ticks, ticks[1:]))
            print(f"RESULT {name}, repeat {r}: longest gap {gap * 1000:.0f} ms from +{(a - start) * 1000:.0f} ms; "
                  f"the insertion call itself {call * 1000:.0f} ms", flush=True)
            for t, took, depth, kind, receiver in DISPATCHES:
                if a - 0.001 <= t < b:
                    print(f"    +{(t - start) * 1000:5.0f} ms {took * 1000:6.1f} ms depth {depth} {kind} -> {receiver}")
            drawn = ", ".join(f"{n} {s * 1000:.1f}" for n, s in DRAWS)
            print(f"    visuals drawn ({len(DRAWS)}, ms each): {drawn}", flush=True)
            w.viewer.layers.remove(p.kwargs["name"])
            for layer in w.viewer.layers:
                layer.visible = True
            _pump(app, 0.8)


if __name__ == "__main__":
    main()
