"""Helpers shared by the method families: baselines and supervoxel masks."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from esegeta_engine.errors import MethodError
from esegeta_engine.methods.registry import Param

BASELINES = ("zero", "min", "mean", "blur")

BASELINE_PARAM = Param(
    "baseline", "str", "zero",
    "reference input: zero, the input's min or mean, or a blurred copy of the input",
    choices=BASELINES,
)


def make_baseline(inputs: torch.Tensor, kind: str, sigma: float = 4.0, view: bool = False) -> torch.Tensor:
    """Return a baseline tensor of the input's shape.

    Parameters
    ----------
    inputs : torch.Tensor
        ``(N, C, *spatial)``.
    kind : {"zero", "min", "mean", "blur"}
        Constant zero, per-input minimum or mean, or a Gaussian blur
        (``sigma`` voxels) that keeps coarse intensity but removes structure.
    view : bool
        For a method that only reads the baseline: the constant kinds (zero, min, mean) as a
        broadcast view of one value per input (the same values, no whole-scan buffer).
    """
    dims = tuple(range(1, inputs.dim()))
    if kind == "zero":
        if view:
            return inputs.new_zeros((1,) * inputs.dim()).expand_as(inputs)
        return torch.zeros_like(inputs)
    if kind in ("min", "mean"):
        value = inputs.amin(dim=dims, keepdim=True) if kind == "min" else inputs.mean(dim=dims, keepdim=True)
        return value.expand_as(inputs) if view else value.expand_as(inputs).clone()
    if kind == "blur":
        return gaussian_blur(inputs, sigma)
    raise MethodError(f"unknown baseline {kind!r}", f"use one of {', '.join(BASELINES)}")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over the spatial axes of ``(N, C, *spatial)``."""
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    n, c, *spatial = x.shape
    out = x.reshape(n * c, 1, *spatial)
    conv = F.conv2d if len(spatial) == 2 else F.conv3d
    for axis in range(len(spatial)):
        shape = [1, 1] + [1] * len(spatial)
        shape[2 + axis] = k.numel()
        pad = [0, 0] * len(spatial)
        pad[2 * (len(spatial) - 1 - axis)] = radius
        pad[2 * (len(spatial) - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), k.reshape(shape))
    return out.reshape(n, c, *spatial)


# Parameters of every method that works on supervoxels (feature groups).
MASK_PARAMS = (
    Param("mask", "str", "slic", "supervoxels: SLIC on the intensities, or a regular grid of blocks",
          choices=("slic", "grid")),
    Param("n_segments", "int", 64, "approximate number of SLIC supervoxels", minimum=2, maximum=100000),
    Param("compactness", "float", 0.1, "SLIC compactness (higher: more cubic supervoxels)",
          minimum=1e-6, maximum=1000.0),
    Param("grid_size", "ints", 8, "block edge in voxels for mask=grid (one or one per axis)",
          minimum=1, maximum=4096),
)


def feature_mask(inputs: torch.Tensor, params: dict) -> torch.Tensor:
    """Supervoxel labels ``(N, 1, *spatial)`` (int64, 0..K-1) for ``inputs``.

    One label per supervoxel, shared by all channels, so perturbation methods
    need one forward pass per supervoxel, never one per voxel.
    """
    n, _, *spatial = inputs.shape
    if params.get("mask", "slic") == "grid":
        size = params.get("grid_size", 8)
        sizes = size if isinstance(size, tuple) else (size,) * len(spatial)
        if len(sizes) != len(spatial):
            raise MethodError(f"grid_size {size} has {len(sizes)} entries for {len(spatial)} spatial axes",
                              f"give one size or {len(spatial)} sizes")
        grids = np.meshgrid(*[np.arange(s) // b for s, b in zip(spatial, sizes)], indexing="ij")
        counts = [int(np.ceil(s / b)) for s, b in zip(spatial, sizes)]
        labels = np.ravel_multi_index(grids, counts)
        _, labels = np.unique(labels, return_inverse=True)
        mask = torch.from_numpy(labels.reshape(spatial)).long()
        return mask.expand(n, 1, *spatial).clone().to(inputs.device)
    from skimage.segmentation import slic

    masks = []
    for i in range(n):
        img = inputs[i].detach().float().cpu().numpy()
        img = np.moveaxis(img, 0, -1)  # channels last
        lo, hi = float(img.min()), float(img.max())
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        labels = slic(img, n_segments=int(params.get("n_segments", 64)),
                      compactness=float(params.get("compactness", 0.1)),
                      channel_axis=-1, start_label=0, enforce_connectivity=True)
        _, labels = np.unique(labels, return_inverse=True)
        _check_segments(int(labels.max()) + 1, int(params.get("n_segments", 64)))
        masks.append(labels.reshape(spatial))
    return torch.from_numpy(np.stack(masks)).long().unsqueeze(1).to(inputs.device)


def _check_segments(found: int, wanted: int) -> None:
    """A SLIC run that collapsed would give a constant map: say so instead."""
    if found < 2:
        raise MethodError(
            f"SLIC found a single supervoxel (asked for {wanted}), so every voxel would get the same "
            "attribution",
            "raise the method's compactness (e.g. 1.0 for noisy images) or use mask: grid",
        )
    if found < wanted / 10:
        logging.getLogger("esegeta_engine").warning(
            "SLIC found only %d supervoxels of the %d asked for; consider a higher compactness or "
            "mask: grid", found, wanted)
