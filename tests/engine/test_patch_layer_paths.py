"""Layer IG, layer DeepLIFT (SHAP), layer GradientSHAP and layer activation on every patch copy of a layer
under sliding-window execution (issue 20, part 2): each equals Captum's own layer method run through
MONAI's ``sliding_window_inference`` (all patches in one network call, so the layer runs once on the
stack of copies), its copies' total is complete for the stitched function, and one patch covering the
volume gives the whole-volume method."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import LayerDeepLift, LayerIntegratedGradients
from captum.attr._core.layer.layer_gradient_shap import LayerInputBaselineXGradient
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from torch import nn

from esegeta_engine.forward.scoring import EvaluationMonitor
from esegeta_engine.methods import MethodContext
from esegeta_engine.methods._common import gaussian_blur
from test_execution_patch_layer import CASES, LAYER, OVERLAP, _monai_F, _net, _ours, _setup, _up


class Monai(nn.Module):
    """The stitched score through MONAI, every patch in one network call."""

    def __init__(self, net: nn.Module, target, patch) -> None:
        super().__init__()
        self.net, self.target, self.patch = net, target, patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _monai_F(self.net, self.target, self.patch, x)


def _placed(copies: torch.Tensor, shape, patch, rows: int = 1) -> torch.Tensor:
    """Copies' layer maps ``(rows * patches, C, *layer)``: channel sum, upsampled, added on MONAI's slices."""
    dims = len(shape)
    ups = _up(copies.sum(1, keepdim=True), patch)
    slices = dense_patch_slices(shape, patch, _get_scan_interval(shape, patch, dims, (OVERLAP,) * dims))
    out = torch.zeros((rows, 1, *shape))
    for r in range(rows):
        for i, sl in enumerate(slices):
            out[(r, slice(None), *sl)] += ups[r * len(slices) + i]
    return out


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert float(ref.abs().max()) > 0


@pytest.mark.parametrize("dims,shape,patch", CASES)
@pytest.mark.parametrize("baseline", ["zero", "blur"])  # one constant reference / paired patch batches
def test_patchwise_layer_ig_equals_captum_through_monai_and_is_complete(dims, shape, patch, baseline):
    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, patch)
    steps = 24
    ours, ctx = _ours(expl, net, target, x, "layer_integrated_gradients", n_steps=steps, baseline=baseline)
    x0 = torch.zeros_like(x) if baseline == "zero" else gaussian_blur(x, 4.0)
    copies = LayerIntegratedGradients(Monai(net, target, patch), getattr(net, LAYER)).attribute(
        x, x0, target=1, n_steps=steps, internal_batch_size=steps)
    _close(ours, _placed(copies, shape, patch))
    total = float(ctx.extra["attribution_sum"][0])
    assert total == pytest.approx(float(copies.double().sum()), rel=1e-4)
    with torch.no_grad():  # layer 4 is a cut of the network: completeness for the stitched function
        delta = float(_monai_F(net, target, patch, x)[0, 1] - _monai_F(net, target, patch, x0)[0, 1])
    assert total == pytest.approx(delta, rel=0.02)


@pytest.mark.parametrize("dims,shape,patch", CASES)
def test_patchwise_layer_deeplift_equals_captum_through_monai_and_is_complete(dims, shape, patch):
    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, patch)
    ours, ctx = _ours(expl, net, target, x, "layer_deeplift", baseline="blur")
    x0 = gaussian_blur(x, 4.0)
    copies = LayerDeepLift(Monai(net, target, patch), getattr(net, LAYER)).attribute(x, x0, target=1)
    _close(ours, _placed(copies, shape, patch))
    with torch.no_grad():  # only linear modules follow the layer: DeepLIFT is exactly complete
        delta = float(_monai_F(net, target, patch, x)[0, 1] - _monai_F(net, target, patch, x0)[0, 1])
    assert float(ctx.extra["attribution_sum"][0]) == pytest.approx(delta, rel=1e-4)


@pytest.mark.parametrize("dims,shape,patch", CASES)
def test_patchwise_gradient_shap_draws_equal_captum_through_monai(dims, shape, patch):
    """One batch of GradientSHAP draws (two noisy inputs, two baselines, seeded path points)."""
    from esegeta_engine.methods.layer_patchwise import _InputBaselineXGradient

    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, patch)
    g = torch.Generator().manual_seed(5)
    xs = x + 0.1 * torch.randn((2, *x.shape[1:]), generator=g)
    bs = 0.2 * torch.randn((2, *x.shape[1:]), generator=g)
    sm = expl.make_score_model(target, x, EvaluationMonitor())
    ctx = MethodContext(sm, x, 1, layer=getattr(net, LAYER), layer_name=LAYER)
    np.random.seed(11)
    ours = _InputBaselineXGradient(ctx, False, "sum").attribute(xs, bs, target=1)
    np.random.seed(11)
    copies = LayerInputBaselineXGradient(Monai(net, target, patch), getattr(net, LAYER)).attribute(
        xs, bs, target=1)
    _close(ours, _placed(copies, shape, patch, rows=2))


@pytest.mark.parametrize("dims,shape,patch", CASES)
def test_patchwise_layer_activation_is_the_copies_blended_by_monai(dims, shape, patch):
    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, patch)
    ours, ctx = _ours(expl, net, target, x, "layer_activation")
    evaluations = ctx.score_model.runner.patch_evaluations
    head = net[: int(LAYER) + 1]
    ref = sliding_window_inference(x, patch, 10_000, lambda z: _up(head(z).sum(1, keepdim=True), patch),
                                   overlap=OVERLAP, mode="gaussian")
    _close(ours, ref)
    n_patches = len(dense_patch_slices(shape, patch, _get_scan_interval(shape, patch, dims, (OVERLAP,) * dims)))
    assert evaluations == n_patches  # one forward of every patch, no backward, no stitched output


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name, params", [
    ("layer_integrated_gradients", {"n_steps": 6}),
    ("layer_integrated_gradients", {"n_steps": 6, "baseline": "blur"}),
    ("layer_deeplift", {"baseline": "blur"}),
    ("layer_deeplift_shap", {"n_baselines": 2}),
    ("layer_gradient_shap", {"n_samples": 3, "n_baselines": 2}),
    ("layer_activation", {}),
])
def test_one_patch_covering_the_volume_equals_the_whole_volume_method(dims, name, params):
    shape = (12,) * dims if dims == 2 else (8,) * dims
    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, shape, mode="sliding_window")
    ours, ctx = _ours(expl, net, target, x, name, **params)
    assert ctx.score_model.patchwise
    _, whole, _ = _setup(net, dims, shape, shape, mode="whole")
    ref, rctx = _ours(whole, net, target, x, name, **params)
    _close(ours, ref)
    if name != "layer_activation":
        assert float(ctx.extra["attribution_sum"][0]) == pytest.approx(float(rctx.extra["attribution_sum"][0]),
                                                                       rel=1e-4)
