"""Seam strength of sliding-window maps against overlap and blending (docs/execution.md).

The bundled U-Net's saliency and guided backprop of the vessel class on the phantom, explained
through the sliding window (patch 32) with overlap 0.25 / 0.5 and constant / Gaussian blending;
seam strength = mean |map| on interior patch-border planes over the median plane, per model
axis (1 = no seam). ``--size`` sets the phantom's edge (default 64; the issue's whole-brain
volume is ``--size 197,233,189``).

    .venv/bin/python benchmarks/bench_seams.py [--size 64]
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="64")
    ap.add_argument("--methods", default="saliency,guided_backprop")
    args = ap.parse_args()
    import numpy as np

    from esegeta_engine import sample
    from esegeta_engine.config import ExecutionConfig, MethodConfig, PreprocessConfig, TargetConfig
    from esegeta_engine.evaluation.seams import seam_strength
    from esegeta_engine.explain import Explainer, MapReady
    from esegeta_engine.io import Volume
    from esegeta_engine.models import load_model

    sizes = [int(s) for s in args.size.split(",")]
    shape = tuple(sizes * 3 if len(sizes) == 1 else sizes)
    info = sample.sample_info()["models"]["unet3d_vessels"]
    net = load_model(sample.unet_paths()["state"], class_path=info["class_path"], kwargs=info["kwargs"])
    ph = sample.make_phantom(shape, seed=3)
    vol = Volume(ph.volume.astype(np.float32), ph.affine)
    for method in args.methods.split(","):
        for overlap in (0.25, 0.5):
            for blend in ("constant", "gaussian"):
                exe = ExecutionConfig(patch_size=32, overlap=overlap, blend=blend)
                ex = Explainer(net, PreprocessConfig(normalisation="minmax"), TargetConfig(classes=[1]), execution=exe)
                ready = next(e for e in ex.iter_explain([vol], [MethodConfig(name=method)]) if isinstance(e, MapReady))
                s = seam_strength(ready.array, (32, 32, 32), overlap)
                print(f"RESULT {method} {shape} patch 32 overlap {overlap} {blend}: seam strength "
                      + " / ".join(f"{k} {v:.2f}" for k, v in s.items()), flush=True)


if __name__ == "__main__":
    main()
