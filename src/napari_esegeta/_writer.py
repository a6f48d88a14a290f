"""NIfTI writer for image and labels layers, with the layer's geometry.

The affine is rebuilt from the layer transform (scale / translate / rotate /
shear / affine), which the reader set from the file's affine, so a read ->
write round trip keeps the geometry exactly; the original header (kept in
``metadata["nifti"]``) supplies units, descriptions and codes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from esegeta_engine.io import NIFTI_SUFFIXES, atomic_write
from napari_esegeta._geometry import meta_to_nifti_affine
from napari_esegeta._reader import header_from_metadata

_NIFTI_DTYPES = (np.uint8, np.int16, np.int32, np.float32, np.float64, np.int8, np.uint16,
                 np.uint32, np.int64, np.uint64)


def _nifti_path(path: str | Path) -> Path:
    path = Path(path)
    if not str(path).lower().endswith(NIFTI_SUFFIXES):
        path = path.with_name(path.name + ".nii.gz")
    return path


def write_nifti(path: str | Path, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write one layer's data as NIfTI with its geometry.

    Parameters
    ----------
    path : str or Path
        Target file; ``.nii.gz`` is appended when it has no NIfTI suffix.
    data : array-like
        Layer data in NIfTI ``(x, y[, z])`` order.
    meta : dict
        Layer attributes (``layer.as_layer_data_tuple()[1]``): transform and
        ``metadata``.

    Returns
    -------
    list of str
        The written path.
    """
    import nibabel as nib

    path = _nifti_path(path)
    arr = np.asarray(data)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype.type not in _NIFTI_DTYPES:
        arr = arr.astype(np.float32)
    ndim = min(arr.ndim, 3)
    affine = meta_to_nifti_affine(meta, ndim)
    original = ((meta.get("metadata") or {}).get("nifti") or {}).get("affine")
    if ndim < 3 and original is not None:  # 2D layer: the through-plane axis comes from the file
        full = np.array(original, dtype=float)
        full[:ndim, :ndim], full[:ndim, 3] = affine[:ndim, :ndim], affine[:ndim, 3]
        affine = full
    header = header_from_metadata(meta.get("metadata"))
    img = nib.Nifti1Image(arr, affine, header=header)
    img.set_data_dtype(arr.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    sform = int(header["sform_code"]) if header is not None else 0
    qform = int(header["qform_code"]) if header is not None else 0
    img.set_sform(affine, code=sform or 1)
    img.set_qform(affine, code=qform or 1)
    with atomic_write(path) as tmp:
        nib.save(img, str(tmp))
    return [str(path)]


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 writer for image layers."""
    return write_nifti(path, data, meta)


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 writer for labels layers (stored as integers)."""
    arr = np.asarray(data)
    if arr.max(initial=0) <= 255 and arr.min(initial=0) >= 0:
        arr = arr.astype(np.uint8)
    else:
        arr = arr.astype(np.int32)
    return write_nifti(path, arr, meta)
