"""Eigen-CAM and Eigen-Grad-CAM under sliding-window execution (issue 20, part 2): the first principal
component of the stitched layer, built patch by patch. The reference stitches the copies that autograd
through MONAI's ``sliding_window_inference`` captured (activations averaged where copies overlap, gradient
x activation added) on the scan's layer grid, and takes the component by a plain SVD."""

from __future__ import annotations

import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval

from esegeta_engine.config import ExecutionConfig, PreprocessConfig, TargetConfig
from esegeta_engine.explain import Explainer
from esegeta_engine.targets import RegionOfInterestTarget
from monai.inferers import sliding_window_inference

from test_execution_patch_layer import LAYER, _net, _ours, _up

ALIGNED = [(2, (28, 20), (12, 12), 1 / 3), (3, (16, 12, 12), (8, 8, 8), 0.5)]  # patch steps even: stride 2 fits


def _setup(net, dims, shape, patch, overlap):
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(3)) + 0.3
    expl = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(),
                     execution=ExecutionConfig(mode="sliding_window", patch_size=list(patch), overlap=overlap,
                                               sw_batch_size=2, blend="constant"))
    return x, expl, RegionOfInterestTarget(torch.ones(shape))


def _copies(net, target, patch, x, overlap):
    """Every patch copy's activation and gradient of the stitched score, by autograd through MONAI."""
    store = {}

    def hook(m, a, y):
        store["a"] = y
        y.register_hook(lambda g: store.__setitem__("g", g))

    h = getattr(net, LAYER).register_forward_hook(hook)
    try:
        xi = x.clone().requires_grad_(True)
        y = sliding_window_inference(xi, patch, 10_000, net, overlap=overlap, mode="constant")
        torch.autograd.grad(target(y)[:, 1].sum(), xi)
    finally:
        h.remove()
    return store["a"].detach(), store["g"].detach()


def _svd_component(t: torch.Tensor) -> torch.Tensor:
    """(1, C, *grid) -> (1, 1, *grid): centred projection on the first right-singular vector, signed to
    correlate positively with the channel sum."""
    c, *grid = t.shape[1:]
    x = t[0].reshape(c, -1).T.double()
    x = x - x.mean(0)
    v = torch.linalg.svd(x, full_matrices=False)[2][0]
    proj = x @ v
    proj = -proj if float(proj @ x.sum(1)) < 0 else proj
    return proj.reshape(1, 1, *grid).float()


def _stitched(copies: torch.Tensor, shape, patch, overlap, scale: int, average: bool) -> torch.Tensor:
    dims = len(shape)
    slices = dense_patch_slices(shape, patch, _get_scan_interval(shape, patch, dims, (overlap,) * dims))
    out = torch.zeros((1, copies.shape[1], *(s // scale for s in shape)))
    count = torch.zeros((1, 1, *out.shape[2:]))
    for i, sl in enumerate(slices):
        at = (0, slice(None), *(slice(s.start // scale, s.stop // scale) for s in sl))
        out[at] += copies[i]
        count[at] += 1
    return out / count if average else out


@pytest.mark.parametrize("dims,shape,patch,overlap", ALIGNED)
@pytest.mark.parametrize("name", ["eigen_cam", "eigen_grad_cam"])
def test_patchwise_eigen_cams_are_the_component_of_the_stitched_layer(dims, shape, patch, overlap, name):
    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, patch, overlap)
    ours, ctx = _ours(expl, net, target, x, name)
    a, g = _copies(net, target, patch, x, overlap)  # every copy, through MONAI
    assert a.shape[0] > 2 and tuple(a.shape[2:]) == tuple(p // 2 for p in patch)
    tensor = _stitched(a, shape, patch, overlap, 2, True) if name == "eigen_cam" else \
        _stitched(g * a, shape, patch, overlap, 2, False)
    ref = _up(_svd_component(tensor), shape)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert not ctx.extra.get("notes")


def test_a_layer_grid_that_does_not_fit_the_patches_is_resampled_and_says_so():
    net = _net(2)
    shape, patch, overlap = (26, 21), (12, 12), 0.25  # patch step 9: odd, the stride-2 grid does not fit
    x, expl, target = _setup(net, 2, shape, patch, overlap)
    ours, ctx = _ours(expl, net, target, x, "eigen_cam")
    a, _ = _copies(net, target, patch, x, overlap)
    ref = _svd_component(_stitched(_up(a, patch), shape, patch, overlap, 1, True))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert any("resampled to the input grid" in n for n in ctx.extra["notes"])


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ["eigen_cam", "eigen_grad_cam"])
def test_one_patch_covering_the_volume_equals_the_whole_volume_method(dims, name):
    shape = (12,) * dims if dims == 2 else (8,) * dims
    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, shape, 0.25)
    ours, ctx = _ours(expl, net, target, x, name)
    assert ctx.score_model.patchwise
    whole = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(), execution=ExecutionConfig(mode="whole"))
    ref, _ = _ours(whole, net, target, x, name)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert float(ref.abs().max()) > 0


@pytest.mark.parametrize("name, params", [
    ("eigen_cam", {}), ("eigen_grad_cam", {}), ("layer_activation", {}), ("score_cam", {}), ("ablation_cam", {}),
    ("layer_integrated_gradients", {"n_steps": 3}), ("layer_deeplift_shap", {"n_baselines": 3}),
])
def test_counted_evaluations_equal_the_cost_estimate(name, params):
    from esegeta_engine.methods import get_method
    from esegeta_engine.methods.behaviour import CostInfo

    net = _net(2)
    shape, patch, overlap = (28, 20), (12, 12), 1 / 3
    x, expl, target = _setup(net, 2, shape, patch, overlap)
    _, ctx = _ours(expl, net, target, x, name, **params)
    spec = get_method(name)
    info = CostInfo(1, 1, shape, patchwise=True, layer_channels=5)
    assert spec.cost(info, spec.resolve_params(params)) == ctx.score_model.monitor.count
