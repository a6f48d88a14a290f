"""Pure arithmetic of the probe's estimate (:mod:`esegeta_engine.jobs.probe`): a call's cost against the
voxels it sees, the voxels a padded call sees, and how durations and sizes are written."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CostLine:
    """Seconds of one network call against the voxels it sees: ``fixed + per_voxel × voxels``."""

    fixed: float
    per_voxel: float

    def at(self, voxels: float) -> float:
        """Seconds of one call on ``voxels`` voxels."""
        return self.fixed + self.per_voxel * voxels

    @classmethod
    def through(cls, points: Sequence[tuple[float, float]]) -> CostLine:
        """The line through the smallest and the largest ``(voxels, seconds)``; one point, or a slope
        that timing noise made ≤ 0, gives time proportional to the voxels of the largest."""
        (v0, t0), (v1, t1) = min(points), max(points)
        slope = (t1 - t0) / (v1 - v0) if v1 > v0 else 0.0
        if slope <= 0:
            return cls(0.0, t1 / v1)
        return cls(t1 - slope * v1, slope)


def padded_voxels(size: Sequence[int], divisible_by: int) -> int:
    """Voxels of ``size`` padded up to a multiple of ``divisible_by`` per axis (what the network sees)."""
    d = max(int(divisible_by), 1)
    return math.prod(-(-int(s) // d) * d for s in size)


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def format_bytes(n: float) -> str:
    """``512 MB``, ``2.3 GB``."""
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{max(n, 0) / 2**20:.0f} MB"
