"""Sliding-window execution: speed and memory as ratios against references in the same run.

Measures, with MONAI's BasicUNet (random weights; timing only):

1. saliency through the patch-wise gradient vs the physical minimum, a forward and a backward of every
   patch (each patch with its own graph, nothing stitched) — target ratio <= 1.6; and the peak RSS of
   each (``resource.getrusage`` of a child process per measurement; ``/usr/bin/time -v`` agrees);
2. occlusion (window/stride 16): patch evaluations with patch reuse vs over the full sliding-window
   function (counted exactly for the full volume, no model needed) — target >= 12x fewer; and the time
   ratio measured on a crop with a small network, same output;
3. an ROI target of a 32^3 box: patches it overlaps out of all patches (target <= 8 of 72).

Default: a reduced scale that finishes in minutes on 2 CPU cores. ``--full`` uses the issue's
448x448x128 volume, BasicUNet at its default features, patch 96^3, overlap 0.25 (about an hour on 2 cores).

    python benchmarks/bench_sliding_window.py [--full]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def _net(features):
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    return BasicUNet(3, 1, 2, features=tuple(features)).eval()


def _child(mode: str, shape, patch, features, overlap: float) -> dict:
    """One measurement in this process (called in a child): time and peak RSS."""
    from esegeta_engine.config import ExecutionConfig, TargetConfig
    from esegeta_engine.forward.sliding import SlidingWindow, WindowSettings
    from esegeta_engine.explain import Explainer
    from esegeta_engine.methods import MethodContext, attribute, get_method
    from esegeta_engine.forward.scoring import EvaluationMonitor
    from esegeta_engine.targets import ArgmaxRegionTarget

    net = _net(features)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 1, *shape)).astype(np.float32))
    for p in net.parameters():
        p.requires_grad_(False)
    start = time.perf_counter()
    if mode == "minimum":  # forward + backward of every patch, nothing else
        sw = SlidingWindow(net, WindowSettings(tuple(patch), overlap))
        grid = sw.grid(shape, x.device)
        xp = grid.pad_input(x)
        for sl in grid.slices:
            patch_in = xp[(slice(None), slice(None), *sl)].clone().requires_grad_(True)
            y = net(patch_in)
            (g,) = torch.autograd.grad(y, patch_in, torch.ones_like(y))
        n = len(grid)
    else:
        expl = Explainer(net, target=TargetConfig(classes=[1]),
                         execution=ExecutionConfig(patch_size=list(patch), overlap=overlap))
        target = ArgmaxRegionTarget()
        target.prepare(expl.raw_output(x))
        start = time.perf_counter()  # the prediction is shared by every method: not part of saliency
        monitor = EvaluationMonitor()
        sm = expl.make_score_model(target, x, monitor)
        spec = get_method(mode)
        params = spec.resolve_params({"n_steps": 8} if mode == "integrated_gradients" else {})
        attribute(spec, MethodContext(sm, x, 1, extra={"patchwise": True}), params)
        n = monitor.patches
    seconds = time.perf_counter() - start
    return {"mode": mode, "seconds": seconds, "patches": n,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _run_child(mode, shape, patch, features, overlap) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps([mode, shape, patch, features, overlap])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def occlusion_counts(shape, patch, overlap, window) -> tuple[int, int]:
    """Exact patch evaluations of occlusion with reuse vs over the full sliding-window function."""
    from esegeta_engine.forward.sliding import WindowGrid, WindowSettings

    grid = WindowGrid(shape, WindowSettings(tuple(patch), overlap), torch.device("cpu"))
    starts = [np.arange(0, s - window + 1, window) for s in shape]
    per_axis = []  # for each axis and window start, the patch intervals it meets
    for ax, st in enumerate(starts):
        lo = st + grid.offset[ax]
        per_axis.append(lo)
    reuse = len(grid)  # the unperturbed patch outputs, once
    for sl in grid.slices:
        hits = 1
        for ax, lo in enumerate(per_axis):
            hits *= int(((lo < sl[ax].stop) & (lo + window > sl[ax].start)).sum())
        reuse += hits
    n_windows = int(np.prod([len(s) for s in starts]))
    full = len(grid) * (n_windows + 1)  # the initial unperturbed evaluation plus one per window
    return reuse, full


def occlusion_timing(shape=(64, 64, 48), patch=(32, 32, 32), window=16) -> dict:
    """Occlusion with patch reuse vs the same occlusion over the full sliding-window function."""
    from esegeta_engine.config import ExecutionConfig, TargetConfig
    from esegeta_engine.explain import Explainer
    from esegeta_engine.methods import MethodContext, attribute, get_method
    from esegeta_engine.forward.scoring import EvaluationMonitor
    from esegeta_engine.targets import ArgmaxRegionTarget

    net = _net((4, 4, 8, 8, 16, 4))
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 1, *shape)).astype(np.float32))
    expl = Explainer(net, target=TargetConfig(classes=[1]),
                     execution=ExecutionConfig(patch_size=list(patch), overlap=0.25, sw_batch_size=4))
    target = ArgmaxRegionTarget()
    target.prepare(expl.raw_output(x))
    spec = get_method("occlusion")
    params = spec.resolve_params({"window": window, "perturbations_per_eval": 4})
    res = {}
    for reuse in (True, False):
        monitor = EvaluationMonitor()
        sm = expl.make_score_model(target, x, monitor)
        if reuse:
            sm.runner.set_base(x)
        start = time.perf_counter()
        res[reuse] = (attribute(spec, MethodContext(sm, x, 1), params), time.perf_counter() - start,
                      monitor.patches)
    a, b = res[True][0], res[False][0]
    return {"shape": shape, "patch": patch, "window": window,
            "reuse_s": res[True][1], "full_s": res[False][1], "speedup": res[False][1] / res[True][1],
            "reuse_patches": res[True][2], "full_patches": res[False][2],
            "max_rel_diff": float((a - b).abs().max() / b.abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="the issue's scale (about an hour on 2 cores)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(*json.loads(args.child))))
        return
    if args.full:
        shape, patch, features = [448, 448, 128], [96, 96, 96], [32, 32, 64, 128, 256, 32]
    else:
        shape, patch, features = [160, 160, 64], [64, 64, 64], [8, 8, 16, 32, 64, 8]
    overlap = 0.25
    print(f"volume {shape}, patch {patch}, BasicUNet features {features}, overlap {overlap}")
    minimum = _run_child("minimum", shape, patch, features, overlap)
    sal = _run_child("saliency", shape, patch, features, overlap)
    print(f"saliency (patch-wise): {sal['seconds']:.1f} s, peak RSS {sal['peak_rss_mb']:.0f} MB, "
          f"{sal['patches']} patch evaluations")
    print(f"minimum (fwd+bwd of every patch): {minimum['seconds']:.1f} s, peak RSS {minimum['peak_rss_mb']:.0f} MB")
    print(f"ratio saliency / minimum: {sal['seconds'] / minimum['seconds']:.2f} (target <= 1.6)")
    if args.full:
        ig = _run_child("integrated_gradients", shape, patch, features, overlap)
        print(f"IG (8 steps): {ig['seconds']:.1f} s, peak RSS {ig['peak_rss_mb']:.0f} MB")
    for size, p in ((tuple(shape), tuple(patch)), ((448, 448, 128), (96, 96, 96))):
        reuse, full = occlusion_counts(size, p, overlap, 16)
        print(f"occlusion 16^3 stride 16 on {list(size)}, patch {list(p)}: {reuse} patch evaluations with reuse "
              f"vs {full} over the full function: {full / reuse:.1f}x fewer (target >= 12)")
    t = occlusion_timing()
    print(f"occlusion timing on a {t['shape']} crop: reuse {t['reuse_s']:.1f} s vs full {t['full_s']:.1f} s "
          f"= {t['speedup']:.1f}x faster; patches {t['reuse_patches']} vs {t['full_patches']}; "
          f"max rel. difference {t['max_rel_diff']:.1e}")
    from esegeta_engine.forward.sliding import WindowGrid, WindowSettings

    big = WindowGrid((448, 448, 128), WindowSettings((96, 96, 96), 0.25), torch.device("cpu"))
    roi = torch.zeros((448, 448, 128), dtype=torch.bool)
    roi[200:232, 200:232, 48:80] = True
    print(f"ROI 32^3 box on 448x448x128, patch 96^3: {len(big.patches_overlapping(roi))} of {len(big)} "
          "patches evaluated (target <= 8)")


if __name__ == "__main__":
    main()
