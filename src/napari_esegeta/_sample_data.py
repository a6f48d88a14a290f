"""Sample data: the engine's TOF-MRA-like phantom, its ground truth, and the bundled U-Net.

Sample volumes are 64^3 (each axis divisible by 4, as the U-Net needs) with
the phantom's anisotropic, x-flipped affine, so they exercise the same
geometry path as a real NIfTI file.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from esegeta_engine.io import Volume
from napari_esegeta._reader import volume_layer_data

SHAPE = (64, 64, 64)
SEED = 7
GROUND_TRUTH_NAME = "ground truth"


def _header(affine: np.ndarray, dtype: Any) -> Any:
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    return hdr


@lru_cache(maxsize=2)
def _phantom(shape: tuple[int, int, int] = SHAPE, seed: int = SEED) -> Any:
    from esegeta_engine.sample import make_phantom

    return make_phantom(shape, seed)


def phantom_volume_data(shape: tuple[int, int, int] = SHAPE, seed: int = SEED) -> list[Any]:
    """Layer data of the phantom volume (image)."""
    ph = _phantom(tuple(shape), seed)
    vol = Volume(ph.volume.astype(np.float32), ph.affine, _header(ph.affine, np.float32))
    return [volume_layer_data(vol, name="phantom TOF-MRA")]


def phantom_mask_data(shape: tuple[int, int, int] = SHAPE, seed: int = SEED) -> list[Any]:
    """Layer data of the phantom's ground-truth vessel mask (labels)."""
    ph = _phantom(tuple(shape), seed)
    vol = Volume(ph.mask, ph.affine, _header(ph.affine, np.uint8))
    data, kwargs, kind = volume_layer_data(vol, name=GROUND_TRUTH_NAME, labels=True)
    return [(data, kwargs, kind)]


def phantom() -> list[Any]:
    """npe2 sample: the phantom volume."""
    return phantom_volume_data()


def phantom_mask() -> list[Any]:
    """npe2 sample: the phantom volume and its ground-truth vessel mask."""
    return phantom_volume_data() + phantom_mask_data()


def phantom_with_model() -> list[Any]:
    """npe2 sample: volume + mask, and the bundled U-Net loaded in the esegeta dock.

    The model is loaded after napari has added the layers (next event-loop
    turn), in a worker thread; problems are shown in the Model widget.
    """
    try:
        import napari
        from qtpy.QtCore import QTimer

        viewer = napari.current_viewer()
        if viewer is not None and hasattr(viewer.window, "add_plugin_dock_widget"):
            QTimer.singleShot(0, lambda: open_with_bundled_model(viewer))
    except Exception:  # the layers still load without the model
        pass
    return phantom_mask()


def open_with_bundled_model(viewer: Any) -> Any:
    """Dock the esegeta widget (Model tab) and start loading the bundled U-Net."""
    _, widget = viewer.window.add_plugin_dock_widget("napari-esegeta", "esegeta")
    widget.show_tab("Model")
    widget.model.use_bundled()
    return widget.model
