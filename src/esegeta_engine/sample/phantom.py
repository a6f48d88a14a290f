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
from scipy import ndimage

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
#: World coordinate (mm) of the first voxel before the x flip is applied.
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
        World offset (mm) added to the (flipped) voxel grid.
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


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def _ellipsoid_radius(p: np.ndarray, centre: np.ndarray, axes: np.ndarray) -> float:
    return float(np.sqrt(np.sum(((p - centre) / axes) ** 2)))


def _walk(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    radius: float,
    centre: np.ndarray,
    axes: np.ndarray,
    *,
    max_len: float,
    r_min: float,
    decay: float = 0.003,
    wiggle: float = 0.07,
) -> tuple[list[np.ndarray], list[float]]:
    """Random walk with momentum, steered back when leaving the ellipsoid."""
    p, d, r = start.astype(float), _unit(direction.astype(float)), radius
    points: list[np.ndarray] = []
    radii: list[float] = []
    travelled = 0.0
    while travelled < max_len and r >= r_min:
        points.append(p.copy())
        radii.append(r)
        step = max(0.5, 0.45 * r)
        rho = _ellipsoid_radius(p, centre, axes)
        if rho > 1.0:
            break
        pull = _unit(centre - p) * max(0.0, rho - 0.8) * 0.8
        d = _unit(d + wiggle * rng.standard_normal(p.size) + pull)
        p = p + step * d
        travelled += step
        r *= 1.0 - decay * step
    return points, radii


def _grow_tree(
    rng: np.random.Generator,
    centre: np.ndarray,
    axes: np.ndarray,
    n_trunks: int,
    r_trunk: tuple[float, float],
    r_min: float,
    max_points: int = 4000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grow a branching vessel tree; returns centres, radii and brightness."""
    ndim = centre.size
    stack: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    for _ in range(n_trunks):
        u = _unit(rng.standard_normal(ndim))
        u[-1] = -abs(u[-1]) - 0.5  # start low (inferior), like carotids
        u = _unit(u)
        start = centre + 0.85 * axes * u
        direction = _unit(centre - start + 0.3 * axes * rng.standard_normal(ndim))
        stack.append((start, direction, rng.uniform(*r_trunk), rng.uniform(-0.05, 0.05)))
    pts: list[np.ndarray] = []
    rads: list[float] = []
    bright: list[float] = []
    r_hi = r_trunk[1]
    while stack and len(pts) < max_points:
        start, direction, r0, b_off = stack.pop(0)
        seg_p, seg_r = _walk(rng, start, direction, r0, centre, axes,
                             max_len=float(rng.uniform(10, 22)), r_min=r_min)
        if not seg_p:
            continue
        pts.extend(seg_p)
        rads.extend(seg_r)
        bright.extend(0.5 + 0.5 * (r - r_min) / (r_hi - r_min) + b_off for r in seg_r)
        end, r_end = seg_p[-1], seg_r[-1]
        d_end = _unit(seg_p[-1] - seg_p[-2]) if len(seg_p) > 1 else direction
        n_children = 2 if r_end > 1.25 * r_min else 0
        for _ in range(n_children):
            turn = _unit(rng.standard_normal(ndim))
            turn = _unit(turn - np.dot(turn, d_end) * d_end)
            angle = rng.uniform(0.4, 1.1)
            new_dir = np.cos(angle) * d_end + np.sin(angle) * turn
            r_child = r_end * rng.uniform(0.76, 0.92)
            if r_child >= r_min:
                stack.append((end, new_dir, r_child, rng.uniform(-0.05, 0.05)))
    return np.array(pts), np.array(rads), np.clip(np.array(bright), 0.45, 1.1)


def _paint_tubes(
    shape: tuple[int, ...], pts: np.ndarray, rads: np.ndarray, bright: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise balls along centre lines: signed distance and brightness."""
    field = np.full(shape, 1e3, dtype=np.float32)
    value = np.zeros(shape, dtype=np.float32)
    for c, r, b in zip(pts, rads, bright):
        half = int(np.ceil(r)) + 2
        lo = [max(0, int(np.floor(ci)) - half) for ci in c]
        hi = [min(s, int(np.floor(ci)) + half + 1) for ci, s in zip(c, shape)]
        if any(h <= l for l, h in zip(lo, hi)):
            continue
        sl = tuple(slice(l, h) for l, h in zip(lo, hi))
        grids = np.ogrid[sl]
        d2 = sum((g - ci) ** 2 for g, ci in zip(grids, c))
        sd = (np.sqrt(d2) - r).astype(np.float32)
        sub_f, sub_v = field[sl], value[sl]
        upd = sd < sub_f
        sub_f[upd] = sd[upd]
        sub_v[upd] = b
    return field, value


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return n / (float(n.std()) + 1e-8)


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...], strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(sum of low-frequency cosines)."""
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    log_b = np.zeros(shape, dtype=np.float32)
    for _ in range(4):
        freq = rng.uniform(-1.0, 1.0, len(shape))
        phase = rng.uniform(0, 2 * np.pi)
        arg = sum(2 * np.pi * f * g / s for f, g, s in zip(freq, grids, shape))
        log_b += np.cos(arg + phase).astype(np.float32)
    log_b *= strength / (float(np.abs(log_b).max()) + 1e-8)
    return np.exp(log_b)


def _background(
    rng: np.random.Generator, shape: tuple[int, ...], centre: np.ndarray, axes: np.ndarray
) -> np.ndarray:
    """Dim textured ellipsoid with a faint bright scalp shell."""
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    rho = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grids, centre, axes)))
    rho = rho + 0.04 * _smooth_noise(rng, shape, 4.0)
    brain = 1.0 / (1.0 + np.exp((rho - 1.0) * 25.0))
    shell = np.exp(-(((rho - 1.12) / 0.035) ** 2))
    tissue = 0.3 + 0.035 * _smooth_noise(rng, shape, 1.5) + 0.03 * _smooth_noise(rng, shape, 5.0)
    return (0.04 + brain * (tissue - 0.04) + 0.32 * shell).astype(np.float32)


def _rician(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    re = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    im = sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return np.sqrt(re * re + im * im)


def make_phantom(
    shape: tuple[int, ...] = (64, 64, 64),
    seed: int = 0,
    *,
    n_trunks: int | None = None,
    r_trunk: tuple[float, float] = (2.0, 2.8),
    r_min: float = 1.0,
    noise: float = 0.05,
    bias_strength: float = 0.3,
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
        Number of root vessels; drawn from {2, 3, 4} when None.
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
    pts, rads, bright = _grow_tree(rng, centre, axes, n_trunks, r_trunk, r_min)
    field, vessel_val = _paint_tubes(shape, pts, rads, bright)
    occupancy = np.clip(0.5 - field, 0.0, 1.0)
    bg = _background(rng, shape, centre, axes)
    img = bg * (1.0 - occupancy) + vessel_val * occupancy
    img = img * _bias_field(rng, shape, bias_strength)
    img = _rician(rng, img.astype(np.float32), noise)
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
        seg_p, seg_r = _walk(rng, start, rng.standard_normal(2), float(rng.uniform(1.2, 2.0)),
                             centre, axes, max_len=float(rng.uniform(22, 38)), r_min=0.8,
                             decay=0.002, wiggle=0.1)
        b = float(rng.uniform(0.65, 1.0))
        pts_l.extend(seg_p)
        rad_l.extend(seg_r)
        val_l.extend([b] * len(seg_p))
    mask = np.zeros(shape, dtype=np.uint8)
    occupancy = np.zeros(shape, dtype=np.float32)
    vessel_val = np.zeros(shape, dtype=np.float32)
    if pts_l:
        field, vessel_val = _paint_tubes(shape, np.array(pts_l), np.array(rad_l), np.array(val_l))
        occupancy = np.clip(0.5 - field, 0.0, 1.0)
        if has_vessel:
            tube_field, _ = _paint_tubes(shape, np.array(pts_l[n_blobs:]),
                                         np.array(rad_l[n_blobs:]), np.array(val_l[n_blobs:]))
            mask = (tube_field < 0).astype(np.uint8)
    bg = _background(rng, shape, centre, axes)
    img = bg * (1.0 - occupancy) + vessel_val * occupancy
    img = img * _bias_field(rng, shape, bias_strength)
    img = _rician(rng, img.astype(np.float32), noise)
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

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ph = make_phantom(shape=shape, seed=seed)
    paths = (out / "phantom_volume.nii.gz", out / "phantom_mask.nii.gz")
    for data, path in zip((ph.volume, ph.mask), paths):
        img = nib.Nifti1Image(data, ph.affine)
        img.set_qform(ph.affine, code=1)
        img.set_sform(ph.affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, str(path))
    return paths
