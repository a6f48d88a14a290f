"""The channel target and the feature-visualisation methods in the Explain widget."""

from __future__ import annotations

import numpy as np
import pytest

from plugin_helpers import wait_until

pytestmark = pytest.mark.gui


def test_channel_target_and_visualisations(qtbot, docked, bundled_model):
    viewer, image, w = docked
    w["model"].use_bundled()
    wait_until(qtbot, lambda: w["model"].session.model is not None
               or w["model"].status.property("status_kind") == "error", 60)
    ex = w["explain"]
    layers = [ex.target_layer_combo.itemData(i) for i in range(ex.target_layer_combo.count())]
    assert layers and ex.target_layer_combo.currentData() in layers
    ex.kind_combo.setCurrentText("channel")
    assert not ex.target_layer_combo.isHidden() and not ex.roi_combo.isVisible()
    ex.channel_spin.setValue(1)
    ex.methods.check("saliency")
    ex.methods.check("layer_visualisation", channels=2, steps=2)
    n_before = len(viewer.layers)
    assert ex.run() is not None, ex.status.text()
    wait_until(qtbot, lambda: not ex.running, 120)
    assert ex.status.property("status_kind") in ("ok", "warning"), ex.status.text()
    new = list(viewer.layers)[n_before:]
    sal = [ly for ly in new if ly.metadata["esegeta"]["method"] == "saliency"]
    vis = [ly for ly in new if ly.metadata["esegeta"]["method"] == "layer_visualisation"]
    assert len(sal) == 1 and len(vis) == 2  # one layer per visualised channel
    meta = sal[0].metadata["esegeta"]
    assert meta["target"] == "channel" and meta["channel"] == 1
    assert meta["target_layer"] == ex.target_layer_combo.currentData()
    for ly in sal + vis:
        assert ly.data.shape == image.data.shape
        np.testing.assert_allclose(ly.affine.affine_matrix, image.affine.affine_matrix)
        np.testing.assert_allclose(ly.scale, image.scale)
    assert not np.array_equal(vis[0].data, vis[1].data)
    # the evaluation panel rebuilds the channel target from the layer's provenance
    from napari_esegeta import _evaluate as E

    info = E.map_info(sal[0], {})
    assert info.target.kind == "channel" and info.target.channel == 1
    assert info.target.layer == meta["target_layer"]
    with pytest.raises(E.EvaluationSetupError, match="not an attribution map"):
        E.map_info(vis[0], {})
    assert vis[0].name.endswith("volume") and vis[1].name != vis[0].name


def test_channel_target_needs_a_layer():
    from esegeta_engine.errors import TargetError
    from napari_esegeta._run import make_target

    with pytest.raises(TargetError, match="no model layer"):
        make_target("channel", layer=None)
    assert make_target("channel", layer="conv", channel=3).channel == 3
