"""The layer-channel (filter / neuron) target: any method explains one channel of a layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from esegeta_engine.channel_target import LayerChannelTarget
from esegeta_engine.errors import MethodError, TargetError
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ClassificationTarget
from tiny_models import assert_untouched, cls_setup, conv, seg_setup, shape

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class OneByOne(nn.Module):
    """A 1x1 convolution then a head: channel k's mean is ``mean_v(sum_c w_kc x_cv) + b_k``."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.mix = conv(dims)(2, 3, 1)
        self.head = conv(dims)(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(x)))


def saliency(score: ScoreModel, x: torch.Tensor, **params) -> torch.Tensor:
    spec = get_method(params.pop("method", "saliency"))
    return attribute(spec, MethodContext(score, x, 0), spec.resolve_params(params))


@pytest.mark.parametrize("dims", [2, 3])
def test_channel_target_saliency_is_the_analytic_gradient(dims: int) -> None:
    torch.manual_seed(0)
    net = OneByOne(dims).eval()
    x = torch.randn(1, 2, *shape(dims))
    score = ScoreModel(net, LayerChannelTarget("mix", channel=1))
    grad = saliency(score, x, abs=False)
    voxels = np.prod(shape(dims))
    expected = (net.mix.weight[1, :, ...].detach().reshape(1, 2, *[1] * dims) / voxels).expand_as(x)
    torch.testing.assert_close(grad, expected)
    assert_untouched(net, {k: v.clone() for k, v in net.state_dict().items()})


@pytest.mark.parametrize("unit", [None, (1, 2)])
@pytest.mark.parametrize("dims", [2, 3])
def test_channel_target_equals_autograd_on_a_conv_net(dims: int, unit: tuple | None) -> None:
    net, x, _ = seg_setup(dims)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    unit = (*unit, 3)[:dims] if unit else None
    score = ScoreModel(net, LayerChannelTarget("conv2", channel=3, unit=unit))
    xg = x.clone().requires_grad_(True)
    seen: list[torch.Tensor] = []
    handle = net.conv2.register_forward_hook(lambda m, a, out: seen.append(out))
    net(xg)
    handle.remove()
    value = seen[0][0, 3][unit] if unit else seen[0][:, 3].mean()
    (expected,) = torch.autograd.grad(value, xg)
    torch.testing.assert_close(saliency(score, x, abs=False), expected)
    torch.testing.assert_close(score(x), value.detach().reshape(1, 1))
    guided = saliency(score, x, method="guided_backprop")  # "layer activation with guided backprop"
    assert guided.shape == x.shape and bool(torch.isfinite(guided).all())
    assert_untouched(net, state)


def test_channel_target_refuses_a_channel_beyond_the_layer() -> None:
    net, x, _ = seg_setup(2)
    score = ScoreModel(net, LayerChannelTarget("conv2", channel=7))
    with pytest.raises(TargetError, match="channel 7 is beyond the layer's channels.*has 4"):
        score(x)
    assert not net.conv2._forward_hooks
    with pytest.raises(TargetError, match="outside a forward pass"):
        LayerChannelTarget("conv2")(torch.zeros(1, 2))


def test_channel_target_refuses_a_layer_used_twice() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(x))

    with pytest.raises(TargetError, match="runs 2 times"):
        ScoreModel(Twice(), LayerChannelTarget("conv"))(torch.zeros(1, 1, 4, 4))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_channel_target_and_visualisations_refuse_torchscript() -> None:
    from tiny_models import TinySegNet

    net = torch.jit.script(TinySegNet(2).eval())
    with pytest.raises(TargetError, match="TorchScript"):
        ScoreModel(net, LayerChannelTarget("conv2", 1))(torch.randn(1, 1, *shape(2)))
    score = ScoreModel(net, ClassificationTarget())
    spec = get_method("deep_dream")
    ctx = MethodContext(score, torch.randn(1, 1, *shape(2)), 0, layer=net.conv2, torchscript=True)
    with pytest.raises(MethodError, match="state dict"):
        attribute(spec, ctx, spec.resolve_params({}))


def test_channel_target_in_the_explainer(tmp_path) -> None:
    from esegeta_engine.config import MethodConfig, PreprocessConfig, TargetConfig
    from esegeta_engine.explain import Explainer, MapReady
    from esegeta_engine.io import Volume as NiftiVolume

    net, _, _ = seg_setup(3)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    vol = NiftiVolume(np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32), np.eye(4))
    ex = Explainer(net, PreprocessConfig(), TargetConfig(kind="channel", layer="conv2", channel=1))
    methods = [MethodConfig(name="saliency", params={"abs": False}),
               MethodConfig(name="deep_dream", params={"steps": 2}, layers=["conv1"])]
    events = [e for e in ex.iter_explain([vol], methods, threaded=False)]
    maps = [e for e in events if isinstance(e, MapReady)]
    assert [m.job.spec.name for m in maps] == ["saliency", "deep_dream"]
    assert all(m.array.shape == (8, 8, 8) for m in maps)
    assert maps[0].job.cls_label == "channel-conv2-ch1" and maps[1].evaluations == 2
    assert maps[1].job.cls_label == "volume"  # a visualisation is not named after the target
    assert_untouched(net, state)
    with pytest.raises(ValueError, match="needs target.layer"):
        TargetConfig(kind="channel")


def test_channel_target_on_a_classifier_layer() -> None:
    net, x, _ = cls_setup(2)
    score = ScoreModel(net, LayerChannelTarget("fc", channel=2))
    torch.testing.assert_close(score(x), ScoreModel(net, ClassificationTarget())(x)[:, 2:3])
