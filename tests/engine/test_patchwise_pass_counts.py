"""Patch evaluations of the two-pass patch-wise methods after the prediction (issue 20, speed at a 96^3 patch).

Guided Grad-CAM (the guided map and Grad-CAM on the patch copies of a layer) and FullGrad with its
min-max normalisation (a pass for every copy's bounds, a pass to map them) each need two backward
passes; their hooks act only in the backward's recomputation, so the stitched forward is the
prediction's output and each pass costs one forward + backward of every patch, nothing more.
"""

from __future__ import annotations

import pytest
import torch

from esegeta_engine.config import ExecutionConfig, PreprocessConfig, TargetConfig
from esegeta_engine.explain import Explainer
from esegeta_engine.forward.scoring import EvaluationMonitor
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.targets import RegionOfInterestTarget
from test_deeplift_twopass import CASES, _net

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("dims,shape,patch", CASES)
@pytest.mark.parametrize("name", ["guided_gradcam", "fullgrad"])
def test_two_pass_methods_cost_two_passes_of_every_patch(dims, shape, patch, name):
    net = _net(dims, "relu")
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(2)) + 0.5
    expl = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(),
                     execution=ExecutionConfig(mode="sliding_window", patch_size=list(patch), overlap=0.25,
                                               sw_batch_size=2))
    expl.raw_output(x)  # the prediction: its stitched output is remembered
    monitor = EvaluationMonitor()
    sm = expl.make_score_model(RegionOfInterestTarget(torch.ones(shape)), x, monitor)
    spec = get_method(name)
    layer = net[5] if spec.needs_layer else None
    ctx = MethodContext(sm, x, 1, layer=layer, layer_name="5" if layer is not None else None,
                        extra={"patchwise": True})
    out = attribute(spec, ctx, spec.resolve_params({}))
    assert bool(torch.isfinite(out).all()) and float(out.abs().max()) > 0
    patches = len(sm.runner.grid(x.shape[2:], x.device).slices)
    assert sm.runner.patch_evaluations == 2 * patches
