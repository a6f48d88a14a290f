"""The one-patch probe's estimate against the run it estimates (issue 19, second pass).

For each size, in a fresh process (as ``esegeta run --dry-run`` or the plugin's first Run): the probe's
estimate, then the run itself (saliency on the bundled U-Net, whole volume or ``--patch``), timed from the
start of the explain call to its map (prediction pass included). Beside the estimate: the old one
(evaluations × the crop's time scaled in proportion to the voxels, no prediction pass), the probe's own
wall time, the estimated peak memory against the process's peak resident set after the run, and the
estimate and the run in CPU seconds (all torch threads), which a loaded machine skews least.

    .venv/bin/python benchmarks/bench_probe_estimate.py [--sizes 64 96] [--patch 48] [--full]

``--full`` adds the whole-brain size 197×233×189. Reports estimate / actual (1.0 is exact).
``--cold-warm`` instead times, in one process, the 64³ crop (warmed), then the 32³ crop on its first call
(cold, as the probe timed it until the seventh pass) and twice more (warm), wall and CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def worker(shape: tuple[int, ...], patch: int | None, method: str) -> None:
    import numpy as np

    from esegeta_engine import sample
    from esegeta_engine.config import ExecutionConfig, MethodConfig, PreprocessConfig, TargetConfig
    from esegeta_engine.explain import Explainer, MapReady
    from esegeta_engine.io import Volume
    from esegeta_engine.jobs import probe as P
    from esegeta_engine.models import load_model

    info = sample.sample_info()["models"]["unet3d_vessels"]
    net = load_model(sample.unet_paths()["state"], class_path=info["class_path"], kwargs=info["kwargs"])
    ph = sample.make_phantom(shape, seed=3)
    vol = Volume(ph.volume.astype(np.float32), ph.affine)
    execution = ExecutionConfig(patch_size=patch) if patch else None
    ex = Explainer(net, PreprocessConfig(normalisation="minmax"), TargetConfig(kind="argmax", classes=[1]),
                   execution=execution)
    methods = [MethodConfig(name=method)]
    t = time.perf_counter()
    est = P.probe_run(ex, vol, methods)
    probe_s = time.perf_counter() - t
    import resource

    start, cpu = time.perf_counter(), time.process_time()
    ready = next(e for e in ex.iter_explain([vol], methods, threaded=False) if isinstance(e, MapReady))
    actual, actual_cpu = time.perf_counter() - start, time.process_time() - cpu
    old = est.expected_evaluations * est.patches_per_evaluation * est.patch_seconds  # until the fourth pass
    line = est.evaluation_line
    print(json.dumps({"shape": shape, "patch": patch, "estimate_s": est.seconds, "old_estimate_s": old,
                      "prediction_s": est.prediction_seconds, "evaluation_s": est.evaluation_seconds,
                      "patch_s": est.patch_seconds, "forward_s": est.forward_seconds, "probe_wall_s": probe_s,
                      "network_calls": est.network_calls, "timed": est.timed, "divisible_by": est.divisible_by, "line": None if line is None else [line.fixed, line.per_voxel],
                      "actual_s": actual, "actual_cpu_s": actual_cpu, "estimate_cpu_s": est.cpu_seconds, "evaluations": ready.evaluations, "expected": est.expected_evaluations,
                      "per_evaluation": est.patches_per_evaluation, "peak_estimate_mb": est.peak_bytes / 2**20,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def cold_warm(repeats: int = 3) -> None:
    """The small crop's first call against its next ones, after the large crop, in one process."""
    import numpy as np

    from esegeta_engine import sample
    from esegeta_engine.config import PreprocessConfig, TargetConfig
    from esegeta_engine.explain import Explainer
    from esegeta_engine.io import Volume
    from esegeta_engine.jobs import probe as P
    from esegeta_engine.models import load_model

    info = sample.sample_info()["models"]["unet3d_vessels"]
    net = load_model(sample.unet_paths()["state"], class_path=info["class_path"], kwargs=info["kwargs"])
    ph = sample.make_phantom((96, 96, 96), seed=3)
    ex = Explainer(net, PreprocessConfig(normalisation="minmax"), TargetConfig(kind="argmax", classes=[1]))
    x = ex.prepare_input(Volume(ph.volume.astype(np.float32), ph.affine))

    def run(edge: int, warm: bool) -> str:
        t = P._calls(ex.model, P._crop(x, (edge,) * 3), output=ex.output, divisible_by=4, precision="fp32",
                     cancel=None, warm=warm, forward=False)
        return f"{t.backward:.3f} s wall, {t.cpu[0]:.3f} s CPU"

    print(f"RESULT 64^3 crop, warmed: {run(64, True)}")
    print(f"RESULT 32^3 crop, first call (cold): {run(32, False)}")
    for i in range(repeats - 1):
        print(f"RESULT 32^3 crop, call {i + 2} (warm): {run(32, False)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    ap.add_argument("--patch", type=int, default=None, help="sliding-window patch (default: whole volume)")
    ap.add_argument("--method", default="saliency")
    ap.add_argument("--full", action="store_true", help="also the 197x233x189 whole-brain size")
    ap.add_argument("--cold-warm", action="store_true", help="the small crop's first call against its next ones")
    ap.add_argument("--worker", nargs="+", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cold_warm:
        cold_warm()
        return
    if args.worker:
        worker(tuple(args.worker), args.patch, args.method)
        return
    shapes = [(s,) * 3 for s in args.sizes] + ([(197, 233, 189)] if args.full else [])
    for shape in shapes:
        cmd = [sys.executable, __file__, "--method", args.method, "--worker", *map(str, shape)]
        if args.patch:
            cmd += ["--patch", str(args.patch)]
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        size = "x".join(map(str, shape))
        mode = f"patch {args.patch}" if args.patch else "whole volume"
        fit = "" if r["line"] is None else f"; line {r['line'][0]:.2f} s + {r['line'][1] * 1e6:.2f} s/Mvoxel"
        print(f"RESULT {size} {mode}, {args.method}: actual {r['actual_s']:.1f} s; estimate {r['estimate_s']:.1f} s "
              f"(ratio {r['estimate_s'] / r['actual_s']:.2f}: prediction {r['prediction_s']:.1f} s + {r['expected']} x "
              f"{r['evaluation_s']:.1f} s), old estimate {r['old_estimate_s']:.1f} s (ratio "
              f"{r['old_estimate_s'] / r['actual_s']:.2f}); probe {r['probe_wall_s']:.1f} s, {r['network_calls']} network "
              f"calls (sizes {' and '.join('x'.join(map(str, t)) for t in r['timed'])}, each after a warm-up, padded to a "
              f"multiple of {r['divisible_by']}; crop {r['patch_s']:.2f} s forward+backward, {r['forward_s']:.2f} s forward{fit}); peak memory "
              f"estimate {r['peak_estimate_mb']:.0f} MB vs {r['peak_rss_mb']:.0f} MB measured; CPU time: actual "
              f"{r['actual_cpu_s']:.1f} s, estimate {r['estimate_cpu_s']:.1f} s (ratio "
              f"{r['estimate_cpu_s'] / r['actual_cpu_s']:.2f})", flush=True)


if __name__ == "__main__":
    main()
