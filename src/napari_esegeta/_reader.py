"""NIfTI reader: ``.nii`` / ``.nii.gz`` -> an image (or labels) layer in world space.

The array keeps nibabel's ``(x, y, z)`` voxel order (the engine's order); the
affine becomes the layer transform (see :mod:`napari_esegeta._geometry`) and
the header travels in ``metadata["nifti"]`` so the writer and the result
layers keep it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from esegeta_engine.errors import VolumeError
from esegeta_engine.io import Volume, is_nifti, load_volume
from napari_esegeta._geometry import nifti_to_layer_kwargs

LayerData = tuple[Any, dict[str, Any], str]
_LABEL_HINT = re.compile(r"(mask|seg|label|lbl|gt)", re.IGNORECASE)


def nifti_metadata(affine: np.ndarray, header: Any = None, path: str | Path | None = None) -> dict[str, Any]:
    """The ``metadata["nifti"]`` entry: affine, raw header bytes and source path."""
    return {
        "affine": np.asarray(affine, dtype=float).copy(),
        "header": bytes(header.binaryblock) if header is not None else None,
        "path": None if path is None else str(path),
    }


def header_from_metadata(meta: dict[str, Any] | None) -> Any:
    """Rebuild a ``Nifti1Header`` from ``metadata["nifti"]`` (None if absent)."""
    import nibabel as nib

    raw = (meta or {}).get("nifti", {}).get("header") if meta else None
    if not raw:
        return None
    try:
        return nib.Nifti1Header(binaryblock=raw)
    except Exception:  # a header from another NIfTI version or garbage: start fresh
        return None


def _spatial_dims(path: Path) -> int:
    """2 for (x, y) / (x, y, 1) images, else 3 (load_volume reports the rest)."""
    import nibabel as nib

    try:
        shape = list(nib.load(str(path)).shape)
    except Exception:
        return 3  # load_volume raises the readable error
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    return 2 if len(shape) == 2 else 3


def _is_label_file(path: Path) -> bool:
    import nibabel as nib

    try:
        dtype = nib.load(str(path)).get_data_dtype()
    except Exception:
        return False
    stem = path.name.split(".")[0]
    return np.issubdtype(dtype, np.integer) and bool(_LABEL_HINT.search(stem))


def read_nifti(path: str | Path) -> list[LayerData]:
    """Read a NIfTI file as napari layer data.

    Parameters
    ----------
    path : str or Path
        ``.nii`` or ``.nii.gz`` file with a 2D or 3D image.

    Returns
    -------
    list of (data, kwargs, layer_type)
        One image layer, or a labels layer for integer files named like masks.

    Raises
    ------
    VolumeError
        Missing, corrupt, 4D or non-finite files (with ``problem`` and ``fix``).
    """
    path = Path(path)
    vol = load_volume(path, spatial_dims=_spatial_dims(path))
    return [volume_layer_data(vol, name=path.name.split(".")[0], labels=_is_label_file(path))]


def volume_layer_data(vol: Volume, name: str, labels: bool = False) -> LayerData:
    """Layer data for an engine :class:`Volume` (image or labels)."""
    kwargs: dict[str, Any] = {"name": name, **nifti_to_layer_kwargs(vol.affine, vol.data.ndim),
                              "metadata": {"nifti": nifti_metadata(vol.affine, vol.header, vol.path)}}
    if labels:  # a mask file: the ground-truth colour, distinct from predictions
        from napari_esegeta._layers import GROUND_TRUTH_COLOR, label_colormap

        kwargs.update(colormap=label_colormap(GROUND_TRUTH_COLOR), opacity=0.5)
        return vol.data.astype(np.int32), kwargs, "labels"
    kwargs.update(colormap="gray", blending="translucent", rendering="mip")
    return vol.data, kwargs, "image"


def _read_or_notify(path: str | list[str]) -> list[Any]:
    """npe2 reader function: readable notification instead of a traceback."""
    p = path[0] if isinstance(path, list) else path
    try:
        return read_nifti(p)
    except VolumeError as exc:
        from napari.utils.notifications import show_error

        show_error(f"Cannot open {Path(p).name}: {exc.problem}" + (f"\n→ {exc.fix}" if exc.fix else ""))
        return [(None,)]  # napari's "nothing to add" sentinel: existing layers stay as they are


def napari_get_reader(path: str | list[str]) -> Callable[[Any], list[Any]] | None:
    """npe2 ``get_reader``: a reader for NIfTI paths, None for anything else."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, (str, Path)) or not is_nifti(path):
        return None
    return _read_or_notify
