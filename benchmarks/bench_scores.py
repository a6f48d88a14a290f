"""ROAD and region perturbation under sliding-window execution: patch evaluations saved by the reuse.

Both scores evaluate perturbed copies of the input on the score function the map explains. With
the perturbation reuse (``SlidingWindow.set_base``) a copy recomputes only the patches its
perturbation touches; without it every copy runs every patch. This counts patch evaluations
both ways (exact) and times both in the same run, for a map concentrated on one structure (a
Gaussian blob: the usual case for a segmentation target) and checks the scores agree.

Default: reduced scale (56x56x40 volume, patch 32, MONAI BasicUNet features 8..16); ``--full``:
192x192x96 with patch 64 (slow on 2 cores).

    python benchmarks/bench_scores.py [--full]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    from monai.networks.nets import BasicUNet

    from esegeta_engine.config import ExecutionConfig
    from esegeta_engine.evaluation.road import region_perturbation, road
    from esegeta_engine.explain import Explainer
    from esegeta_engine.targets import ArgmaxRegionTarget

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    shape, patch, features = ((192, 192, 96), 64, (16, 16, 32, 64, 128, 16)) if a.full else \
        ((56, 56, 40), 32, (8, 8, 16, 16, 16, 8))
    torch.manual_seed(0)
    net = BasicUNet(3, 1, 2, features=features).eval()
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 1, *shape)).astype(np.float32))
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    centre = [s * 0.3 for s in shape]
    blob = np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / (2 * (shape[0] / 12) ** 2))
    attr = torch.from_numpy(blob.astype(np.float32))[None, None]
    ex = Explainer(net, execution=ExecutionConfig(patch_size=patch, mode="sliding_window"))
    target = ArgmaxRegionTarget()
    target.prepare(ex.raw_output(x))
    results = {"shape": list(shape), "patch": patch}
    for name, fn, kw in (("road", road, {"percentages": [0.01, 0.02, 0.05, 0.1, 0.2]}),
                         ("region_perturbation", region_perturbation, {"region": 8, "steps": 10})):
        out = {}
        for reuse in (True, False):
            sm = ex.make_score_model(target, x)
            if not reuse:  # every copy runs the full sliding window
                sm.runner.set_base = lambda _x: None  # type: ignore[method-assign]
            t0 = time.perf_counter()
            r = fn(sm, x, attr, 1, **kw)
            out["reuse" if reuse else "full"] = {"patch_evaluations": sm.runner.patch_evaluations,
                                                 "seconds": round(time.perf_counter() - t0, 2), "result": r}
        agree = max(abs(u - v) for u, v in zip(
            *(out[k]["result"]["road_curve_morf" if name == "road" else "region_curve"] for k in ("reuse", "full"))))
        full, used = out["full"]["patch_evaluations"], out["reuse"]["patch_evaluations"]
        results[name] = {"patch_evaluations_full": full, "patch_evaluations_reuse": used,
                         "saved": full - used, "fewer_x": round(full / max(used, 1), 2),
                         "time_ratio_reuse_over_full": round(out["reuse"]["seconds"] / out["full"]["seconds"], 3),
                         "max_score_difference": agree}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
