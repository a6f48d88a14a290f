"""Turning engine results into napari layer data (no Qt, no viewer).

* attribution maps: image layers named ``method · target`` with the input's
  geometry and provenance in metadata. A signed map gets a diverging colormap
  centred on 0 (symmetric contrast limits), an unsigned map a sequential one;
  both are transparent around 0, so with translucent blending the scan stays
  visible wherever the map is weak. Contrast limits come from the map's own
  support (voxels above a noise floor), not from the whole volume, so a sparse
  map (most voxels ~0) does not saturate the whole brain;
* predictions and ground truth: labels layers with the input's geometry and
  one fixed, distinct colour each.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: 3D renderings offered for maps; a signed map needs ``translucent`` to show both signs
RENDERINGS = ("translucent", "mip", "attenuated_mip")
SUPPORT_PERCENTILE = 99.0
NOISE_FLOOR = 0.01  # fraction of max |map| below which a voxel is not the map's support
MAP_OPACITY = 0.9
PREDICTION_COLOR = (1.0, 0.85, 0.1, 1.0)  # yellow
GROUND_TRUTH_COLOR = (0.1, 0.9, 1.0, 1.0)  # cyan

_DIVERGING = "esegeta_diverging"
_SEQUENTIAL = "esegeta_heat"


def _register(name: str, display: str, colors: list[list[float]], controls: list[float]) -> Any:
    from napari.utils.colormaps import AVAILABLE_COLORMAPS, Colormap

    if name not in AVAILABLE_COLORMAPS:
        AVAILABLE_COLORMAPS[name] = Colormap(colors=colors, controls=controls, name=name,
                                             display_name=display)
    return AVAILABLE_COLORMAPS[name]


def diverging_colormap() -> Any:
    """Cyan - blue - transparent - red - yellow colormap, transparent at its centre (0)."""
    return _register(_DIVERGING, "esegeta diverging", [
        [0.6, 0.95, 1.0, 1.0], [0.1, 0.4, 1.0, 1.0], [0.1, 0.4, 1.0, 0.0], [1.0, 0.2, 0.1, 0.0],
        [1.0, 0.2, 0.1, 1.0], [1.0, 0.95, 0.4, 1.0]], [0.0, 0.3, 0.45, 0.55, 0.7, 1.0])


def sequential_colormap() -> Any:
    """Transparent - red - orange - yellow colormap (transparent at its low end)."""
    return _register(_SEQUENTIAL, "esegeta heat", [
        [0.5, 0.0, 0.1, 0.0], [0.5, 0.0, 0.1, 0.0], [0.85, 0.1, 0.1, 0.9], [1.0, 0.6, 0.0, 1.0],
        [1.0, 1.0, 0.7, 1.0]], [0.0, 0.1, 0.35, 0.7, 1.0])


def is_signed(arr: np.ndarray, tol: float = 0.01) -> bool:
    """True if the map has negative values worth showing (beyond ``tol`` x max |map|)."""
    arr = np.asarray(arr)
    peak = float(np.abs(arr).max()) if arr.size else 0.0
    return peak > 0 and float(arr.min()) < -tol * peak


def support_limit(arr: np.ndarray, percentile: float = SUPPORT_PERCENTILE,
                  floor: float = NOISE_FLOOR) -> float:
    """Contrast limit from the map's own support.

    The ``percentile`` of |map| over the voxels above ``floor`` x max |map|
    (the map's support), so that a sparse map's few strong voxels set the
    scale rather than the near-zero rest of the volume. Falls back to the
    maximum, then 1 for an all-zero map.
    """
    a = np.abs(np.asarray(arr, dtype=np.float32)).ravel()
    peak = float(a.max()) if a.size else 0.0
    if peak <= 0 or not np.isfinite(peak):
        return 1.0
    support = a[a > floor * peak]
    lim = float(np.percentile(support, percentile)) if support.size else peak
    return lim if lim > 0 else peak


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
    lim = support_limit(arr)
    if signed:
        colormap, limits = diverging_colormap(), (-lim, lim)
    else:
        colormap, limits = sequential_colormap(), (0.0, lim)
    meta = {"esegeta": {"method": method, "label": method_label, "target_label": target_label,
                        "signed": signed, "support_limit": lim, **provenance}}
    if nifti is not None:
        meta["nifti"] = nifti
    kwargs = {"name": result_name(method_label, target_label), "colormap": colormap,
              "contrast_limits": limits, "blending": "translucent", "opacity": MAP_OPACITY,
              "rendering": default_rendering(signed), "interpolation3d": "linear",
              "metadata": meta, **geometry}
    return arr, kwargs, "image"


def image_layers(data: Any, kwargs: dict[str, Any]) -> list[Any] | None:
    """napari's layer model of a map, built where this is called (the run's worker thread).

    The GUI thread then only inserts it (``viewer.layers.append``): the layer's construction
    (data checks, transforms, thumbnail) is not part of its event-loop turn. A per-channel map
    (``channel_axis``) gives ``None``: ``viewer.add_image`` splits it on the GUI thread.
    """
    if "channel_axis" in kwargs:
        return None
    from napari.layers import Image

    return [Image(data, **kwargs)]


def add_prepared(viewer: Any, data: Any, kwargs: dict[str, Any], layers: list[Any] | None = None) -> list[Any]:
    """Insert prebuilt layers (:func:`image_layers`), or add the data as napari does; the layers added."""
    if layers is None:
        added = viewer.add_image(data, **kwargs)  # a list for per-channel volumes
        return added if isinstance(added, list) else [added]
    for layer in layers:
        viewer.layers.append(layer)
    return list(layers)


def default_rendering(signed: bool) -> str:
    """3D rendering of a map: ``translucent`` shows both signs, ``mip`` the strongest positives."""
    return "translucent" if signed else "mip"


def label_colormap(color: tuple[float, float, float, float]) -> dict[Any, Any]:
    """A labels colormap giving every non-zero label ``color`` (0 stays transparent)."""
    return {None: color, 0: (0.0, 0.0, 0.0, 0.0)}


def prediction_layer_data(labels: np.ndarray, *, model_name: str, geometry: dict[str, Any],
                          nifti: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any], str]:
    """Layer data of a model prediction (labels on the input grid, yellow; model in metadata)."""
    meta: dict[str, Any] = {"esegeta": {"prediction": True, "model": model_name}}
    if nifti is not None:
        meta["nifti"] = nifti
    kwargs = {"name": "prediction", "opacity": 0.6, "colormap": label_colormap(PREDICTION_COLOR),
              "metadata": meta, **geometry}
    return np.asarray(labels).astype(np.int32), kwargs, "labels"


def is_result_layer(layer: Any) -> bool:
    """True for attribution layers made by this plugin."""
    meta = getattr(layer, "metadata", None) or {}
    return "method" in meta.get("esegeta", {})


def is_input_layer(layer: Any) -> bool:
    """True for image layers that can be explained (not results, not comparison views)."""
    meta = getattr(layer, "metadata", None) or {}
    return not is_result_layer(layer) and not meta.get("esegeta_compare_base")


def show_only(viewer: Any, newest: Any) -> None:
    """Make ``newest`` the only visible attribution map (the others stay in the layer list).

    Only layers whose visibility changes are touched: napari redraws the whole canvas for every
    ``visible`` it is given, and reslices a layer set visible even when it already was.
    """
    for layer in viewer.layers:
        if is_result_layer(layer) and layer is not newest and layer.visible:
            layer.visible = False
    if not newest.visible:
        newest.visible = True


def next_rendering(current: str) -> str:
    """The 3D rendering after ``current`` in translucent -> MIP -> attenuated MIP -> translucent."""
    try:
        return RENDERINGS[(RENDERINGS.index(current) + 1) % len(RENDERINGS)]
    except ValueError:
        return RENDERINGS[0]
