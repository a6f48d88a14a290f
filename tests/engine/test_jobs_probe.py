"""The one-patch probe (issue 19.7): two network calls of one patch (a warm-up, not timed, and the timed one),
and an estimate that scales with the plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from esegeta_engine.config import ExecutionConfig, MethodConfig, PreprocessConfig, TargetConfig
from esegeta_engine.explain import Explainer
from esegeta_engine.io import Volume
from esegeta_engine.jobs.probe import ProbeEstimate, probe_run


class CountingNet(nn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.conv = conv(1, 2, 3, padding=1)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape[2:]))
        return self.conv(x)


def _volume(shape):
    return Volume(np.random.default_rng(0).random(shape).astype(np.float32), np.eye(4))


@pytest.mark.parametrize("shape, patch", [((40, 36, 24), 16), ((40, 36), 16)])
def test_probe_evaluates_exactly_one_patch_twice(shape, patch) -> None:
    net = CountingNet(len(shape)).eval()
    ex = Explainer(net, PreprocessConfig(spatial_dims=len(shape)), TargetConfig(classes=[1]),
                   execution=ExecutionConfig(patch_size=patch))
    est = probe_run(ex, _volume(shape), [MethodConfig(name="saliency")])
    assert isinstance(est, ProbeEstimate)
    assert net.calls == [(patch,) * len(shape)] * 2  # a warm-up and the timed call, of one patch
    assert est.probed == 1 and est.network_calls == 2 and est.patch == (patch,) * len(shape)
    from esegeta_engine.forward.sliding import WindowGrid, WindowSettings

    grid = WindowGrid(shape, WindowSettings((patch,) * len(shape)), torch.device("cpu"))
    assert est.patches_per_evaluation == len(grid) > 1
    assert all(p.grad is None for p in net.parameters()) and not net.training  # model untouched
    assert est.peak_bytes > 0


def test_whole_volume_probe_crops_and_scales_by_voxels() -> None:
    net = CountingNet(3).eval()
    ex = Explainer(net, PreprocessConfig(), TargetConfig(classes=[1]))
    est = probe_run(ex, _volume((96, 80, 8)), [MethodConfig(name="saliency")])
    assert net.calls == [(64, 64, 8)] * 2
    assert est.patches_per_evaluation == pytest.approx(96 * 80 * 8 / (64 * 64 * 8))


def test_estimate_scales_with_expected_evaluations() -> None:
    net = CountingNet(3).eval()
    ex = Explainer(net, PreprocessConfig(), TargetConfig(classes=[1]), execution=ExecutionConfig(patch_size=16))
    vol = _volume((32, 32, 24))
    few = probe_run(ex, vol, [MethodConfig(name="saliency")])
    many = probe_run(ex, vol, [MethodConfig(name="integrated_gradients", params={"n_steps": 8})])
    assert many.expected_evaluations > few.expected_evaluations >= 1
    for est in (few, many):  # seconds = evaluations x patches per evaluation x one patch's time
        assert est.seconds == pytest.approx(est.expected_evaluations * est.patches_per_evaluation * est.patch_seconds)
    assert len(net.calls) == 4  # one patch, twice, per probe
    assert "patch" in many.text() and "evaluations" in many.text()


@pytest.mark.parametrize("dims", [2, 3])
def test_a_cancel_stops_the_probe_inside_its_one_call(dims: int) -> None:
    """Cancel during the probe (a whole 64³ volume's forward and backward on the sample) stops it at the
    network's next module: the module after the click never runs."""
    import threading

    from esegeta_engine.errors import Cancelled

    cancel = threading.Event()

    class Clicked(CountingNet):
        def __init__(self) -> None:
            super().__init__(dims)
            self.head = (nn.Conv3d if dims == 3 else nn.Conv2d)(2, 2, 1)
            self.head_calls = 0
            self.head.register_forward_pre_hook(lambda *_: setattr(self, "head_calls", self.head_calls + 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = super().forward(x)
            cancel.set()  # the click, between the two convolutions
            return self.head(y)

    net = Clicked().eval()
    ex = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(classes=[1]))
    with pytest.raises(Cancelled):
        probe_run(ex, _volume((24,) * dims), [MethodConfig(name="saliency")], cancel=cancel)
    assert len(net.calls) == 1 and net.head_calls == 0
    with pytest.raises(Cancelled):  # a cancel before the probe: no call at all
        probe_run(ex, _volume((24,) * dims), [MethodConfig(name="saliency")], cancel=cancel)
    assert len(net.calls) == 1
