"""Engine overhead: the full engine path vs the raw Captum call, same settings, one process.

For Saliency, Integrated Gradients and Occlusion on the bundled 3D U-Net and a phantom volume,
time

* ``engine``: ``Explainer.iter_explain`` as the CLI runs it (``threaded=False``; the job runs on
  the watchdog's model thread) — input preparation, the unperturbed forward pass that freezes the
  argmax region, target module, score model with cancellation/deadline checks, the map back to
  NIfTI order;
* ``threaded``: the same with ``threaded=True`` (as the napari plugin runs it: progress events
  while the job runs);
* ``captum``: the same work by hand in the main thread — the unperturbed forward pass and argmax
  region, then the bare Captum call on a hand-written forward function computing the same score;
* ``captum-thread``: that same call on a worker thread (where napari's ``thread_worker`` would
  make it: the fair reference for the napari path).

The process starts as the ``esegeta`` command does (:func:`esegeta_engine.malloc_arena.share_malloc_arena`:
one malloc arena, so the model thread allocates like the main thread); ``--default-malloc`` keeps
glibc's per-thread arenas, to see what that costs (at 64³, IG: about +8 % CPU and +30 % page
faults for any call made off the main thread, Captum's own included).

Rounds are interleaved (the order rotates each round) and the first round warms up. For each
mode the median and minimum wall time, the median process CPU time (all threads) and the median
count of minor page faults are kept; ratios are against ``captum`` of the same run. On a shared,
loaded machine read the CPU-time ratio and the fault counts: other processes change wall time
far more than the 5 % checked. Target: engine / captum <= 1.05.

    python benchmarks/bench_engine_overhead.py --threads 1            # reduced: 32³, 5 repeats
    python benchmarks/bench_engine_overhead.py --threads 1 --full     # the issue's scale: 64³, 7 repeats
"""

from __future__ import annotations

import argparse
import sys

if "--default-malloc" not in sys.argv:  # before torch starts any thread, as `esegeta` does
    from esegeta_engine.malloc_arena import share_malloc_arena

    SHARED = share_malloc_arena()
else:
    SHARED = False

import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from captum.attr import IntegratedGradients, Occlusion, Saliency  # noqa: E402

from esegeta_engine.config import MethodConfig, PreprocessConfig, TargetConfig  # noqa: E402
from esegeta_engine.explain import Explainer, MapReady  # noqa: E402
from esegeta_engine.io import Volume  # noqa: E402
from esegeta_engine.sample import load_sample_unet, make_phantom  # noqa: E402

CASES = {
    "saliency": ({}, lambda f: Saliency(f), {"abs": True}),
    "integrated_gradients": ({"n_steps": 16, "internal_batch_size": 8},
                             lambda f: IntegratedGradients(f),
                             {"n_steps": 16, "internal_batch_size": 8, "method": "gausslegendre"}),
    "occlusion": ({"window": 16, "perturbations_per_eval": 4}, lambda f: Occlusion(f),
                  {"sliding_window_shapes": (1, 16, 16, 16), "strides": (1, 16, 16, 16),
                   "perturbations_per_eval": 4}),
}
MODES = ("engine", "threaded", "captum", "captum-thread")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=None, help="volume edge (default 32, --full 64)")
    ap.add_argument("--repeats", type=int, default=None, help="measured rounds (default 5, --full 7)")
    ap.add_argument("--full", action="store_true", help="the issue's scale: 64³, 7 repeats")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--methods", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    ap.add_argument("--default-malloc", action="store_true", help="keep glibc's per-thread malloc arenas")
    args = ap.parse_args()
    size = args.size or (64 if args.full else 32)
    repeats = args.repeats or (7 if args.full else 5)
    torch.set_num_threads(args.threads)

    model = load_sample_unet("state")
    ph = make_phantom((size,) * 3, seed=4242)
    vol = Volume(ph.volume, ph.affine)
    explainer = Explainer(model, PreprocessConfig(normalisation="minmax"), TargetConfig(kind="argmax", classes=[1]))
    x = explainer.prepare_input(vol)
    box: dict[str, torch.Tensor] = {}
    worker = ThreadPoolExecutor(1)  # one long-lived worker thread, like napari's thread_worker

    def raw_forward(inp: torch.Tensor) -> torch.Tensor:  # the same score, written by hand
        out = model(inp)
        onehot = box["onehot"].repeat(inp.shape[0] // box["onehot"].shape[0], 1, 1, 1, 1)
        return (out * onehot).flatten(2).sum(-1)

    def raw(make: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        torch.set_num_threads(args.threads)  # (a new thread's own setting)
        with torch.no_grad():
            out = model(x)
        box["onehot"] = torch.nn.functional.one_hot(out.argmax(1), out.shape[1]).movedim(-1, 1).float()
        return make(raw_forward).attribute(x, target=1, **kwargs).detach()

    print(f"volume {size}^3, torch threads {args.threads}, {repeats} repeats after a warm-up round, malloc: "
          f"{'one arena (as esegeta)' if SHARED else 'glibc per-thread arenas'}")
    print("ratios vs captum (main thread): wall median, wall min, CPU median; median page faults (a count); "
          "threaded also vs captum-thread")
    for name in args.methods.split(","):
        params, make, kwargs = CASES[name]
        wall: dict[str, list[float]] = {m: [] for m in MODES}
        cpu: dict[str, list[float]] = {m: [] for m in MODES}
        faults: dict[str, list[int]] = {m: [] for m in MODES}
        for r in range(repeats + 1):  # the first round warms up
            for mode in MODES[r % len(MODES):] + MODES[:r % len(MODES)]:  # rotate the order
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                c0 = time.process_time()
                t0 = time.perf_counter()
                if mode == "captum":
                    ref = raw(make, kwargs)
                elif mode == "captum-thread":
                    worker.submit(raw, make, kwargs).result()
                else:
                    maps = [e.array for e in explainer.iter_explain(
                        [vol], [MethodConfig(name=name, params=params)], threaded=mode == "threaded")
                        if isinstance(e, MapReady)]
                if r:
                    wall[mode].append(time.perf_counter() - t0)
                    cpu[mode].append(time.process_time() - c0)
                    faults[mode].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        med = {m: (statistics.median(wall[m]), min(wall[m]), statistics.median(cpu[m]),
                   statistics.median(faults[m])) for m in MODES}
        diff = float(np.abs(maps[0] - ref[0, 0].numpy()).max())
        base = med["captum"]
        print(f"{name}: captum {base[0]:.3f} s wall (min {base[1]:.3f}), {base[2]:.3f} s CPU, "
              f"{base[3]:.0f} faults; max|map - captum| {diff:.2e}")
        for m in ("engine", "threaded", "captum-thread"):
            w, lo, c, f = med[m]
            line = (f"  {m:<14} wall {w / base[0]:.3f}  min {lo / base[1]:.3f}  CPU {c / base[2]:.3f}  "
                    f"faults {f:.0f}")
            if m == "threaded":
                t = med["captum-thread"]
                line += f"   vs captum-thread: wall {w / t[0]:.3f}  CPU {c / t[2]:.3f}"
            print(line, flush=True)
    worker.shutdown()


if __name__ == "__main__":
    main()
