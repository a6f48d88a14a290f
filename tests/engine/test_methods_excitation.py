"""Excitation backprop, its contrastive variant, and the linear approximation (issue 8):
a hand computation, probability conservation and non-negativity, the 2D/3D matrix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.methods.excitation import ExcitationBackprop
from esegeta_engine.models import model_guard
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ClassificationTarget, RegionOfInterestTarget
from tiny_models import assert_untouched, cls_setup, seg_setup

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EB = ("excitation_backprop", "contrastive_excitation_backprop")


def mlp() -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    return net, torch.rand(1, 3) + 0.2


def test_matches_a_hand_computation_on_a_tiny_network() -> None:
    net, x = mlp()
    score = ScoreModel(net, ClassificationTarget())
    target = 1
    a = net[1](net[0](x)).detach()[0]  # hidden activations (non-negative)
    w = net[2].weight.detach()[target]  # weights of the target unit
    # top: P(target) = 1; hidden unit j wins with a_j w_j+ / sum_j a_j w_j+
    pos = a * w.clamp(min=0)
    neg = a * (-w).clamp(min=0)  # the dual unit has weights -w
    expected = pos / pos.sum()
    got = ExcitationBackprop(score, net[1]).attribute(x, target=target)[0]
    torch.testing.assert_close(got, expected)
    contrastive = ExcitationBackprop(score, net[1], contrastive=True).attribute(x, target=target)[0]
    torch.testing.assert_close(contrastive, expected - neg / neg.sum())
    # one layer further down, through the first Linear (inputs x >= 0)
    w1 = net[0].weight.detach()  # (4, 3)
    share = (x[0][None, :] * w1).clamp(min=0)  # (hidden j, input i)
    below = (share / share.sum(1, keepdim=True)).T @ expected
    at_input = ExcitationBackprop(score, net[0]).attribute(
        x, target=target, attribute_to_layer_input=True)[0]
    torch.testing.assert_close(at_input, below)


@pytest.mark.parametrize("dims", [2, 3])
def test_probabilities_are_non_negative_and_sum_to_one_at_every_layer(dims: int) -> None:
    net, _, score = seg_setup(dims)
    x = torch.rand(1, 1, *(8,) * dims) + 0.1
    for layer in (net.relu2, net.conv1):  # any network: probabilities are never negative
        assert bool((ExcitationBackprop(score, layer).attribute(x, target=1) >= 0).all())
    with torch.no_grad():  # positive weights and input: every unit has excitatory inputs,
        for conv in (net.conv1, net.conv2, net.head):  # so no probability may be lost
            conv.weight.abs_()
    for layer in (net.relu2, net.conv2, net.relu1, net.conv1):
        P = ExcitationBackprop(score, layer).attribute(x, target=1)
        assert bool((P >= 0).all())
        assert float(P.sum()) == pytest.approx(1.0, rel=1e-4)
    P_in = ExcitationBackprop(score, net.conv1).attribute(x, target=1, attribute_to_layer_input=True)
    assert float(P_in.sum()) == pytest.approx(1.0, rel=1e-4) and bool((P_in >= 0).all())


def test_contrastive_sums_to_zero_and_differs_from_plain() -> None:
    net, x, score = cls_setup(2)
    x = x.abs() + 0.1
    plain = ExcitationBackprop(score, net.relu1).attribute(x, target=0)
    contrastive = ExcitationBackprop(score, net.relu1, contrastive=True).attribute(x, target=0)
    assert float(contrastive.sum()) == pytest.approx(0.0, abs=1e-5)  # 1 - 1
    assert not torch.allclose(plain, contrastive)


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", EB)
def test_method_matrix(name: str, dims: int, kind: str) -> None:
    net, x, score = (seg_setup if kind == "segmentation" else cls_setup)(dims)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    spec = get_method(name)
    score.monitor.start(None)
    with model_guard(net):
        result = attribute(spec, MethodContext(score, x, 1, layer=net.conv2, layer_name="conv2"),
                           spec.resolve_params({}))
    assert result.shape == (1, 1, *x.shape[2:]) and bool(torch.isfinite(result).all())
    assert result.abs().sum() > 0
    assert score.monitor.count == spec.cost(None, {}) == 1
    assert spec.patchwise == "gradient"  # runs on every patch copy of the layer (issue 20)
    assert_untouched(net, state)


def test_runs_on_monai_basic_unet_3d() -> None:
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    net = nets.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2,
                         features=(2, 2, 2, 2, 2, 2)).eval()
    x = torch.rand(1, 1, 32, 16, 16)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    score = ScoreModel(net, RegionOfInterestTarget(torch.ones(x.shape[2:])))
    with model_guard(net):
        P = ExcitationBackprop(score, net.upcat_1).attribute(x, target=1)
    assert bool((P >= 0).all()) and 0 < float(P.sum()) <= 1.0 + 1e-5
    assert_untouched(net, state)


@pytest.mark.parametrize("dims", [2, 3])
def test_linear_approximation_is_layer_gradient_x_activation_summed(dims: int) -> None:
    net, x, score = seg_setup(dims)
    ctx = MethodContext(score, x, 1, layer=net.conv2, layer_name="conv2")
    la = get_method("linear_approximation")
    lgxa = get_method("layer_gradient_x_activation")
    ours = attribute(la, ctx, la.resolve_params({"upsample": False}))
    reference = attribute(lgxa, ctx, lgxa.resolve_params({"channel_reduce": "sum", "upsample": False}))
    torch.testing.assert_close(ours, reference)
    xi = x.clone()
    acts = []
    h = net.conv2.register_forward_hook(lambda m, a, y: acts.append(y))
    out = score(xi)[:, 1].sum()
    h.remove()
    (g,) = torch.autograd.grad(out, acts[0])
    torch.testing.assert_close(ours, (acts[0] * g).sum(1, keepdim=True).detach())
