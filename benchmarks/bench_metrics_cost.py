"""Cost of the robustness metrics vs the raw model evaluations they need, one run.

Infidelity (``n`` Gaussian perturbations) needs ``n`` forward passes on the
perturbed inputs plus one on the clean input; max-sensitivity of Saliency
needs ``n + 1`` Saliency maps, i.e. forward + backward passes. For each case
this times (a) :func:`infidelity_score` / :func:`sensitivity_score` and (b)
exactly those model evaluations written by hand, at the same batch sizes
(``max_examples_per_batch``), interleaved, median of ``--repeats``. The ratio
(a)/(b) is the metric's overhead (Captum's bookkeeping, the perturbation
generator, the engine's score model). Target: ratio <= 1.2.

Data: the bundled sample (``make_phantom((64,)*3)`` + ``load_sample_unet()``,
min-max normalised input) when its weights are installed; otherwise a 3D
``TinySegNet`` on 32^3 (printed), or ``--untrained-unet`` for the sample
architecture with random weights (timing does not depend on the weights).

    .venv/bin/python benchmarks/bench_metrics_cost.py [--repeats 5] [--threads 1]

Issue 9 adds two cases (``--trust-size``, default a small 32^3 phantom crop; ``--only trust`` runs
them alone):

* the completeness check per axiom method: time(method + check) / time(method) (target <= 1.05;
  the check is two score-model forwards);
* the calibrated randomisation check (null of two fully randomised networks + footprint removal)
  vs the uncalibrated one, saliency on every stage: target <= 2.2 (two extra runs per method).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from esegeta_engine.evaluation import infidelity_score, sensitivity_score
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.sample import load_sample_unet, make_phantom, minmax_normalise
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ArgmaxRegionTarget


def load_case(untrained_unet: bool) -> tuple[nn.Module, torch.Tensor, str]:
    """Model and a (1, 1, S, S, S) min-max normalised phantom."""
    try:
        if untrained_unet:
            raise FileNotFoundError("asked for the untrained U-Net")
        model = load_sample_unet("state")
        size, label = 64, "sample U-Net (trained), phantom 64^3"
    except (FileNotFoundError, KeyError, OSError) as exc:
        torch.manual_seed(0)
        if untrained_unet:
            from esegeta_engine.sample import UNet

            model, size, label = UNet(3, 1, 2), 64, "sample U-Net architecture, RANDOM weights, phantom 64^3"
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engine"))
            from tiny_models import TinySegNet

            model, size = TinySegNet(3), 32
            label = f"FALLBACK: sample weights missing ({type(exc).__name__}); TinySegNet 3D, phantom 32^3"
    vol = minmax_normalise(make_phantom((size,) * 3, seed=4242).volume)
    return model.eval(), torch.from_numpy(np.ascontiguousarray(vol))[None, None].float(), label


def median_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Run the functions interleaved ``repeats + 1`` times; median without the warm-up round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats + 1):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def chunks(n: int, batch: int | None) -> list[int]:
    b = n if batch is None else min(batch, n)
    return [b] * (n // b) + ([n % b] if n % b else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--infidelity-samples", type=int, default=16)
    ap.add_argument("--sensitivity-samples", type=int, default=8)
    ap.add_argument("--untrained-unet", action="store_true")
    ap.add_argument("--only", choices=("all", "robustness", "trust"), default="all")
    ap.add_argument("--trust-size", type=int, default=32, help="phantom edge of the issue-9 cases")
    ap.add_argument("--stages", type=int, default=None, help="randomisation stages (default all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.only != "robustness":
        trust_costs(args)
    if args.only == "trust":
        return

    model, x, label = load_case(args.untrained_unet)
    target = ArgmaxRegionTarget()
    with torch.no_grad():
        out = model(x)
    target.prepare(out)
    cls = target.default_classes(out)[0]
    sm = ScoreModel(model, target)
    saliency = get_method("saliency")
    params = saliency.resolve_params({})
    ctx = MethodContext(sm, x, cls)
    attr = attribute(saliency, ctx, params)

    def raw_forwards(n: int, batch: int | None) -> Callable[[], object]:
        def run() -> None:
            with torch.no_grad():
                sm(x)  # the clean input, once
                for b in chunks(n, batch):
                    sm(x.expand(b, *x.shape[1:]) + 0.05 * torch.randn(b, *x.shape[1:]))
        return run

    def raw_gradients(n: int, batch: int | None) -> Callable[[], object]:
        def grad(inp: torch.Tensor) -> None:
            inp = inp.detach().requires_grad_(True)
            torch.autograd.grad(sm(inp)[:, cls].sum(), inp)

        def run() -> None:
            grad(x)  # the clean map, once
            for b in chunks(n, batch):
                grad(x.expand(b, *x.shape[1:]) + 0.02 * torch.rand(b, *x.shape[1:]))
        return run

    ni, ns = args.infidelity_samples, args.sensitivity_samples
    cases = []
    for batch in (None, 4):
        cases.append((f"infidelity n={ni}", batch, ni + 1,
                      lambda b=batch: infidelity_score(sm, x, attr, cls, n_perturb_samples=ni,
                                                       max_examples_per_batch=b),
                      raw_forwards(ni, batch)))
        cases.append((f"sensitivity(saliency) n={ns}", batch, ns + 1,
                      lambda b=batch: sensitivity_score(saliency, ctx, params, n_perturb_samples=ns,
                                                        max_examples_per_batch=b),
                      raw_gradients(ns, batch), ))

    print(label)
    print(f"input {tuple(x.shape)}, class {cls}, torch threads {args.threads}, "
          f"{args.repeats} repeats (median s, interleaved)")
    print(f"{'metric':<28} {'batch':>5} {'evals':>5} {'metric s':>9} {'raw s':>8} {'ratio':>6}  value")
    worst = 0.0
    for name, batch, evals, metric, raw in cases:
        value: list[float] = []
        t = median_times({"metric": lambda: value.append(metric()), "raw": raw}, args.repeats)
        ratio = t["metric"] / t["raw"]
        worst = max(worst, ratio)
        shown = "all" if batch is None else str(batch)
        v = value[-1]
        print(f"{name:<28} {shown:>5} {evals:>5} {t['metric']:9.3f} {t['raw']:8.3f} {ratio:6.3f}  "
              f"{v:.4g}" + ("" if math.isfinite(v) else " (nan)"))
    print(f"worst ratio {worst:.3f} (target <= 1.2): {'OK' if worst <= 1.2 else 'ABOVE TARGET'}")


def trust_costs(args: argparse.Namespace) -> None:
    """Issue 9: completeness-check and calibrated-randomisation cost ratios."""
    from esegeta_engine.evaluation import run_randomisation
    from esegeta_engine.evaluation.axioms import completeness_check

    model, _, label = load_case(args.untrained_unet)
    size = args.trust_size
    x = torch.from_numpy(np.ascontiguousarray(minmax_normalise(make_phantom((size,) * 3, seed=4242).volume)))
    x = x[None, None].float()
    target = ArgmaxRegionTarget()
    with torch.no_grad():
        target.prepare(model(x))
    sm = ScoreModel(model, target)
    print(f"{label.split(',')[0]}; issue-9 cases on a {size}^3 phantom, class 1 (vessel), "
          f"threads {args.threads}, {args.repeats} repeats")
    print(f"{'completeness check':<34} {'method s':>9} {'+check s':>9} {'ratio':>6}  error")
    worst = 0.0
    cases = [("integrated_gradients", {}, None), ("deeplift", {}, None), ("deeplift_shap", {}, None),
             ("gradient_shap", {}, None), ("layer_conductance", {}, "ups.0.block.conv2")]
    for name, given, layer in cases:
        spec = get_method(name)
        params = spec.resolve_params(given)
        from esegeta_engine.models import get_layer

        def method(spec=spec, params=params, layer=layer) -> tuple:
            ctx = MethodContext(sm, x, 1, layer=get_layer(model, layer) if layer else None, layer_name=layer)
            return ctx, attribute(spec, ctx, params)

        found: list[dict] = []

        def with_check(spec=spec, params=params, method=method) -> None:
            ctx, attr = method()
            found.append(completeness_check(spec, ctx, params, attr))

        t = median_times({"method": method, "checked": with_check}, args.repeats)
        ratio = t["checked"] / t["method"]
        worst = max(worst, ratio)
        err = found[-1].get("completeness_error")
        print(f"{name + (f'@{layer}' if layer else ''):<34} {t['method']:9.3f} {t['checked']:9.3f} {ratio:6.3f}  "
              + (f"{err:.3g} ({found[-1]['axiom_status']})" if err is not None else found[-1]["axiom_status"]))
    print(f"worst completeness-check ratio {worst:.3f} (target <= 1.05)")
    sal = [(get_method("saliency"), {}, None)]

    def randomisation(calibrated: bool) -> Callable[[], object]:
        return lambda: run_randomisation(model, lambda m: ScoreModel(m, target), x, 1, sal,
                                         max_stages=args.stages, calibrate=calibrated, footprint=calibrated)

    t = median_times({"plain": randomisation(False), "calibrated": randomisation(True)}, max(1, args.repeats // 2))
    ratio = t["calibrated"] / t["plain"]
    print(f"randomisation (saliency, {args.stages or 'all'} stages): uncalibrated {t['plain']:.2f} s, "
          f"calibrated {t['calibrated']:.2f} s, ratio {ratio:.3f} (target <= 2.2): "
          f"{'OK' if ratio <= 2.2 else 'ABOVE TARGET'}\n")


if __name__ == "__main__":
    main()
