"""The channel target with the patch-wise layer methods (issue 20): under several patches, Grad-CAM and
layer gradient x activation at one layer, explaining the mean of another layer's stitched channel map,
equal their definitions computed by autograd through MONAI's ``sliding_window_inference`` (each patch
copy's activation and gradient captured there, the maps stitched by MONAI or placed on MONAI's slices);
one patch covering the volume gives the whole-volume method. 2D and 3D."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

from esegeta_engine.channel_target import LayerChannelTarget
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.methods import MethodContext, attribute, get_method

from test_channel_target_sliding import CASES, OVERLAP, _net, _reference, _score_model, _x
from tiny_models import assert_untouched

EXPLAINED = "1"  # the layer the method reads (before the pooling)


def _copies(net, predictor, patch, x):
    """Each patch copy's activation and gradient at EXPLAINED of the stitched channel score, all patches
    in one network call (MONAI's patch order)."""
    store = {}

    def hook(m, a, y):
        store["a"] = y
        y.register_hook(lambda g: store.__setitem__("g", g))

    h = getattr(net, EXPLAINED).register_forward_hook(hook)
    try:
        xi = x.clone().requires_grad_(True)
        score = sliding_window_inference(xi, patch, 10_000, predictor, overlap=OVERLAP, mode="gaussian").mean()
        torch.autograd.grad(score, xi)
    finally:
        h.remove()
    return store["a"].detach(), store["g"].detach()


def _run(sm, net, x, name):
    spec = get_method(name)
    ctx = MethodContext(sm, x, 0, layer=getattr(net, EXPLAINED), layer_name=EXPLAINED,
                        extra={"patchwise": sm.patchwise})
    return attribute(spec, ctx, spec.resolve_params({})), ctx


def _up(maps, patch):
    return F.interpolate(maps, size=patch, mode="bilinear" if len(patch) == 2 else "trilinear",
                         align_corners=False)


@pytest.mark.parametrize("dims, shape, patch", CASES)
@pytest.mark.parametrize("layer, k, softmax", [("3", 1, False), ("4", 2, True)])  # the channel's layer
def test_gradcam_and_gradient_x_activation_of_a_channel_equal_the_definition_through_monai(
        dims, shape, patch, layer, k, softmax) -> None:
    net = _net(dims)
    state = {n: v.clone() for n, v in net.state_dict().items()}
    x = _x(shape)
    sm = _score_model(net, LayerChannelTarget(layer, k, activation="softmax" if softmax else "none"), patch)
    assert sm.patchwise and len(sm.runner.grid(shape, x.device).slices) > 1
    _, _, predictor = _reference(net, layer, k, softmax, patch, x)
    a, g = _copies(net, predictor, patch, x)
    assert a.shape[0] > 2 and float(g.abs().max()) > 0

    cam, _ = _run(sm, net, x, "layer_gradcam")
    weights = g.mean(dim=tuple(range(2, g.dim())), keepdim=True)
    cams = _up((weights * a).sum(1, keepdim=True).clamp(min=0), patch)
    ref = sliding_window_inference(x, patch, 10_000, lambda z: cams, overlap=OVERLAP, mode="gaussian")
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert float(ref.abs().max()) > 0

    gxa, ctx = _run(sm, net, x, "layer_gradient_x_activation")
    ups = _up((g * a).sum(1, keepdim=True), patch)
    ref = torch.zeros_like(x)
    slices = dense_patch_slices(shape, patch, _get_scan_interval(shape, patch, dims, (OVERLAP,) * dims))
    for i, sl in enumerate(slices):
        ref[(0, slice(None), *sl)] += ups[i]
    torch.testing.assert_close(gxa, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert_untouched(net, state)
    assert not any(m._forward_hooks for m in net.modules())


@pytest.mark.parametrize("dims, shape, patch", CASES)
@pytest.mark.parametrize("name", ["layer_gradcam", "layer_gradient_x_activation"])
def test_one_patch_covering_the_volume_is_the_whole_volume_method(dims, shape, patch, name) -> None:
    net = _net(dims)
    size = tuple(patch)
    x = _x(size)
    one = _score_model(net, LayerChannelTarget("3", 1), size)
    assert len(one.runner.grid(size, x.device).slices) == 1
    ours, _ = _run(one, net, x, name)
    ref, _ = _run(ScoreModel(net, LayerChannelTarget("3", 1)), net, x, name)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert float(ref.abs().max()) > 0


def test_the_explainer_runs_layer_methods_on_a_channel_target_patch_wise() -> None:
    """Through the whole run: Grad-CAM and layer gradient x activation of a channel target under several
    patches give maps; none is refused."""
    import numpy as np

    from esegeta_engine.config import ExecutionConfig, MethodConfig, PreprocessConfig, TargetConfig
    from esegeta_engine.explain import Explainer, MapReady
    from esegeta_engine.io import Volume

    net = _net(3)
    arr = np.random.default_rng(0).normal(size=(14, 12, 11)).astype(np.float32)
    ex = Explainer(net, PreprocessConfig(), TargetConfig(kind="channel", layer="3", channel=1),
                   execution=ExecutionConfig(patch_size=[8, 8, 8], overlap=OVERLAP))
    methods = [MethodConfig(name=n, layers=[EXPLAINED]) for n in ("layer_gradcam", "layer_gradient_x_activation")]
    maps = [e for e in ex.iter_explain([Volume(arr, np.eye(4))], methods, threaded=False) if isinstance(e, MapReady)]
    assert [m.job.spec.name for m in maps] == ["layer_gradcam", "layer_gradient_x_activation"]
    assert all(m.patch_evaluations > 0 and float(np.abs(m.array).max()) > 0 for m in maps)
