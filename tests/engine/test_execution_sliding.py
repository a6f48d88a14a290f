"""Sliding-window execution: MONAI equality, patch-wise gradients, patch reuse, ROI patches, AMP."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from captum.attr import GuidedBackprop, IntegratedGradients, Occlusion, Saliency
from monai.inferers import sliding_window_inference
from torch import nn

from esegeta_engine.config import ExecutionConfig, MethodConfig, PreprocessConfig, TargetConfig
from esegeta_engine.errors import Cancelled, MethodError
from esegeta_engine.forward.sliding import SlidingWindow, WindowGrid, WindowSettings
from esegeta_engine.explain import Explainer, MapReady
from esegeta_engine.io import Volume
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.forward.scoring import EvaluationMonitor
from esegeta_engine.targets import ArgmaxRegionTarget, RegionOfInterestTarget

from tiny_models import assert_untouched


def _net(dims: int, leaky: bool = False) -> nn.Module:
    torch.manual_seed(3)
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    act = nn.LeakyReLU(0.1) if leaky else nn.ReLU()
    return nn.Sequential(C(1, 4, 3, padding=1), act, C(4, 2, 3, padding=1)).eval()


CASES = [(2, (37, 50), (16, 16)), (3, (21, 30, 19), (16, 16, 8)), (3, (10, 12, 9), (16, 16, 16))]


@pytest.mark.parametrize("dims,shape,patch", CASES)
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_output_equals_monai(dims, shape, patch, blend, overlap):
    net = _net(dims)
    x = torch.randn(2, 1, *shape, generator=torch.Generator().manual_seed(1))
    sw = SlidingWindow(net, WindowSettings(patch, overlap, blend, 3))
    with torch.no_grad():
        ours = sw(x)
        ref = sliding_window_inference(x, patch, 3, net, overlap=overlap, mode=blend)
    assert ours.shape == ref.shape
    assert float((ours - ref).abs().max() / (ref.max() - ref.min())) <= 1e-5


@pytest.mark.parametrize("dims,shape,patch", CASES[:2])
@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "guided_backprop"])
def test_patchwise_gradient_equals_autograd_through_monai(dims, shape, patch, method):
    net = _net(dims, leaky=False)
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(2))
    expl = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(),
                     execution=ExecutionConfig(patch_size=list(patch), overlap=0.25, sw_batch_size=2))
    target = ArgmaxRegionTarget()
    target.prepare(expl.raw_output(x))
    monitor = EvaluationMonitor()
    sm = expl.make_score_model(target, x, monitor)
    assert sm.patchwise
    before = {k: v.clone() for k, v in net.state_dict().items()}
    spec = get_method(method)
    ctx = MethodContext(sm, x, 1, extra={"patchwise": True})
    ours = attribute(spec, ctx, spec.resolve_params({"n_steps": 8} if method == "integrated_gradients" else {}))
    assert_untouched(net, before)

    class Reference(nn.Module):  # autograd through the whole sliding-window function (MONAI)
        def __init__(self) -> None:
            super().__init__()
            self.net = net  # registered, so Captum's guided hooks reach its ReLUs

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return target(sliding_window_inference(inp, patch, 2, self.net, overlap=0.25, mode="gaussian"))

    ref_model = Reference()
    if method == "saliency":
        ref = Saliency(ref_model).attribute(x, target=1, abs=True)
    elif method == "integrated_gradients":
        ref = IntegratedGradients(ref_model).attribute(x, torch.zeros_like(x), target=1, n_steps=8,
                                                        internal_batch_size=1)
    else:
        ref = GuidedBackprop(ref_model).attribute(x, target=1)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert float(ref.abs().max()) > 0
    if method == "guided_backprop":  # the guided rule really acted (differs from the plain gradient)
        plain = Saliency(ref_model).attribute(x, target=1, abs=False)
        assert not torch.allclose(ours, plain, atol=1e-3 * float(plain.abs().max()))


def _windows_overlapping(grid: WindowGrid, window: tuple[int, ...], shape: tuple[int, ...]) -> int:
    """Independent count: (window position, patch) pairs that intersect, on the padded grid."""
    total = 0
    ranges = [range(0, s - w + 1, w) for s, w in zip(shape, window)]
    for start in np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, len(shape)):
        lo = [int(s) + o for s, o in zip(start, grid.offset)]
        for sl in grid.slices:
            if all(p.start < l + w and p.stop > l for p, l, w in zip(sl, lo, window)):
                total += 1
    return total


@pytest.mark.parametrize("dims,shape,patch,window", [(2, (24, 20), (8, 8), (4, 4)),
                                                      (3, (12, 10, 9), (6, 6, 6), (3, 5, 3))])
def test_occlusion_reuses_patches_and_equals_full_computation(dims, shape, patch, window):
    net = _net(dims)
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(4))
    expl = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(),
                     execution=ExecutionConfig(patch_size=list(patch), overlap=0.25, sw_batch_size=4))
    target = ArgmaxRegionTarget()
    target.prepare(expl.raw_output(x))
    monitor = EvaluationMonitor()
    sm = expl.make_score_model(target, x, monitor)
    sm.runner.set_base(x)
    spec = get_method("occlusion")
    params = spec.resolve_params({"window": list(window), "perturbations_per_eval": 3})
    ours = attribute(spec, MethodContext(sm, x, 1, extra={"patchwise": True}), params)

    class Full(nn.Module):
        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return target(sliding_window_inference(inp, patch, 4, net, overlap=0.25, mode="gaussian"))

    ref = Occlusion(Full()).attribute(x, sliding_window_shapes=(1, *window), strides=(1, *window),
                                      baselines=torch.zeros_like(x), target=1, perturbations_per_eval=3)
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    grid = sm.runner.grid(shape, x.device)
    expected = len(grid) + _windows_overlapping(grid, window, shape)  # base patches + changed patches
    assert monitor.patches == expected
    full_cost = len(grid) * (1 + int(np.prod([s // w for s, w in zip(shape, window)])))
    assert monitor.patches < full_cost


def test_feature_ablation_reuse_equals_full():
    net = _net(3)
    x = torch.randn(1, 1, 12, 12, 10, generator=torch.Generator().manual_seed(5))
    expl = Explainer(net, PreprocessConfig(), TargetConfig(),
                     execution=ExecutionConfig(patch_size=6, overlap=0.5, sw_batch_size=8))
    target = ArgmaxRegionTarget()
    target.prepare(expl.raw_output(x))
    spec = get_method("feature_ablation")
    params = spec.resolve_params({"mask": "grid", "grid_size": 4})
    sm = expl.make_score_model(target, x, EvaluationMonitor())
    sm.runner.set_base(x)
    ours = attribute(spec, MethodContext(sm, x, 1), params)
    plain = expl.make_score_model(target, x, EvaluationMonitor())  # no base: full sliding window each time
    ref = attribute(spec, MethodContext(plain, x, 1), params)
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert sm.monitor.patches < plain.monitor.patches


def test_roi_target_evaluates_only_overlapping_patches():
    net = _net(3)
    shape = (24, 24, 12)
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(6))
    roi = np.zeros(shape, bool)
    roi[2:6, 3:7, 2:5] = True  # a small box in one corner
    vol = Volume(x[0, 0].numpy(), np.eye(4), None)
    expl = Explainer(net, PreprocessConfig(), TargetConfig(kind="roi", classes=[1]),
                     execution=ExecutionConfig(patch_size=8, overlap=0.25))
    events = list(expl.iter_explain([vol], [MethodConfig(name="saliency")], roi_mask=roi, threaded=False))
    ready = [e for e in events if isinstance(e, MapReady)]
    assert len(ready) == 1
    grid = WindowGrid(shape, WindowSettings((8, 8, 8), 0.25), torch.device("cpu"))
    overlapping = len(grid.patches_overlapping(torch.from_numpy(roi)))
    assert overlapping < len(grid) / 4
    # one no-grad forward and one recomputation per overlapping patch
    assert ready[0].patch_evaluations == 2 * overlapping
    # equals saliency through the whole sliding-window function
    target = RegionOfInterestTarget(roi)
    xr = x.clone().requires_grad_()
    score = target(sliding_window_inference(xr, (8, 8, 8), 1, net, overlap=0.25, mode="gaussian"))[0, 1]
    (g,) = torch.autograd.grad(score, xr)
    assert np.allclose(ready[0].array, g.abs()[0, 0].numpy(), atol=1e-5 * float(g.abs().max()))


def test_cancel_stops_between_patch_batches():
    cancel = threading.Event()

    class Clicked(nn.Module):
        """The click lands during the third patch batch of 64."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(1, 2, 1)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 3:
                cancel.set()
            return self.conv(x)

    net = Clicked()
    sw = SlidingWindow(net, WindowSettings((4, 4, 4), 0.0), before_batch=lambda n: _check(cancel))
    x = torch.zeros(1, 1, 16, 16, 16)
    with pytest.raises(Cancelled), torch.no_grad():
        sw(x)
    assert net.calls == 3 and sw.patch_evaluations == 3  # no patch batch after the click (counted, no clock)


def _check(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise Cancelled("cancelled")


def test_bf16_on_cpu_runs_and_non_finite_map_is_redone_in_fp32():
    class OverflowsInLowPrecision(nn.Module):
        """Finite in fp32; its reduced-precision path overflows (as fp16 does past 65504)."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(1, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y * float("inf") if y.dtype != torch.float32 else y

    x = np.random.default_rng(0).normal(size=(12, 12, 12)).astype(np.float32)
    vol = Volume(x, np.eye(4), None)
    torch.manual_seed(0)
    good = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv3d(2, 2, 1))
    expl = Explainer(good, execution=ExecutionConfig(precision="bf16"))
    maps = [e for e in expl.iter_explain([vol], [MethodConfig(name="saliency")], threaded=False)
            if isinstance(e, MapReady)]
    assert maps and np.isfinite(maps[0].array).all() and maps[0].execution["precision"] == "bf16"
    assert not maps[0].notes
    torch.manual_seed(0)
    expl = Explainer(OverflowsInLowPrecision(), PreprocessConfig(), TargetConfig(classes=[1]),
                     execution=ExecutionConfig(precision="bf16"))
    events = list(expl.iter_explain([vol], [MethodConfig(name="saliency")], threaded=False))
    ready = [e for e in events if isinstance(e, MapReady)]
    assert ready, events
    assert np.isfinite(ready[0].array).all()
    assert ready[0].execution["precision_fallback"] == "bf16 -> fp32"
    assert any("fp32" in n for n in ready[0].notes)


def test_bad_execution_settings_are_named():
    with pytest.raises(Exception, match="overlap"):
        ExecutionConfig(overlap=1.0)
    with pytest.raises(MethodError, match="overlap"):
        WindowSettings((8, 8), 1.5)
    expl = Explainer(_net(3), execution=ExecutionConfig(precision="fp16"))
    with pytest.raises(Exception, match="fp16"):
        expl.raw_output(torch.zeros(1, 1, 4, 4, 4))


def test_a_whole_volume_method_is_refused_by_name_under_sliding_window():
    net = _net(3)
    vol = Volume(np.random.default_rng(1).normal(size=(16, 16, 8)).astype(np.float32), np.eye(4), None)
    expl = Explainer(net, execution=ExecutionConfig(patch_size=8))
    events = list(expl.iter_explain([vol], [MethodConfig(name="feature_permutation"),
                                            MethodConfig(name="layer_gradcam", layers=["0"]),
                                            MethodConfig(name="eigen_cam", layers=["0"]),
                                            MethodConfig(name="saliency")], threaded=False))
    failed = [e for e in events if type(e).__name__ == "JobFailed"]
    ok = [e for e in events if isinstance(e, MapReady)]
    assert len(failed) == 1 and "feature_permutation" in failed[0].error and "several volumes" in failed[0].error
    assert len(ok) == 3  # Grad-CAM on every patch copy of the layer, Eigen-CAM on the stitched layer (issue 20)


def test_a_patch_the_model_rejects_is_named_with_the_fix():
    from esegeta_engine.sample.nets import UNet

    net = UNet(3, features=(2, 4, 8)).eval()  # needs sizes divisible by 4
    expl = Explainer(net, execution=ExecutionConfig(patch_size=[6, 6, 6]))
    with pytest.raises(MethodError, match=r"does not accept a patch of size \[6, 6, 6\]") as info:
        expl.raw_output(torch.zeros(1, 1, 12, 12, 12))
    assert "patch_size" in str(info.value)


def test_out_of_memory_is_reported_as_memory_with_what_would_fit():
    class Hungry(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(1, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[2] > 8:  # the whole volume does not fit; an 8^3 patch does
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return self.conv(x)

    x = torch.zeros(1, 1, 16, 16, 16)
    with pytest.raises(MethodError, match="ran out of memory") as info:
        Explainer(Hungry()).raw_output(x)
    assert "execution.patch_size" in str(info.value) and "bf16" in str(info.value)
    out = Explainer(Hungry(), execution=ExecutionConfig(patch_size=8)).raw_output(x)  # the suggested fix works
    assert out.shape == (1, 2, 16, 16, 16)
