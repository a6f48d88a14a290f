"""The DeepLIFT family on real networks: reused activations (MONAI SegResNet) and modules
without a DeepLIFT rule (InstanceNorm in MONAI BasicUNet) (issue 8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.models import model_guard
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import RegionOfInterestTarget
from tiny_models import assert_untouched

monai_nets = pytest.importorskip("monai.networks.nets")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FAMILY = ("deeplift", "deeplift_shap", "layer_deeplift", "layer_deeplift_shap")


def segresnet(dims: int, norm: str = "batch") -> tuple[nn.Module, torch.Tensor]:
    """Tiny SegResNet: one ``nn.ReLU`` module called at several places of forward."""
    torch.manual_seed(0)
    net = monai_nets.SegResNet(spatial_dims=dims, in_channels=1, out_channels=2, init_filters=4,
                               blocks_down=(1, 1), blocks_up=(1,),
                               norm=(norm, {"num_groups": 2}) if norm == "group" else norm).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net, torch.randn(1, 1, *(8,) * dims)


def run(name: str, net: nn.Module, x: torch.Tensor, **params) -> tuple[torch.Tensor, MethodContext]:
    score = ScoreModel(net, RegionOfInterestTarget(torch.ones(x.shape[2:])))
    spec = get_method(name)
    layer = net.conv_final[2] if name.startswith("layer") and hasattr(net, "conv_final") else None
    if name.startswith("layer") and layer is None:
        layer = net.final_conv
    ctx = MethodContext(score, x, 1, layer=layer, layer_name="layer")
    with model_guard(net):
        score.monitor.start(None)
        result = attribute(spec, ctx, spec.resolve_params(params))
    ctx.extra["evaluations"] = score.monitor.count
    return result, ctx


def reused_activations(net: nn.Module) -> list[nn.Module]:
    calls: dict[int, int] = {}
    handles = [m.register_forward_pre_hook(lambda m, a: calls.__setitem__(id(m), calls.get(id(m), 0) + 1))
               for m in net.modules() if isinstance(m, nn.ReLU)]
    net(torch.zeros(1, 1, 8, 8))
    for h in handles:
        h.remove()
    return [m for m in net.modules() if calls.get(id(m), 0) > 1]


def test_segresnet_reuses_an_activation_module() -> None:
    net, _ = segresnet(2)
    assert reused_activations(net), "the test network must call one ReLU at several places"


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", FAMILY)
def test_runs_on_segresnet_and_leaves_it_untouched(name: str, dims: int) -> None:
    net, x = segresnet(dims)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    result, ctx = run(name, net, x)
    assert result.shape[0] == 1 and result.shape[2:] == x.shape[2:]
    assert bool(torch.isfinite(result).all()) and result.abs().sum() > 0
    assert ctx.extra["evaluations"] == get_method(name).cost(None, {})
    assert ctx.extra.get("notes", []) == []  # batch norm, ReLU, upsampling: all have exact rules
    assert_untouched(net, state)


@pytest.mark.parametrize("dims", [2, 3])
def test_segresnet_deeplift_is_complete(dims: int) -> None:
    """Every module of this SegResNet has an exact rule: sum of attributions = F(x) - F(0)."""
    net, x = segresnet(dims)
    result, ctx = run("deeplift", net, x)
    with torch.no_grad():
        delta = ctx.score_model(x)[0, 1] - ctx.score_model(torch.zeros_like(x))[0, 1]
    torch.testing.assert_close(result.sum(), delta, rtol=1e-3, atol=1e-4)


def test_group_norm_is_named_in_a_note() -> None:
    net, x = segresnet(2, norm="group")
    _, ctx = run("deeplift", net, x)
    (note,) = ctx.extra["notes"]
    assert "GroupNorm" in note and "F(x) - F(baseline)" in note


def test_basic_unet_instance_norm_is_named_in_a_note() -> None:
    torch.manual_seed(0)
    net = monai_nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2,
                               features=(2, 2, 2, 2, 2, 2)).eval()
    x = torch.randn(1, 1, 32, 32)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    result, ctx = run("deeplift", net, x)
    (note,) = ctx.extra["notes"]
    assert "InstanceNorm2d" in note and "LeakyReLU" not in note  # Captum has a LeakyReLU rule
    assert bool(torch.isfinite(result).all())
    assert_untouched(net, state)


def test_a_reused_layer_is_refused_by_name() -> None:
    net, x = segresnet(2)
    layer = reused_activations(net)[0]
    score = ScoreModel(net, RegionOfInterestTarget(torch.ones(x.shape[2:])))
    spec = get_method("layer_deeplift")
    ctx = MethodContext(score, x, 1, layer=layer, layer_name="act")
    with pytest.raises(MethodError, match="layer 'act' is called"):
        attribute(spec, ctx, spec.resolve_params({}))
