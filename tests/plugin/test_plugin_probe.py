"""The Explain tab's one-patch probe (issue 19.7): the estimate shows before any method runs, and a run
estimated to be long stops after the probe (a warm-up, a timed forward + backward and a timed forward of one
patch, and the same two of a half-edge crop for a whole volume larger than the crop) until the second click
(counted on the network)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plugin_helpers import wait_until


class CountingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x)


@pytest.mark.gui
def test_long_estimate_stops_after_one_patch(qtbot, docked, monkeypatch) -> None:
    import napari_esegeta._qt.explain_widget as EW

    viewer, image, w = docked
    session = w["model"].session
    net = CountingNet().eval()
    session.set_model(net, "counting", session.preprocess, None)
    ex = w["explain"]
    ex.kind_combo.setCurrentText("argmax")
    ex.methods.check("saliency")
    monkeypatch.setattr(EW, "WARN_SECONDS", 0.0)  # every estimate is "long"
    n_layers = len(viewer.layers)
    assert ex.run() is not None
    wait_until(qtbot, lambda: not ex.running, 60)
    assert ex.last_estimate is not None
    probe_calls = ex.last_estimate.network_calls
    assert net.calls == probe_calls == 1 + 2 * ex.last_estimate.probed  # the probe's calls, nothing else
    assert len(viewer.layers) == n_layers and ex.run_btn.text() == "Run anyway"
    assert "estimated at" in ex.status.text() and "patch" in ex.status.text()
    ex.run()  # the second click runs it, without probing again
    wait_until(qtbot, lambda: not ex.running, 120)
    assert len(ex.added) == 1 and ex.last_estimate is None
    assert net.calls > probe_calls


@pytest.mark.gui
def test_estimate_shows_while_the_run_goes_on(qtbot, docked) -> None:
    viewer, image, w = docked
    session = w["model"].session
    net = CountingNet().eval()
    session.set_model(net, "counting", session.preprocess, None)
    ex = w["explain"]
    ex.kind_combo.setCurrentText("argmax")
    ex.methods.check("saliency")
    ex.run()
    wait_until(qtbot, lambda: not ex.running, 120)
    est = ex.last_estimate
    assert est is not None and est.expected_evaluations is not None and est.seconds is not None
    assert len(ex.added) == 1 and ex.run_btn.text() == "Run"


@pytest.mark.gui
@pytest.mark.parametrize("patch", [None, 16])
def test_a_long_whole_volume_layer_is_named_with_the_cancel_wait(qtbot, docked, monkeypatch, patch) -> None:
    """Whole volume: the status says how long Cancel can wait (the slowest layer, from the probe) and names the
    patch size without applying it; a sliding window's steps are one patch's, so no note."""
    import napari_esegeta._cost as C
    from esegeta_engine.config import ExecutionConfig

    viewer, image, w = docked
    session = w["model"].session
    net = CountingNet().eval()
    session.set_model(net, "counting", session.preprocess, None)
    session.execution = ExecutionConfig(patch_size=patch) if patch else None
    monkeypatch.setattr(C, "CANCEL_NOTE_S", -1.0)  # every layer is "long"
    ex = w["explain"]
    ex.kind_combo.setCurrentText("argmax")
    ex.methods.check("saliency")
    shown: list[str] = []
    monkeypatch.setattr(C, "cancel_note", lambda est, _f=C.cancel_note: shown.append(_f(est)) or shown[-1])
    ex.run()
    wait_until(qtbot, lambda: not ex.running, 120)
    assert len(shown) == 1 and len(ex.added) == 1
    if patch:
        assert shown == [""] and ex.last_estimate.evaluation_line is None
    else:
        assert "Cancel waits for the layer running" in shown[0] and "patch size" in shown[0]
        assert ex.last_estimate.cancel_wait_seconds > 0
    assert net.calls > ex.last_estimate.network_calls
