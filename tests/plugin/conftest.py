"""Shared fixtures of the plugin tests: a small phantom, the (bundled) U-Net, docked widgets."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

SHAPE = (32, 32, 32)  # the U-Net needs every axis divisible by 4


@pytest.fixture(scope="session")
def phantom():
    """A small phantom: volume, mask and its anisotropic, x-flipped affine."""
    from esegeta_engine.sample import make_phantom

    return make_phantom(SHAPE, seed=3)


@pytest.fixture(autouse=True)
def _napari_settings_not_saved():
    """napari autosaves its settings to the user's file; tests must never write there."""
    try:
        from napari.settings import get_settings
    except ImportError:
        yield
        return
    settings = get_settings()
    saved, readers = settings._save_on_change, dict(settings.plugins.extension2reader)
    settings._save_on_change = False
    yield
    settings.plugins.extension2reader = readers
    settings._save_on_change = saved


@pytest.fixture(autouse=True)
def _probe_never_stops_a_run(monkeypatch):
    """The Explain tab's one-patch probe stops runs estimated over 2 minutes; on a loaded test machine the
    tiny test runs can be estimated that long. Tests of the stop set the limit themselves."""
    try:
        import napari_esegeta._qt.explain_widget as EW
    except ImportError:
        return
    monkeypatch.setattr(EW, "WARN_SECONDS", float("inf"))


@pytest.fixture
def bundled_model(monkeypatch, tmp_path_factory) -> Path:
    """Path of the bundled U-Net state dict.

    If the engine's sample weights are not installed (yet), a deterministic
    untrained U-Net stands in, served through the same ``sample_info`` /
    ``unet_paths`` API so the plugin's "bundled model" code path is tested.
    """
    from esegeta_engine import sample

    try:
        path = sample.unet_paths()["state"]
        if Path(path).is_file():
            return Path(path)
    except Exception:
        pass
    import torch

    folder = tmp_path_factory.mktemp("unet")
    torch.manual_seed(0)
    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "features": [8, 16, 32]}
    torch.save(sample.UNet(**{**kwargs, "features": tuple(kwargs["features"])}).state_dict(),
               folder / "unet.pt")
    info = {"preprocess": {"normalisation": "minmax", "axis_order": "xyz"},
            "models": {"unet3d_vessels": {"class_path": "esegeta_engine.sample.nets:UNet",
                                          "kwargs": kwargs, "files": {"state": "unet.pt"},
                                          "classes": ["background", "vessel"]}}}
    monkeypatch.setattr(sample, "sample_info", lambda: info)
    monkeypatch.setattr(sample, "unet_paths", lambda: {"state": folder / "unet.pt"})
    return folder / "unet.pt"


@pytest.fixture
def make_docked(make_napari_viewer):
    """Factory: a viewer with the phantom image (plugin geometry) and the three widgets docked."""
    from qtpy.QtWidgets import QApplication

    from napari_esegeta._qt.compare_widget import CompareWidget
    from napari_esegeta._qt.explain_widget import ExplainWidget
    from napari_esegeta._qt.model_widget import ModelWidget
    from napari_esegeta._sample_data import phantom_volume_data

    made = []

    def factory(show: bool = False):
        viewer = make_napari_viewer(show=show)
        data, kwargs, _ = phantom_volume_data(SHAPE, 3)[0]
        image = viewer.add_image(data, **kwargs)
        widgets = {"model": ModelWidget(viewer), "explain": ExplainWidget(viewer),
                   "compare": CompareWidget(viewer)}
        for name, w in widgets.items():
            viewer.window.add_dock_widget(w, name=name)
        made.append(widgets["explain"])
        return viewer, image, widgets

    yield factory
    for explain in made:  # never leave a worker behind
        if explain.running:
            explain.cancel()
            deadline = time.perf_counter() + 10
            while explain.running and time.perf_counter() < deadline:
                QApplication.processEvents()
                time.sleep(0.01)


@pytest.fixture
def docked(make_docked):
    """A hidden viewer with the phantom and the widgets (see ``make_docked``)."""
    return make_docked()
