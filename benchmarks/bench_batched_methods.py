"""Batched perturbation methods: time per evaluated input vs a plain batched forward, RISE memory.

Score-CAM, Ablation-CAM and RISE evaluate many perturbed copies of the input in
batches of ``batch_size`` through the engine's score model. On the bundled 3D
U-Net and a phantom volume, for each method, time

* method: ``methods.attribute`` as the engine runs it (mask/ablation
  construction, score model with cancellation/deadline checks, weighting);
* forward: the same number of evaluated inputs as plain ``torch.no_grad``
  forward passes of the model on batches of the same size, with the region
  score written by hand;

and report seconds per evaluated input and the ratio (target <= 1.1). Runs are
interleaved; the median of ``--repeats`` is reported.

RISE's memory must not grow with the number of masks: ``--memory-size`` runs
RISE with ``--memory-masks`` and with a tenth of them on a volume of that edge,
each in a fresh process, and reports the peak memory of each (CUDA:
``max_memory_allocated``; CPU: the process's peak RSS).

Small by default (32^3, few masks/channels); the issue's scale is

    .venv/bin/python benchmarks/bench_batched_methods.py --size 64 --rise-masks 256 \\
        --memory-size 128 --memory-masks 4000 --device cuda
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
import torch
import torch.nn.functional as F

from esegeta_engine.config import PreprocessConfig, TargetConfig
from esegeta_engine.explain import Explainer
from esegeta_engine.io import Volume
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.models import get_layer
from esegeta_engine.sample import load_sample_unet, make_phantom
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ArgmaxRegionTarget

LAYER = "downs.1.block.relu2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rise-masks", type=int, default=32)
    ap.add_argument("--max-channels", type=int, default=16, help="Score-/Ablation-CAM channel cap")
    ap.add_argument("--memory-size", type=int, default=0, help="volume edge for the RISE memory check (0: skip)")
    ap.add_argument("--memory-masks", type=int, default=400)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rise-memory-run", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.rise_memory_run:
        _rise_memory_run(args, device)
        return

    model = load_sample_unet("state").to(device).eval()
    ph = make_phantom((args.size,) * 3, seed=4242)
    explainer = Explainer(model, PreprocessConfig(normalisation="minmax"), TargetConfig(kind="argmax", classes=[1]))
    x = explainer.prepare_input(Volume(ph.volume, ph.affine)).to(device)
    with torch.no_grad():
        out = model(x)
    target = ArgmaxRegionTarget()
    target.prepare(out)
    score = ScoreModel(model, target)
    onehot = F.one_hot(out.argmax(1), out.shape[1]).movedim(-1, 1).float()

    def plain(inputs: int, per_batch: int) -> None:
        with torch.no_grad():
            for start in range(0, inputs, per_batch):
                batch = x.expand(min(per_batch, inputs - start), *x.shape[1:]).contiguous()
                (model(batch) * onehot).flatten(2).sum(-1)[:, 1].sum().item()

    common = {"batch_size": args.batch_size}
    cases: dict[str, dict] = {
        "score_cam": {**common, "max_channels": args.max_channels},
        "ablation_cam": {**common, "max_channels": args.max_channels},
        "rise": {**common, "n_masks": args.rise_masks, "cell_size": 8},
    }
    print(f"volume {args.size}^3 on {device}, torch threads {args.threads}, batch {args.batch_size}, "
          f"{args.repeats} repeats (median)")
    print(f"{'method':<14} {'inputs':>7} {'method s/input':>15} {'forward s/input':>16} {'ratio':>7}")
    for name, params in cases.items():
        spec = get_method(name)
        ctx = MethodContext(score, x, 1, layer=get_layer(model, LAYER) if spec.needs_layer else None,
                            layer_name=LAYER)
        resolved = spec.resolve_params(params)
        times: dict[str, list[float]] = {"method": [], "forward": []}
        for _ in range(args.repeats + 1):  # the first round warms up
            score.monitor.start(None)
            t0 = time.perf_counter()
            attribute(spec, ctx, resolved)
            _sync(device)
            times["method"].append(time.perf_counter() - t0)
            samples = score.monitor.samples
            t0 = time.perf_counter()
            plain(samples, args.batch_size)  # the same number of inputs, in batches of the same size
            _sync(device)
            times["forward"].append(time.perf_counter() - t0)
        m, f = (statistics.median(times[k][1:]) / samples for k in ("method", "forward"))
        print(f"{name:<14} {samples:>7} {m:15.5f} {f:16.5f} {m / f:7.3f}")

    if args.memory_size:
        _rise_memory(model, args, device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rise_memory(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> None:
    """Run RISE with a tenth of the masks and with all of them, each in a fresh process."""
    print(f"RISE peak memory on a {args.memory_size}^3 volume (batch {args.batch_size}, fresh process each):")
    for masks in (max(1, args.memory_masks // 10), args.memory_masks):
        cmd = [sys.executable, __file__, "--rise-memory-run", str(masks), "--memory-size", str(args.memory_size),
               "--batch-size", str(args.batch_size), "--device", args.device, "--threads", str(args.threads)]
        print("  " + subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip())


def _rise_memory_run(args: argparse.Namespace, device: torch.device) -> None:
    model = load_sample_unet("state").to(device).eval()
    ph = make_phantom((args.memory_size,) * 3, seed=4242)
    explainer = Explainer(model, PreprocessConfig(normalisation="minmax"), TargetConfig(kind="argmax", classes=[1]))
    x = explainer.prepare_input(Volume(ph.volume, ph.affine)).to(device)
    with torch.no_grad():
        target = ArgmaxRegionTarget()
        target.prepare(model(x))
    score = ScoreModel(model, target)
    spec = get_method("rise")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    attribute(spec, MethodContext(score, x, 1), spec.resolve_params(
        {"n_masks": args.rise_memory_run, "batch_size": args.batch_size, "cell_size": 16}))
    _sync(device)
    if device.type == "cuda":
        peak = f"peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**20:9.1f} MiB"
    else:
        peak = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:9.1f} MiB"
    print(f"{args.rise_memory_run:>6} masks: {peak}, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
