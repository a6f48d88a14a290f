"""A new map's whole-volume statistics (contrast limits, signedness, seams, trust) are computed in the
worker thread, never on napari's GUI thread (issue 19.6): counted per call, with the thread it ran in."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from plugin_helpers import wait_until


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _run_two_maps(qtbot, w):
    """Saliency and input × gradient of the tiny network, run from the Explain tab to the end: the tab."""
    session = w["model"].session
    session.set_model(TinyNet().eval(), "tiny", session.preprocess, None)
    ex = w["explain"]
    ex.kind_combo.setCurrentText("argmax")
    for name in ("saliency", "input_x_gradient"):
        ex.methods.check(name)
    assert ex.run() is not None
    wait_until(qtbot, lambda: not ex.running, 120)
    return ex


@pytest.fixture
def threads_of(monkeypatch):
    """Record the thread of every call of the contrast-limit and signedness functions."""
    import napari_esegeta._layers as L

    seen: list[tuple[str, bool]] = []
    for name in ("support_limit", "is_signed"):
        original = getattr(L, name)

        def spy(*args, _f=original, _name=name, **kwargs):
            seen.append((_name, threading.current_thread() is threading.main_thread()))
            return _f(*args, **kwargs)

        monkeypatch.setattr(L, name, spy)
    return seen


@pytest.mark.gui
def test_explain_builds_map_layers_off_the_gui_thread(qtbot, docked, threads_of) -> None:
    viewer, image, w = docked
    ex = _run_two_maps(qtbot, w)
    assert len(ex.added) == 2, ex.status.text()
    # each map: one contrast limit and one signedness check, all in the worker
    assert sorted(n for n, _ in threads_of) == ["is_signed"] * 2 + ["support_limit"] * 2
    assert not any(on_main for _, on_main in threads_of)
    layer = viewer.layers[ex.added[-1]]
    lim = layer.metadata["esegeta"]["support_limit"]
    assert layer.contrast_limits[1] == pytest.approx(lim) and lim > 0


@pytest.mark.gui
def test_explain_builds_napari_layer_models_in_the_worker(qtbot, docked, monkeypatch) -> None:
    """napari's ``Image`` of each map is constructed in the worker; the GUI thread only inserts that object."""
    from napari.layers import Image

    viewer, image, w = docked
    built: list[tuple[object, bool]] = []
    init = Image.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append((self, threading.current_thread() is threading.main_thread()))

    monkeypatch.setattr(Image, "__init__", spy)
    ex = _run_two_maps(qtbot, w)
    assert len(ex.added) == 2, ex.status.text()
    maps = [viewer.layers[name] for name in ex.added]
    # exactly the two maps' layers were constructed, both in the worker, and those objects are in the viewer
    assert len(built) == 2 and not any(on_main for _, on_main in built)
    assert all(any(layer is obj for obj, _ in built) for layer in maps)


@pytest.mark.gui
def test_evaluate_builds_stage_layers_off_the_gui_thread(qtbot, docked, threads_of) -> None:
    viewer, image, w = docked
    session = w["model"].session
    session.set_model(TinyNet().eval(), "tiny", session.preprocess, None)
    ex = w["explain"]
    ex.kind_combo.setCurrentText("argmax")
    ex.methods.check("saliency")
    ex.run()
    wait_until(qtbot, lambda: not ex.running, 120)
    threads_of.clear()
    from napari_esegeta._qt.evaluate_widget import EvaluateWidget

    ev = EvaluateWidget(viewer)
    viewer.window.add_dock_widget(ev, name="evaluate")
    ev.refresh_maps()
    ev.form.set_checked(axioms=False, infidelity=False, faithfulness=False, randomisation=True)
    assert ev.run() is not None
    wait_until(qtbot, lambda: not ev.running, 180)
    stages = list(ev.added)
    assert stages, ev.status.text()
    assert len([n for n, _ in threads_of if n == "support_limit"]) == len(stages)
    assert not any(on_main for _, on_main in threads_of)
    assert np.isfinite(viewer.layers[stages[0]].contrast_limits).all()


@pytest.mark.gui
def test_a_map_napari_cannot_build_is_one_status_line_and_the_others_still_come(qtbot, docked, monkeypatch) -> None:
    """napari's ``Image`` refusing one map (built in the worker) costs that map only, never the run."""
    import napari_esegeta._run as R

    viewer, image, w = docked
    original, calls = R.image_layers, []

    def first_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("napari refused this layer")
        return original(*args, **kwargs)

    monkeypatch.setattr(R, "image_layers", first_fails)
    ex = _run_two_maps(qtbot, w)
    assert len(calls) == 2 and len(ex.added) == 1
    assert "could not be shown" in ex.status.text() and "napari refused this layer" in ex.status.text()
