"""Limits that hold: the config reader's cost on hostile files, and how fast --timeout refuses.

* **Config reader.** Peak Python memory (tracemalloc) and time of reading a ~450-byte YAML
  alias bomb (9**9 values once expanded), a 40 kB config nested 20,000 levels deep (YAML and
  JSON) and a 1 MB file, each as a ratio against reading an ordinary 1 kB config in the same
  run. Target: every refusal within 10x the ordinary read's memory.
* **Prediction pass.** A sliding window over a volume of ``--edge``^3 voxels in patches of 2
  (``(edge/2)**3`` patches) with a time limit of ``--timeout`` s: the patch batches evaluated
  before the refusal (the rule: 2), the grid set-up time (building the window grid, before the
  first batch) and the wall time of ``run`` to the refusal (model and volume loading included).

Small by default (edge 40: 8,000 patches); the issue's scale (~185,000 patches, --timeout 10) is

    .venv/bin/python benchmarks/bench_limits.py --full
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def _measure(fn) -> tuple[float, int, str]:
    tracemalloc.start()
    t = time.perf_counter()
    try:
        fn()
        outcome = "read"
    except Exception as exc:  # the refusal is the expected outcome
        outcome = f"{type(exc).__name__}: {str(exc)[:80]}"
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak, outcome


def bench_reader(folder: Path) -> None:
    from esegeta_engine.yamlsafe import read_config_file

    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    files = {
        "ordinary 1 kB": ("ok.yaml", "model: {path: m.pt}\nvolumes: [v.nii.gz]\nmethods:\n"
                          + "".join(f"  - {{name: saliency, params: {{k{i}: {i}}}}}\n" for i in range(25))),
        "alias bomb": ("bomb.yaml", "\n".join(lines) + "\nmodels: *a8\n"),
        "deep YAML": ("deep.yaml", "model: " + "[" * 20000 + "]" * 20000 + "\n"),
        "deep JSON": ("deep.json", '{"model": ' + "[" * 20000 + "]" * 20000 + "}"),
        "1 MB + 1": ("big.yaml", "a: 1\n#" + "x" * 1_000_000 + "\n"),
    }
    rows = []
    (folder / "warm.yaml").write_text(files["ordinary 1 kB"][1])
    read_config_file(folder / "warm.yaml")  # first-use costs (imports, compiled patterns) out of the figures
    for label, (name, text) in files.items():
        (folder / name).write_text(text)
        rows.append((label, (folder / name).stat().st_size, *_measure(lambda n=name: read_config_file(folder / n))))
    base_s, base_peak = rows[0][2], rows[0][3]
    print(f"{'file':<16}{'bytes':>10}{'seconds':>10}{'peak kB':>10}{'x ordinary':>12}  outcome")
    for label, size, s, peak, outcome in rows:
        print(f"{label:<16}{size:>10}{s:>10.3f}{peak / 1e3:>10.0f}{peak / max(base_peak, 1):>12.1f}  {outcome}")
    print(f"(ordinary read: {base_s:.4f} s)")


def bench_prediction_pass(folder: Path, edge: int, timeout_s: float) -> None:
    import nibabel as nib
    import torch

    from esegeta_engine.config import parse_config
    from esegeta_engine.forward.sliding import WindowGrid, WindowSettings
    from esegeta_engine.pipeline import run
    from esegeta_engine.forward.scoring import EvaluationMonitor

    torch.manual_seed(0)
    torch.save(torch.nn.Conv3d(1, 2, 3, padding=1), folder / "net.pt")  # a tiny segmentation net
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((edge,) * 3).astype(np.float32), np.eye(4)),
             folder / "vol.nii.gz")
    t = time.perf_counter()
    grid = WindowGrid((edge,) * 3, WindowSettings(patch_size=(2, 2, 2), overlap=0.0), torch.device("cpu"))
    grid_s = time.perf_counter() - t
    batches = []
    real = EvaluationMonitor.patch_batch

    def counting(self, n):
        batches.append(n)
        return real(self, n)

    EvaluationMonitor.patch_batch = counting
    cfg = parse_config({"model": {"path": str(folder / "net.pt"), "format": "pickled_module"},
                        "volumes": [str(folder / "vol.nii.gz")], "methods": [{"name": "saliency"}],
                        "target": {"kind": "argmax", "classes": [1]}, "run": {"timeout_s": timeout_s},
                        "execution": {"mode": "sliding_window", "patch_size": 2, "overlap": 0.0},
                        "output": {"dir": str(folder / "out"), "overwrite": True}})
    t = time.perf_counter()
    try:
        run(cfg, trust_pickled=True)
        outcome = "ran"
    except Exception as exc:
        outcome = str(exc).splitlines()[0][:160]
    wall = time.perf_counter() - t
    EvaluationMonitor.patch_batch = real
    refused = outcome != "ran"
    print(json.dumps({"patches": len(grid), "timeout_s": timeout_s, "grid_setup_s": round(grid_s, 2),
                      "patch_batches_evaluated": len(batches) - (1 if refused else 0),
                      "wall_s_to_refusal": round(wall, 2),
                      "outcome": outcome}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edge", type=int, default=40)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--full", action="store_true", help="the issue's scale: edge 114 (185,193 patches), 10 s")
    args = ap.parse_args()
    if args.full:
        args.edge, args.timeout = 114, 10.0
    with tempfile.TemporaryDirectory() as tmp:
        bench_reader(Path(tmp))
        bench_prediction_pass(Path(tmp), args.edge, args.timeout)


if __name__ == "__main__":
    main()
