"""NIfTI affine <-> napari layer transform.

Engine arrays are in nibabel voxel order ``(x, y, z)``; the plugin keeps that
array order in every layer and expresses the NIfTI voxel-to-world (RAS+ mm)
matrix with the layer's transform, so napari's world coordinates *are* the
scanner coordinates and engine maps line up exactly.

Convention (used everywhere in the plugin):

* axis-aligned affines (diagonal 3x3 part, flips allowed) become the layer's
  ``scale`` (possibly negative) and ``translate``;
* anything else (oblique, permuted, sheared) becomes the layer's ``affine``
  with unit scale and zero translation.

Result layers copy the input layer's transform verbatim
(:func:`copy_geometry`), so both conventions stay consistent.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_TOL = 1e-6


def is_axis_aligned(affine: np.ndarray) -> bool:
    """True if the linear part of ``affine`` is diagonal (flips allowed).

    Parameters
    ----------
    affine : np.ndarray
        ``(n+1, n+1)`` homogeneous matrix.
    """
    lin = np.asarray(affine, dtype=float)[:-1, :-1]
    off = lin - np.diag(np.diag(lin))
    scale = max(float(np.abs(lin).max()), 1.0)
    return bool(np.all(np.abs(off) <= _TOL * scale)) and bool(np.all(np.diag(lin) != 0))


def nifti_to_layer_kwargs(affine: np.ndarray, ndim: int = 3) -> dict[str, Any]:
    """Layer transform keyword arguments for a NIfTI ``affine``.

    Parameters
    ----------
    affine : np.ndarray
        4x4 NIfTI voxel-to-world matrix.
    ndim : int
        Number of spatial axes of the layer data (2 or 3).

    Returns
    -------
    dict
        ``{"scale", "translate"}`` for axis-aligned affines, else ``{"affine"}``.
    """
    a = np.asarray(affine, dtype=float)
    sub = np.eye(ndim + 1)
    sub[:ndim, :ndim] = a[:ndim, :ndim]
    sub[:ndim, ndim] = a[:ndim, 3]
    if is_axis_aligned(sub):
        return {"scale": tuple(float(v) for v in np.diag(sub)[:ndim]),
                "translate": tuple(float(v) for v in sub[:ndim, ndim])}
    return {"affine": sub}


def _homogeneous_from_parts(ndim: int, scale: Any = None, translate: Any = None,
                            rotate: Any = None, shear: Any = None,
                            affine: Any = None) -> np.ndarray:
    from napari.utils.transforms import Affine

    def arr(v: Any, default: Any) -> Any:
        return default if v is None else np.asarray(v, dtype=float)

    inner = Affine(scale=arr(scale, np.ones(ndim)), translate=arr(translate, np.zeros(ndim)),
                   rotate=arr(rotate, np.eye(ndim)), shear=arr(shear, np.zeros(ndim * (ndim - 1) // 2)),
                   ndim=ndim)
    outer = np.eye(ndim + 1) if affine is None else _as_matrix(affine, ndim)
    return outer @ inner.affine_matrix


def _as_matrix(affine: Any, ndim: int) -> np.ndarray:
    m = getattr(affine, "affine_matrix", affine)
    m = np.asarray(m, dtype=float)
    if m.shape == (ndim, ndim):  # linear part only
        full = np.eye(ndim + 1)
        full[:ndim, :ndim] = m
        return full
    return m


def layer_to_nifti_affine(layer: Any) -> np.ndarray:
    """The 4x4 NIfTI affine of a napari layer (data index -> world).

    Parameters
    ----------
    layer : napari.layers.Layer
        Any layer with 2 or 3 spatial data axes in NIfTI order.
    """
    return meta_to_nifti_affine({
        "scale": layer.scale, "translate": layer.translate, "rotate": layer.rotate,
        "shear": layer.shear, "affine": layer.affine.affine_matrix,
    }, layer.ndim)


def meta_to_nifti_affine(meta: dict[str, Any], ndim: int) -> np.ndarray:
    """The 4x4 NIfTI affine from layer keyword arguments (writer ``meta``).

    Parameters
    ----------
    meta : dict
        May hold ``scale``, ``translate``, ``rotate``, ``shear``, ``affine``.
    ndim : int
        Number of data axes (2 or 3).
    """
    m = _homogeneous_from_parts(ndim, meta.get("scale"), meta.get("translate"), meta.get("rotate"),
                                meta.get("shear"), meta.get("affine"))
    if ndim == 3:
        return m
    out = np.eye(4)
    out[:ndim, :ndim] = m[:ndim, :ndim]
    out[:ndim, 3] = m[:ndim, ndim]
    return out


def copy_geometry(layer: Any) -> dict[str, Any]:
    """Keyword arguments that give a new layer exactly ``layer``'s transform."""
    return {
        "scale": np.array(layer.scale, dtype=float),
        "translate": np.array(layer.translate, dtype=float),
        "rotate": np.array(layer.rotate, dtype=float),
        "shear": np.array(layer.shear, dtype=float),
        "affine": np.array(layer.affine.affine_matrix, dtype=float),
    }


def voxel_to_world(affine: np.ndarray, ijk: Any) -> np.ndarray:
    """Apply a 4x4 affine to voxel indices ``(..., 3)``."""
    ijk = np.asarray(ijk, dtype=float)
    return ijk @ affine[:3, :3].T + affine[:3, 3]
