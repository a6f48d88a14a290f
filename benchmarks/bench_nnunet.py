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

    python benchmarks/bench_nnunet.py [--full]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "engine"))


def _load(folder: Path):
    import nibabel as nib
    import numpy as np
    import torch

    from esegeta_engine.config import ModelConfig
    from esegeta_engine.models import load_source

    img = nib.load(folder.parent.parent.parent / "scan.nii.gz")
    loaded = load_source(ModelConfig(nnunet=folder, folds=[0]))
    loaded.module.bind_volume(img.header.get_zooms()[:3])
    x = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))[None, None]
    return loaded.module, x, img


def child(mode: str, folder: Path) -> dict:
    """One measurement in this process: seconds (and counts)."""
    import torch

    if mode == "reference":  # nnU-Net's own prediction, model loading excluded as for ours
        import nibabel as nib
        import numpy as np
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        img = nib.load(folder.parent.parent.parent / "scan.nii.gz")
        pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                               perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                               verbose_preprocessing=False, allow_tqdm=False)
        pred.initialize_from_trained_model_folder(str(folder), use_folds=(0,))
        data = np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0)[None]
        spacing = [float(s) for s in img.header.get_zooms()[:3]][::-1]
        t = time.perf_counter()
        pred.predict_single_npy_array(data, {"spacing": spacing}, None, None, True)
        return {"seconds": time.perf_counter() - t}
    m, x, _ = _load(folder)
    if mode == "predict":
        t = time.perf_counter()
        with torch.no_grad():
            m(x)
        return {"seconds": time.perf_counter() - t}
    if mode in ("saliency", "saliency_after_prediction"):
        if mode == "saliency_after_prediction":  # as in a run: the prediction pass first (untimed), then saliency
            with torch.no_grad():
                m(x)
        calls: list[int] = []
        m.bind_monitor(calls.append)
        xr = x.clone().requires_grad_(True)
        t = time.perf_counter()
        out = m(xr)
        region = out.detach().argmax(1) == 1
        (g,) = torch.autograd.grad((out[:, 1] * region).sum(), xr)
        return {"seconds": time.perf_counter() - t, "network_calls": len(calls)}
    if mode == "minimum":  # one forward + backward per patch of every mirrored copy and fold, nothing else
        with torch.no_grad():
            m(x)
        info = m._last[0]
        plan, ens = info["plan"], m.ensemble
        data = plan.pad(m._prepare(x[0])["data"])
        t = time.perf_counter()
        n = 0
        for net in ens.networks:
            for sl in plan.slicers:
                for axes in [(), *ens.mirror_sets]:
                    p = data[sl][None]
                    p = (torch.flip(p, axes) if axes else p).clone().requires_grad_(True)
                    y = net(p)
                    (g,) = torch.autograd.grad(y, p, torch.ones_like(y))
                    n += 1
        return {"seconds": time.perf_counter() - t, "network_calls": n}
    raise ValueError(mode)


def _run_child(mode: str, folder: Path) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--child", mode, "--folder", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    result["peak_rss_mb"] = int(rss.group(1)) / 1024 if rss else None
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="the issue's 256x256x128 scale")
    ap.add_argument("--child")
    ap.add_argument("--folder")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.folder))))
        return
    import nibabel as nib

    import nnunet_setup as S

    shape = (256, 256, 128) if args.full else (48, 48, 24)
    root = Path(tempfile.mkdtemp(prefix="bench_nnunet_"))
    S.TRAIN_SHAPE = shape
    folder = S.make_results(root, folds=(0,))
    img, _ = S.scan(shape, (0.9, 0.9, 1.8), seed=11)
    nib.save(img, root / "scan.nii.gz")
    res = {mode: _run_child(mode, folder)
           for mode in ("reference", "predict", "saliency", "saliency_after_prediction", "minimum")}
    print(f"scale: {'full' if args.full else 'reduced'} scan {shape}; plans patch "
          f"{json.loads((folder / 'plans.json').read_text())['configurations']['3d_fullres']['patch_size']}")
    for k, v in res.items():
        print(f"  {k:<26} {v['seconds']:8.2f} s  peak RSS {v['peak_rss_mb']:.0f} MB"
              + (f"  network calls {v['network_calls']}" if "network_calls" in v else ""))
    print(f"saliency / (forward+backward of every patch, mirror and fold): "
          f"{res['saliency']['seconds'] / res['minimum']['seconds']:.2f} (target <= 1.6)")
    print(f"saliency after the run's prediction pass (its forward reused) / the same minimum: "
          f"{res['saliency_after_prediction']['seconds'] / res['minimum']['seconds']:.2f} (target <= 1.6)")
    print(f"peak memory saliency / nnUNetPredictor: "
          f"{res['saliency']['peak_rss_mb'] / res['reference']['peak_rss_mb']:.2f} (target <= 1.3)")
    print(f"prediction ours / nnUNetPredictor: {res['predict']['seconds'] / res['reference']['seconds']:.2f} "
          "(target <= 1.1)")


if __name__ == "__main__":
    main()
