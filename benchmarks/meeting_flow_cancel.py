"""Cancel latency and Evaluate's memory for :mod:`bench_meeting_flow` (run that script; this holds its parts 2-3).

2. Cancel latency, the click to the worker's end: in the Explain tab ``--cancel-delays`` seconds into a
   saliency run (the probe, the prediction pass or the method's forward/backward, whole-volume execution)
   and, on the sample, in the Evaluate tab's randomisation. "before" switches off the checks inside one
   model evaluation (the engine until 19.8), in the same run.
3. Peak resident memory of evaluating a sliding-window map (infidelity + faithfulness, the one evaluation
   session) against explaining it (saliency), each in a fresh process on the same volume, model and
   execution (patch 32, overlap 0.25). Target: Evaluate <= 1.3x Explain.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from bench_meeting_flow import BIG, _pump, _wait


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
    if args.patch:  # sliding-window execution (the Model tab's field): Cancel is checked per patch batch too
        mw.patch_edit.setText(str(args.patch))
        mw._execution_changed()
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
            mode = f"patch {args.patch}" if args.patch else "whole volume"
            print(f"RESULT {size}, bundled U-Net, {mode}: {name}: max {max(ok) * 1000:.0f} ms, "
                  f"median {statistics.median(ok) * 1000:.0f} ms over {len(ok)} (target <= 1000 ms)")


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
        res = subprocess.run([sys.executable, str(__import__("pathlib").Path(__file__).with_name("bench_meeting_flow.py")), "--memory-worker", kind, "--memory-size", str(args.memory_size)],
                             capture_output=True, text=True, check=True)
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])
    ratio = out["evaluate"]["peak_mb"] / out["explain"]["peak_mb"]
    print(f"RESULT peak RSS on a {args.memory_size}^3 phantom, sliding window 32: explain {out['explain']['peak_mb']:.0f} MB "
          f"(+{out['explain']['growth_mb']:.0f}), evaluate {out['evaluate']['peak_mb']:.0f} MB "
          f"(+{out['evaluate']['growth_mb']:.0f}); ratio {ratio:.2f} (target <= 1.3)")
