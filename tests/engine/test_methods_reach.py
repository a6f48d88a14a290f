"""Occlusion windows that cannot reach the target's patches cost no evaluation (issue 20, part 4):
the map is identical to occlusion over the whole sliding-window function (MONAI), with fewer counted
model evaluations and patch evaluations, and the saving is in the map's notes."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Occlusion
from monai.inferers import sliding_window_inference
from torch import nn

from esegeta_engine.config import ExecutionConfig, PreprocessConfig, TargetConfig
from esegeta_engine.explain import Explainer
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.forward.scoring import EvaluationMonitor
from esegeta_engine.targets import RegionOfInterestTarget


def _net(dims: int) -> nn.Module:
    torch.manual_seed(3)
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    N = nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d  # global within a patch
    return nn.Sequential(C(1, 4, 3, padding=1), N(4), nn.ReLU(), C(4, 2, 3, padding=1)).eval()


@pytest.mark.parametrize("dims,shape,patch,window,box", [
    (2, (32, 28), (8, 8), (4, 4), (slice(2, 5), slice(3, 6))),
    (3, (16, 14, 12), (6, 6, 6), (3, 3, 3), (slice(1, 3), slice(2, 4), slice(1, 3)))])
def test_occlusion_skips_windows_outside_the_target_patches(dims, shape, patch, window, box, monkeypatch):
    import esegeta_engine.methods.perturbation as perturbation

    net = _net(dims)
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(4))
    roi = torch.zeros(shape, dtype=torch.bool)
    roi[box] = True
    target = RegionOfInterestTarget(roi.float())
    expl = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(),
                     execution=ExecutionConfig(patch_size=list(patch), overlap=0.25, sw_batch_size=2))
    spec = get_method("occlusion")
    params = spec.resolve_params({"window": list(window), "perturbations_per_eval": 1})
    runs = {}
    for restricted in (True, False):  # today's ROI occlusion (patch reuse, ROI patches) vs with skipping
        if not restricted:
            monkeypatch.setattr(perturbation, "reach_filter", lambda *a: None)
        monitor = EvaluationMonitor()
        sm = expl.make_score_model(target, x, monitor, support=roi)
        sm.runner.set_base(x)
        ctx = MethodContext(sm, x, 1, extra={"patchwise": True})
        runs[restricted] = (attribute(spec, ctx, params), monitor.count, monitor.patches, ctx)

    class Full(nn.Module):
        def forward(self, inp):
            return target(sliding_window_inference(inp, patch, 2, net, overlap=0.25, mode="gaussian"))

    ref = Occlusion(Full()).attribute(x, sliding_window_shapes=(1, *window), strides=(1, *window),
                                      baselines=torch.zeros_like(x), target=1)
    ours, count, patches, ctx = runs[True]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(ours, runs[False][0], rtol=0, atol=0)  # identical map
    skipped = ctx.extra["skipped_perturbations"]
    assert skipped > 0 and count == runs[False][1] - skipped  # one evaluation per window saved
    assert patches <= runs[False][2]
    assert any("cost no evaluation" in n for n in ctx.extra["notes"])
