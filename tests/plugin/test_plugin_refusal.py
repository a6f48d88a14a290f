"""A method that sliding-window execution will refuse is refused before any model evaluation (issue 19.7),
counted on the model itself, in the Explain tab's engine call and on the Run click."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from esegeta_engine.config import ExecutionConfig, MethodConfig, PreprocessConfig, TargetConfig
from esegeta_engine.io import Volume


class CountingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.relu = nn.ReLU()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(self.relu(x))


@pytest.mark.parametrize("methods, kind", [(["feature_permutation"], "argmax"),
                                           (["saliency", "feature_permutation"], "argmax"), (["feature_permutation"], "channel")])
def test_refused_before_any_model_evaluation(methods, kind) -> None:
    from napari_esegeta._run import RunError, explain_events

    net = CountingNet().eval()
    volume = Volume(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), np.eye(4))
    target = TargetConfig(kind=kind, classes=[1], **({"layer": "conv"} if kind == "channel" else {}))
    configs = [MethodConfig(name=m) for m in methods]
    events = list(explain_events(net, volume, configs, preprocess=PreprocessConfig(), target=target, output=None,
                                 roi_mask=None, cancel=threading.Event(),
                                 execution=ExecutionConfig(patch_size=8)))
    assert net.calls == 0  # not one forward pass: no preparation, no prediction, no patch
    assert len(events) == 1 and isinstance(events[0], RunError)
    assert "cannot run here" in events[0].text and "sliding-window execution" in events[0].text
    assert "execution.mode: whole" in events[0].text


class RefusingPipeline(CountingNet):
    """A deployed pipeline's own refusal (as nnU-Net's refuses DeepLIFT's family), asked before any work."""

    def method_refusal(self, method: str) -> tuple[str, str] | None:
        return ("method 'deeplift' cannot run through this pipeline", "use integrated_gradients") \
            if method == "deeplift" else None


def test_a_pipelines_own_refusal_comes_before_any_model_evaluation() -> None:
    from napari_esegeta._run import RunError, explain_events

    net = RefusingPipeline().eval()
    volume = Volume(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), np.eye(4))
    events = list(explain_events(net, volume, [MethodConfig(name="saliency"), MethodConfig(name="deeplift")],
                                 preprocess=PreprocessConfig(), target=TargetConfig(classes=[1]), output=None,
                                 roi_mask=None, cancel=threading.Event(), execution=ExecutionConfig(patch_size=32)))
    assert net.calls == 0
    assert len(events) == 1 and isinstance(events[0], RunError)
    assert "deeplift" in events[0].text and "cannot run through this pipeline" in events[0].text


def test_the_same_methods_run_on_the_whole_volume() -> None:
    """The rule refuses only what the sliding window cannot compute (a whole-volume run works)."""
    from esegeta_engine.explain import MapReady
    from napari_esegeta._run import explain_events

    net = CountingNet().eval()
    volume = Volume(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), np.eye(4))
    events = list(explain_events(net, volume, [MethodConfig(name="eigen_cam", layers=["conv"])],
                                 preprocess=PreprocessConfig(), target=TargetConfig(classes=[1]), output=None,
                                 roi_mask=None, cancel=threading.Event(), execution=ExecutionConfig(patch_size=32)))
    assert any(isinstance(e, MapReady) for e in events) and net.calls > 0


@pytest.mark.gui
def test_run_click_refuses_without_a_worker(qtbot, docked) -> None:
    viewer, image, w = docked
    session = w["model"].session
    net = CountingNet().eval()
    session.set_model(net, "counting", session.preprocess, None)
    w["model"].patch_edit.setText("8")
    w["model"]._execution_changed()
    ex = w["explain"]
    ex.methods.check("feature_permutation")
    assert ex.run() is None and not ex.running
    assert ex.status.property("status_kind") == "error" and "feature_permutation" in ex.status.text()
    assert net.calls == 0
