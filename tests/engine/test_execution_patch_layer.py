"""Layer methods and CAMs on every patch copy of a layer under sliding-window execution (issue 20,
part 2): Grad-CAM and layer conductance equal the same definitions computed by autograd through
MONAI's ``sliding_window_inference`` (each copy's activation and gradient captured there, the maps
stitched by MONAI or placed on MONAI's own patch slices), conductance is complete for the stitched
function, and one patch covering the volume gives the whole-volume method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from torch import nn

from esegeta_engine.config import ExecutionConfig, PreprocessConfig, TargetConfig
from esegeta_engine.explain import Explainer
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.forward.scoring import EvaluationMonitor
from esegeta_engine.targets import RegionOfInterestTarget

from tiny_models import assert_untouched

CASES = [(2, (26, 21), (12, 12)), (3, (14, 12, 11), (8, 8, 8))]
OVERLAP = 0.25


def _net(dims: int) -> nn.Module:
    torch.manual_seed(7)
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    P = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
    return nn.Sequential(C(1, 4, 3, padding=1), nn.ReLU(), P(2), C(4, 5, 3, padding=1), nn.ReLU(),
                         nn.Upsample(scale_factor=2), C(5, 2, 3, padding=1)).eval()


LAYER = "4"


def _setup(net, dims, shape, patch, mode="auto"):
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(3)) + 0.3
    expl = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(),
                     execution=ExecutionConfig(mode=mode, patch_size=list(patch), overlap=OVERLAP, sw_batch_size=2))
    target = RegionOfInterestTarget(torch.ones(shape))  # every voxel's class scores, summed
    return x, expl, target


def _ours(expl, net, target, x, name, **params):
    sm = expl.make_score_model(target, x, EvaluationMonitor())
    spec = get_method(name)
    ctx = MethodContext(sm, x, 1, layer=getattr(net, LAYER), layer_name=LAYER,
                        extra={"patchwise": sm.patchwise})
    return attribute(spec, ctx, spec.resolve_params(params)), ctx


def _monai_F(net, target, patch, x):
    return target(sliding_window_inference(x, patch, 10_000, net, overlap=OVERLAP, mode="gaussian"))


def _copies(net, target, patch, x):
    """Each patch copy's activation and gradient of the stitched score, by autograd through MONAI
    (all patches in one network call, in MONAI's patch order)."""
    store = {}

    def hook(m, a, y):
        store["a"] = y
        y.register_hook(lambda g: store.__setitem__("g", g))

    h = getattr(net, LAYER).register_forward_hook(hook)
    try:
        xi = x.clone().requires_grad_(True)
        torch.autograd.grad(_monai_F(net, target, patch, xi)[:, 1].sum(), xi)
    finally:
        h.remove()
    return store["a"].detach(), store["g"].detach()


def _up(maps, patch):
    return F.interpolate(maps, size=patch, mode="bilinear" if len(patch) == 2 else "trilinear",
                         align_corners=False)


@pytest.mark.parametrize("dims,shape,patch", CASES)
def test_patchwise_gradcam_equals_gradcam_of_each_copy_stitched_by_monai(dims, shape, patch):
    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, patch)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ours, ctx = _ours(expl, net, target, x, "layer_gradcam")
    assert_untouched(net, before)
    a, g = _copies(net, target, patch, x)
    weights = g.mean(dim=tuple(range(2, g.dim())), keepdim=True)
    cams = _up((weights * a).sum(1, keepdim=True).clamp(min=0), patch)
    ref = sliding_window_inference(x, patch, 10_000, lambda z: cams, overlap=OVERLAP, mode="gaussian")
    assert ours.shape == ref.shape == x.shape
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert float(ref.abs().max()) > 0 and a.shape[0] > 2  # several patches


@pytest.mark.parametrize("dims,shape,patch", CASES)
def test_patchwise_conductance_equals_conductance_of_each_copy_and_is_complete(dims, shape, patch):
    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, patch)
    steps = 6
    ours, ctx = _ours(expl, net, target, x, "layer_conductance", n_steps=steps, method="riemann_trapezoid")
    from captum.attr._utils.approximation_methods import approximation_parameters

    alphas = approximation_parameters("riemann_trapezoid")[1](steps + 1)
    pts = [_copies(net, target, patch, float(al) * x) for al in alphas]
    cond = sum(pts[k][1] * (pts[k + 1][0] - pts[k][0]) for k in range(steps)).sum(1, keepdim=True)
    ups = _up(cond, patch)
    interval = _get_scan_interval(shape, patch, dims, (OVERLAP,) * dims)
    ref = torch.zeros_like(x)
    for i, sl in enumerate(dense_patch_slices(shape, patch, interval)):
        ref[(0, slice(None), *sl)] += ups[i]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    # the copies' total is the conductance total of the stitched function: close to F(x) - F(0)
    total = float(ctx.extra["attribution_sum"][0])
    assert total == pytest.approx(float(cond.double().sum()), rel=1e-5)
    with torch.no_grad():
        delta = float(_monai_F(net, target, patch, x)[0, 1] - _monai_F(net, target, patch, 0 * x)[0, 1])
    assert total == pytest.approx(delta, rel=0.05)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ["layer_gradcam", "gradcam_pp", "layercam", "layer_gradient_x_activation",
                                  "layer_conductance", "internal_influence"])
def test_one_patch_covering_the_volume_equals_the_whole_volume_method(dims, name):
    shape = (12,) * dims if dims == 2 else (8,) * dims
    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, shape, mode="sliding_window")
    ours, ctx = _ours(expl, net, target, x, name)
    assert ctx.score_model.patchwise
    _, whole, _ = _setup(net, dims, shape, shape, mode="whole")
    ref, rctx = _ours(whole, net, target, x, name)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    if name == "layer_conductance":
        assert float(ctx.extra["attribution_sum"][0]) == pytest.approx(float(rctx.extra["attribution_sum"][0]),
                                                                       rel=1e-4)


@pytest.mark.parametrize("dims,shape,patch", CASES)
@pytest.mark.parametrize("name", ["excitation_backprop", "contrastive_excitation_backprop"])
def test_patchwise_excitation_backprop_equals_the_rules_through_monai(dims, shape, patch, name):
    from esegeta_engine.methods.excitation import ExcitationBackprop

    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, patch)
    ours, _ = _ours(expl, net, target, x, name)

    class Positive(torch.autograd.Function):  # the unnormalised top-down signal
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, g):
            return g.clamp(min=0)

    class Monai(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, inp):
            return _monai_F(self.net, target, patch, inp)

    def eb_copies(dual: bool) -> torch.Tensor:
        eb = ExcitationBackprop(Monai(), getattr(net, LAYER), contrastive=dual)
        eb.start = lambda y: Positive.apply(y)
        eb._dual = dual
        store = {}

        def hook(m, a, y):
            store["a"] = y
            y.register_hook(lambda g: store.__setitem__("g", g))

        handles = eb._hook({})
        handles.append(getattr(net, LAYER).register_forward_hook(hook))
        try:
            xi = x.clone().requires_grad_(True)
            torch.autograd.grad(Monai()(xi)[:, 1].sum(), xi)
        finally:
            for h in handles:
                h.remove()
        return store["g"].detach()

    # the target reads class 1 at every voxel: the positive gradient at the stitched output sums to
    # the number of voxels
    z = float(torch.tensor(shape).prod())
    p = eb_copies(False) / z
    if name.startswith("contrastive"):
        p = p - eb_copies(True) / z
    ups = _up(p.sum(1, keepdim=True), patch)
    interval = _get_scan_interval(shape, patch, dims, (OVERLAP,) * dims)
    ref = torch.zeros_like(x)
    for i, sl in enumerate(dense_patch_slices(shape, patch, interval)):
        ref[(0, slice(None), *sl)] += ups[i]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert float(ref.abs().max()) > 0


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ["excitation_backprop", "contrastive_excitation_backprop"])
def test_one_patch_excitation_backprop_equals_the_whole_volume_method(dims, name):
    shape = (12,) * dims if dims == 2 else (8,) * dims
    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, shape, mode="sliding_window")
    ours, _ = _ours(expl, net, target, x, name)
    _, whole, _ = _setup(net, dims, shape, shape, mode="whole")
    ref, _ = _ours(whole, net, target, x, name)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("dims,shape,patch", CASES)
def test_patchwise_guided_gradcam_is_guided_backprop_times_the_stitched_gradcam(dims, shape, patch):
    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, patch)
    ours, _ = _ours(expl, net, target, x, "guided_gradcam")
    cam, _ = _ours(expl, net, target, x, "layer_gradcam")
    guided, _ = _ours(expl, net, target, x, "guided_backprop")
    torch.testing.assert_close(ours, guided * cam, rtol=1e-5, atol=1e-7)
    assert float(ours.abs().max()) > 0


@pytest.mark.parametrize("dims,shape,patch", CASES)
def test_patchwise_internal_influence_equals_the_path_sum_of_each_copy(dims, shape, patch):
    from captum.attr._utils.approximation_methods import approximation_parameters

    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, patch)
    steps = 5
    ours, _ = _ours(expl, net, target, x, "internal_influence", n_steps=steps, method="riemann_trapezoid")
    step_sizes, alphas = (f(steps) for f in approximation_parameters("riemann_trapezoid"))
    infl = sum(float(s) * _copies(net, target, patch, float(al) * x)[1] for s, al in zip(step_sizes, alphas))
    ups = _up(infl.sum(1, keepdim=True), patch)
    interval = _get_scan_interval(shape, patch, dims, (OVERLAP,) * dims)
    ref = torch.zeros_like(x)
    for i, sl in enumerate(dense_patch_slices(shape, patch, interval)):
        ref[(0, slice(None), *sl)] += ups[i]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
