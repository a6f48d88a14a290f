"""nnU-Net's resampling as exact, differentiable per-axis matrices (plus its clipping).

nnU-Net resamples images (``resampling_fn_data``: scikit-image ``resize``, spline order 3)
and logits (``resampling_fn_probabilities``: order 1; across the slices of anisotropic
scans order ``order_z`` with ``map_coordinates``). ``resize`` is ``scipy.ndimage.zoom``
(separable: one matrix per axis) followed by a clip to the input's range (per channel, or
per slice when the slices are resampled separately). :func:`resampler` builds those
matrices from the very calls nnU-Net makes — ``ndi.zoom`` with ``resize``'s arguments for
in-plane axes, nnU-Net's own function on unit vectors across slices — and
:meth:`Resampling.apply` applies them and the clip with torch, so autograd through it is
the exact derivative of the deployed resampling. Tests compare it with nnU-Net's
functions on random data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from esegeta_engine.errors import ModelLoadError

SUPPORTED = ("resample_data_or_seg_to_shape",)


@dataclass
class Resampling:
    """Per-axis matrices (new size × old size, float64) and where ``resize`` clips."""

    matrices: list[torch.Tensor | None]
    clip: bool
    separate_axis: int | None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Resample ``x`` ``(C, *spatial)`` (computed in float64)."""
        y = x.to(torch.float64)
        nd = y.dim() - 1
        inplane = [a for a in range(nd) if a != self.separate_axis]
        src = y
        for a in inplane:
            y = _along(y, a, self.matrices[a])
        if self.clip and any(self.matrices[a] is not None for a in inplane):
            dims = tuple(a + 1 for a in inplane)
            lo, hi = src.amin(dim=dims, keepdim=True), src.amax(dim=dims, keepdim=True)
            y = torch.maximum(torch.minimum(y, hi), lo)
        if self.separate_axis is not None:
            y = _along(y, self.separate_axis, self.matrices[self.separate_axis])
        return y


def _along(y: torch.Tensor, a: int, mat: torch.Tensor | None) -> torch.Tensor:
    if mat is None:
        return y
    return torch.movedim(torch.matmul(torch.movedim(y, a + 1, -1), mat.to(y.device, y.dtype).T), -1, a + 1)


def resampler(fn: Callable[..., np.ndarray], shape: Sequence[int], new_shape: Sequence[int],
              current_spacing: Sequence[float], new_spacing: Sequence[float]) -> Resampling:
    """The :class:`Resampling` nnU-Net's ``fn`` performs from ``shape`` to ``new_shape``.

    Raises
    ------
    ModelLoadError
        If the plans name a resampling function other than nnU-Net's default one.
    """
    from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

    base = getattr(fn, "func", fn)
    if getattr(base, "__name__", "") not in SUPPORTED:
        raise ModelLoadError(f"the plans resample with {getattr(base, '__name__', base)!r}, which is not "
                             "nnU-Net's default resampling function",
                             "explain a configuration planned with nnU-Net's default resampling")
    kw = dict(getattr(fn, "keywords", {}) or {})
    if kw.get("is_seg"):
        raise ModelLoadError("the plans resample images as segmentations", "check plans.json")
    order, order_z = int(kw.get("order", 3)), int(kw.get("order_z", 0))
    shape = tuple(int(s) for s in shape)
    new_shape = tuple(int(s) for s in new_shape)
    if shape == new_shape:  # nnU-Net returns the data untouched
        return Resampling([None] * len(shape), False, None)
    sep, axis = determine_do_sep_z_and_axis(kw.get("force_separate_z", False), current_spacing, new_spacing)
    axis = int(axis) if sep and axis is not None else None
    mats: list[torch.Tensor | None] = []
    for a, (n, m) in enumerate(zip(shape, new_shape)):
        if a == axis:
            mats.append(None if n == m else _slices_matrix(base, n, m, a, len(shape), order_z, kw))
        else:
            mats.append(_zoom_matrix(n, m, order))
    return Resampling(mats, order > 1, axis)


def _zoom_matrix(n: int, m: int, order: int) -> torch.Tensor:
    """``resize``'s ``ndi.zoom(…, mode='nearest', grid_mode=True)`` along one axis, as a matrix."""
    from scipy import ndimage as ndi

    cols = [ndi.zoom(np.eye(n)[i], m / n, order=order, mode="nearest", grid_mode=True) for i in range(n)]
    return torch.from_numpy(np.ascontiguousarray(np.stack(cols, axis=1)))


def _slices_matrix(fn: Callable[..., np.ndarray], n: int, m: int, a: int, nd: int, order_z: int,
                   kw: dict) -> torch.Tensor:
    """nnU-Net's across-slice resampling on unit vectors (``map_coordinates``, no clip)."""
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg

    basis = [1] * nd
    basis[a] = n
    target = [1] * nd
    target[a] = m
    eye = np.eye(n).reshape(n, *basis)
    out = resample_data_or_seg(eye, np.array(target), False, a, 3, True, order_z=order_z)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(out, dtype=np.float64).reshape(n, m).T))
