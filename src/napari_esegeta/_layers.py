"""Turning engine results into napari layer data (no Qt, no viewer).

* attribution maps: image layers named ``method · target`` with the input's
  geometry, a diverging (signed) or sequential (unsigned) colormap that is
  black at zero (so additive blending leaves the MRA visible where the map is
  zero), symmetric / robust contrast limits and provenance in metadata;
* predictions: labels layers with the input's geometry.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RENDERINGS = ("mip", "attenuated_mip", "translucent")
ROBUST_PERCENTILE = 99.5
SEQUENTIAL = "inferno"


def diverging_colormap() -> Any:
    """Blue - black - red colormap (black at zero), registered once with napari."""
    from napari.utils.colormaps import AVAILABLE_COLORMAPS, Colormap

    name = "esegeta_diverging"
    if name not in AVAILABLE_COLORMAPS:
        AVAILABLE_COLORMAPS[name] = Colormap(
            colors=[[0.55, 0.85, 1.0, 1.0], [0.1, 0.35, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0],
                    [1.0, 0.2, 0.1, 1.0], [1.0, 0.9, 0.3, 1.0]],
            controls=[0.0, 0.25, 0.5, 0.75, 1.0], name=name, display_name="esegeta diverging")
    return AVAILABLE_COLORMAPS[name]


def is_signed(arr: np.ndarray, tol: float = 0.01) -> bool:
    """True if the map has negative values worth showing (beyond ``tol`` x max |map|)."""
    arr = np.asarray(arr)
    peak = float(np.abs(arr).max()) if arr.size else 0.0
    return peak > 0 and float(arr.min()) < -tol * peak


def robust_limit(arr: np.ndarray, percentile: float = ROBUST_PERCENTILE) -> float:
    """The ``percentile`` of |map| (falls back to the max, then 1 for all-zero maps)."""
    a = np.abs(np.asarray(arr, dtype=np.float64)).ravel()
    if not a.size:
        return 1.0
    lim = float(np.percentile(a, percentile))
    if lim <= 0:
        lim = float(a.max())
    return lim if lim > 0 else 1.0


def result_name(method_label: str, target_label: str) -> str:
    """``method[@layer][+smoothgrad] · target`` (napari adds ``[1]`` to repeats)."""
    return f"{method_label} · {target_label}"


def result_layer_data(
    array: np.ndarray,
    *,
    method: str,
    method_label: str,
    target_label: str,
    provenance: dict[str, Any],
    geometry: dict[str, Any],
    nifti: dict[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any], str]:
    """Layer data of one attribution map.

    Parameters
    ----------
    array : np.ndarray
        The map in NIfTI order (the input volume's grid).
    method : str
        Registry name of the method.
    method_label : str
        ``method[@layer][+noise tunnel]``.
    target_label : str
        e.g. ``argmax-1``.
    provenance : dict
        Goes to ``metadata["esegeta"]`` (params, target, class, seconds...).
    geometry : dict
        The input layer's transform (:func:`napari_esegeta._geometry.copy_geometry`).
    nifti : dict, optional
        The input's ``metadata["nifti"]``, so results save with its header.

    Returns
    -------
    (data, kwargs, "image")
    """
    arr = np.asarray(array, dtype=np.float32)
    signed = is_signed(arr)
    lim = robust_limit(arr)
    if signed:
        colormap, limits = diverging_colormap(), (-lim, lim)
    else:
        colormap, limits = SEQUENTIAL, (0.0, lim)
    meta = {"esegeta": {"method": method, "label": method_label, "target_label": target_label,
                        "signed": signed, "robust_limit": lim, **provenance}}
    if nifti is not None:
        meta["nifti"] = nifti
    kwargs = {"name": result_name(method_label, target_label), "colormap": colormap,
              "contrast_limits": limits, "blending": "additive", "rendering": "mip",
              "interpolation3d": "linear", "metadata": meta, **geometry}
    return arr, kwargs, "image"


def prediction_layer_data(labels: np.ndarray, *, model_name: str, geometry: dict[str, Any],
                          nifti: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any], str]:
    """Layer data of a model prediction (labels on the input grid)."""
    meta: dict[str, Any] = {"esegeta": {"prediction": True, "model": model_name}}
    if nifti is not None:
        meta["nifti"] = nifti
    kwargs = {"name": f"prediction · {model_name}", "opacity": 0.6, "metadata": meta, **geometry}
    return np.asarray(labels).astype(np.int32), kwargs, "labels"


def is_result_layer(layer: Any) -> bool:
    """True for attribution layers made by this plugin."""
    meta = getattr(layer, "metadata", None) or {}
    return "method" in meta.get("esegeta", {})


def is_input_layer(layer: Any) -> bool:
    """True for image layers that can be explained (not results, not comparison views)."""
    meta = getattr(layer, "metadata", None) or {}
    return not is_result_layer(layer) and not meta.get("esegeta_compare_base")


def next_rendering(current: str) -> str:
    """The 3D rendering after ``current`` in MIP -> attenuated MIP -> translucent -> MIP."""
    try:
        return RENDERINGS[(RENDERINGS.index(current) + 1) % len(RENDERINGS)]
    except ValueError:
        return RENDERINGS[0]
