"""Small runs and cohorts for the job-layer tests: a TorchScript segmentation net and tiny volumes."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from tiny_models import TinySegNet

METHODS: list[dict[str, Any]] = [{"name": "saliency"}, {"name": "input_x_gradient"}]


def model_file(folder: Path, seed: int = 0, name: str = "seg.pt") -> Path:
    """A TorchScript TinySegNet (3 classes) whose weights depend on ``seed``."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    path = folder / name
    torch.jit.script(TinySegNet(3).eval()).save(str(path))
    return path


def volume_file(folder: Path, name: str = "vol.nii.gz", seed: int = 0, shape=(12, 10, 8)) -> Path:
    """A random volume with a non-trivial affine."""
    folder.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = [-9.0, 4.0, 1.5]
    path = folder / name
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def run_data(model: Path, volume: Path, out: Path, methods: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A single-run config mapping."""
    return {"model": {"path": str(model)}, "volumes": [str(volume)],
            "target": {"kind": "argmax", "classes": [1]}, "methods": methods or METHODS,
            "output": {"dir": str(out), "save_prediction": False}, "evaluation": {"report": False}}


def cohort_data(models: dict[str, Path], volumes: list[Path], out: Path,
                methods: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A cohort config mapping over ``models`` (name -> file) and ``volumes``."""
    return {"models": [{"name": n, "path": str(p)} for n, p in models.items()],
            "cohort": {"volumes": [str(v) for v in volumes], "executor": "inline"},
            "target": {"kind": "argmax", "classes": [1]}, "methods": methods or METHODS,
            "output": {"dir": str(out)}, "evaluation": {"report": False}}


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Relative path -> (SHA-256, mtime in ns) of every regular file under ``folder`` (links skipped)."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            files[str(p.relative_to(folder))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return files
