"""Gradient methods: the 2D/3D method matrix and analytic/independent checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import GuidedBackprop, LayerAttribution, LayerGradCam
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.methods import MethodContext, attribute, get_method, list_methods
from esegeta_engine.methods.gradient import baseline_distribution
from esegeta_engine.models import is_torchscript
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ArgmaxRegionTarget, ClassificationTarget
from tiny_models import (
    SIZE,
    LinearScore,
    TinyClassifier,
    TinySegNet,
    assert_untouched,
    cls_setup,
    conv,
    seg_setup,
    shape,
)

# Captum announces every hook it sets and every input it marks as requiring grad.
# torch.jit.script is deprecated, but TorchScript files are what users still bring.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")]

METHODS = ("saliency", "integrated_gradients", "input_x_gradient", "guided_backprop",
           "deconvolution", "deeplift", "deeplift_shap", "gradient_shap", "guided_gradcam")
NOISE_TUNNEL = ("saliency", "integrated_gradients", "input_x_gradient", "guided_backprop",
                "deconvolution", "deeplift", "gradient_shap")
HOOKS = ("guided_backprop", "deconvolution", "deeplift", "deeplift_shap", "guided_gradcam")
DETERMINISTIC_NT = ("saliency", "integrated_gradients", "input_x_gradient", "guided_backprop",
                    "deconvolution", "deeplift")




def run(name: str, score: nn.Module, x: torch.Tensor, target: int = 1, layer: nn.Module | None = None,
        noise_tunnel: dict | None = None, seed: int = 0, **params) -> torch.Tensor:
    spec = get_method(name)
    ctx = MethodContext(score, x, target, layer=layer, seed=seed, torchscript=is_torchscript(score))
    return attribute(spec, ctx, spec.resolve_params(params), noise_tunnel)


def score_of(score: nn.Module, x: torch.Tensor, target: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return score(x)[:, target]


# --- the method matrix --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", METHODS)
def test_method_matrix(name: str, dims: int, kind: str) -> None:
    net, x, score = (seg_setup if kind == "segmentation" else cls_setup)(dims)
    target = 1 if kind == "segmentation" else int(score(x).argmax(dim=1))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x_before = x.clone()
    result = run(name, score, x, target=target, layer=net.conv2)
    assert result.shape == x.shape
    assert result.dtype == torch.float32
    assert bool(torch.isfinite(result).all())
    assert bool(result.abs().sum() > 0), "all-zero map"
    assert torch.equal(x, x_before) and not x.requires_grad
    assert_untouched(net, state)


def test_registered_specs() -> None:
    specs = {s.name: s for s in list_methods("gradient")}
    assert set(METHODS) <= set(specs)
    for name in METHODS:
        spec = specs[name]
        assert spec.reference and spec.summary and spec.title
        assert all(p.help for p in spec.params)
        spec.resolve_params({})  # every default is valid
        assert spec.noise_tunnel == (name in NOISE_TUNNEL)
        assert spec.needs_hooks == (name in HOOKS)
        assert spec.needs_layer == (name == "guided_gradcam")


# --- analytic and independent checks ------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_saliency_is_the_gradient_of_a_linear_score(dims: int) -> None:
    net = LinearScore((1, *shape(dims)), classes=2).eval()
    score = ScoreModel(net, ClassificationTarget())
    x = torch.randn(1, 1, *shape(dims))
    sal = run("saliency", score, x, target=1, abs=False)
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(score(xg)[0, 1], xg)
    assert torch.equal(sal, grad)
    assert torch.equal(sal[0], net.weight[1].detach())
    assert torch.equal(run("saliency", score, x, target=1), grad.abs())


@pytest.mark.parametrize("dims", [2, 3])
def test_input_x_gradient_is_input_times_gradient(dims: int) -> None:
    _, x, score = seg_setup(dims)
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(score(xg)[0, 1], xg)
    torch.testing.assert_close(run("input_x_gradient", score, x), x * grad)


@pytest.mark.parametrize("dims", [2, 3])
def test_integrated_gradients_completeness(dims: int) -> None:
    _, x, score = seg_setup(dims)
    attr = run("integrated_gradients", score, x, n_steps=128)
    expected = score_of(score, x) - score_of(score, torch.zeros_like(x))
    torch.testing.assert_close(attr.sum().reshape(1), expected, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("baseline", ["zero", "blur"])
@pytest.mark.parametrize("kind", ["segmentation", "classification"])
@pytest.mark.parametrize("dims", [2, 3])
def test_deeplift_completeness(dims: int, kind: str, baseline: str) -> None:
    from esegeta_engine.methods._common import make_baseline

    _, x, score = (seg_setup if kind == "segmentation" else cls_setup)(dims)
    attr = run("deeplift", score, x, baseline=baseline)
    expected = score_of(score, x) - score_of(score, make_baseline(x, baseline))
    torch.testing.assert_close(attr.sum().reshape(1), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
def test_deeplift_shap_completeness_over_its_baselines(kind: str) -> None:
    _, x, score = (seg_setup if kind == "segmentation" else cls_setup)(3)
    attr = run("deeplift_shap", score, x, seed=7, n_baselines=5, baseline_noise=0.2)
    baselines = baseline_distribution(x, "zero", 5, 0.2, seed=7)
    expected = score_of(score, x) - score_of(score, baselines).mean()
    torch.testing.assert_close(attr.sum().reshape(1), expected, rtol=1e-4, atol=1e-4)


def test_gradient_shap_completeness_on_a_linear_model() -> None:
    net = LinearScore((1, *shape(2)), classes=2).eval()
    score = ScoreModel(net, ClassificationTarget())
    x = torch.randn(1, 1, *shape(2))
    # Exact for a linear model with one noise-free baseline and no input noise.
    attr = run("gradient_shap", score, x, n_samples=3, stdevs=0.0, n_baselines=1, baseline_noise=0.0)
    expected = score_of(score, x) - score_of(score, torch.zeros_like(x))
    torch.testing.assert_close(attr.sum().reshape(1), expected, rtol=1e-5, atol=1e-5)
    # In expectation otherwise: many samples over noisy baselines and noisy inputs.
    attr = run("gradient_shap", score, x, seed=3, n_samples=4000, stdevs=0.05, n_baselines=4,
               baseline_noise=0.1)
    baselines = baseline_distribution(x, "zero", 4, 0.1, seed=3)
    expected = score_of(score, x) - score_of(score, baselines).mean()
    torch.testing.assert_close(attr.sum().reshape(1), expected, rtol=1e-2, atol=5e-2)


class OneHidden(nn.Module):
    """x -> fc2(relu(fc1(flatten(x)))): small enough to backpropagate by hand."""

    def __init__(self, features: int, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(features, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


@pytest.mark.parametrize("dims", [2, 3])
def test_guided_backprop_and_deconvolution_match_hand_written_rules(dims: int) -> None:
    x = torch.randn(1, 1, *shape(dims))
    net = OneHidden(x.numel()).eval()
    score = ScoreModel(net, ClassificationTarget())
    t = 2
    with torch.no_grad():
        z = net.fc1(x.flatten(1))[0]  # forward input of the ReLU
        g = net.fc2.weight[t]  # gradient of the score at the ReLU's output
        # Guided backprop: zero negative gradients AND gradients where the forward input was <= 0.
        guided = ((g.clamp(min=0) * (z > 0)) @ net.fc1.weight).reshape(x.shape)
        # Deconvolution: ReLU on the gradient only, ignoring the forward pass.
        deconv = (g.clamp(min=0) @ net.fc1.weight).reshape(x.shape)
        plain = ((g * (z > 0)) @ net.fc1.weight).reshape(x.shape)
    assert bool(((z > 0) & (g < 0)).any()), "the check needs a unit the two rules treat differently"
    torch.testing.assert_close(run("guided_backprop", score, x, target=t), guided)
    torch.testing.assert_close(run("deconvolution", score, x, target=t), deconv)
    torch.testing.assert_close(run("saliency", score, x, target=t, abs=False), plain)


class Strided(nn.Module):
    """Conv(stride 2)-ReLU-Conv-ReLU-pool-Linear: its conv2 map is coarser than the input."""

    def __init__(self, dims: int, classes: int = 3) -> None:
        super().__init__()
        C = conv(dims)
        self.conv1 = C(1, 4, 3, stride=2, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = C(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.pool(h).flatten(1))


@pytest.mark.parametrize("dims", [2, 3])
def test_guided_gradcam_is_guided_backprop_times_upsampled_gradcam(dims: int) -> None:
    net = Strided(dims).eval()
    score = ScoreModel(net, ClassificationTarget())
    x = torch.randn(1, 1, *shape(dims))
    t = int(score(x).argmax(dim=1))
    mode = "bilinear" if dims == 2 else "trilinear"
    cam = LayerGradCam(score, net.conv2).attribute(x, target=t, relu_attributions=True)
    assert cam.shape[2:] == (SIZE // 2,) * dims
    expected = GuidedBackprop(score).attribute(x, target=t) * LayerAttribution.interpolate(
        cam, x.shape[2:], interpolate_mode=mode)
    result = run("guided_gradcam", score, x, target=t, layer=net.conv2)
    assert bool(expected.abs().sum() > 0)
    torch.testing.assert_close(result, expected.detach())


@pytest.mark.parametrize("dims", [2, 3])
def test_guided_gradcam_interpolates_linearly_for_the_dimension(dims: int) -> None:
    net, x, score = seg_setup(dims)
    spec = get_method("guided_gradcam")
    call = spec.build(MethodContext(score, x, 1, layer=net.conv2), spec.resolve_params({}))
    assert call.kwargs["interpolate_mode"] == ("bilinear" if dims == 2 else "trilinear")


def test_guided_gradcam_on_a_linear_layer_raises() -> None:
    net, x, score = cls_setup(2)
    with pytest.raises(MethodError, match="layer"):
        run("guided_gradcam", score, x, layer=net.fc)


@pytest.mark.parametrize("name", DETERMINISTIC_NT)
def test_noise_tunnel_with_zero_noise_equals_the_plain_method(name: str) -> None:
    _, x, score = seg_setup(2)
    plain = run(name, score, x)
    smooth = run(name, score, x, noise_tunnel={"type": "smoothgrad", "samples": 3, "stdev": 0.0})
    torch.testing.assert_close(smooth, plain, rtol=1e-5, atol=1e-6)


def test_noise_tunnel_wraps_gradient_shap() -> None:
    _, x, score = cls_setup(3)
    result = run("gradient_shap", score, x, noise_tunnel={"samples": 2, "stdev": 0.1})
    assert result.shape == x.shape and bool(torch.isfinite(result).all())


def test_noise_tunnel_is_refused_for_deeplift_shap() -> None:
    _, x, score = cls_setup(2)
    with pytest.raises(MethodError, match="noise tunnel"):
        run("deeplift_shap", score, x, noise_tunnel={"samples": 2})


@pytest.mark.parametrize("name", ["gradient_shap", "deeplift_shap"])
def test_sampling_is_seeded_and_leaves_the_global_rng_alone(name: str) -> None:
    _, x, score = cls_setup(2)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    first = run(name, score, x, seed=5)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(run(name, score, x, seed=5), first)
    assert not torch.equal(run(name, score, x, seed=6), first)


def test_baseline_distribution() -> None:
    x = torch.randn(2, 1, *shape(3)) * 3 + 1
    dist = baseline_distribution(x, "mean", 4, 0.1, seed=0)
    assert dist.shape == (8, 1, *shape(3))
    assert torch.equal(dist, baseline_distribution(x, "mean", 4, 0.1, seed=0))
    mean = x.mean(dim=(1, 2, 3, 4)).repeat(4)
    torch.testing.assert_close(dist.flatten(1).mean(1), mean, atol=0.05, rtol=0)
    noise_std = (dist - mean.reshape(-1, 1, 1, 1, 1)).flatten(1).std(1)
    expected_std = 0.1 * x.flatten(1).std(1, correction=0).repeat(4)
    torch.testing.assert_close(noise_std, expected_std, rtol=0.15, atol=0)
    exact = baseline_distribution(x, "zero", 3, 0.0, seed=0)
    assert torch.equal(exact, torch.zeros(6, 1, *shape(3)))


@pytest.mark.parametrize("params", [{"n_steps": 0}, {"n_steps": 2001}, {"method": "simpson"},
                                    {"internal_batch_size": 0}, {"baseline": "noise"}])
def test_out_of_range_parameters_are_rejected(params: dict) -> None:
    (name,) = params
    with pytest.raises(MethodError, match=name):
        get_method("integrated_gradients").resolve_params(params)


def test_deeplift_shap_needs_two_baselines() -> None:
    with pytest.raises(MethodError, match="n_baselines"):
        get_method("deeplift_shap").resolve_params({"n_baselines": 1})


@pytest.mark.parametrize("name", HOOKS)
def test_hook_methods_refuse_torchscript(name: str) -> None:
    net = torch.jit.script(TinySegNet(2).eval())
    x = torch.randn(1, 1, *shape(2))
    target = ArgmaxRegionTarget()
    target.prepare(net(x).detach())
    score = ScoreModel(net, target)
    with pytest.raises(MethodError, match="state dict"):
        run(name, score, x, layer=net.conv2)


def test_gradient_only_methods_run_on_torchscript() -> None:
    net = torch.jit.script(TinyClassifier(2).eval())
    score = ScoreModel(net, ClassificationTarget())
    x = torch.randn(1, 1, *shape(2))
    assert run("saliency", score, x).shape == x.shape
    assert run("integrated_gradients", score, x, n_steps=4).shape == x.shape
