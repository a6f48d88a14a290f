"""Guided backprop, deconvolution and guided Grad-CAM on real networks (issue 8).

Captum's rules touch ``nn.ReLU`` only; ours act on every rectifier module. On
ReLU networks they must equal Captum's; on MONAI's BasicUNet (LeakyReLU) and
UNet (PReLU) they must differ from the gradient and match a hand computation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.attr import Deconvolution, GuidedBackprop
from torch import nn

from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.methods.rectifiers import RectifiedGradient
from esegeta_engine.models import model_guard
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ArgmaxRegionTarget, RegionOfInterestTarget
from tiny_models import assert_untouched, cls_setup, seg_setup

monai_nets = pytest.importorskip("monai.networks.nets")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run(name: str, score: nn.Module, x: torch.Tensor, target: int = 1,
        layer: nn.Module | None = None, **params) -> tuple[torch.Tensor, MethodContext]:
    spec = get_method(name)
    ctx = MethodContext(score, x, target, layer=layer)
    return attribute(spec, ctx, spec.resolve_params(params)), ctx


def region_score(net: nn.Module, x: torch.Tensor) -> ScoreModel:
    target = ArgmaxRegionTarget()
    with torch.no_grad():
        target.prepare(net(x))
    return ScoreModel(net, target)


def sum_score(net: nn.Module, x: torch.Tensor) -> ScoreModel:
    """Scores (N, K): each class's output summed over the whole grid."""
    return ScoreModel(net, RegionOfInterestTarget(torch.ones(x.shape[2:])))


def basic_unet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = monai_nets.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2,
                               features=(2, 2, 2, 2, 2, 2)).eval()
    return net, torch.randn(1, 1, 32, 16, 16)


def prelu_unet(dims: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = monai_nets.UNet(spatial_dims=dims, in_channels=1, out_channels=2, channels=(4, 8),
                          strides=(2,)).eval()
    with torch.no_grad():  # PReLU slopes start at 0.25 everywhere; make them differ
        for m in net.modules():
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(0.05, 0.5)
    return net, torch.randn(1, 1, *(8,) * dims)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kind", ["segmentation", "classification"])
@pytest.mark.parametrize("name, captum", [("guided_backprop", GuidedBackprop),
                                          ("deconvolution", Deconvolution)])
def test_equals_captum_on_relu_networks(name: str, captum: type, kind: str, dims: int) -> None:
    net, x, score = (seg_setup if kind == "segmentation" else cls_setup)(dims)
    target = 1
    ours, ctx = run(name, score, x, target)
    reference = captum(score).attribute(x.clone(), target=target).detach()
    torch.testing.assert_close(ours, reference)
    assert ctx.extra.get("notes", []) == []


@pytest.mark.parametrize("name", ["guided_backprop", "deconvolution", "guided_gradcam"])
def test_basic_unet_leaky_relu_differs_from_the_gradient(name: str) -> None:
    net, x = basic_unet()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    score = region_score(net, x)
    with model_guard(net):
        layer = net.upcat_1 if name == "guided_gradcam" else None
        result, ctx = run(name, score, x, layer=layer)
        gradient, _ = run("saliency", score, x, abs=False)
        if name == "guided_gradcam":  # Captum's: plain gradient (no nn.ReLU) times Grad-CAM
            from captum.attr import GuidedGradCam

            captum_map = GuidedGradCam(score, layer).attribute(x.clone(), target=1,
                                                              interpolate_mode="trilinear")
            gradient = captum_map.detach()
    assert result.shape == x.shape and bool(torch.isfinite(result).all())
    assert result.abs().sum() > 0
    assert not torch.allclose(result, gradient, rtol=1e-3, atol=1e-6), "the rule did not act"
    assert ctx.extra.get("notes", []) == []
    assert_untouched(net, state)


@pytest.mark.parametrize("dims", [2, 3])
def test_prelu_unet_guided_differs_from_the_gradient_and_matches_by_hand(dims: int) -> None:
    net, x = prelu_unet(dims)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    score = sum_score(net, x)
    with model_guard(net):
        guided, _ = run("guided_backprop", score, x)
        gradient, _ = run("saliency", score, x, abs=False)
        by_hand = hand_guided(score, x)
    assert not torch.allclose(guided, gradient, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(guided, by_hand)
    assert_untouched(net, state)


def hand_guided(score: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Guided rule written as tensor hooks on each PReLU output: f'(x) * max(g, 0)."""
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        out.register_hook(F.relu)

    handles = [m.register_forward_hook(hook) for m in score.modules() if isinstance(m, nn.PReLU)]
    try:
        xi = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(score(xi)[:, 1].sum(), xi)
    finally:
        for h in handles:
            h.remove()
    return g


class LeakyNet(nn.Module):
    """conv -> LeakyReLU -> 1x1 conv, small enough to write the rules out by hand."""

    def __init__(self, dims: int, inplace: bool = False, functional: bool = False) -> None:
        super().__init__()
        C = nn.Conv2d if dims == 2 else nn.Conv3d
        self.conv1 = C(1, 3, 3, padding=1)
        self.act = nn.LeakyReLU(0.2, inplace=inplace)
        self.head = C(3, 2, 1)
        self.functional = functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv1(x))
        if self.functional:
            h = F.relu(h - 0.1)
        return self.head(h)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dims", [2, 3])
def test_deconvolution_by_hand_on_leaky_relu(dims: int, inplace: bool) -> None:
    torch.manual_seed(1)
    net = LeakyNet(dims, inplace=inplace).eval()
    x = torch.randn(1, 1, *(6,) * dims)
    score = sum_score(net, x)
    result, _ = run("deconvolution", score, x)
    # score = sum over voxels of head(h)[1]: gradient at h is the head's weight of class 1.
    conv_t = F.conv_transpose2d if dims == 2 else F.conv_transpose3d
    g_h = net.head.weight[1].detach().reshape(1, 3, *(1,) * dims).expand(1, 3, *x.shape[2:])
    expected = conv_t(F.leaky_relu(g_h, 0.2), net.conv1.weight.detach(), padding=1)
    torch.testing.assert_close(result, expected)


def test_functional_activations_are_noted() -> None:
    torch.manual_seed(2)
    net = LeakyNet(2, functional=True).eval()
    x = torch.randn(1, 1, 6, 6)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    _, ctx = run("guided_backprop", sum_score(net, x), x)
    notes = ctx.extra["notes"]
    assert len(notes) == 1 and "relu x1" in notes[0] and "1 activation module" in notes[0]
    assert_untouched(net, state)


def test_no_rectifier_module_is_noted() -> None:
    net = nn.Conv2d(1, 2, 3, padding=1).eval()
    x = torch.randn(1, 1, 5, 5)
    _, ctx = run("deconvolution", sum_score(net, x), x)
    assert "equals the gradient" in ctx.extra["notes"][0]


@pytest.mark.parametrize("name", ["guided_backprop", "deconvolution", "guided_gradcam"])
def test_cost_is_the_counted_evaluations(name: str) -> None:
    net, x, score = seg_setup(2)
    spec = get_method(name)
    score.monitor.start(None)
    run(name, score, x, layer=net.conv2)
    assert spec.cost is not None and score.monitor.count == spec.cost(None, {})
    assert spec.patchwise == "gradient"  # guided Grad-CAM runs on every patch copy too (issue 20)


def test_rectified_gradient_is_a_captum_gradient_attribution() -> None:
    from captum.attr import NoiseTunnel

    net, x = prelu_unet(2)
    score = sum_score(net, x)
    plain = RectifiedGradient(score, "guided", [], "guided_backprop").attribute(x, target=1)
    tunnel = NoiseTunnel(RectifiedGradient(score, "guided", [], "guided_backprop"))
    smooth = tunnel.attribute(x, target=1, nt_samples=2, stdevs=0.0)
    torch.testing.assert_close(smooth, plain)
