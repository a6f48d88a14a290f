"""Layer methods: the 2D/3D method matrix and analytic/independent checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.methods import MethodContext, attribute, get_method, list_methods
from esegeta_engine.methods._common import make_baseline
from esegeta_engine.methods.gradient import baseline_distribution
from esegeta_engine.methods.layer import LAYER_PARAMS
from esegeta_engine.models import is_torchscript
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ArgmaxRegionTarget, ClassificationTarget
from tiny_models import (
    SIZE,
    LinearSeg,
    TinyClassifier,
    TinySegNet,
    assert_untouched,
    cls_setup,
    conv,
    seg_setup,
    shape,
)

# torch.jit.script is deprecated, but TorchScript files are what users still bring;
# Captum announces every hook it sets.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")]

METHODS = ("layer_activation", "layer_gradcam", "layer_conductance", "internal_influence",
           "layer_gradient_x_activation", "layer_deeplift", "layer_deeplift_shap",
           "layer_gradient_shap", "layer_integrated_gradients")
RAW = {"upsample": False, "channel_reduce": "none"}  # the layer's own (N, C, *grid) map




def setup(kind: str, dims: int) -> tuple[nn.Module, torch.Tensor, ScoreModel, int]:
    net, x, score = (seg_setup if kind == "segmentation" else cls_setup)(dims)
    target = 1 if kind == "segmentation" else int(score(x).argmax(dim=1))
    return net, x, score, target


class Strided(nn.Module):
    """Conv(stride 2)-ReLU-Conv-ReLU-pool-Linear: its conv2 map is coarser than the input."""

    def __init__(self, dims: int, classes: int = 3) -> None:
        super().__init__()
        C = conv(dims)
        self.conv1 = C(1, 4, 3, stride=2, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = C(4, 5, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(5, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.pool(h).flatten(1))


def run(name: str, score: nn.Module, x: torch.Tensor, layer: nn.Module | None, target: int = 1,
        seed: int = 0, **params) -> torch.Tensor:
    spec = get_method(name)
    ctx = MethodContext(score, x, target, layer=layer, seed=seed, torchscript=is_torchscript(score))
    return attribute(spec, ctx, spec.resolve_params(params))


def score_of(score: nn.Module, x: torch.Tensor, target: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return score(x)[:, target]


def hooked(score: nn.Module, layer: nn.Module, x: torch.Tensor, target: int,
           layer_input: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's activation (output, or input) and the score's gradient there."""
    store: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        store["a"] = args[0] if layer_input else out

    handle = layer.register_forward_hook(hook)
    try:
        s = score(x)[0, target]
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(s, store["a"])
    return store["a"].detach(), grad


# --- the method matrix --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", METHODS)
def test_method_matrix(name: str, dims: int, kind: str) -> None:
    net, x, score, target = setup(kind, dims)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    result = run(name, score, x, net.conv2, target=target)
    assert result.shape == (1, 1, *shape(dims))
    assert result.dtype == torch.float32
    assert bool(torch.isfinite(result).all())
    assert bool(result.abs().sum() > 0), "all-zero map"
    assert_untouched(net, state)


def test_registered_specs() -> None:
    specs = {s.name: s for s in list_methods("layer")}
    assert set(METHODS) <= set(specs)
    for name in METHODS:
        spec = specs[name]
        assert spec.needs_layer and spec.needs_hooks and not spec.noise_tunnel
        assert spec.reference and spec.summary and spec.title
        assert all(p.help for p in spec.params)
        assert spec.params[-3:] == LAYER_PARAMS  # the same three common Params everywhere
        spec.resolve_params({})  # every default is valid
        net, x, score = cls_setup(2)
        call = spec.build(MethodContext(score, x, 0, layer=net.conv2), spec.resolve_params({}))
        assert call.passes_target == (name != "layer_activation")


# --- post-processing: channels and grid ---------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_channel_reduce_and_upsample(dims: int) -> None:
    net = Strided(dims).eval()
    score = ScoreModel(net, ClassificationTarget())
    x = torch.randn(1, 1, *shape(dims))
    raw = run("layer_gradient_x_activation", score, x, net.conv2, **RAW)
    assert raw.shape == (1, 5, *(SIZE // 2,) * dims)
    summed = run("layer_gradient_x_activation", score, x, net.conv2, upsample=False)
    torch.testing.assert_close(summed, raw.sum(1, keepdim=True))
    mean = run("layer_gradient_x_activation", score, x, net.conv2, upsample=False,
               channel_reduce="mean")
    torch.testing.assert_close(mean, raw.mean(1, keepdim=True))
    per_channel = run("layer_gradient_x_activation", score, x, net.conv2, channel_reduce="none")
    assert per_channel.shape == (1, 5, *shape(dims))
    mode = "bilinear" if dims == 2 else "trilinear"
    up = F.interpolate(raw.sum(1, keepdim=True), size=shape(dims), mode=mode, align_corners=False)
    torch.testing.assert_close(run("layer_gradient_x_activation", score, x, net.conv2), up)


# --- analytic and independent checks ------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("layer_input", [False, True])
def test_layer_activation_is_the_hooked_activation(dims: int, layer_input: bool) -> None:
    net, x, score = seg_setup(dims)
    act, _ = hooked(score, net.conv2, x, 1, layer_input)
    result = run("layer_activation", score, x, net.conv2, attribute_to_layer_input=layer_input, **RAW)
    torch.testing.assert_close(result, act)
    summed = run("layer_activation", score, x, net.conv2, attribute_to_layer_input=layer_input)
    torch.testing.assert_close(summed, act.sum(1, keepdim=True))


@pytest.mark.parametrize("model", ["segnet", "strided"])
@pytest.mark.parametrize("dims", [2, 3])
def test_layer_gradcam_matches_a_manual_computation(dims: int, model: str) -> None:
    if model == "segnet":
        net, x, score = seg_setup(dims)
        t = 1
    else:
        net = Strided(dims).eval()
        score = ScoreModel(net, ClassificationTarget())
        x = torch.randn(1, 1, *shape(dims))
        t = int(score(x).argmax(dim=1))
    act, grad = hooked(score, net.conv2, x, t)
    weights = grad.mean(dim=tuple(range(2, grad.dim())), keepdim=True)  # channel-mean gradients
    signed = (weights * act).sum(dim=1, keepdim=True)
    manual = signed.clamp(min=0)
    assert bool(manual.abs().sum() > 0)
    torch.testing.assert_close(run("layer_gradcam", score, x, net.conv2, target=t, upsample=False),
                               manual)
    torch.testing.assert_close(
        run("layer_gradcam", score, x, net.conv2, target=t, upsample=False,
            relu_attributions=False), signed)


@pytest.mark.parametrize("dims", [2, 3])
def test_layer_gradient_x_activation_is_activation_times_gradient(dims: int) -> None:
    net, x, score = seg_setup(dims)
    act, grad = hooked(score, net.conv2, x, 1)
    torch.testing.assert_close(run("layer_gradient_x_activation", score, x, net.conv2, **RAW),
                               act * grad)


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
@pytest.mark.parametrize("dims", [2, 3])
def test_layer_integrated_gradients_completeness(dims: int, kind: str) -> None:
    net, x, score, t = setup(kind, dims)
    attr = run("layer_integrated_gradients", score, x, net.conv2, target=t, n_steps=128, **RAW)
    expected = score_of(score, x, t) - score_of(score, torch.zeros_like(x), t)
    torch.testing.assert_close(attr.sum().reshape(1), expected, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("baseline", ["zero", "mean"])
@pytest.mark.parametrize("kind", ["segmentation", "classification"])
@pytest.mark.parametrize("dims", [2, 3])
def test_layer_deeplift_completeness(dims: int, kind: str, baseline: str) -> None:
    net, x, score, t = setup(kind, dims)
    attr = run("layer_deeplift", score, x, net.conv2, target=t, baseline=baseline, **RAW)
    expected = score_of(score, x, t) - score_of(score, make_baseline(x, baseline), t)
    torch.testing.assert_close(attr.sum().reshape(1), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
def test_layer_deeplift_shap_completeness_over_its_baselines(kind: str) -> None:
    net, x, score, t = setup(kind, 3)
    attr = run("layer_deeplift_shap", score, x, net.conv2, target=t, seed=4, n_baselines=3,
               baseline_noise=0.3, **RAW)
    baselines = baseline_distribution(x, "zero", 3, 0.3, seed=4)
    expected = score_of(score, x, t) - score_of(score, baselines, t).mean()
    torch.testing.assert_close(attr.sum().reshape(1), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
@pytest.mark.parametrize("dims", [2, 3])
def test_layer_conductance_completeness(dims: int, kind: str) -> None:
    net, x, score, t = setup(kind, dims)
    attr = run("layer_conductance", score, x, net.conv2, target=t, n_steps=64, **RAW)
    expected = score_of(score, x, t) - score_of(score, torch.zeros_like(x), t)
    torch.testing.assert_close(attr.sum().reshape(1), expected, rtol=3e-2, atol=1e-3)


@pytest.mark.parametrize("dims", [2, 3])
def test_layer_gradient_shap_is_exact_when_the_score_is_linear_in_the_layer(dims: int) -> None:
    torch.manual_seed(1)
    net = LinearSeg(dims).eval()
    x = torch.randn(1, 1, *shape(dims))
    target = ArgmaxRegionTarget()
    target.prepare(net(x).detach())
    score = ScoreModel(net, target)
    t = int(net(x).argmax(1).flatten()[0])
    attr = run("layer_gradient_shap", score, x, net.conv, target=t, n_samples=3, stdevs=0.0,
               n_baselines=1, baseline_noise=0.0, **RAW)
    expected = score_of(score, x, t) - score_of(score, torch.zeros_like(x), t)
    torch.testing.assert_close(attr.sum().reshape(1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["layer_gradient_shap", "layer_deeplift_shap"])
def test_sampling_is_seeded_and_leaves_the_global_rng_alone(name: str) -> None:
    net, x, score = cls_setup(2)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    first = run(name, score, x, net.conv2, seed=5)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(run(name, score, x, net.conv2, seed=5), first)
    assert not torch.equal(run(name, score, x, net.conv2, seed=6), first)


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, params", [
    ("layer_conductance", {"n_steps": 0}),
    ("internal_influence", {"n_steps": 0}),
    ("layer_integrated_gradients", {"n_steps": 0}),
    ("layer_gradient_shap", {"n_samples": 0}),
    ("layer_deeplift_shap", {"n_baselines": 1}),
    ("layer_gradcam", {"channel_reduce": "max"}),
    ("layer_activation", {"upsample": "yes"}),
])
def test_out_of_range_parameters_are_rejected(name: str, params: dict) -> None:
    (param,) = params
    with pytest.raises(MethodError, match=param):
        get_method(name).resolve_params(params)


@pytest.mark.parametrize("name", METHODS)
def test_layer_methods_refuse_torchscript(name: str) -> None:
    net = torch.jit.script(TinyClassifier(2).eval())
    score = ScoreModel(net, ClassificationTarget())
    with pytest.raises(MethodError, match="state dict"):
        run(name, score, torch.randn(1, 1, *shape(2)), net.conv2)


def test_layer_methods_need_a_layer() -> None:
    _, x, score = cls_setup(2)
    with pytest.raises(MethodError, match="needs a layer"):
        run("layer_gradcam", score, x, None)
