"""Cancel in the evaluation session's randomisation (issue 19.9): no model evaluation starts after the cancel
(counted on the network), and the layer-order pass of the randomisation sees one patch, never the volume."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from esegeta_engine.config import ExecutionConfig, MethodConfig, PreprocessConfig, TargetConfig
from esegeta_engine.errors import Cancelled
from esegeta_engine.evaluation.api import evaluation_config
from esegeta_engine.evaluation.session import EvaluationSession, MapToScore
from esegeta_engine.explain import Explainer, MapReady, Progress
from esegeta_engine.io import Volume

SHAPE = (24, 24, 16)


class CountingNet(nn.Module):
    #: every forward of this net and of its copies (the randomisation deep-copies the model)
    shapes: list[tuple[int, ...]] = []

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv3d(4, 2, 3, padding=1)
        CountingNet.shapes.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape[2:]))
        return self.conv2(torch.relu(self.conv1(x)))


def _map(net, execution):
    torch.manual_seed(0)
    vol = Volume(np.random.default_rng(0).random(SHAPE).astype(np.float32), np.eye(4))
    target = TargetConfig(classes=[1])
    ready = next(e for e in Explainer(net, PreprocessConfig(), target, execution=execution)
                 .iter_explain([vol], [MethodConfig(name="saliency")]) if isinstance(e, MapReady))
    info = MapToScore(name="m", method="saliency", params={}, cls=1, target=target, array=ready.array,
                      target_label="vessel", execution=ready.execution)
    return vol, info


def _session(net, cancel):
    cfg = evaluation_config(axioms=False, infidelity=False, faithfulness=False, randomisation=True)
    return EvaluationSession(net, cfg, preprocess=PreprocessConfig(), cancel=cancel)


@pytest.mark.parametrize("execution", [None, ExecutionConfig(patch_size=16)])
def test_no_evaluation_starts_after_cancel(execution) -> None:
    net = CountingNet().eval()
    vol, info = _map(net, execution)
    cancel = threading.Event()
    after = None
    with pytest.raises(Cancelled):
        for ev in _session(net, cancel).randomise(vol, [info]):
            if isinstance(ev, Progress) and "randomisation" in ev.message and after is None:
                cancel.set()  # the click, as the stages are about to start
                after = len(net.shapes)
    assert after is not None and len(net.shapes) == after  # not one forward pass after the click


def test_randomisation_layer_order_pass_sees_a_patch() -> None:
    net = CountingNet().eval()
    execution = ExecutionConfig(patch_size=16)
    vol, info = _map(net, execution)
    net.shapes.clear()
    list(_session(net, threading.Event()).randomise(vol, [info]))
    assert net.shapes and set(net.shapes) == {(16, 16, 16)}  # every forward, the order pass included


class TrippingNet(CountingNet):
    """Sets the cancel inside its ``trip_at``-th forward (counted from the arming), between its two
    convolutions: a click while the network runs."""

    cancel: threading.Event | None = None
    trip_at: int | None = None
    finished: list[int] = []  # forwards that reached their end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape[2:]))
        y = torch.relu(self.conv1(x))
        if TrippingNet.trip_at is not None and len(self.shapes) == TrippingNet.trip_at:
            TrippingNet.cancel.set()
        y = self.conv2(y)
        self.finished.append(len(self.shapes))
        return y


@pytest.mark.parametrize("execution", [None, ExecutionConfig(patch_size=16)])
def test_a_cancel_inside_a_stage_evaluation_runs_no_further_forward(execution) -> None:
    """The click lands inside a randomised copy's evaluation (whole volume, or one patch of the
    sliding window): that forward stops at its next module, and no forward starts after it (the
    sliding window's patch loop watched a monitor the randomisation had replaced)."""
    net = TrippingNet().eval()
    TrippingNet.finished.clear()
    vol, info = _map(net, execution)
    cancel = threading.Event()
    armed = None
    try:
        with pytest.raises(Cancelled):
            for ev in _session(net, cancel).randomise(vol, [info]):
                if isinstance(ev, Progress) and "randomisation" in ev.message and armed is None:
                    armed = len(net.shapes)
                    TrippingNet.cancel, TrippingNet.trip_at = cancel, armed + 4  # inside a stage's evaluation
    finally:
        TrippingNet.trip_at = None
    assert armed is not None and len(net.shapes) == armed + 4
    assert net.finished[-1] == armed + 3  # the forward of the click stopped at its next module
