"""The one-patch probe (issue 19.7): a warm-up call of one patch (not timed), a timed forward + backward and a
timed forward without gradients (the prediction pass's unit), a second, half-edge crop under whole-volume
execution (warmed too), crops padded as the volume is, and an estimate that scales with the plan (prediction
pass included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from esegeta_engine.config import ExecutionConfig, MethodConfig, PreprocessConfig, TargetConfig
from esegeta_engine.explain import Explainer
from esegeta_engine.io import Volume
from esegeta_engine.jobs.probe import CostLine, ProbeEstimate, probe_run


class CountingNet(nn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.conv = conv(1, 2, 3, padding=1)
        self.calls: list[tuple[int, ...]] = []
        self.grad: list[bool] = []  # whether each call built a graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape[2:]))
        self.grad.append(torch.is_grad_enabled())
        return self.conv(x)


def _volume(shape):
    return Volume(np.random.default_rng(0).random(shape).astype(np.float32), np.eye(4))


@pytest.mark.parametrize("shape, patch", [((40, 36, 24), 16), ((40, 36), 16)])
def test_probe_evaluates_exactly_one_patch_three_times(shape, patch) -> None:
    net = CountingNet(len(shape)).eval()
    ex = Explainer(net, PreprocessConfig(spatial_dims=len(shape)), TargetConfig(classes=[1]),
                   execution=ExecutionConfig(patch_size=patch))
    est = probe_run(ex, _volume(shape), [MethodConfig(name="saliency")])
    assert isinstance(est, ProbeEstimate)
    assert net.calls == [(patch,) * len(shape)] * 3  # a warm-up, the timed call and the timed forward, of one patch
    assert net.grad == [True, True, False]  # the last as the prediction pass runs: no graph
    assert est.probed == 1 and est.network_calls == 3 and est.patch == (patch,) * len(shape)
    assert est.warmup_seconds is not None and est.warmup_seconds > 0  # the untimed first call, kept for comparison
    from esegeta_engine.forward.sliding import WindowGrid, WindowSettings

    grid = WindowGrid(shape, WindowSettings((patch,) * len(shape)), torch.device("cpu"))
    assert est.patches_per_evaluation == len(grid) > 1
    assert all(p.grad is None for p in net.parameters()) and not net.training  # model untouched
    assert est.peak_bytes > 0


def test_whole_volume_probe_times_two_crops_and_reads_the_volume_off_their_line() -> None:
    """A network's time is not proportional to its voxels (a fixed part per call): a half-edge crop is
    timed too, after its own warm-up call, and the whole volume's call is read off the line through the two
    sizes. The crop keeps each long axis's size modulo 32 (96 -> 64, 80 -> 48)."""
    net = CountingNet(3).eval()
    ex = Explainer(net, PreprocessConfig(), TargetConfig(classes=[1]))
    est = probe_run(ex, _volume((96, 80, 8)), [MethodConfig(name="saliency")])
    assert net.calls == [(64, 48, 8)] * 3 + [(32, 24, 4)] * 3  # each size: a warm-up, then the timed pair
    assert net.grad == [True, True, False] * 2
    assert est.probed == 2 and est.network_calls == 6 and est.timed == ((64, 48, 8), (32, 24, 4))
    assert est.patches_per_evaluation == pytest.approx(96 * 80 * 8 / (64 * 48 * 8))
    line, plain = est.evaluation_line, est.prediction_line
    assert line.at(64 * 48 * 8) == pytest.approx(est.patch_seconds)  # the line goes through the timed crop
    assert plain.at(64 * 48 * 8) == pytest.approx(est.forward_seconds)
    assert est.evaluation_seconds == pytest.approx(line.at(96 * 80 * 8))
    assert est.prediction_seconds == pytest.approx(plain.at(96 * 80 * 8))
    assert est.seconds == pytest.approx(est.prediction_seconds + est.expected_evaluations * est.evaluation_seconds)


def _fake_calls(costs: dict, log: list):
    """``_calls`` with injected timings: forward + backward ``fixed + per_voxel × voxels`` of what the network
    sees (the crop padded to ``divisible_by``), forward a third of it; a cold call (``warm=False``) 0.5 s more."""
    from esegeta_engine.jobs.probe import _Timed

    def fake(model, x, *, output, divisible_by, precision, cancel, warm, forward):
        size = tuple(int(s) for s in x.shape[2:])
        log.append((size, warm, divisible_by))
        seen = float(np.prod([-(-s // divisible_by) * divisible_by for s in size]))
        fb = costs["fixed"] + costs["per_voxel"] * seen + (0.0 if warm else 0.5)
        return _Timed(0.9 if warm else None, fb, fb / 3, 1000, 0.1, (2 * fb, 2 * fb / 3))
    return fake


def test_whole_volume_estimate_arithmetic_with_injected_timings_and_a_warmed_small_crop(monkeypatch) -> None:
    """With timings ``0.4 + 1e-6 × voxels`` per crop, the estimate is that line at the whole volume's voxels
    exactly, prediction pass included; both crops are timed warm (a cold one would add its 0.5 s)."""
    import esegeta_engine.jobs.probe as P

    log: list = []
    monkeypatch.setattr(P, "_calls", _fake_calls({"fixed": 0.4, "per_voxel": 1e-6}, log))
    ex = Explainer(CountingNet(3).eval(), PreprocessConfig(), TargetConfig(classes=[1]))
    est = probe_run(ex, _volume((197, 133, 90)), [MethodConfig(name="saliency")])
    big, small = (69, 69, 58), (34, 34, 29)  # 197 % 32 = 5 -> 48 + 21; 90 -> 48 + 10; then half edges
    assert log == [(big, True, 1), (small, True, 1)]  # the small crop warmed too
    assert est.timed == (big, small) and est.network_calls == 6
    assert est.evaluation_line.fixed == pytest.approx(0.4) and est.evaluation_line.per_voxel == pytest.approx(1e-6)
    whole = 197 * 133 * 90
    assert est.evaluation_seconds == pytest.approx(0.4 + 1e-6 * whole)
    assert est.prediction_seconds == pytest.approx((0.4 + 1e-6 * whole) / 3)
    assert est.seconds == pytest.approx(est.prediction_seconds + est.expected_evaluations * est.evaluation_seconds)
    assert est.cpu_seconds == pytest.approx(2 * est.seconds)  # the CPU line, through the CPU times
    assert est.patches_per_evaluation == pytest.approx(whole / np.prod(big))


class _Multiple(CountingNet):
    """A U-Net-like network that takes only sizes divisible by 4 (as the bundled U-Net)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % 4 for s in x.shape[2:]):
            raise ValueError(f"spatial size must be a multiple of 4, got {list(x.shape[2:])}")
        return super().forward(x)


def test_the_crop_needs_the_padding_the_volume_needs_and_sizes_are_counted_padded(monkeypatch) -> None:
    """A 64³ crop of 197×233×189 needed no padding where the volume needs 200×236×192: the crop keeps the
    remainders, the probe finds the multiple (4) on it, and the line is read at the padded volume."""
    net = _Multiple(3).eval()
    ex = Explainer(net, PreprocessConfig(), TargetConfig(classes=[1]))
    est = probe_run(ex, _volume((97, 90, 8)), [MethodConfig(name="saliency")])
    assert est.divisible_by == 4 and est.timed == ((65, 58, 8), (32, 28, 4))
    assert net.calls[-6:] == [(68, 60, 8)] * 3 + [(32, 28, 4)] * 3  # the crop padded as the run pads the volume
    assert est.evaluation_seconds == pytest.approx(est.evaluation_line.at(100 * 92 * 8))
    assert est.patches_per_evaluation == pytest.approx(100 * 92 * 8 / (68 * 60 * 8))

    log: list = []  # the same arithmetic with injected timings: the padded counts, exactly
    monkeypatch.setattr(__import__("esegeta_engine.jobs.probe", fromlist=["_calls"]), "_calls",
                        _fake_calls({"fixed": 0.2, "per_voxel": 2e-6}, log))
    ex = Explainer(net, PreprocessConfig(), TargetConfig(classes=[1]))
    ex._divisible = 4  # as found
    est = probe_run(ex, _volume((97, 90, 8)), [MethodConfig(name="saliency")])
    assert est.evaluation_seconds == pytest.approx(0.2 + 2e-6 * 100 * 92 * 8)


def test_whole_volume_within_the_crop_is_probed_once_as_it_is() -> None:
    net = CountingNet(3).eval()
    ex = Explainer(net, PreprocessConfig(), TargetConfig(classes=[1]))
    est = probe_run(ex, _volume((40, 36, 8)), [MethodConfig(name="saliency")])
    assert net.calls == [(40, 36, 8)] * 3 and est.network_calls == 3 and est.patches_per_evaluation == 1
    assert est.evaluation_seconds == pytest.approx(est.patch_seconds)  # the volume itself was timed
    assert est.prediction_seconds == pytest.approx(est.forward_seconds)


def test_cost_line_through_two_sizes() -> None:
    line = CostLine.through([(8000, 5.5), (1000, 2.0)])  # 1.5 s a call + 0.5 ms a voxel
    assert line.fixed == pytest.approx(1.5) and line.per_voxel == pytest.approx(5e-4)
    assert line.at(100_000) == pytest.approx(51.5)  # proportional scaling from 8000 voxels would say 68.75
    noisy = CostLine.through([(8000, 2.0), (1000, 2.2)])  # timing noise: the small crop took longer
    assert noisy.fixed == 0 and noisy.at(16000) == pytest.approx(4.0)  # proportional to the larger
    assert CostLine.through([(8000, 2.0)]).at(16000) == pytest.approx(4.0)


def test_estimate_scales_with_expected_evaluations() -> None:
    net = CountingNet(3).eval()
    ex = Explainer(net, PreprocessConfig(), TargetConfig(classes=[1]), execution=ExecutionConfig(patch_size=16))
    vol = _volume((32, 32, 24))
    few = probe_run(ex, vol, [MethodConfig(name="saliency")])
    many = probe_run(ex, vol, [MethodConfig(name="integrated_gradients", params={"n_steps": 8})])
    assert many.expected_evaluations > few.expected_evaluations >= 1
    for est in (few, many):  # seconds = prediction pass + evaluations x patches per evaluation x one patch's time
        assert est.evaluation_seconds == pytest.approx(est.patches_per_evaluation * est.patch_seconds)
        assert est.prediction_seconds == pytest.approx(est.patches_per_evaluation * est.forward_seconds)
        assert est.prediction_seconds > 0
        assert est.seconds == pytest.approx(est.prediction_seconds + est.expected_evaluations * est.evaluation_seconds)
    assert len(net.calls) == 6  # one patch, three times, per probe
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


class _Clock:
    """A stand-in for ``time.perf_counter`` that only the network's modules move."""

    def __init__(self) -> None:
        self.t = 0.0

    def perf_counter(self) -> float:
        return self.t

    process_time = perf_counter


class _Ticking(nn.Module):
    def __init__(self, clock: _Clock, ticks: float, dims: int, channels: int) -> None:
        super().__init__()
        self.clock, self.ticks = clock, ticks
        self.conv = (nn.Conv3d if dims == 3 else nn.Conv2d)(channels, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.t += self.ticks
        return self.conv(x)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("sliding", [True, False])
def test_cancel_wait_is_the_slowest_layer_scaled_to_the_input(monkeypatch, dims: int, sliding: bool) -> None:
    """The longest stretch without a cancel check is the slowest module (5 clock units of 1 + 5 + 1), at the
    patch's scale for a sliding window and scaled as the whole call is for a whole volume."""
    import esegeta_engine.jobs.probe as P

    clock = _Clock()
    monkeypatch.setattr(P, "time", clock)
    net = nn.Sequential(_Ticking(clock, 1, dims, 1), _Ticking(clock, 5, dims, 2), _Ticking(clock, 1, dims, 2)).eval()
    shape = (96, 80) if dims == 2 else (96, 80, 8)
    ex = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(classes=[1]),
                   execution=ExecutionConfig(patch_size=16) if sliding else None)
    est = probe_run(ex, _volume(shape), [MethodConfig(name="saliency")])
    assert est.patch_seconds == 7 and est.forward_seconds == 7  # every module once per call
    assert est.cpu_seconds == pytest.approx(est.seconds)  # the same clock for both here
    if sliding:
        assert est.cancel_wait_seconds == 5 and est.evaluation_seconds == 7 * est.patches_per_evaluation
    else:  # both crops took 7 units: time proportional to the voxels, and so is the slowest layer's
        assert est.evaluation_line.fixed == 0
        assert est.cancel_wait_seconds == pytest.approx(5 * est.patches_per_evaluation)


class _Blocks(nn.Module):
    """A net that names its blocks for activation checkpointing (as the nnU-Net pipeline does)."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.block = nn.Sequential(conv(1, 4, 3, padding=1), nn.ReLU())
        self.head = conv(4, 2, 1)
        self.block_runs = 0
        self.block[0].register_forward_pre_hook(lambda *_: setattr(self, "block_runs", self.block_runs + 1))

    def checkpoint_segments(self) -> list[nn.Module]:
        return [self.block]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("method, setting, used", [("saliency", "auto", True), ("saliency", "off", False),
                                                    ("guided_backprop", "auto", False)])
def test_probe_runs_checkpointed_as_the_run_will_and_says_so(dims, method, setting, used) -> None:
    """The probe's timed forward + backward runs the blocks checkpointed exactly when the run's method will:
    each checkpointed block runs again in the backward (counted), the record says so, the model is restored."""
    net = _Blocks(dims).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ex = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(classes=[1]),
                   execution=ExecutionConfig(checkpointing=setting))
    est = probe_run(ex, _volume((24,) * dims), [MethodConfig(name=method)])
    assert est.checkpointing is not None and est.checkpointing["used"] is used
    # a warm-up and a timed forward + backward, then a forward without gradients; checkpointed: once more in
    # each backward (the recomputation)
    assert net.block_runs == (5 if used else 3)
    if used:
        assert est.checkpointing["checkpointed_block_calls"] == 2 and est.checkpointing["segments"] == 1
    assert "forward" not in net.block.__dict__  # the wrapper is gone
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
