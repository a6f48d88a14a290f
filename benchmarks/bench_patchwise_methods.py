"""Patch-wise Grad-CAM, DeepLIFT and LRP: time and peak memory as ratios against the physical minimum.

The minimum is a forward and a backward of every patch (each patch with its own graph, nothing
stitched); for DeepLIFT, of every patch of the input and of the baseline. Each measurement runs in
its own child process (peak RSS from ``resource.getrusage``, as ``/usr/bin/time -v`` reports it).
Targets (issue 20): ratio <= 1.6, peak RSS <= 4 GB at the issue's scale.

Default: a reduced scale that finishes in minutes on 2 shared CPU cores. ``--full`` uses the issue's
448x448x128 volume, MONAI BasicUNet at its default features, patch 96^3, overlap 0.25 (hours on 2 cores).

``--full-grid [--max-patches K]`` gives the issue's peak memory in minutes: the 448x448x128 volume, its
72-patch grid and every whole-volume buffer at full size, with only the first K patches (default 2)
run through the network on both sides; each child also reports where its peak RSS was reached.

    python benchmarks/bench_patchwise_methods.py [--full]
    python benchmarks/bench_patchwise_methods.py --full-grid --shared-reference --no-occlusion \
        --methods saliency,layer_gradcam,deeplift,lrp
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from statistics import median

import numpy as np
import torch

LAYER = "upcat_2"
# counted multiply-adds of the convolutions per patch against the minimum's (a dispatch-mode counter on one
# 32^3 patch of this network; docs/execution.md, "LRP's default composite: where 2x comes from")
FLOORS = {"lrp": "epsilon_plus (the default) does 2.013x the minimum's convolution multiply-adds (z+ on "
                 "LeakyReLU's signed inputs: one more convolution and two transposed ones per layer), so its "
                 "ratio cannot go below ~2.0 without changing the map; LRP-epsilon does 1.000x (see lrp:epsilon)",
          "lrp:epsilon": "1.000x the minimum's convolution multiply-adds (the default epsilon_plus: 2.013x)"}
PARAMS = {"layer_integrated_gradients": {"n_steps": 8},  # its reference: n_steps x the minimum
          "deeplift_shap": {"n_baselines": 2}}


def _net(features):
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    return BasicUNet(3, 1, 2, features=tuple(features)).eval()


def _first_patches(k: int | None) -> None:
    """``--max-patches K``: only the first K patches of the grid run through the network.

    Every whole-volume buffer (input, stitched outputs, count map, upstream and gradient buffers,
    the baseline's stitched output) is allocated at the full volume's size exactly as in a real
    run; only :meth:`SlidingWindow.active_patches` (the one place that says which patches run)
    is cut to its first K. Each patch costs the same time and transient memory, so the peak RSS
    is the full run's; the time covers K patches."""
    if not k:
        return
    from esegeta_engine.forward.sliding import SlidingWindow

    every = SlidingWindow.active_patches
    SlidingWindow.active_patches = lambda self, grid: every(self, grid)[:k]  # type: ignore[method-assign]


class _PeakWhere:
    """Samples RSS every 2 ms in a thread; keeps the main thread's engine frames at the highest sample."""

    def __init__(self) -> None:
        import threading

        self.peak, self.where, self.main = 0, "", threading.main_thread().ident
        self.stop = threading.Event()
        self.page = resource.getpagesize()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import traceback

        with open("/proc/self/statm") as f:
            while not self.stop.wait(0.002):
                f.seek(0)
                rss = int(f.read().split()[1]) * self.page
                if rss > self.peak:
                    frame = sys._current_frames().get(self.main)
                    stack = traceback.extract_stack(frame) if frame is not None else []
                    self.peak = rss
                    self.where = " <- ".join(f"{fr.name}:{fr.lineno}" for fr in reversed(stack)
                                             if "esegeta_engine" in fr.filename or "bench_" in fr.filename)

    def close(self) -> dict:
        self.stop.set()
        self.thread.join()
        return {"sampled_peak_mb": self.peak / 2**20, "peak_at": self.where}


def _child(mode: str, shape, patch, features, overlap: float, max_patches: int | None = None) -> dict:
    from esegeta_engine.config import ExecutionConfig, TargetConfig
    from esegeta_engine.forward.sliding import SlidingWindow, WindowSettings
    from esegeta_engine.explain import Explainer
    from esegeta_engine.methods import MethodContext, attribute, get_method
    from esegeta_engine.models import get_layer
    from esegeta_engine.forward.scoring import EvaluationMonitor
    from esegeta_engine.targets import ArgmaxRegionTarget

    torch.set_num_threads(1)
    _first_patches(max_patches)
    where = _PeakWhere() if max_patches else None
    net = _net(features)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 1, *shape)).astype(np.float32))
    for p in net.parameters():
        p.requires_grad_(False)
    start, cpu = time.perf_counter(), time.process_time()
    if mode == "onepatch":  # one fwd+bwd of a patch-sized input
        xi = x[(slice(None), slice(None), *(slice(0, p) for p in patch))].clone().requires_grad_(True)
        y = net(xi)
        torch.autograd.grad(y, xi, torch.ones_like(y))
        n = 1
    elif mode.startswith("minimum"):
        copies = 2 if mode == "minimum2" else 1  # DeepLIFT's reference: input and baseline
        sw = SlidingWindow(net, WindowSettings(tuple(patch), overlap))
        grid = sw.grid(shape, x.device)
        n = 0
        for xi in [x, torch.zeros_like(x)][:copies]:
            xp = grid.pad_input(xi)
            for sl in grid.slices[:max_patches or None]:
                patch_in = xp[(slice(None), slice(None), *sl)].clone().requires_grad_(True)
                y = net(patch_in)
                torch.autograd.grad(y, patch_in, torch.ones_like(y))
                n += 1
    else:
        expl = Explainer(net, target=TargetConfig(classes=[1]),
                         execution=ExecutionConfig(patch_size=list(patch), overlap=overlap))
        target = ArgmaxRegionTarget()
        target.prepare(expl.raw_output(x))
        start, cpu = time.perf_counter(), time.process_time()  # the prediction is shared by every method
        monitor = EvaluationMonitor()
        sm = expl.make_score_model(target, x, monitor)
        name, _, composite = mode.partition(":")  # "lrp:epsilon": LRP with that composite
        spec = get_method(name)
        layer = get_layer(net, LAYER) if spec.needs_layer else None
        ctx = MethodContext(sm, x, 1, layer=layer, layer_name=LAYER if layer is not None else None,
                            extra={"patchwise": True})
        params = {"composite": composite} if composite else {}
        attribute(spec, ctx, spec.resolve_params({**params, **PARAMS.get(mode, {})}))
        n = monitor.patches
    return {"mode": mode, "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "patches": n, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **(where.close() if where is not None else {})}


def occlusion_roi(shape, patch, roi_edge: int, window: int, features, net=None) -> dict:
    """Occlusion for an ROI box under three bounds: none, the patches the ROI reads (before issue 20
    part 4) and the receptive field (linearised probe). ``patch`` None: whole-volume execution."""
    import esegeta_engine.methods.perturbation as perturbation
    import esegeta_engine.methods.reach as reach
    from esegeta_engine.config import ExecutionConfig, TargetConfig
    from esegeta_engine.explain import Explainer
    from esegeta_engine.forward.receptive import ReceptiveFieldUnknown
    from esegeta_engine.forward.scoring import EvaluationMonitor
    from esegeta_engine.methods import MethodContext, attribute, get_method
    from esegeta_engine.targets import RegionOfInterestTarget

    torch.set_num_threads(1)
    net = net if net is not None else _net(features)
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 1, *shape)).astype(np.float32))
    roi = torch.zeros(shape, dtype=torch.bool)
    lo = [s // 2 - roi_edge // 2 for s in shape]
    roi[tuple(slice(a, a + roi_edge) for a in lo)] = True
    target = RegionOfInterestTarget(roi.float())
    execution = None if patch is None else ExecutionConfig(patch_size=list(patch), overlap=0.25)
    expl = Explainer(net, target=TargetConfig(classes=[1]), execution=execution)
    spec = get_method("occlusion")
    params = spec.resolve_params({"window": window, "perturbations_per_eval": 1})
    original, probe = perturbation.reach_filter, reach.dependency

    def unknown(*a, **k):
        raise ReceptiveFieldUnknown("switched off")

    res = {}
    for bound in ("receptive", "patches", "none"):
        if bound == "patches" and patch is None:
            continue
        perturbation.reach_filter = original if bound != "none" else (lambda *a: None)
        reach.dependency = probe if bound == "receptive" else unknown
        try:
            monitor = EvaluationMonitor()
            sm = expl.make_score_model(target, x, monitor, support=roi)
            if patch is not None:
                sm.runner.set_base(x)
            ctx = MethodContext(sm, x, 1, extra={"patchwise": patch is not None})
            start = time.perf_counter()
            out = attribute(spec, ctx, params)
            res[bound] = {"map": out, "seconds": time.perf_counter() - start, "evaluations": monitor.count,
                          "patches": monitor.patches, "record": ctx.extra.get("receptive_field", {})}
        finally:
            perturbation.reach_filter, reach.dependency = original, probe
    ref = res["none"]["map"]
    for r in res.values():
        r["identical"] = bool(torch.equal(r.pop("map"), ref))
    return res


def _print_occlusion(title: str, res: dict) -> None:
    print(title)
    base = res.get("patches", res["none"])
    for bound, r in res.items():
        rec = r["record"]
        print(f"  bound {bound:10s}: {r['seconds']:7.1f} s, {r['evaluations']} evaluations, {r['patches']} patch "
              f"evaluations, {rec.get('skipped', 0)} of {rec.get('copies', '-')} windows skipped, reach "
              f"{rec.get('reach_voxels', '-')} voxels; time ratio vs '{'patches' if 'patches' in res else 'none'}' "
              f"{r['seconds'] / base['seconds']:.2f}; identical map: {r['identical']}")


def _run_child(*args) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(list(args))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="the issue's scale (hours on 2 cores)")
    ap.add_argument("--intermediate", action="store_true",
                    help="192x192x96, BasicUNet at its default features, patch 96^3 (9 patches: the issue's "
                         "patch and network on a smaller volume)")
    ap.add_argument("--one-patch", action="store_true",
                    help="96^3, BasicUNet at its default features, patch 96^3: one patch of the issue's size "
                         "(peak memory per method at the issue's patch)")
    ap.add_argument("--two-patch", action="store_true",
                    help="96x96x168, default BasicUNet, patch 96^3: two patches, the patch-wise path at the "
                         "issue's patch (peak memory)")
    ap.add_argument("--two-patch-64", action="store_true",
                    help="64x64x112, default BasicUNet, patch 64^3: two patches at (2/3)^3 of the issue's patch "
                         "volume (below 2 GB: runs beside other work); peak RSS scales with the patch's voxels")
    ap.add_argument("--full-grid", action="store_true",
                    help="the issue's 448x448x128 volume, its full 72-patch grid and every whole-volume buffer "
                         "at full size, but only the first --max-patches patches run through the network "
                         "(honest peak memory in minutes: every patch costs the same)")
    ap.add_argument("--max-patches", type=int, default=None,
                    help="only the first K patches of the grid run through the network (--full-grid: default 2)")
    ap.add_argument("--shared-reference", action="store_true",
                    help="time every method against the one minimum measured first (fewer child processes; "
                         "for peak-memory runs, not for ratios on a loaded machine)")
    ap.add_argument("--no-reference", action="store_true",
                    help="measure the methods only, no minimum (peak-memory runs; no ratios)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=1, help="interleaved reference/method runs (medians)")
    ap.add_argument("--estimate", action="store_true",
                    help="time one 96^3 patch and extrapolate --intermediate and --full from the ratios")
    ap.add_argument("--occlusion-only", action="store_true", help="only the ROI occlusion measurement")
    ap.add_argument("--instance-norm", action="store_true",
                    help="only: ROI occlusion on BasicUNet (instance norm) where the ROI reads 1 of 25 patches")
    ap.add_argument("--no-occlusion", action="store_true", help="skip the ROI occlusion measurement")
    ap.add_argument("--roi-32", action="store_true", help="reduced-scale occlusion with the issue's 32^3 ROI box "
                    "(window 16) on 96x96x64: sliding window at patch 48^3, and the whole-volume batch-norm UNet")
    ap.add_argument("--methods", help="comma-separated subset of: layer_gradcam, deeplift, lrp (its default "
                                      "composite, epsilon_plus), lrp:epsilon, excitation_backprop, fullgrad, "
                                      "guided_gradcam, deeplift_shap (2 baselines; its reference: input and "
                                      "baseline, once per baseline)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(*json.loads(args.child))))
        return
    max_patches = args.max_patches
    if args.full_grid:
        shape, patch, features = [448, 448, 128], [96, 96, 96], [32, 32, 64, 128, 256, 32]
        max_patches = max_patches or 2
    elif args.full:
        shape, patch, features = [448, 448, 128], [96, 96, 96], [32, 32, 64, 128, 256, 32]
    elif args.two_patch:
        shape, patch, features = [96, 96, 168], [96, 96, 96], [32, 32, 64, 128, 256, 32]
    elif args.two_patch_64:
        shape, patch, features = [64, 64, 112], [64, 64, 64], [32, 32, 64, 128, 256, 32]
    elif args.one_patch:
        shape, patch, features = [96, 96, 96], [96, 96, 96], [32, 32, 64, 128, 256, 32]
    elif args.intermediate:
        shape, patch, features = [192, 192, 96], [96, 96, 96], [32, 32, 64, 128, 256, 32]
    else:
        shape, patch, features = [112, 112, 48], [48, 48, 48], [8, 8, 16, 32, 64, 8]
    overlap = 0.25
    if args.instance_norm:  # the norms spread each patch's voxels over the patch: only whole patches skip
        _print_occlusion("occlusion (window 8) for an 8^3 ROI at the centre of [128, 128, 32], patch [32, 32, 32], "
                         "BasicUNet (4, 4, 8, 8, 16, 4) (instance norm):",
                         occlusion_roi([128, 128, 32], [32, 32, 32], 8, 8, [4, 4, 8, 8, 16, 4]))
        return
    print(f"volume {shape}, patch {patch}, BasicUNet features {features}, overlap {overlap}, 1 thread")
    if max_patches:
        print(f"--max-patches: only the first {max_patches} of the grid's {_patches(shape, patch, overlap)} "
              "patches run "
              "through the network (the reference too); every whole-volume buffer is allocated at full size as in "
              "a real run. Every patch costs the same, so peak RSS is the full run's; times and ratios cover "
              f"{max_patches} patches (the per-patch ratio).")
    minimum = minimum2 = {"seconds": 0.0, "peak_rss_mb": 0.0}
    paired = False
    if not args.occlusion_only and not args.no_reference:
        minimum = _run_child("minimum", shape, patch, features, overlap, max_patches)
        paired = not args.methods or any(m in ("deeplift", "deeplift_shap") for m in args.methods.split(","))
        # only if used
        minimum2 = _run_child("minimum2", shape, patch, features, overlap, max_patches) if paired else minimum
        print(f"minimum (fwd+bwd of every patch): {minimum['seconds']:.1f} s, peak RSS "
              f"{minimum['peak_rss_mb']:.0f} MB; of input and baseline: "
              + (f"{minimum2['seconds']:.1f} s" if paired else "not measured (no DeepLIFT method)"))
    if not args.no_occlusion:
        if args.full:
            occ_args = (shape, patch, 32, 16, features)
        elif args.roi_32:
            occ_args = ([96, 96, 64], [48, 48, 48], 32, 16, [4, 4, 8, 8, 16, 4])
        else:  # a smaller volume: today's ROI occlusion walks every window
            occ_args = ([64, 64, 32], [32, 32, 32], 8, 8, [4, 4, 8, 8, 16, 4])
        _print_occlusion(f"occlusion (window {occ_args[3]}) for a {occ_args[2]}^3 ROI on {occ_args[0]}, patch "
                         f"{occ_args[1]}, BasicUNet {occ_args[4]} (instance norm):", occlusion_roi(*occ_args))
        from monai.networks.nets import UNet

        torch.manual_seed(0)  # a network whose receptive field is smaller than the volume: batch norm, 2 levels
        unet = UNet(3, 1, 2, (8, 16, 32), (2, 2), num_res_units=1, norm="batch").eval()
        demo = ([64, 64, 32], None, 8, 8, None) if not args.full else ([448, 448, 128], None, 32, 16, None)
        demo = ([96, 96, 64], None, 32, 16, None) if args.roi_32 else demo
        _print_occlusion(f"occlusion (window {demo[3]}) for a {demo[2]}^3 ROI on {demo[0]}, whole volume, MONAI "
                         "UNet (8, 16, 32), batch norm:", occlusion_roi(*demo, net=unet))
    if args.occlusion_only:
        return
    runs = (("saliency", "minimum"), ("layer_gradcam", "minimum"), ("deeplift", "minimum2"), ("lrp", "minimum"),
            ("lrp:epsilon", "minimum"),
            ("excitation_backprop", "minimum"), ("layer_integrated_gradients", "minimum"), ("eigen_cam", "minimum"),
            ("eigen_grad_cam", "minimum"), ("fullgrad", "minimum"), ("guided_gradcam", "minimum"),
            ("deeplift_shap", "minimum2"))
    ratios = {}
    for mode, ref_mode in runs:
        if args.methods and mode not in args.methods.split(","):
            continue
        refs, mine = [], []
        for _ in range(args.repeat):  # interleaved: load changes hit both sides
            if not args.no_reference:
                refs.append({"minimum": minimum, "minimum2": minimum2}[ref_mode] if args.shared_reference
                            else _run_child(ref_mode, shape, patch, features, overlap, max_patches))
            mine.append(_run_child(mode, shape, patch, features, overlap, max_patches))
        if args.no_reference:
            r = mine[0]
            print(f"{mode}: {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB, {r['patches']} patch evaluations; peak ({r.get('sampled_peak_mb', 0):.0f} MB sampled) at "
                  f"{r.get('peak_at', '-')}")
            continue
        # layer IG: one pass per path point; DeepLIFT SHAP: one DeepLIFT per baseline row
        steps = PARAMS.get(mode, {}).get("n_steps", PARAMS.get(mode, {}).get("n_baselines", 1))
        wall = median(r["seconds"] for r in mine) / (steps * median(r["seconds"] for r in refs))
        cpu = median(r["cpu_seconds"] for r in mine) / (steps * median(r["cpu_seconds"] for r in refs))
        ratios[mode] = cpu
        r = mine[len(mine) // 2]
        print(f"{mode}: median {median(m['seconds'] for m in mine):.1f} s wall, "
              f"{median(m['cpu_seconds'] for m in mine):.1f} s CPU, peak RSS {max(m['peak_rss_mb'] for m in mine):.0f} "
              f"MB (reference {max(m['peak_rss_mb'] for m in refs):.0f} MB), {r['patches']} patch evaluations; "
              f"ratio vs {ref_mode} (fwd+bwd of every patch{', input and baseline' if ref_mode == 'minimum2' else ''}, "
              f"{args.repeat} interleaved run(s)): CPU {cpu:.2f}, wall {wall:.2f} (target <= 1.6)")
        if mode in FLOORS:
            print(f"  floor: {FLOORS[mode]}")
        if "peak_at" in r:
            print(f"  peak ({r['sampled_peak_mb']:.0f} MB sampled) at {r['peak_at']}")
    if args.estimate:
        _estimate(ratios, overlap)


def _patches(shape, patch, overlap: float) -> int:
    """MONAI's patch count along each axis, multiplied."""
    n = 1
    for s, p in zip(shape, patch):
        step = max(int(p * (1 - overlap)), 1)
        n *= 1 if s <= p else -(-(s - p) // step) + 1
    return n


def _estimate(ratios: dict, overlap: float) -> None:
    """Time one fwd+bwd of a 96^3 patch of BasicUNet at its default features (one child process)
    and extrapolate --intermediate and --full from the patch counts and the ratios just measured."""
    one = _run_child("onepatch", [96, 96, 96], [96, 96, 96], [32, 32, 64, 128, 256, 32], overlap)
    print(f"one 96^3 patch fwd+bwd, BasicUNet default features: {one['seconds']:.1f} s wall, "
          f"{one['cpu_seconds']:.1f} s CPU, peak RSS {one['peak_rss_mb']:.0f} MB")
    for name, shape in (("--intermediate", [192, 192, 96]), ("--full", [448, 448, 128])):
        n = _patches(shape, [96] * 3, overlap)
        line = ", ".join(f"{m} ~{one['cpu_seconds'] * n * r * (2 if m == 'deeplift' else 1) / 60:.0f} min"
                         for m, r in ratios.items())
        print(f"estimate {name} {shape}: {n} patches, minimum ~{one['cpu_seconds'] * n / 60:.0f} CPU-min; {line} "
              "(1 thread, CPU time; reduced-scale ratios)")

if __name__ == "__main__":
    main()
