"""The one-patch probe's estimate against the run it estimates (issue 19, second pass).

For each size, in a fresh process (as ``esegeta run --dry-run`` or the plugin's first Run): the probe's
estimate, then the run itself (saliency on the bundled U-Net, whole volume or ``--patch``), timed from the
start of the explain call to its map. The probe's first call includes torch's warm-up (allocator,
kernel selection); the estimate now times a second call. Both figures come from the same process.

    .venv/bin/python benchmarks/bench_probe_estimate.py [--sizes 64 96] [--patch 48] [--full]

``--full`` adds the whole-brain size 197×233×189. Reports estimate / actual (1.0 is exact).
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
    warmup = est.warmup_seconds  # the first, untimed call: what the estimate scaled until 19.8
    start = time.perf_counter()
    ready = next(e for e in ex.iter_explain([vol], methods, threaded=False) if isinstance(e, MapReady))
    actual = time.perf_counter() - start
    print(json.dumps({"shape": shape, "patch": patch, "estimate_s": est.seconds, "patch_s": est.patch_seconds,
                      "probe_wall_s": probe_s, "first_call_s": warmup,
                      "estimate_first_call_s": None if est.seconds is None else est.seconds * warmup / est.patch_seconds,
                      "actual_s": actual, "evaluations": ready.evaluations,
                      "expected": est.expected_evaluations, "per_evaluation": est.patches_per_evaluation}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    ap.add_argument("--patch", type=int, default=None, help="sliding-window patch (default: whole volume)")
    ap.add_argument("--method", default="saliency")
    ap.add_argument("--full", action="store_true", help="also the 197x233x189 whole-brain size")
    ap.add_argument("--worker", nargs="+", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
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
        first = r["estimate_first_call_s"]
        print(f"RESULT {size} {mode}, {args.method}: actual {r['actual_s']:.1f} s; estimate from the second call "
              f"{r['estimate_s']:.1f} s (ratio {r['estimate_s'] / r['actual_s']:.2f}), from the first call as before "
              f"{first:.1f} s (ratio {first / r['actual_s']:.2f}) (probe took {r['probe_wall_s']:.1f} s; "
              f"{r['expected']} evaluation(s) x {r['per_evaluation']:.3g} patches, one patch {r['patch_s']:.2f} s, "
              f"first call {r['first_call_s']:.2f} s)", flush=True)


if __name__ == "__main__":
    main()
