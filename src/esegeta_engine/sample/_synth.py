"""Private building blocks of the phantom generator (geometry, texture, noise).

Coordinates are voxel indices in array order; every function draws its
randomness from the ``numpy.random.Generator`` it is given, so results are
deterministic for a given generator state. Works for 2D and 3D grids.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def unit(v: np.ndarray) -> np.ndarray:
    """Return ``v`` scaled to unit length (unchanged if it is zero)."""
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def ellipsoid_radius(p: np.ndarray, centre: np.ndarray, axes: np.ndarray) -> float:
    """Normalised ellipsoidal radius of point ``p`` (1.0 on the surface)."""
    return float(np.sqrt(np.sum(((p - centre) / axes) ** 2)))


def walk(
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
    """Trace one vessel centre line as a random walk with momentum.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    start, direction : numpy.ndarray
        Start point and initial heading (voxels; any length).
    radius : float
        Start radius (voxels); it decays by ``decay`` per voxel travelled.
    centre, axes : numpy.ndarray
        Brain ellipsoid; the walk is pulled back inwards near its surface and
        stops once outside.
    max_len : float
        Maximum path length (voxels).
    r_min : float
        The walk stops when the radius falls below this value.
    decay : float
        Relative radius loss per voxel.
    wiggle : float
        Standard deviation of the heading perturbation per step.

    Returns
    -------
    points : list of numpy.ndarray
        Centre-line points, spaced about half a radius apart.
    radii : list of float
        Radius at each point.
    """
    p, d, r = start.astype(float), unit(direction.astype(float)), radius
    points: list[np.ndarray] = []
    radii: list[float] = []
    travelled = 0.0
    while travelled < max_len and r >= r_min:
        points.append(p.copy())
        radii.append(r)
        step = max(0.5, 0.45 * r)
        rho = ellipsoid_radius(p, centre, axes)
        if rho > 1.0:
            break
        pull = unit(centre - p) * max(0.0, rho - 0.8) * 0.8
        d = unit(d + wiggle * rng.standard_normal(p.size) + pull)
        p = p + step * d
        travelled += step
        r *= 1.0 - decay * step
    return points, radii


def grow_tree(
    rng: np.random.Generator,
    centre: np.ndarray,
    axes: np.ndarray,
    n_trunks: int,
    r_trunk: tuple[float, float],
    r_min: float,
    max_points: int = 4000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grow a branching vessel tree from trunks entering from below.

    Segments are grown breadth-first; each segment end splits into two
    thinner children until the radius reaches ``r_min``.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    centre, axes : numpy.ndarray
        Brain ellipsoid centre and semi-axes (voxels).
    n_trunks : int
        Number of root vessels.
    r_trunk : tuple of float
        Range of trunk radii (voxels).
    r_min : float
        Smallest vessel radius (voxels).
    max_points : int
        Safety cap on the number of centre-line points.

    Returns
    -------
    points : numpy.ndarray
        (P, ndim) centre-line points.
    radii : numpy.ndarray
        (P,) radii.
    brightness : numpy.ndarray
        (P,) vessel intensity; thinner vessels are dimmer, as in TOF-MRA.
    """
    ndim = centre.size
    stack: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    for _ in range(n_trunks):
        u = unit(rng.standard_normal(ndim))
        u[-1] = -abs(u[-1]) - 0.5  # start low (inferior), like carotids
        u = unit(u)
        start = centre + 0.85 * axes * u
        direction = unit(centre - start + 0.3 * axes * rng.standard_normal(ndim))
        stack.append((start, direction, rng.uniform(*r_trunk), rng.uniform(-0.05, 0.05)))
    pts: list[np.ndarray] = []
    rads: list[float] = []
    bright: list[float] = []
    r_hi = r_trunk[1]
    while stack and len(pts) < max_points:
        start, direction, r0, b_off = stack.pop(0)
        seg_p, seg_r = walk(rng, start, direction, r0, centre, axes,
                            max_len=float(rng.uniform(10, 22)), r_min=r_min)
        if not seg_p:
            continue
        pts.extend(seg_p)
        rads.extend(seg_r)
        bright.extend(0.5 + 0.5 * (r - r_min) / (r_hi - r_min) + b_off for r in seg_r)
        end, r_end = seg_p[-1], seg_r[-1]
        d_end = unit(seg_p[-1] - seg_p[-2]) if len(seg_p) > 1 else direction
        n_children = 2 if r_end > 1.25 * r_min else 0
        for _ in range(n_children):
            turn = unit(rng.standard_normal(ndim))
            turn = unit(turn - np.dot(turn, d_end) * d_end)
            angle = rng.uniform(0.4, 1.1)
            new_dir = np.cos(angle) * d_end + np.sin(angle) * turn
            r_child = r_end * rng.uniform(0.76, 0.92)
            if r_child >= r_min:
                stack.append((end, new_dir, r_child, rng.uniform(-0.05, 0.05)))
    return np.array(pts), np.array(rads), np.clip(np.array(bright), 0.45, 1.1)


def paint_tubes(
    shape: tuple[int, ...], pts: np.ndarray, rads: np.ndarray, bright: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise balls along centre lines.

    Parameters
    ----------
    shape : tuple of int
        Grid shape.
    pts, rads, bright : numpy.ndarray
        Centre points (P, ndim), radii (P,) and brightness (P,).

    Returns
    -------
    field : numpy.ndarray
        float32 signed distance to the nearest vessel wall (negative inside,
        1e3 far from every ball).
    value : numpy.ndarray
        float32 brightness of the ball that set ``field`` (0 elsewhere).
    """
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


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return n / (float(n.std()) + 1e-8)


def bias_field(rng: np.random.Generator, shape: tuple[int, ...], strength: float) -> np.ndarray:
    """Smooth multiplicative bias field ``exp(sum of low-frequency cosines)``.

    The log-field is scaled so that its absolute maximum equals ``strength``.
    """
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    log_b = np.zeros(shape, dtype=np.float32)
    for _ in range(4):
        freq = rng.uniform(-1.0, 1.0, len(shape))
        phase = rng.uniform(0, 2 * np.pi)
        arg = sum(2 * np.pi * f * g / s for f, g, s in zip(freq, grids, shape))
        log_b += np.cos(arg + phase).astype(np.float32)
    log_b *= strength / (float(np.abs(log_b).max()) + 1e-8)
    return np.exp(log_b)


def background(
    rng: np.random.Generator, shape: tuple[int, ...], centre: np.ndarray, axes: np.ndarray
) -> np.ndarray:
    """Dim textured ellipsoid ("brain") with a thin brighter scalp shell.

    Returns a float32 image: about 0.3 inside (soft two-scale texture),
    0.04 outside and up to about 0.36 on the shell.
    """
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    rho = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grids, centre, axes)))
    rho = rho + 0.04 * smooth_noise(rng, shape, 4.0)
    brain = 1.0 / (1.0 + np.exp((rho - 1.0) * 25.0))
    shell = np.exp(-(((rho - 1.12) / 0.035) ** 2))
    tissue = 0.3 + 0.035 * smooth_noise(rng, shape, 1.5) + 0.03 * smooth_noise(rng, shape, 5.0)
    return (0.04 + brain * (tissue - 0.04) + 0.32 * shell).astype(np.float32)


def rician(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of ``img`` plus complex Gaussian noise of std ``sigma`` (Rician)."""
    re = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    im = sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return np.sqrt(re * re + im * im)


def compose(
    rng: np.random.Generator,
    field: np.ndarray,
    vessel_val: np.ndarray,
    centre: np.ndarray,
    axes: np.ndarray,
    bias_strength: float,
    noise: float,
) -> np.ndarray:
    """Blend vessels into the background, apply bias field and Rician noise.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    field : numpy.ndarray
        Signed distance to the vessel walls (negative inside), from
        :func:`paint_tubes`; sets the partial-volume occupancy.
    vessel_val : numpy.ndarray
        Vessel brightness per voxel, from :func:`paint_tubes`.
    centre, axes : numpy.ndarray
        Brain ellipsoid centre and semi-axes (voxels).
    bias_strength, noise : float
        Bias field log-amplitude and Rician noise standard deviation.

    Returns
    -------
    numpy.ndarray
        float32 image.
    """
    occupancy = np.clip(0.5 - field, 0.0, 1.0)
    bg = background(rng, field.shape, centre, axes)
    img = bg * (1.0 - occupancy) + vessel_val * occupancy
    img = img * bias_field(rng, field.shape, bias_strength)
    return rician(rng, img.astype(np.float32), noise).astype(np.float32)
