"""Components: k gradient maps from one shared forward vs k separate runs, as a time ratio.

Explaining k connected structures with saliency as k separate jobs runs the network forward
(and, patch-wise, once more in the backward's recomputation) k times; the shared path
(:mod:`esegeta_engine.shared_gradients`) runs it once per patch batch and back-propagates k
times. Both are timed in this run on the same network and volume, whole-volume and
sliding-window, in interleaved order (separate, shared; then shared, separate; ...) so that the
machine's load falls on both alike; the medians over ``--repeats`` and the median of the
per-repeat ratios are reported, and the maps are checked equal. Target: shared / separate
<= 0.6 for k = 5. Because times on a shared machine move with its load, the network passes are
also counted (forward inputs, i.e. whole volumes or patches, and backward passes): their ratio
is the saving independent of load.

MONAI BasicUNet (random weights; timing only); the argmax region is frozen to k synthetic blobs.
Default: reduced scale (48x48x32, features 8..16, patch 32) that runs in a minute on 2 cores;
``--full``: 160x160x96, BasicUNet's default features, patch 64.

    python benchmarks/bench_components.py [--full] [--k 5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def _setup(shape, features, k):
    from monai.networks.nets import BasicUNet

    from esegeta_engine.regions import expand_components
    from esegeta_engine.targets import ArgmaxRegionTarget

    torch.manual_seed(0)
    net = BasicUNet(3, 1, 2, features=tuple(features)).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 1, *shape)).astype(np.float32))
    region = torch.zeros(shape, dtype=torch.long)
    rng = np.random.default_rng(1)
    r = max(2, min(shape) // 10)
    for i in range(k):  # k separate blobs along the first axis
        c = [int((i + 0.5) * shape[0] / k)] + [int(rng.integers(r, s - r)) for s in shape[1:]]
        region[tuple(slice(ci - r, ci + r) for ci in c)] = 1
    parent = ArgmaxRegionTarget("softmax")
    out = torch.zeros(1, 2, *shape)
    parent.prepare(out)
    parent.region = region[None]
    parent.onehot = torch.nn.functional.one_hot(parent.region, 2).movedim(-1, 1).float()
    comp = expand_components(parent, out, [1])
    assert len(comp.components) == k, len(comp.components)
    return net, x, comp


class PassCounter:
    """Counts the network's forward calls, the inputs (patches) they ran, and backward passes.

    A forward hook on the network counts each call and its batch; when the output carries a
    graph, a tensor hook on it counts every backward pass that reaches the network through it.
    Counts do not depend on the machine's load, unlike the times.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        self.forward = self.inputs = self.backward = 0
        self._handle = net.register_forward_hook(self._hook)

    def _hook(self, _m, args, out) -> None:
        self.forward += 1
        self.inputs += int(args[0].shape[0])
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._backward)

    def _backward(self, grad):
        self.backward += 1
        return grad

    def take(self) -> dict[str, int]:
        out = {"forward_calls": self.forward, "forward_inputs": self.inputs, "backward_passes": self.backward}
        self.forward = self.inputs = self.backward = 0
        return out

    def close(self) -> None:
        self._handle.remove()


def _measure(net, x, comp, execution, repeats=3):
    """Separate and shared timed in interleaved order (ABBA...), so load hits both alike;
    medians of the times and of the per-repeat ratios, and the pass counts of one repeat."""
    from esegeta_engine.config import ExecutionConfig
    from esegeta_engine.explain import Explainer
    from esegeta_engine.methods import MethodContext, attribute, get_method
    from esegeta_engine.shared_gradients import column_gradients

    ex = Explainer(net, execution=ExecutionConfig(**execution) if execution else None)
    spec = get_method("saliency")
    params = spec.resolve_params({})
    k = len(comp.components)

    def separate():  # the path k separate jobs take: their own score model and support
        out = []
        for j in range(k):
            sm = ex.make_score_model(comp, x, support=comp.support(j))
            out.append(attribute(spec, MethodContext(score_model=sm, inputs=x, target=j), params))
        return out

    def shared():
        sm = ex.make_score_model(comp, x, support=comp.support(None))
        return [g.abs() for g in column_gradients(sm, x, list(range(k)))]

    counter = PassCounter(net)
    runs = {"separate": separate, "shared": shared}
    times: dict[str, list[float]] = {"separate": [], "shared": []}
    counts, maps = {}, {}
    try:
        for r in range(repeats):
            order = ("separate", "shared") if r % 2 == 0 else ("shared", "separate")
            for name in order:
                counter.take()
                t0 = time.perf_counter()
                maps[name] = runs[name]()
                times[name].append(time.perf_counter() - t0)
                counts[name] = counter.take()
    finally:
        counter.close()
    err = max(float((a - b).abs().max()) for a, b in zip(maps["separate"], maps["shared"]))
    ratios = [sh / sep for sh, sep in zip(times["shared"], times["separate"])]
    passes = {n: c["forward_inputs"] + c["backward_passes"] for n, c in counts.items()}
    return {"separate_s": round(float(np.median(times["separate"])), 3),
            "shared_s": round(float(np.median(times["shared"])), 3),
            "ratio_median": round(float(np.median(ratios)), 3),
            "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "counts": counts,
            "network_pass_ratio": round(passes["shared"] / passes["separate"], 3),
            "max_abs_difference": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the larger scale (slow on 2 cores)")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats (medians reported)")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    shape, features, patch = ((160, 160, 96), (32, 32, 64, 128, 256, 32), 64) if a.full else \
        ((48, 48, 32), (8, 8, 16, 16, 16, 8), 32)
    net, x, comp = _setup(shape, features, a.k)
    res = {"k": a.k, "shape": list(shape), "features": list(features),
           "whole_volume": _measure(net, x, comp, None, a.repeats),
           "sliding_window": _measure(net, x, comp, {"patch_size": patch, "mode": "sliding_window"}, a.repeats)}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
