"""nnU-Net v2 explained as deployed: speed and memory as ratios against references in one run.

A tiny dataset is planned with nnU-Net's own tools (fingerprint + ExperimentPlanner), and one
randomly initialised fold is saved in nnU-Net's checkpoint layout (timing only). Measured on one scan:

1. saliency through the whole pipeline (preprocessing, Gaussian sliding window, mirroring, fold
   ensemble, resampling back) vs the physical minimum: one forward and one backward of every patch of
   every mirrored copy and fold — target ratio <= 1.6; measured alone, and after the run's prediction
   pass (as ``esegeta run`` does it), whose forward the gradient pass reuses;
2. peak memory (``/usr/bin/time -v``, maximum resident set, each in its own process) of saliency through
   the pipeline vs nnU-Net's own prediction (``nnUNetPredictor.predict_single_npy_array``) — target <= 1.3;
3. our prediction (no gradients) vs ``nnUNetPredictor`` on the same scan — target <= 1.1.

Default: a reduced scale (training scans and the scan 48x48x24). ``--full``: the issue's 256x256x128.

    python benchmarks/bench_nnunet.py [--full] [--estimate] [--one-member] [--modes reference,saliency,...]
                                      [--patches N] [--patch-ratio 48x96x96 --repeats 3]

``--one-member``: both sides of every ratio run one fold with mirroring off (ours: ``mirroring: false``;
nnU-Net's: ``use_mirroring=False``), so each pass is one network call per patch instead of eight. Members are
evaluated one at a time on both sides, so peak memory does not depend on their number; the time ratios compare
the same reduced work. The output says when it ran reduced. ``--modes`` picks the children (default all five,
in the order reference, saliency, predict, minimum, saliency_after_prediction); each child's figures are
printed as it finishes.

``--modes saliency_checkpointed[_after_prediction]`` run saliency with activation checkpointing
(``execution.checkpointing``, :mod:`esegeta_engine.forward.checkpointing`); the ratios put them against the
same ``minimum`` (plain forward + backward, no checkpointing). ``--patches N``: only the first N patches run
the network in our children (the rest return zeros; every buffer keeps its full size, and the peak is
reached in the first patch), so the issue's scale fits a shared machine; nnU-Net's own prediction runs whole.
``--patch-ratio ZxYxX`` times only the planned network on one patch of that size, interleaved in one process
(CPU seconds, median of ``--repeats``): the per-patch ratio that decides the pipeline's at full scale.

``--estimate`` plans the scale, times one patch of the planned network and prints how long the
five children would take (network calls only), without running them.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "engine"))


def _load(folder: Path, mirroring: bool = True):
    import nibabel as nib
    import numpy as np
    import torch

    from esegeta_engine.config import ModelConfig
    from esegeta_engine.models import load_source

    img = nib.load(folder.parent.parent.parent / "scan.nii.gz")
    loaded = load_source(ModelConfig(nnunet=folder, folds=[0], mirroring=mirroring))
    loaded.module.bind_volume(img.header.get_zooms()[:3])
    x = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))[None, None]
    return loaded.module, x, img


def _cap(ens, patches: int) -> None:
    """Only the first ``patches`` patches run the network (forward and backward); the rest return zeros.

    Every buffer of the pipeline (accumulators, resampling, gradients) keeps its full size, so the peak,
    reached in the first patch, is the whole run's; times cover the computed patches only.
    """
    import torch

    orig = ens._net
    seen = {False: 0, True: 0}

    def capped(net, x):
        k = seen[ens.recomputing]
        seen[ens.recomputing] = k + 1
        if k < patches * ens.calls_per_patch // len(ens.networks):
            return orig(net, x)
        if ens.before_call is not None:
            ens.before_call(0)
        return x.new_zeros((x.shape[0], ens.num_heads, *x.shape[2:])) + 0 * x.sum()

    ens._net = capped


def child(mode: str, folder: Path, mirroring: bool = True, patches: int | None = None) -> dict:
    """One measurement in this process: seconds (and counts); ``mirroring`` on both sides alike."""
    import torch

    if mode == "reference":  # nnU-Net's own prediction, model loading excluded as for ours
        import nibabel as nib
        import numpy as np
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        img = nib.load(folder.parent.parent.parent / "scan.nii.gz")
        pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                               perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                               verbose_preprocessing=False, allow_tqdm=False)
        pred.initialize_from_trained_model_folder(str(folder), use_folds=(0,))
        data = np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0)[None]
        spacing = [float(s) for s in img.header.get_zooms()[:3]][::-1]
        t = time.perf_counter()
        pred.predict_single_npy_array(data, {"spacing": spacing}, None, None, True)
        return {"seconds": time.perf_counter() - t}
    m, x, _ = _load(folder, mirroring)
    if mode == "predict":
        t = time.perf_counter()
        with torch.no_grad():
            m(x)
        return {"seconds": time.perf_counter() - t}
    if patches is not None:
        _cap(m.ensemble, patches)
    if mode.startswith("saliency"):  # saliency[_checkpointed][_after_prediction]
        from esegeta_engine.forward.checkpointing import method_checkpointing
        from esegeta_engine.methods.registry import get_method

        if mode.endswith("_after_prediction"):  # as in a run: the prediction pass first (untimed), then saliency
            with torch.no_grad():
                m(x)
        calls: list[int] = []
        m.bind_monitor(calls.append)
        xr = x.clone().requires_grad_(True)
        setting = "on" if "_checkpointed" in mode else "off"
        t = time.perf_counter()
        cpu = time.process_time()
        with method_checkpointing(get_method("saliency"), m, setting) as use:
            out = m(xr)
            region = out.detach().argmax(1) == 1
            (g,) = torch.autograd.grad((out[:, 1] * region).sum(), xr)
        return {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - cpu,
                "network_calls": sum(calls), "checkpointed_segments": use.segments,
                "checkpointed_block_calls": use.calls}
    if mode == "minimum":  # one forward + backward per patch of every mirrored copy and fold, nothing else
        with torch.no_grad():
            m(x)
        info = m._last[0]
        plan, ens = info["plan"], m.ensemble
        data = plan.pad(m._prepare(x[0])["data"])
        t = time.perf_counter()
        cpu = time.process_time()
        n = 0
        for net in ens.networks:
            for sl in plan.slicers[:patches]:
                for axes in [(), *ens.mirror_sets]:
                    p = data[sl][None]
                    p = (torch.flip(p, axes) if axes else p).clone().requires_grad_(True)
                    y = net(p)
                    (g,) = torch.autograd.grad(y, p, torch.ones_like(y))
                    n += 1
        return {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - cpu, "network_calls": n}
    raise ValueError(mode)


def patch_ratio(folder: Path, patch: tuple[int, ...], repeats: int) -> None:
    """Per-patch network cost of saliency through the pipeline vs the minimum, interleaved in one process.

    The planned fold network on one random patch of size ``patch``. Per patch the pipeline runs a forward
    without a graph (the stitched prediction) and, in the backward, the patch again with a graph and its
    backward; the minimum is one forward + backward. Each repeat times, in turn: the minimum; the pipeline's
    per-patch work with checkpointing (``checkpoint_segments``) and without; the checkpointed forward +
    backward alone (after a run's prediction pass, whose forward the pipeline reuses). CPU seconds of the
    process (every thread), medians; pre- and post-processing are not included.
    """
    import torch

    from esegeta_engine.forward.checkpointing import checkpointed

    m, _, _ = _load(folder, mirroring=False)
    net, segments = m.folds[0], m.checkpoint_segments()
    x = torch.randn(1, 1, *patch)

    def fwd_bwd() -> None:
        p = x.clone().requires_grad_(True)
        y = net(p)
        torch.autograd.grad(y, p, torch.ones_like(y))

    def forward() -> None:
        with torch.no_grad():
            net(x)

    def ckpt_fwd_bwd() -> None:
        with checkpointed(segments):
            fwd_bwd()

    work = {"minimum": [fwd_bwd], "pipeline, checkpointed": [forward, ckpt_fwd_bwd],
            "pipeline, not checkpointed": [forward, fwd_bwd], "checkpointed after prediction": [ckpt_fwd_bwd]}
    times: dict[str, list[float]] = {k: [] for k in work}
    for _ in range(repeats):
        for k, steps in work.items():
            t = time.process_time()
            for step in steps:
                step()
            times[k].append(time.process_time() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"per-patch CPU seconds, patch {list(patch)} of the planned network, {len(segments)} checkpointed "
          f"segments, median of {repeats}:")
    for k, v in med.items():
        print(f"  {k:<32} {v:8.2f} s  ratio to the minimum {v / med['minimum']:.2f}"
              + ("  (target <= 1.6)" if k != "minimum" else ""))


def estimate(folder: Path, shape: tuple[int, ...]) -> None:
    """How long the five children would take at this scale: one patch timed, times the counted calls.

    Network calls per pass come from nnU-Net's own window plan for the scan (patches x mirrored copies);
    one forward without a graph and one forward + backward of one patch of the planned network are
    timed here (median of 3). Preprocessing and resampling are not included (a lower bound).
    """
    import torch

    from esegeta_engine.models.nnunet.window import WindowPlan
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    m, x, img = _load(folder)
    spacing = [float(s) for s in img.header.get_zooms()[:3]][::-1]  # nnU-Net's z, y, x
    cropped = [shape[2], shape[1], shape[0] - 1]  # the zero slab at x = 0 is cropped
    new = compute_new_shape(cropped, spacing, list(m.cm.spacing))
    plan = WindowPlan.of(new, m.cm.patch_size, m.step_size)
    calls = len(plan.slicers) * m.ensemble.calls_per_patch
    net = m.folds[0]
    patch = torch.randn(1, 1, *m.cm.patch_size)

    def timed(fn) -> float:
        times = []
        for _ in range(3 if calls * len(patch.flatten()) < 10**7 else 1):  # a full-scale patch: once
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    def fwd() -> None:
        with torch.no_grad():
            net(patch)

    def fwd_bwd() -> None:
        p = patch.clone().requires_grad_(True)
        y = net(p)
        torch.autograd.grad(y, p, torch.ones_like(y))

    t_f, t_fb = timed(fwd), timed(fwd_bwd)
    per_child = {"reference": calls * t_f, "predict": calls * t_f, "saliency": calls * (t_f + t_fb),
                 "saliency_after_prediction": calls * (t_f + t_fb), "minimum": calls * (t_f + t_fb)}
    print(f"estimate for scan {shape}: network grid {[int(n) for n in new]}, patch {list(m.cm.patch_size)}, "
          f"{len(plan.slicers)} patches x {m.ensemble.calls_per_patch} mirrored copies = {calls} network calls "
          f"per pass; one patch: forward {t_f:.2f} s, forward + backward {t_fb:.2f} s")
    for k, v in per_child.items():
        print(f"  {k:<26} >= {v / 60:6.1f} min (network calls only)")
    print(f"  all five children        >= {sum(per_child.values()) / 60:6.1f} min")


def _run_child(mode: str, folder: Path, mirroring: bool, patches: int | None = None) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--child", mode, "--folder", str(folder)]
    cmd += [] if mirroring else ["--one-member"]
    cmd += [] if patches is None or mode == "reference" else ["--patches", str(patches)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    result["peak_rss_mb"] = int(rss.group(1)) / 1024 if rss else None
    return result


MODES = ("reference", "saliency", "predict", "minimum", "saliency_after_prediction", "saliency_checkpointed",
         "saliency_checkpointed_after_prediction")
DEFAULT_MODES = MODES[:5]


def _ratios(res: dict, members: str) -> None:
    """The issue's three ratios from whichever children ran (members said on every line)."""
    def has(*ks: str) -> bool:
        return all(k in res for k in ks)

    if has("saliency", "minimum"):
        print(f"saliency / (forward+backward of every patch and member) [{members}]: "
              f"{res['saliency']['seconds'] / res['minimum']['seconds']:.2f} (target <= 1.6)")
    if has("saliency_after_prediction", "minimum"):
        print(f"saliency after the run's prediction pass (its forward reused) / the same minimum [{members}]: "
              f"{res['saliency_after_prediction']['seconds'] / res['minimum']['seconds']:.2f} (target <= 1.6)")
    for mode in ("saliency_checkpointed", "saliency_checkpointed_after_prediction"):
        if has(mode, "minimum"):
            a, b = res[mode], res["minimum"]
            print(f"{mode} / the same minimum [{members}]: wall {a['seconds'] / b['seconds']:.2f}, "
                  f"CPU {a['cpu_seconds'] / b['cpu_seconds']:.2f} (target <= 1.6)")
    for mode in ("saliency", "saliency_checkpointed"):
        if has(mode, "reference"):
            print(f"peak memory {mode} / nnUNetPredictor [{members}]: "
                  f"{res[mode]['peak_rss_mb'] / res['reference']['peak_rss_mb']:.2f} (target <= 1.3)")
    if has("predict", "reference"):
        print(f"prediction ours / nnUNetPredictor [{members}]: "
              f"{res['predict']['seconds'] / res['reference']['seconds']:.2f} (target <= 1.1)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="the issue's 256x256x128 scale")
    ap.add_argument("--estimate", action="store_true",
                    help="plan the scale and time one patch, then print how long the run would take (no run)")
    ap.add_argument("--one-member", action="store_true",
                    help="one fold, no mirroring, on both sides of every ratio (memory does not depend on members)")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help=f"children to run, comma-separated ({', '.join(MODES)})")
    ap.add_argument("--patches", type=int, help="only the first N patches run the network in our children "
                    "(buffers keep their full size; the peak is reached in the first patch); nnU-Net's own "
                    "prediction always runs whole")
    ap.add_argument("--patch-ratio", metavar="ZxYxX", help="only time one patch of this size of the planned "
                    "network: saliency's per-patch work (checkpointed or not) vs forward + backward, interleaved")
    ap.add_argument("--repeats", type=int, default=3, help="--patch-ratio: repeats (median)")
    ap.add_argument("--child")
    ap.add_argument("--folder")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.folder), not args.one_member, args.patches)))
        return
    import nibabel as nib

    import nnunet_setup as S

    shape = (256, 256, 128) if args.full else (48, 48, 24)
    root = Path(tempfile.mkdtemp(prefix="bench_nnunet_"))
    try:
        S.TRAIN_SHAPE = shape
        folder = S.make_results(root, folds=(0,))
        img, _ = S.scan(shape, (0.9, 0.9, 1.8), seed=11)
        nib.save(img, root / "scan.nii.gz")
        if args.estimate:
            estimate(folder, shape)
            return
        if args.patch_ratio:
            patch_ratio(folder, tuple(int(v) for v in args.patch_ratio.split("x")), args.repeats)
            return
        modes = [m for m in args.modes.split(",") if m]
        unknown = sorted(set(modes) - set(MODES))
        if unknown:
            raise SystemExit(f"unknown --modes {unknown}: choose from {', '.join(MODES)}")
        patch = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]["patch_size"]
        print(f"scale: {'full' if args.full else 'reduced'} scan {shape}; plans patch {patch}; "
              + (f"our children: only the first {args.patches} patch(es) run the network; " if args.patches else "")
              + "members: "
              + ("ONE fold, mirroring OFF on both sides of every ratio (--one-member)" if args.one_member
                 else "one fold x every mirrored copy on both sides"), flush=True)
        res = {}
        for mode in modes:
            v = res[mode] = _run_child(mode, folder, not args.one_member, args.patches)
            print(f"  {mode:<38} {v['seconds']:8.2f} s  peak RSS {v['peak_rss_mb']:.0f} MB"
                  + (f"  CPU {v['cpu_seconds']:.1f} s" if "cpu_seconds" in v else "")
                  + (f"  network calls {v['network_calls']}" if "network_calls" in v else "")
                  + (f"  checkpointed segments {v['checkpointed_segments']}" if v.get("checkpointed_segments")
                     else ""), flush=True)
        _ratios(res, "one fold, no mirroring, both sides" if args.one_member else "one fold, mirrored, both sides")
    finally:  # the planned dataset, checkpoints and scans (hundreds of MB at full scale)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
