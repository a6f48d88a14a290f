"""Procedural TOF-MRA-like phantoms used as the embedded default sample.

The 3D phantom is a dim, ellipsoidal "brain" with soft texture and a bright
scalp shell, containing a tree of bright tubular vessels of shrinking radius.
A smooth multiplicative bias field and Rician noise make a global threshold
insufficient for a clean segmentation. A 2D variant produces slice-like
images for a tiny binary classifier (does the slice contain an in-plane vessel
segment?).

All arrays use NIfTI axis order (x, y, z) and coordinates are voxel indices.
Everything is deterministic given the ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from esegeta_engine.sample import _synth

__all__ = [
    "Phantom",
    "Phantom2D",
    "make_phantom",
    "make_phantom_2d",
    "make_affine",
    "minmax_normalise",
    "save_phantom_nifti",
]

#: Voxel spacing (mm) of the phantom grid, x / y / z.
DEFAULT_SPACING: tuple[float, float, float] = (0.4, 0.4, 0.6)
#: World coordinate (mm) of the grid corner with the smallest x, y and z.
DEFAULT_ORIGIN: tuple[float, float, float] = (12.6, -14.2, -21.5)


@dataclass(frozen=True, eq=False)
class Phantom:
    """A 3D (or 2D) vessel phantom.

    Attributes
    ----------
    volume : numpy.ndarray
        float32 image in NIfTI (x, y, z) axis order, roughly in [0, 1.2].
    mask : numpy.ndarray
        uint8 ground-truth vessel mask (0/1), same shape as ``volume``.
    affine : numpy.ndarray
        4x4 float64 voxel-to-world (RAS, mm) affine.
    """

    volume: np.ndarray
    mask: np.ndarray
    affine: np.ndarray


@dataclass(frozen=True, eq=False)
class Phantom2D:
    """A 2D slice-like phantom for the binary classifier sample.

    Attributes
    ----------
    image : numpy.ndarray
        float32 image of shape (X, Y).
    mask : numpy.ndarray
        uint8 mask of the in-plane vessel segment (all zeros for class 0).
    label : int
        1 if the image contains a bright tube segment, else 0.
    affine : numpy.ndarray
        4x4 float64 affine for the image stored as (X, Y, 1).
    """

    image: np.ndarray
    mask: np.ndarray
    label: int
    affine: np.ndarray


def make_affine(
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    origin: tuple[float, float, float] = DEFAULT_ORIGIN,
    shape: tuple[int, ...] = (64, 64, 64),
) -> np.ndarray:
    """Build an axis-aligned affine with anisotropic spacing and an x flip.

    Parameters
    ----------
    spacing : tuple of float
        Voxel size (mm) along x, y, z.
    origin : tuple of float
        World coordinate (mm) of the grid corner with the smallest x, y, z
        (the last voxel along x, because x is flipped).
    shape : tuple of int
        Grid shape; used so that the x flip keeps the grid near ``origin``.

    Returns
    -------
    numpy.ndarray
        4x4 float64 affine; the x axis runs right-to-left (negative entry).
    """
    aff = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    aff[:3, 3] = origin
    aff[0, 3] += spacing[0] * (shape[0] - 1)
    return aff


def minmax_normalise(image: np.ndarray) -> np.ndarray:
    """Min-max normalise an image to [0, 1] (the sample models' preprocessing).

    Parameters
    ----------
    image : numpy.ndarray
        Any real-valued array.

    Returns
    -------
    numpy.ndarray
        float32 array scaled to [0, 1] (all zeros if the image is constant).
    """
    img = np.asarray(image, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    if hi - lo <= 0:
        return np.zeros_like(img)
    return (img - lo) / (hi - lo)


def make_phantom(
    shape: tuple[int, ...] = (64, 64, 64),
    seed: int = 0,
    *,
    n_trunks: int | None = None,
    r_trunk: tuple[float, float] = (2.0, 2.8),
    r_min: float = 1.0,
    noise: float = 0.06,
    bias_strength: float = 0.35,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
) -> Phantom:
    """Generate a TOF-MRA-like vessel phantom.

    Parameters
    ----------
    shape : tuple of int
        Grid shape in (x, y, z) order; 2D shapes give an (x, y) image.
    seed : int
        Seed of the random generator; equal seeds give identical arrays.
    n_trunks : int, optional
        Number of root vessels; drawn from {3, 4, 5} when None.
    r_trunk : tuple of float
        Range of the trunk radius in voxels.
    r_min : float
        Branches stop growing below this radius (voxels).
    noise : float
        Standard deviation of the Rician noise (vessel peak is about 1).
    bias_strength : float
        Maximum absolute log-amplitude of the multiplicative bias field.
    spacing : tuple of float
        Voxel size (mm) used for the affine.

    Returns
    -------
    Phantom
        Volume (float32), vessel mask (uint8) and 4x4 affine.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"shape must be 2D or 3D, got {shape}")
    rng = np.random.default_rng(seed)
    arr_shape = np.array(shape, dtype=float)
    centre = (arr_shape - 1) / 2 + rng.uniform(-1.5, 1.5, len(shape))
    axes = arr_shape * np.array([0.40, 0.36, 0.38][: len(shape)]) * rng.uniform(0.95, 1.05)
    if n_trunks is None:
        n_trunks = int(rng.integers(3, 6))
    pts, rads, bright = _synth.grow_tree(rng, centre, axes, n_trunks, r_trunk, r_min)
    field, vessel_val = _synth.paint_tubes(shape, pts, rads, bright)
    img = _synth.compose(rng, field, vessel_val, centre, axes, bias_strength, noise)
    shape3 = shape if len(shape) == 3 else (*shape, 1)
    return Phantom(
        volume=img.astype(np.float32),
        mask=(field < 0).astype(np.uint8),
        affine=make_affine(spacing, DEFAULT_ORIGIN, shape3),
    )


def make_phantom_2d(
    shape: tuple[int, int] = (64, 64),
    seed: int = 0,
    has_vessel: bool | None = None,
    *,
    noise: float = 0.05,
    bias_strength: float = 0.3,
) -> Phantom2D:
    """Generate a 2D slice-like image for the vessel / no-vessel classifier.

    Class 1 images contain one bright in-plane tube segment; both classes may
    contain small round bright blobs (through-plane vessel cross-sections),
    so that brightness alone does not decide the class.

    Parameters
    ----------
    shape : tuple of int
        Image shape (x, y).
    seed : int
        Seed of the random generator.
    has_vessel : bool, optional
        Force the class; drawn with probability 0.5 when None.
    noise : float
        Standard deviation of the Rician noise.
    bias_strength : float
        Maximum absolute log-amplitude of the multiplicative bias field.

    Returns
    -------
    Phantom2D
        Image, tube mask, label and affine of the (X, Y, 1) image.
    """
    shape = (int(shape[0]), int(shape[1]))
    rng = np.random.default_rng(seed)
    if has_vessel is None:
        has_vessel = bool(rng.random() < 0.5)
    arr_shape = np.array(shape, dtype=float)
    centre = (arr_shape - 1) / 2 + rng.uniform(-2, 2, 2)
    axes = arr_shape * np.array([0.42, 0.38]) * rng.uniform(0.92, 1.05)
    pts_l: list[np.ndarray] = []
    rad_l: list[float] = []
    val_l: list[float] = []
    for _ in range(int(rng.integers(0, 3))):  # distractor cross-sections
        p = centre + 0.6 * axes * rng.uniform(-1, 1, 2)
        pts_l.append(p)
        rad_l.append(float(rng.uniform(1.2, 2.3)))
        val_l.append(float(rng.uniform(0.6, 1.0)))
    n_blobs = len(pts_l)
    if has_vessel:
        start = centre + 0.35 * axes * rng.uniform(-1, 1, 2)
        seg_p, seg_r = _synth.walk(
            rng, start, rng.standard_normal(2), float(rng.uniform(1.2, 2.0)), centre, axes,
            max_len=float(rng.uniform(22, 38)), r_min=0.8, decay=0.002, wiggle=0.1,
        )
        pts_l.extend(seg_p)
        rad_l.extend(seg_r)
        val_l.extend([float(rng.uniform(0.65, 1.0))] * len(seg_p))
    pts, rads, vals = np.array(pts_l).reshape(-1, 2), np.array(rad_l), np.array(val_l)
    field, vessel_val = _synth.paint_tubes(shape, pts, rads, vals)
    tube_field, _ = _synth.paint_tubes(shape, pts[n_blobs:], rads[n_blobs:], vals[n_blobs:])
    mask = (tube_field < 0).astype(np.uint8)
    img = _synth.compose(rng, field, vessel_val, centre, axes, bias_strength, noise)
    affine = make_affine((DEFAULT_SPACING[0], DEFAULT_SPACING[1], 1.0), DEFAULT_ORIGIN,
                         (*shape, 1))
    return Phantom2D(image=img.astype(np.float32), mask=mask, label=int(has_vessel),
                     affine=affine)


def save_phantom_nifti(
    out_dir: str | Path, seed: int = 0, shape: tuple[int, int, int] = (64, 64, 64)
) -> tuple[Path, Path]:
    """Write a phantom volume and its mask as NIfTI files.

    Parameters
    ----------
    out_dir : str or pathlib.Path
        Destination folder (created if missing).
    seed : int
        Phantom seed.
    shape : tuple of int
        Volume shape (x, y, z).

    Returns
    -------
    tuple of pathlib.Path
        Paths of ``phantom_volume.nii.gz`` and ``phantom_mask.nii.gz``.
    """
    import nibabel as nib

    from esegeta_engine.io import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ph = make_phantom(shape=shape, seed=seed)
    paths = (out / "phantom_volume.nii.gz", out / "phantom_mask.nii.gz")
    for data, path in zip((ph.volume, ph.mask), paths):
        img = nib.Nifti1Image(data, ph.affine)
        img.set_qform(ph.affine, code=1)
        img.set_sform(ph.affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        with atomic_write(path) as tmp:
            nib.save(img, str(tmp))
    return paths
