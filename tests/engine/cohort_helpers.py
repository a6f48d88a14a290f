"""A tiny cohort for the cohort tests: phantoms on one grid, the sample U-Net and a perturbed copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from esegeta_engine.cohort.config import parse_cohort_config
from esegeta_engine.sample import make_phantom, sample_info, unet_paths

SHAPE = (16, 16, 16)
METHODS: list[dict[str, Any]] = [{"name": "saliency"}, {"name": "input_x_gradient"},
                                 {"name": "integrated_gradients", "params": {"n_steps": 4}}]


def write_phantoms(folder: Path, n: int = 4, shape: tuple[int, ...] = SHAPE, first_seed: int = 3) -> list[Path]:
    """``n`` phantom volumes (and vessel masks) of one grid as NIfTI."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ph = make_phantom(shape, seed=first_seed + i)
        p = folder / f"sub{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(ph.volume, ph.affine), p)
        nib.save(nib.Nifti1Image(ph.mask.astype(np.uint8), ph.affine), folder / f"sub{i:02d}_gt.nii.gz")
        paths.append(p)
    return paths


def write_models(folder: Path) -> dict[str, Path]:
    """The sample U-Net's state dict and a copy with perturbed weights (seeded, no global RNG)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = torch.load(unet_paths()["state"], map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(1)
    other = {k: (v + 0.05 * v.std() * torch.randn(v.shape, generator=gen) if v.is_floating_point() and v.numel() > 1
                 else v.clone()) for k, v in state.items()}
    torch.save(state, folder / "unet_a.pt")
    torch.save(other, folder / "unet_b.pt")
    return {"a": folder / "unet_a.pt", "b": folder / "unet_b.pt"}


def cohort_data(tmp: Path, **cohort: Any) -> dict[str, Any]:
    """A cohort config mapping: 2 models x the phantoms in ``tmp/data`` x 3 methods x class 1."""
    info = sample_info()["models"]["unet3d_vessels"]
    models = write_models(tmp / "models") if not (tmp / "models" / "unet_b.pt").exists() else \
        {"a": tmp / "models" / "unet_a.pt", "b": tmp / "models" / "unet_b.pt"}
    model = {"class_path": info["class_path"], "kwargs": info["kwargs"]}
    return {
        "models": [{"name": "base", "path": str(models["a"]), **model},
                   {"name": "tuned", "path": str(models["b"]), **model}],
        "cohort": {"glob": str(tmp / "data" / "sub??.nii.gz"), **cohort},
        "preprocess": {"normalisation": "minmax"},
        "target": {"kind": "argmax", "classes": [1]},
        "methods": METHODS,
        "output": {"dir": str(tmp / "out")},
    }


def cohort_config(tmp: Path, out: str = "out", **cohort: Any) -> Any:
    data = cohort_data(tmp, **cohort)
    data["output"] = {"dir": str(tmp / out)}
    return parse_cohort_config(data)


class KillsItsProcess(torch.nn.Module):
    """A segmentation net whose forward pass SIGKILLs the process running it (a worker dying mid-job)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
        return self.conv(x)
