"""The Model tab's folders: nnU-Net results folders and MONAI bundles through the engine's sources."""

from __future__ import annotations

import json

import pytest
import torch

from esegeta_engine.errors import BundleTrustError, ModelLoadError
from napari_esegeta import _model as M


def _bundle(tmp_path, marker):
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    torch.save({}, root / "models" / "model.pt")
    (root / "configs" / "inference.json").write_text(json.dumps({
        "network_def": {"_target_": "BasicUNet"}, "x": f"$open({str(marker)!r}, 'w').write('ran')"}))
    return root


def test_bundle_folder_asks_for_trust_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    req = M.ModelRequest(path=str(_bundle(tmp_path, marker)))
    with pytest.raises(BundleTrustError, match="would run Python"):
        M.load_request_pair(req)
    assert not marker.exists()


def test_a_folder_of_another_kind_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="neither an nnU-Net results folder .* nor a MONAI bundle"):
        M.load_request_pair(M.ModelRequest(path=str(tmp_path)))


def test_a_folders_own_window_greys_out_the_patch_size(qtbot, make_napari_viewer, tmp_path, monkeypatch,
                                                       bundled_model):
    import bundle_setup as B
    import napari_esegeta._qt.model_widget as mwmod
    from napari_esegeta._qt.model_widget import ModelWidget
    from plugin_helpers import wait_until

    mw = ModelWidget(make_napari_viewer())
    mw.patch_edit.setText("96")
    mw._execution_changed()
    assert mw.session.execution.patch_size == 96
    asked: list[str] = []
    monkeypatch.setattr(mwmod, "confirm_pickled", lambda parent, path, what="": asked.append(what) or True)
    mw.path_edit.setText(str(B.write_bundle(tmp_path / "bundle")))
    mw.load()
    wait_until(qtbot, lambda: mw.session.model is not None, 120)
    assert asked and "MONAI bundle" in asked[0]  # trust was asked, naming what would run
    tip = mw.patch_edit.toolTip()
    assert not mw.patch_edit.isEnabled() and mw.patch_edit.text() == ""
    assert "own sliding window" in tip and "SlidingWindowInferer" in tip and "[16, 16, 16]" in tip
    assert getattr(mw.session.execution, "patch_size", None) is None  # whole volume: no window on top
    mw.use_bundled()  # a plain model file: the user's patch size is back
    wait_until(qtbot, lambda: mw.session.model is not None and M.own_window(mw.session.model) is None, 60)
    assert mw.patch_edit.isEnabled() and mw.patch_edit.toolTip().startswith("Sliding-window execution")
