"""A tiny nnU-Net v2 model built with nnU-Net's own tools (no training).

A synthetic dataset is written in nnU-Net's raw layout; ``extract_fingerprints`` and
``plan_experiments`` (nnU-Net's Python entry points of ``nnUNetv2_extract_fingerprint``
and ``nnUNetv2_plan_experiment``) run in a subprocess with ``nnUNet_raw`` /
``nnUNet_preprocessed`` / ``nnUNet_results`` pointing at temporary folders (nnU-Net reads
them at import). Randomly initialised networks built from those plans are saved per fold
in nnU-Net's checkpoint layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

DATASET = "Dataset001_Tiny"
TRAINER_DIR = "nnUNetTrainer__nnUNetPlans__3d_fullres"
SPACING = (1.0, 1.0, 2.0)  # x, y, z of the training scans (anisotropic: a spacing to resample to)
TRAIN_SHAPE = (16, 12, 8)  # x, y, z of the training scans (the plans' patch follows from it)

_PLAN = """
from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments
extract_fingerprints([1], num_processes=1, check_dataset_integrity=False, clean=True, verbose=False)
plan_experiments([1])
"""


def scan(shape: tuple[int, ...], spacing: tuple[float, ...], seed: int, affine: np.ndarray | None = None):
    """A synthetic scan (a bright ellipsoid on noise, zero outside a border) and its label."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    blob = sum((g / 0.5) ** 2 for g in grid) < 1
    img = (rng.normal(100, 10, shape) + 80 * blob).astype(np.float32)
    img[:1] = 0  # a zero slab: nnU-Net crops to the non-zero box
    aff = np.diag([*spacing, 1.0]) if affine is None else affine
    return nib.Nifti1Image(img, aff), nib.Nifti1Image(blob.astype(np.uint8), aff)


def make_plans(root: Path) -> Path:
    """Raw dataset + fingerprint + plans; returns the preprocessed dataset folder."""
    raw = root / "raw" / DATASET
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        img, lab = scan(TRAIN_SHAPE, SPACING, i)
        nib.save(img, raw / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        nib.save(lab, raw / "labelsTr" / f"case_{i:03d}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "vessel": 1},
        "numTraining": 3, "file_ending": ".nii.gz"}))
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "results"), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", _PLAN], env=env, check=True, capture_output=True, timeout=600)
    return root / "pre" / DATASET


def make_results(root: Path, folds: tuple[int, ...] = (0, 1), mirror_axes: tuple[int, ...] = (0, 1, 2)) -> Path:
    """An nnU-Net results folder with randomly initialised folds (nnU-Net's checkpoint layout)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pre = make_plans(root)
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset = json.loads((pre / "dataset.json").read_text())
    out = root / "results" / DATASET / TRAINER_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / "plans.json").write_text(json.dumps(plans))
    (out / "dataset.json").write_text(json.dumps(dataset))
    cm = PlansManager(plans).get_configuration("3d_fullres")
    for f in folds:
        torch.manual_seed(100 + f)
        net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, 1, 2, allow_init=True,
                                     deep_supervision=False)
        (out / f"fold_{f}").mkdir(exist_ok=True)
        torch.save({"network_weights": net.state_dict(), "optimizer_state": {}, "grad_scaler_state": None,
                    "logging": {"train_losses": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.1)]},
                    "_best_ema": None, "current_epoch": 1,
                    "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": f,
                                  "dataset_json": dataset, "device": torch.device("cpu")},
                    "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": mirror_axes},
                   out / f"fold_{f}" / "checkpoint_final.pth")
    return out


def reference_probabilities(folder: Path, folds: tuple, img: nib.Nifti1Image, mirroring: bool = True) -> np.ndarray:
    """nnU-Net's own prediction (``predict_single_npy_array``), classes first, NIfTI axis order."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                           perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                           verbose_preprocessing=False, allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(folder), use_folds=folds, checkpoint_name="checkpoint_final.pth")
    data = np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0)[None]  # SimpleITK's z, y, x
    spacing = [float(s) for s in img.header.get_zooms()[:3]][::-1]
    _, probs = pred.predict_single_npy_array(data, {"spacing": spacing}, None, None, True)
    return np.asarray(probs).transpose(0, 3, 2, 1)


def add_configuration(folder: Path, configuration: str, folds: tuple[int, ...] = (0,),
                      mirror_axes: tuple[int, ...] = (0, 1)) -> Path:
    """A sibling results folder for another configuration of the same plans (e.g. ``2d``)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((folder / "plans.json").read_text())
    dataset = json.loads((folder / "dataset.json").read_text())
    out = folder.parent / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    out.mkdir(exist_ok=True)
    (out / "plans.json").write_text(json.dumps(plans))
    (out / "dataset.json").write_text(json.dumps(dataset))
    cm = PlansManager(plans).get_configuration(configuration)
    for f in folds:
        torch.manual_seed(200 + f)
        net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, 1, 2, allow_init=True,
                                     deep_supervision=False)
        (out / f"fold_{f}").mkdir(exist_ok=True)
        torch.save({"network_weights": net.state_dict(), "optimizer_state": {}, "grad_scaler_state": None,
                    "logging": {}, "_best_ema": None, "current_epoch": 1,
                    "init_args": {"plans": plans, "configuration": configuration, "fold": f,
                                  "dataset_json": dataset, "device": torch.device("cpu")},
                    "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": mirror_axes},
                   out / f"fold_{f}" / "checkpoint_final.pth")
    return out
