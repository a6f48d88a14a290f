"""LRP folds eval-mode BatchNorm into the convolution before it (issue 20, part 5): LRP of a
network with BatchNorm equals LRP of the same network folded by torch's own fusion; LRP-0 equals
gradient x input on a ReLU + BatchNorm network with biases; the model is unchanged afterwards;
normalisations that cannot be folded are named in the notes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.methods.canonize import fold_batch_norm
from esegeta_engine.methods.lrp import LRP
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import RegionOfInterestTarget

OPTIONS = {"epsilon": 0.0, "gamma": 0.25, "alpha": 2.0, "low": None, "high": None}


def bn_net(dims: int, seed: int = 0, norm: str = "batch") -> nn.Sequential:
    """conv-BN-ReLU-conv-BN-ReLU-conv(1x1), biases on, BN statistics far from identity."""
    torch.manual_seed(seed)
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    B = {"batch": nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d,
         "instance": nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d}[norm]
    net = nn.Sequential(C(1, 4, 3, padding=1), B(4, affine=True), nn.ReLU(),
                        C(4, 3, 3, padding=1, bias=False), B(3, affine=True), nn.ReLU(), C(3, 2, 1))
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.weight.data.uniform_(0.5, 3.0)
            m.bias.data.uniform_(-0.5, 0.5)
            if m.running_mean is not None:
                m.running_mean.uniform_(-1.0, 1.0)
                m.running_var.uniform_(0.01, 4.0)
    return net.eval()


def folded(net: nn.Sequential) -> nn.Sequential:
    """The same network with each conv+BN pair fused by torch (an independent fold)."""
    layers = list(copy.deepcopy(net))
    out = []
    i = 0
    while i < len(layers):
        if i + 1 < len(layers) and isinstance(layers[i + 1], nn.modules.batchnorm._BatchNorm):
            out.append(fuse_conv_bn_eval(layers[i], layers[i + 1]))
            i += 2
        else:
            out.append(layers[i])
            i += 1
    return nn.Sequential(*out).eval()


def score_of(net: nn.Module, x: torch.Tensor) -> ScoreModel:
    with torch.no_grad():
        grid = net(x).shape[2:]
    return ScoreModel(net, RegionOfInterestTarget(torch.ones(grid)))


def state(net: nn.Module) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items()} | {
        f"id:{n}": id(p) for n, p in net.named_parameters()}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus", "epsilon_gamma_box"])
def test_lrp_with_batch_norm_equals_lrp_of_the_folded_network(dims: int, composite: str) -> None:
    net = bn_net(dims)
    x = torch.randn(1, 1, *(6,) * dims)
    before = state(net)
    ours = LRP(score_of(net, x), composite, {**OPTIONS, "epsilon": 0.01}).attribute(x, target=1)
    ref = LRP(score_of(folded(net), x), composite, {**OPTIONS, "epsilon": 0.01}).attribute(x, target=1)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    after = state(net)
    assert before.keys() == after.keys()
    for k in before:
        assert (torch.equal(before[k], after[k]) if isinstance(before[k], torch.Tensor)
                else before[k] == after[k]), k
    assert all(m.eps > 0 for m in net.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm3d))
    if composite != "epsilon":  # z+ ignores biases and a positive per-channel scale: the same either way
        return
    # passing BN through unchanged (the old behaviour) gives a different map
    passed = LRP(score_of(net, x), composite, {**OPTIONS, "epsilon": 0.01}, canonize=False).attribute(x, target=1)
    assert not torch.allclose(passed, ref, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_lrp0_equals_gradient_x_input_on_a_relu_batch_norm_network(dims: int) -> None:
    net = bn_net(dims, seed=3)
    x = torch.randn(1, 1, *(6,) * dims)
    score = score_of(net, x)
    relevance = LRP(score, "epsilon", OPTIONS).attribute(x, target=0)
    xi = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(score(xi)[:, 0].sum(), xi)
    torch.testing.assert_close(relevance, g * x, rtol=1e-4, atol=1e-6)


def test_fold_restores_the_model_after_an_error() -> None:
    net = bn_net(2)
    before = state(net)
    with pytest.raises(RuntimeError, match="boom"):
        with fold_batch_norm(net, torch.randn(1, 1, 6, 6)) as done:
            assert len(done) == 2
            raise RuntimeError("boom")
    after = state(net)
    for k in before:
        assert (torch.equal(before[k], after[k]) if isinstance(before[k], torch.Tensor)
                else before[k] == after[k]), k
    assert net[3].bias is None


@pytest.mark.parametrize("dims", [2, 3])
def test_folding_costs_two_probe_calls_and_lrp_three_network_calls(dims: int) -> None:
    """Finding the pairs and checking the fold: two probe forwards (the first's output is the unfolded
    reference); LRP adds its one explained pass."""
    net = bn_net(dims)
    calls = [0]
    hook = net.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    x = torch.randn(1, 1, *(6,) * dims)
    try:
        with fold_batch_norm(net, x) as done:
            assert len(done) == 2 and calls[0] == 2
        calls[0] = 0
        LRP(ScoreModel(net, RegionOfInterestTarget(torch.ones((6,) * dims))), "epsilon", OPTIONS).attribute(x, target=0)
        assert calls[0] == 3
    finally:
        hook.remove()


def test_a_conv_output_read_twice_is_not_folded() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.bn = nn.BatchNorm2d(2).eval()
            self.bn.running_mean.fill_(0.7)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.conv(x)
            return self.bn(z) + z  # the raw conv output is read again

    net = Skip().eval()
    with fold_batch_norm(net, torch.randn(1, 1, 5, 5)) as done:
        assert done == []


@pytest.mark.parametrize("dims", [2, 3])
def test_instance_norm_is_named_in_the_notes(dims: int) -> None:
    net = bn_net(dims, norm="instance")
    x = torch.randn(1, 1, *(6,) * dims)
    ctx = MethodContext(score_model=score_of(net, x), inputs=x, target=1)
    spec = get_method("lrp")
    out = attribute(spec, ctx, spec.resolve_params({}))
    assert out.shape == x.shape
    notes = " ".join(ctx.extra["notes"])
    assert "InstanceNorm" in notes and "unchanged" in notes


@pytest.mark.parametrize("dims", [2, 3])
def test_instance_norm_is_named_in_the_notes_under_sliding_window(dims: int) -> None:
    from esegeta_engine.forward.runner import ExecutionForm
    from esegeta_engine.forward.sliding import WindowSettings

    net = bn_net(dims, norm="instance")
    x = torch.randn(1, 1, *(10,) * dims)
    roi = torch.zeros(x.shape[2:])
    roi[(slice(2, 8),) * dims] = 1.0
    sm = ScoreModel(net, RegionOfInterestTarget(roi), form=ExecutionForm(WindowSettings((6,) * dims)))
    ctx = MethodContext(score_model=sm, inputs=x, target=1, extra={"patchwise": True})
    spec = get_method("lrp")
    out = attribute(spec, ctx, spec.resolve_params({}))
    assert out.shape == x.shape and sm.monitor.patches > 0  # patch by patch
    notes = " ".join(ctx.extra["notes"])
    assert "InstanceNorm" in notes and "unchanged" in notes


@pytest.mark.parametrize("dims", [2, 3])
def test_no_batch_norm_no_probe_and_lrp_one_network_call(dims: int) -> None:
    """Without an eval-mode batch norm there is nothing to fold: no probe forward (on a sliding
    window it was one more patch forward per map: a quarter of the two-patch minimum)."""
    torch.manual_seed(0)
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    N = nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d
    net = nn.Sequential(C(1, 3, 3, padding=1), N(3, affine=True), nn.LeakyReLU(0.1), C(3, 2, 1)).eval()
    calls = [0]
    hook = net.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    x = torch.randn(1, 1, *(6,) * dims)
    try:
        with fold_batch_norm(net, x) as done:
            assert done == [] and calls[0] == 0
        LRP(ScoreModel(net, RegionOfInterestTarget(torch.ones((6,) * dims))), "epsilon", OPTIONS).attribute(x, target=0)
        assert calls[0] == 1
    finally:
        hook.remove()
