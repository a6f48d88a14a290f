"""Time ratios of the patch-wise methods against the forward + backward of the same patches, in one process.

Issue 20: Grad-CAM, DeepLIFT and LRP each <= 1.6x the forward + backward of every patch (DeepLIFT: of the
input's and the baseline's patches), on the 448x448x128 grid (MONAI BasicUNet at its default features,
patch 96^3, overlap 0.25). Every patch costs the same, so only the first K patches of the grid run
(``--max-patches``, as ``bench_patchwise_methods.py --full-grid``), with every whole-scan buffer at full
size. Unlike that benchmark (one child process per measurement, for peak RSS), everything here runs in one
single-threaded process, set up once (the volume, the network, the prediction every method starts from),
and each repeat times the references and the methods one after another, so load changes hit both
sides; CPU seconds (``time.process_time``), medians over the repeats.

    python benchmarks/bench_patchwise_ratios.py --full-grid --max-patches 2 --repeat 2
    python benchmarks/bench_patchwise_ratios.py            # reduced scale, a minute
"""

from __future__ import annotations

import argparse
import gc
import time
from statistics import median

import numpy as np
import torch

from bench_patchwise_methods import FLOORS, LAYER, _first_patches, _net


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full-grid", action="store_true", help="448x448x128, default BasicUNet, patch 96^3")
    ap.add_argument("--max-patches", type=int, default=2, help="patches of the grid that run (each costs the same)")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of references and methods (medians)")
    ap.add_argument("--methods", default="layer_gradcam,deeplift,lrp,lrp:epsilon")
    args = ap.parse_args()
    from esegeta_engine.config import ExecutionConfig, TargetConfig
    from esegeta_engine.explain import Explainer
    from esegeta_engine.forward.scoring import EvaluationMonitor
    from esegeta_engine.forward.sliding import SlidingWindow, WindowSettings
    from esegeta_engine.methods import MethodContext, attribute, get_method
    from esegeta_engine.models import get_layer
    from esegeta_engine.targets import ArgmaxRegionTarget

    if args.full_grid:
        shape, patch, features = [448, 448, 128], [96, 96, 96], [32, 32, 64, 128, 256, 32]
    else:
        shape, patch, features = [112, 112, 48], [48, 48, 48], [8, 8, 16, 32, 64, 8]
    k, overlap = args.max_patches, 0.25
    torch.set_num_threads(1)
    _first_patches(k)
    net = _net(features)
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 1, *shape)).astype(np.float32))
    grid = SlidingWindow(net, WindowSettings(tuple(patch), overlap)).grid(shape, x.device)
    expl = Explainer(net, target=TargetConfig(classes=[1]),
                     execution=ExecutionConfig(patch_size=list(patch), overlap=overlap))
    target = ArgmaxRegionTarget()
    target.prepare(expl.raw_output(x))  # the prediction every method starts from (not timed)
    print(f"volume {shape}, patch {patch}, BasicUNet features {features}, overlap {overlap}: the first {k} of "
          f"{len(grid)} patches run; 1 thread, one process, {args.repeat} rounds; CPU seconds")

    def minimum(inp: torch.Tensor) -> int:
        xp = grid.pad_input(inp)
        for sl in grid.slices[:k]:
            patch_in = xp[(slice(None), slice(None), *sl)].clone().requires_grad_(True)
            y = net(patch_in)
            torch.autograd.grad(y, patch_in, torch.ones_like(y))
        return k

    def method(mode: str) -> int:
        monitor = EvaluationMonitor()
        sm = expl.make_score_model(target, x, monitor)
        name, _, composite = mode.partition(":")
        spec = get_method(name)
        layer = get_layer(net, LAYER) if spec.needs_layer else None
        ctx = MethodContext(sm, x, 1, layer=layer, layer_name=LAYER if layer is not None else None,
                            extra={"patchwise": True})
        attribute(spec, ctx, spec.resolve_params({"composite": composite} if composite else {}))
        return monitor.patches

    def timed(fn, *a) -> tuple[float, int]:
        gc.collect()
        cpu = time.process_time()
        n = fn(*a)
        return time.process_time() - cpu, n

    warm = x[(slice(None), slice(None), *grid.slices[0])].clone().requires_grad_(True)  # the convolution
    torch.autograd.grad(net(warm).sum(), warm)  # library's first call at these shapes: not timed
    methods = args.methods.split(",")
    runs: dict[str, list[float]] = {m: [] for m in ["minimum", "minimum baseline", *methods]}
    patches: dict[str, int] = {}
    for r in range(args.repeat):
        for mode in ["minimum", *methods[:2], "minimum baseline", *methods[2:]]:
            fn, arg = {"minimum": (minimum, x), "minimum baseline": (minimum, torch.zeros_like(x))}.get(
                mode, (method, mode))
            seconds, patches[mode] = timed(fn, arg)
            runs[mode].append(seconds)
            print(f"round {r + 1}: {mode}: {seconds:.1f} s CPU, {patches[mode]} patch evaluations", flush=True)
    ref = median(runs["minimum"])
    ref2 = median(a + b for a, b in zip(runs["minimum"], runs["minimum baseline"]))
    print(f"minimum (fwd+bwd of {k} patches): median {ref:.1f} s CPU; of input and baseline: {ref2:.1f} s")
    for mode in methods:
        paired = mode.startswith("deeplift")
        base = ref2 if paired else ref
        per_round = [m / (a + b if paired else a)
                     for m, a, b in zip(runs[mode], runs["minimum"], runs["minimum baseline"])]
        print(f"{mode}: median {median(runs[mode]):.1f} s CPU, {patches[mode]} patch evaluations; ratio vs the "
              f"fwd+bwd of the same patches{' (input and baseline)' if paired else ''}: {median(runs[mode]) / base:.2f}"
              f" (per round: {', '.join(f'{v:.2f}' for v in per_round)}; target <= 1.6)")
        if mode in FLOORS:
            print(f"  floor: {FLOORS[mode]}")


if __name__ == "__main__":
    main()
