"""Input preparation: intensity normalisation and an explicit, reversible
mapping between NIfTI axis order and the model's axis order.

NIfTI arrays from nibabel are indexed ``(x, y, z[, c])`` in voxel order of the
file's affine. Many models were trained on arrays in another order (e.g.
``(z, y, x)`` from SimpleITK). ``axis_order`` names the model's spatial axes
in terms of the NIfTI ones, so ``"zyx"`` means the model's first spatial axis
is NIfTI z. :class:`AxisOrder` applies it and undoes it on the maps.

Examples
--------
>>> import numpy as np
>>> order = AxisOrder("zyx")
>>> a = np.zeros((4, 5, 6))
>>> order.to_model(a).shape
(6, 5, 4)
>>> order.to_nifti(order.to_model(a)).shape
(4, 5, 6)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from esegeta_engine.errors import ConfigError, VolumeError

NORMALISATIONS = ("none", "zscore", "minmax", "percentile")


@dataclass(frozen=True)
class AxisOrder:
    """Permutation of spatial axes between NIfTI (``xyz``) and model order.

    Parameters
    ----------
    order : str
        A permutation of ``"xyz"`` (3D) or ``"xy"`` (2D).
    """

    order: str = "xyz"

    def __post_init__(self) -> None:
        base = "xyz"[: len(self.order)]
        if len(self.order) not in (2, 3) or sorted(self.order) != sorted(base):
            raise ConfigError(
                f"axis_order {self.order!r} is not a permutation of 'xyz' or 'xy'",
                "use e.g. 'xyz' (nibabel order, default) or 'zyx' (SimpleITK/numpy order)",
            )

    @property
    def permutation(self) -> tuple[int, ...]:
        """Model axis i is NIfTI axis ``permutation[i]``."""
        return tuple("xyz".index(a) for a in self.order)

    def to_model(self, spatial: np.ndarray) -> np.ndarray:
        """Reorder the leading spatial axes of a NIfTI-ordered array."""
        perm = self.permutation
        rest = tuple(range(len(perm), spatial.ndim))
        return np.transpose(spatial, perm + rest)

    def to_nifti(self, spatial: np.ndarray) -> np.ndarray:
        """Undo :meth:`to_model` on the leading spatial axes."""
        inverse = tuple(int(i) for i in np.argsort(self.permutation))
        rest = tuple(range(len(inverse), spatial.ndim))
        return np.transpose(spatial, inverse + rest)


def normalise(
    data: np.ndarray, mode: str = "none", percentiles: tuple[float, float] = (1.0, 99.0)
) -> np.ndarray:
    """Normalise intensities (per volume, over all voxels and channels).

    Parameters
    ----------
    data : np.ndarray
        The image.
    mode : {"none", "zscore", "minmax", "percentile"}
        ``zscore``: zero mean, unit std; ``minmax``: to [0, 1]; ``percentile``:
        clip to the given percentiles, then to [0, 1].
    percentiles : (float, float)
        Lower and upper percentile for ``percentile``.
    """
    data = data.astype(np.float32, copy=False)
    if mode == "none":
        return data
    if mode == "zscore":
        std = float(data.std())
        return (data - float(data.mean())) / (std if std > 0 else 1.0)
    if mode in ("minmax", "percentile"):
        if mode == "percentile":
            lo, hi = (float(v) for v in np.percentile(data, percentiles))  # Python floats: NumPy 2 keeps
            data = np.clip(data, lo, hi)  # float32 (numpy float64 scalars would promote the volume to float64)
        else:
            lo, hi = float(data.min()), float(data.max())
        return (data - lo) / (hi - lo) if hi > lo else np.zeros_like(data)
    raise ConfigError(f"unknown normalisation {mode!r}", f"use one of {', '.join(NORMALISATIONS)}")


def to_model_input(
    data: np.ndarray,
    *,
    spatial_dims: int,
    in_channels: int = 1,
    axis_order: str = "xyz",
    normalisation: str = "none",
    percentiles: tuple[float, float] = (1.0, 99.0),
    geometry: Geometry | None = None,
) -> torch.Tensor:
    """Turn a NIfTI-ordered array into a model input ``(1, C, *spatial)``.

    Parameters
    ----------
    data : np.ndarray
        ``(*spatial)`` or ``(*spatial, C)`` in NIfTI axis order.
    spatial_dims : int
        2 or 3.
    in_channels : int
        Channels the model expects.

    Raises
    ------
    VolumeError
        If the array does not have the expected dimensions or channel count.
    """
    if data.ndim == spatial_dims:
        data = data[..., None]
    if data.ndim != spatial_dims + 1:
        raise VolumeError(
            f"the image has shape {data.shape} but a {spatial_dims}D model input was expected",
            f"give a {spatial_dims}D volume (optionally with channels last), or set "
            "preprocess.spatial_dims",
        )
    if data.shape[-1] != in_channels:
        raise VolumeError(
            f"the image has {data.shape[-1]} channel(s) but the model expects {in_channels}",
            "set preprocess.in_channels to the model's input channels, or give a matching image",
        )
    data = normalise(data, normalisation, percentiles)
    data = (geometry or Geometry(axis_order)).to_model(data)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(data, -1, 0)))[None]


def to_nifti_map(attribution: np.ndarray, axis_order: str = "xyz") -> np.ndarray:
    """Turn a map ``(*spatial_model)`` back into NIfTI axis order."""
    return AxisOrder(axis_order).to_nifti(attribution)


@dataclass(frozen=True)
class Geometry:
    """NIfTI voxel grid <-> model grid: an optional reorientation, then the axis order.

    ``orientation`` (e.g. ``"RAS"``, the orientation the model was trained in)
    reorients the volume with :mod:`nibabel.orientations` — flips included, not only
    axis permutations — and :meth:`to_nifti` brings every map back exactly to the
    scan's voxel grid, so maps are written with the scan's own affine.

    Parameters
    ----------
    axis_order : str
        Model spatial axes in NIfTI terms (after reorientation), see :class:`AxisOrder`.
    ornt : np.ndarray, optional
        nibabel orientation transform from the file's voxel axes to the model's
        orientation (``None``: no reorientation).
    """

    axis_order: str = "xyz"
    ornt: np.ndarray | None = None

    @classmethod
    def of(cls, affine: np.ndarray, spatial_dims: int, axis_order: str = "xyz",
           orientation: str | None = None) -> Geometry:
        """The geometry of a volume with ``affine`` for a model trained in ``orientation``."""
        if not orientation:
            return cls(axis_order)
        from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

        if len(orientation) != spatial_dims:
            raise ConfigError(f"preprocess.orientation {orientation!r} has {len(orientation)} axis codes for "
                              f"{spatial_dims}D volumes", f"give {spatial_dims} codes, e.g. "
                              + ("RAS" if spatial_dims == 3 else "RA"))
        start = io_orientation(np.asarray(affine, dtype=float))[:spatial_dims]
        try:
            ornt = ornt_transform(start, axcodes2ornt(tuple(orientation)))
        except Exception as exc:  # 2D image whose axes are not among the codes
            raise ConfigError(f"cannot reorient the volume to {orientation!r}: {exc}",
                              "give axis codes of the image's own axes, or remove preprocess.orientation") from None
        if np.array_equal(ornt, [[i, 1] for i in range(spatial_dims)]):
            return cls(axis_order)
        return cls(axis_order, ornt)

    def to_model(self, spatial: np.ndarray) -> np.ndarray:
        """NIfTI-ordered array (leading spatial axes) -> model order."""
        if self.ornt is not None:
            from nibabel.orientations import apply_orientation

            spatial = apply_orientation(spatial, self.ornt)
        return AxisOrder(self.axis_order).to_model(spatial)

    def to_nifti(self, spatial: np.ndarray) -> np.ndarray:
        """Undo :meth:`to_model` on the leading spatial axes (exactly, voxel for voxel)."""
        spatial = AxisOrder(self.axis_order).to_nifti(spatial)
        if self.ornt is not None:
            from nibabel.orientations import apply_orientation

            spatial = apply_orientation(spatial, self._inverse())
        return np.ascontiguousarray(spatial)

    def _inverse(self) -> np.ndarray:
        assert self.ornt is not None
        inv = np.zeros_like(self.ornt)
        for i, (axis, flip) in enumerate(self.ornt):
            inv[int(axis)] = [i, flip]
        return inv

    def index_to_model(self, index: Sequence[int], shape: Sequence[int]) -> list[int]:
        """A NIfTI voxel index -> the same voxel's index on the model grid."""
        idx = [int(i) for i in index]
        if self.ornt is not None:
            new = [0] * len(idx)
            for i, (axis, flip) in enumerate(self.ornt):
                new[int(axis)] = idx[i] if flip > 0 else int(shape[i]) - 1 - idx[i]
            idx = new
        return [idx[i] for i in AxisOrder(self.axis_order).permutation]
