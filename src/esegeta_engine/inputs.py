"""A run's inputs read and checked before anything is written: volumes, ROI and ground-truth masks."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from esegeta_engine.config import Config
from esegeta_engine.errors import VolumeError, VolumeShapeError
from esegeta_engine.io import Volume, load_volume
from esegeta_engine.methods import get_method

log = logging.getLogger("esegeta_engine")


def load_inputs(cfg: Config) -> tuple[list[Volume], np.ndarray | None]:
    """Load and check the volumes (and the ROI mask) named in ``cfg``."""
    p = cfg.preprocess
    volumes = [load_volume(v, spatial_dims=p.spatial_dims, channels=p.in_channels) for v in cfg.volumes]
    batch_only = [m.name for m in cfg.methods if get_method(m.name).needs_batch]
    if batch_only and len({v.data.shape for v in volumes}) > 1:
        raise VolumeError(f"{', '.join(batch_only)} explains all volumes as one batch, which needs "
                          "volumes of one shape, got " + ", ".join(str(v.data.shape) for v in volumes),
                          "resample or crop them to a common grid, or run that method separately")
    roi = None
    if cfg.target.kind == "roi" and cfg.target.roi_mask is not None:
        roi = load_mask_on_grid(cfg.target.roi_mask, volumes, p.spatial_dims, "ROI mask")
    if cfg.target.kind == "outcome" and cfg.target.ground_truth is not None:
        from esegeta_engine.regions import load_ground_truth as load_labels

        roi = load_labels(cfg.target.ground_truth, volumes, p.spatial_dims)  # labels, NIfTI order
    return volumes, roi


def load_mask_file(path: Path, spatial_dims: int, what: str) -> Volume:
    """Read a mask or label NIfTI (one image, no channels), its errors said as the mask's.

    A mask is never a model input, so a wrong shape is the mask's, fixed in the mask file: never the
    model's channels (a deployed pipeline's channel note is added to volume shape errors only).

    Raises
    ------
    VolumeError
        Naming ``what`` and the file (not a :class:`VolumeShapeError`).
    """
    try:
        return load_volume(path, spatial_dims=spatial_dims)
    except VolumeShapeError:
        import nibabel as nib

        raise VolumeError(f"{what} {Path(path).name} has shape {nib.load(str(path)).shape} but a {spatial_dims}D mask on the "
                          "volume's grid was expected (one label image, no channel or time axis)",
                          f"give the {what} as a single {spatial_dims}D image on the volume's grid (keep one "
                          "channel of a 4D file, e.g. with nibabel or fslroi)") from None
    except VolumeError as exc:
        raise VolumeError(f"{what}: {exc.problem}", exc.fix) from None


def load_mask_on_grid(path: Path, volumes: list[Volume], spatial_dims: int, what: str) -> np.ndarray:
    """Read a mask NIfTI and check it lies on every volume's grid (shape and affine).

    Raises
    ------
    VolumeError
        Naming the mask, the volume and what differs.
    """
    m = load_mask_file(path, spatial_dims, what)
    for v in volumes:
        name = v.path.name if v.path else "the volume"
        if m.data.shape != v.data.shape[:spatial_dims]:
            raise VolumeError(f"{what} {m.path.name} has shape {m.data.shape} but {name} has "
                              f"{v.data.shape[:spatial_dims]}", "give the mask on the volume's grid")
        if not np.allclose(m.affine, v.affine, atol=1e-3):
            raise VolumeError(f"{what} {m.path.name} and {name} have different geometry (affines differ)",
                              "resample the mask onto the volume")
    return m.data != 0


def load_ground_truth(cfg: Config, volumes: list[Volume]) -> tuple[np.ndarray | None, str | None]:
    """The ground-truth mask, or ``None`` and why localisation is undefined (a mask on
    another grid must not cost the run its maps and other metrics)."""
    loc = cfg.evaluation.localisation
    if loc is None:
        return None, None
    try:
        mask = load_mask_on_grid(loc.mask, volumes, cfg.preprocess.spatial_dims, "ground-truth mask")
    except VolumeError as exc:
        log.warning("localisation is undefined: %s", exc)
        return None, f"undefined: {exc.problem}"
    if not mask.any():
        log.warning("ground-truth mask %s is empty: localisation scores are undefined", loc.mask.name)
    return mask, None
