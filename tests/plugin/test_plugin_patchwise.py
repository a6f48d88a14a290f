"""The plugin on volumes where one whole-volume evaluation is slow: patch-wise execution from the
Model tab, Cancel within 1 s, and a progress total equal to the evaluations the run makes."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from plugin_helpers import wait_until

pytestmark = pytest.mark.gui


class SlowSegNet(nn.Module):
    """A segmentation net whose forward takes ~2 s on the whole 32^3 phantom, ~0.06 s on an 8^3 patch;
    it counts the forward passes that start after the cancel event is set."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.cancel = None
        self.calls = self.after_cancel = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.cancel is not None and self.cancel().is_set():
            self.after_cancel += 1
        time.sleep(2.0 * x.numel() / 32 ** 3)
        return self.conv(x)


def test_cancel_stops_at_the_next_patch_under_patch_wise_execution(qtbot, docked):
    """Counted, not timed: after Cancel no patch evaluation starts (at most the one past its check);
    the latency is measured by benchmarks/bench_meeting_flow.py."""
    viewer, image, w = docked
    session = w["model"].session
    torch.manual_seed(0)
    net = SlowSegNet().eval()
    session.set_model(net, "slow", session.preprocess, None)
    w["model"].patch_edit.setText("8")
    w["model"]._execution_changed()
    assert session.execution is not None and session.execution.patch_size == 8
    ex = w["explain"]
    net.cancel = lambda: ex.control.event
    ex.kind_combo.setCurrentText("argmax")
    ex.classes_edit.setText("1")
    ex.methods.check("saliency")
    assert ex.run() is not None, ex.status.text()
    wait_until(qtbot, lambda: "saliency" in ex.progress_label.text(), 120)
    qtbot.wait(700)
    assert ex.running
    ex.cancel_btn.click()
    calls = net.calls
    wait_until(qtbot, lambda: not ex.running, 60)
    assert net.after_cancel <= 1 and net.calls <= calls + 1, (net.calls, calls, net.after_cancel)
    assert "cancelled" in ex.status.text()


def test_progress_total_equals_the_evaluations_the_run_makes(qtbot, docked, bundled_model):
    viewer, image, w = docked
    w["model"].use_bundled()
    wait_until(qtbot, lambda: w["model"].session.model is not None, 60)
    ex = w["explain"]
    ex.kind_combo.setCurrentText("argmax")
    ex.classes_edit.setText("1")
    ex.methods.check("saliency")
    ex.methods.check("integrated_gradients", n_steps=6, internal_batch_size=2)
    ex.methods.check("occlusion", window=16)
    assert ex.run() is not None, ex.status.text()
    wait_until(qtbot, lambda: not ex.running, 120)
    results = [ly for ly in viewer.layers if "method" in ly.metadata.get("esegeta", {})]
    made = sum(ly.metadata["esegeta"]["evaluations"] for ly in results)
    assert len(results) == 3
    assert ex._rate.expected == made  # the total shown (with the ETA) is what the run then made
