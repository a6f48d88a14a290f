"""Engine overhead: the full engine path vs the raw Captum call, same settings, one run.

For Saliency, Integrated Gradients and Occlusion on the bundled 3D U-Net and a
phantom volume, time (a) ``Explainer.iter_explain`` — config objects, target
module, score model with cancellation/deadline checks, worker thread, map back
to NIfTI order — and (b) the bare Captum call on a hand-written forward function
computing the same argmax-region score. Runs are interleaved and the median of
``--repeats`` is reported. Target: engine / raw Captum <= 1.05.

    .venv/bin/python benchmarks/bench_engine_overhead.py [--size 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

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
    with torch.no_grad():
        region = model(x).argmax(1)
    onehot = (region == 1).float()

    def raw_forward(inp: torch.Tensor) -> torch.Tensor:  # the same score, written by hand
        out = model(inp)
        fg = (out[:, 1] * onehot.repeat(inp.shape[0] // onehot.shape[0], 1, 1, 1)).flatten(1).sum(1)
        bg = (out[:, 0] * (1 - onehot).repeat(inp.shape[0] // onehot.shape[0], 1, 1, 1)).flatten(1).sum(1)
        return torch.stack([bg, fg], 1)

    print(f"volume {args.size}^3, torch threads {args.threads}, {args.repeats} repeats (median s)")
    print(f"{'method':<22} {'engine':>8} {'captum':>8} {'ratio':>7}  max|diff|")
    for name in args.methods.split(","):
        params, make, kwargs = CASES[name]
        engine_t, raw_t = [], []
        for _ in range(args.repeats + 1):  # first round warms up
            t0 = time.perf_counter()
            maps = [e.array for e in explainer.iter_explain([vol], [MethodConfig(name=name, params=params)])
                    if isinstance(e, MapReady)]
            t1 = time.perf_counter()
            with torch.enable_grad():
                ref = make(raw_forward).attribute(x, target=1, **kwargs).detach()
            t2 = time.perf_counter()
            engine_t.append(t1 - t0)
            raw_t.append(t2 - t1)
        e, r = statistics.median(engine_t[1:]), statistics.median(raw_t[1:])
        diff = float(np.abs(maps[0] - ref[0, 0].numpy()).max())
        print(f"{name:<22} {e:8.3f} {r:8.3f} {e / r:7.3f}  {diff:.2e}")


if __name__ == "__main__":
    main()
