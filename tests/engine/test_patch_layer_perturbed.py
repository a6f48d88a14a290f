"""Score-CAM and Ablation-CAM under sliding-window execution (issue 20, part 2): masks and channels of the
stitched layer, each perturbed copy recomputing only the patches it changes. The reference is the
definition computed through MONAI's ``sliding_window_inference`` (every patch recomputed), on the layer
copies MONAI's own call captured."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference

from esegeta_engine.errors import MethodError
from test_execution_patch_layer import LAYER, _net, _ours, _up
from test_patch_layer_eigen import ALIGNED, _copies, _setup, _stitched


def _monai_score(net, target, patch, overlap, x):
    with torch.no_grad():
        return target(sliding_window_inference(x, patch, 10_000, net, overlap=overlap, mode="constant"))[:, 1]


def _ablated(net, target, patch, overlap, x, k):
    def zero(m, args, y):
        y = y.clone()
        y[:, k] = 0
        return y

    h = getattr(net, LAYER).register_forward_hook(zero)
    try:
        return _monai_score(net, target, patch, overlap, x)
    finally:
        h.remove()


@pytest.mark.parametrize("dims,shape,patch,overlap", ALIGNED)
@pytest.mark.parametrize("name", ["score_cam", "ablation_cam"])
def test_patchwise_score_and_ablation_cam_equal_the_definition_through_monai(dims, shape, patch, overlap, name):
    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, patch, overlap)
    x[(0, 0, slice(shape[0] // 2, None))] = 0  # the baseline (zero) there: those patches are never recomputed
    ours, ctx = _ours(expl, net, target, x, name, relu_attributions=False)  # signed: no all-zero map
    a, _ = _copies(net, target, patch, x, overlap)
    stitched = _stitched(a, shape, patch, overlap, 2, True)[0]
    if name == "score_cam":
        base = _monai_score(net, target, patch, overlap, torch.zeros_like(x))
        weights = []
        for ak in stitched:
            mask = _up(((ak - ak.min()) / (ak.max() - ak.min() + 1e-8))[None, None], shape)
            weights.append(_monai_score(net, target, patch, overlap, x * mask) - base)
    else:
        y = _monai_score(net, target, patch, overlap, x)
        weights = [(y - _ablated(net, target, patch, overlap, x, k)) / y.abs() for k in range(a.shape[1])]
    cam = sum(float(w) * ak for w, ak in zip(weights, stitched))
    ref = _up(cam[None, None], shape)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert float(ref.abs().max()) > 0
    n_patches, channels = a.shape[0], a.shape[1]
    full = n_patches * (channels + 2 if name == "score_cam" else channels + 1)  # every patch, every copy
    assert ctx.score_model.runner.patch_evaluations < full


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ["score_cam", "ablation_cam"])
def test_one_patch_covering_the_volume_equals_the_whole_volume_method(dims, name):
    from esegeta_engine.config import ExecutionConfig, PreprocessConfig, TargetConfig
    from esegeta_engine.explain import Explainer

    shape = (12,) * dims if dims == 2 else (8,) * dims
    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, shape, 0.25)
    ours, ctx = _ours(expl, net, target, x, name, relu_attributions=False)
    assert ctx.score_model.patchwise
    whole = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(), execution=ExecutionConfig(mode="whole"))
    ref, _ = _ours(whole, net, target, x, name, relu_attributions=False)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert float(ref.abs().max()) > 0


def test_a_saturated_softmax_weighting_is_refused_by_name():
    """Region-sum scores differ by far more than a logit between channels: torchcam's softmax is one-hot,
    the same channel for every class (seen on MONAI's UNETR). Refused, naming the paper's weighting."""
    from esegeta_engine.config import ExecutionConfig, PreprocessConfig, TargetConfig
    from esegeta_engine.explain import Explainer

    net = _net(2)
    x, _, target = _setup(net, 2, (12, 12), (12, 12), 0.25)
    whole = Explainer(net, PreprocessConfig(spatial_dims=2), TargetConfig(), execution=ExecutionConfig(mode="whole"))
    with pytest.raises(MethodError, match="saturated") as info:
        _ours(whole, net, target, 40 * x, "score_cam", weighting="softmax")
    assert "weighting: increase" in str(info.value)
