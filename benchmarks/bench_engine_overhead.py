"""Engine overhead: the full engine path vs the raw Captum call, same settings, one run.

For Saliency, Integrated Gradients and Occlusion on the bundled 3D U-Net and a
phantom volume, time

* engine: ``Explainer.iter_explain`` as the CLI runs it (methods in the calling
  thread) — input preparation, the unperturbed forward pass that freezes the
  argmax region, target module, score model with cancellation/deadline checks,
  the map back to NIfTI order;
* engine-threaded: the same with ``threaded=True`` (as the napari plugin runs it:
  each method in a worker thread, progress events while it runs);
* captum: the same work by hand — the unperturbed forward pass and argmax region,
  then the bare Captum call on a hand-written forward function computing the same
  region score.

Runs are interleaved and the median of ``--repeats`` is reported, in wall-clock time and in
process CPU time (all threads of this process: the engine's model thread included). On a
shared, loaded machine the CPU-time ratio is the one to read: other processes' load changes
wall-clock time run to run far more than the 5 % being checked, but not the CPU this process
spends. Target: engine / captum <= 1.05.

    .venv/bin/python benchmarks/bench_engine_overhead.py [--size 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch
from captum.attr import IntegratedGradients, Occlusion, Saliency

from esegeta_engine.config import MethodConfig, PreprocessConfig, TargetConfig
from esegeta_engine.explain import Explainer, MapReady
from esegeta_engine.io import Volume
from esegeta_engine.sample import load_sample_unet, make_phantom

CASES = {
    "saliency": ({}, lambda f: Saliency(f), {"abs": True}),
    "integrated_gradients": ({"n_steps": 16, "internal_batch_size": 8},
                             lambda f: IntegratedGradients(f),
                             {"n_steps": 16, "internal_batch_size": 8, "method": "gausslegendre"}),
    "occlusion": ({"window": 16, "perturbations_per_eval": 4}, lambda f: Occlusion(f),
                  {"sliding_window_shapes": (1, 16, 16, 16), "strides": (1, 16, 16, 16),
                   "perturbations_per_eval": 4}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--methods", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = load_sample_unet("state")
    ph = make_phantom((args.size,) * 3, seed=4242)
    vol = Volume(ph.volume, ph.affine)
    explainer = Explainer(model, PreprocessConfig(normalisation="minmax"), TargetConfig(kind="argmax", classes=[1]))
    x = explainer.prepare_input(vol)
    box: dict[str, torch.Tensor] = {}

    def raw_forward(inp: torch.Tensor) -> torch.Tensor:  # the same score, written by hand
        out = model(inp)
        onehot = box["onehot"].repeat(inp.shape[0] // box["onehot"].shape[0], 1, 1, 1, 1)
        return (out * onehot).flatten(2).sum(-1)

    def raw(make: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            out = model(x)
        box["onehot"] = torch.nn.functional.one_hot(out.argmax(1), out.shape[1]).movedim(-1, 1).float()
        return make(raw_forward).attribute(x, target=1, **kwargs).detach()

    print(f"volume {args.size}^3, torch threads {args.threads}, {args.repeats} repeats (median s)")
    print(f"{'method':<22} {'engine':>8} {'threaded':>9} {'captum':>8} {'ratio':>7} {'ratio thr':>9}  "
          f"{'cpu ratio':>9} {'cpu thr':>8}  max|diff|")
    for name in args.methods.split(","):
        params, make, kwargs = CASES[name]
        times: dict[str, list[float]] = {"engine": [], "threaded": [], "captum": []}
        cpu: dict[str, list[float]] = {k: [] for k in times}
        for _ in range(args.repeats + 1):  # the first round warms up
            for mode in times:
                c0 = time.process_time()
                t0 = time.perf_counter()
                if mode == "captum":
                    ref = raw(make, kwargs)
                else:
                    maps = [e.array for e in explainer.iter_explain(
                        [vol], [MethodConfig(name=name, params=params)], threaded=mode == "threaded")
                        if isinstance(e, MapReady)]
                times[mode].append(time.perf_counter() - t0)
                cpu[mode].append(time.process_time() - c0)
        e, t, r = (statistics.median(times[k][1:]) for k in ("engine", "threaded", "captum"))
        ce, ct, cr = (statistics.median(cpu[k][1:]) for k in ("engine", "threaded", "captum"))
        diff = float(np.abs(maps[0] - ref[0, 0].numpy()).max())
        print(f"{name:<22} {e:8.3f} {t:9.3f} {r:8.3f} {e / r:7.3f} {t / r:9.3f}  {ce / cr:9.3f} {ct / cr:8.3f}  "
              f"{diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
