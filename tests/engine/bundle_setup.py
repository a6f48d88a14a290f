"""A tiny MONAI bundle written in the test (BasicUNet, the usual inference transforms).

The bundle's own pipeline run through MONAI (``monai_reference``: its parsed
preprocessing from the file, the parsed ``SlidingWindowInferer``, ``Activationsd`` and
``Invertd``) is the reference the deployed-pipeline tests compare with.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

CONFIG = {
    "imports": ["$import torch"],
    "bundle_root": ".",
    "device": "$torch.device('cpu')",
    "network_def": {"_target_": "BasicUNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                    "features": [4, 4, 8, 8, 16, 4], "norm": "batch"},
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [1.0, 1.0, 1.2], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -50, "a_max": 250, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "EnsureTyped", "keys": "image"}]},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 2, "overlap": 0.5,
                "mode": "gaussian"},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]},
}
METADATA = {"network_data_format": {"inputs": {"image": {"num_channels": 1}},
                                    "outputs": {"pred": {"channel_def": {"0": "background", "1": "vessel",
                                                                         "2": "aneurysm"}}}}}
CLASSES = ["background", "vessel", "aneurysm"]


def config(**changes) -> dict:
    """A copy of the bundle config with top-level entries replaced (None removes one)."""
    out = copy.deepcopy(CONFIG)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def write_bundle(root: Path, cfg: dict | None = None, seed: int = 0, weights: bool = True) -> Path:
    """The bundle folder: configs/inference.json, configs/metadata.json, models/model.pt."""
    from monai.networks.nets import BasicUNet

    cfg = CONFIG if cfg is None else cfg
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "configs" / "inference.json").write_text(json.dumps(cfg))
    (root / "configs" / "metadata.json").write_text(json.dumps(METADATA))
    if weights:
        torch.manual_seed(seed)
        net = BasicUNet(**{k: v for k, v in CONFIG["network_def"].items() if k != "_target_"})
        torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


def oblique_scan(path: Path, shape: tuple[int, ...] = (20, 18, 10)) -> Path:
    """A scan whose affine is rotated 20 degrees about z with a flipped x axis (anisotropic)."""
    rng = np.random.default_rng(3)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    blob = sum((g / 0.6) ** 2 for g in grid) < 1
    img = (rng.normal(50, 20, shape) + 120 * blob).astype(np.float32)
    t = np.deg2rad(20)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-1.2, 0.9, 2.2])
    aff[:3, 3] = [12, -7, 3]
    nib.save(nib.Nifti1Image(img, aff), path)
    return path


def monai_reference(root: Path, scan: Path) -> np.ndarray:
    """The bundle's own pipeline through MONAI: LoadImaged ... Invertd (AsDiscreted left out)."""
    from monai.bundle import ConfigParser
    from monai.transforms import AsDiscreted, Compose

    p = ConfigParser()
    p.read_config(str(root / "configs" / "inference.json"))
    p["bundle_root"] = str(root)
    net = p.get_parsed_content("network_def")
    net.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    net.eval()
    pre, inferer, post = (p.get_parsed_content(k) for k in ("preprocessing", "inferer", "postprocessing"))
    d = pre({"image": str(scan)})
    with torch.no_grad():
        d["pred"] = inferer(d["image"][None], net)[0]
    d = Compose([t for t in post.transforms if not isinstance(t, AsDiscreted)])(d)
    return d["pred"].numpy()
