"""LRP: defining identities (LRP-0 = gradient x input, conservation), hand-computed rules,
the method matrix, a real MONAI network, and refusal of modules without a rule (issue 8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.methods import lrp_rules
from esegeta_engine.methods.lrp import LRP
from esegeta_engine.models import model_guard
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import RegionOfInterestTarget
from tiny_models import assert_untouched, cls_setup, seg_setup

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

OPTIONS = {"epsilon": 0.0, "gamma": 0.25, "alpha": 2.0, "low": None, "high": None}


def chain(dims: int, bias: bool = False, seed: int = 0) -> nn.Module:
    """conv-ReLU-convT(stride 2)-LeakyReLU-avgpool-conv-BatchNorm-ReLU-conv(1x1)."""
    torch.manual_seed(seed)
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    T = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
    P = nn.AvgPool2d if dims == 2 else nn.AvgPool3d
    B = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    net = nn.Sequential(C(1, 4, 3, padding=1, bias=bias), nn.ReLU(),
                        T(4, 3, 2, stride=2, bias=bias), nn.LeakyReLU(0.1), P(2),
                        C(3, 4, 3, padding=1, bias=bias), B(4), nn.ReLU(inplace=True),
                        C(4, 2, 1, bias=bias)).eval()
    return net


def score_of(net: nn.Module, x: torch.Tensor) -> ScoreModel:
    """Each class's outputs summed over the whole output grid."""
    with torch.no_grad():
        grid = net(x).shape[2:]
    return ScoreModel(net, RegionOfInterestTarget(torch.ones(grid)))


def gradient_x_input(score: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    xi = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(score(xi)[:, target].sum(), xi)
    return g * x


@pytest.mark.parametrize("dims", [2, 3])
def test_lrp0_on_a_bias_free_relu_network_equals_gradient_x_input(dims: int) -> None:
    torch.manual_seed(0)
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    net = nn.Sequential(C(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2) if dims == 2
                        else nn.MaxPool3d(2), C(4, 4, 3, padding=1, bias=False), nn.ReLU(),
                        C(4, 2, 1, bias=False)).eval()
    x = torch.randn(1, 1, *(8,) * dims)
    score = score_of(net, x)
    relevance = LRP(score, "epsilon", OPTIONS).attribute(x, target=1)
    torch.testing.assert_close(relevance, gradient_x_input(score, x, 1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("composite", ["epsilon", "epsilon_gamma_box", "gamma", "epsilon_plus_flat"])
def test_relevance_is_conserved_layer_by_layer(composite: str, dims: int) -> None:
    net = chain(dims)
    x = torch.randn(1, 1, *(6,) * dims)
    score = score_of(net, x)
    record: list[tuple[str, float, float]] = []
    relevance = LRP(score, composite, {**OPTIONS, "epsilon": 1e-9}, record).attribute(x, target=1)
    if composite == "epsilon_plus_flat":  # z+ in the middle: conserved where z+ > 0 only
        record = [r for r in record if r[0] in ("0", "1", "3", "6", "7")]  # flat, pass-through
    assert len(record) >= 5
    for name, r_in, r_out in record:
        assert r_in == pytest.approx(r_out, rel=1e-4, abs=1e-5), f"layer {name}"
    start = float(score(x)[0, 1])
    if composite != "epsilon_plus_flat":
        assert float(relevance.sum()) == pytest.approx(start, rel=1e-3)


def test_epsilon_absorbs_relevance_in_proportion_to_epsilon() -> None:
    net = chain(2)
    x = torch.randn(1, 1, 6, 6)
    record: list[tuple[str, float, float]] = []
    LRP(score_of(net, x), "epsilon", {**OPTIONS, "epsilon": 0.5}, record).attribute(x, target=1)
    lost = [abs(r_out) - abs(r_in) for _, r_in, r_out in record if r_in != r_out]
    assert lost and all(v > 0 for v in lost)  # |z / (z + eps sign z)| < 1 shrinks relevance


def test_alpha_beta_matches_a_hand_computation() -> None:
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():  # mixed signs in every row, so both shares exist
        lin.weight.copy_(torch.tensor([[0.5, -0.3, 0.2], [-0.4, 0.6, -0.1]]))
    a = torch.rand(1, 3) + 0.1
    R = torch.tensor([[1.0, -0.5]])
    w = lin.weight.detach()  # (out, in)
    contrib = a[0][None, :] * w  # (k, j)
    pos, neg = contrib.clamp(min=0), contrib.clamp(max=0)
    expected = (2 * (pos / pos.sum(1, keepdim=True)) - 1 * (neg / neg.sum(1, keepdim=True))).T @ R[0]
    out = lrp_rules.alpha_beta(lin, a, R, alpha=2.0, eps=0.0)
    torch.testing.assert_close(out[0], expected)


def test_zbox_and_flat_match_hand_computations() -> None:
    torch.manual_seed(4)
    lin = nn.Linear(3, 2, bias=False)
    a = torch.randn(1, 3)
    R = torch.tensor([[0.7, 0.3]])
    w = lin.weight.detach()
    low, high = torch.full((1, 3), -2.0), torch.full((1, 3), 2.0)
    zij = a[0] * w - low[0] * w.clamp(min=0) - high[0] * w.clamp(max=0)  # (k, j)
    expected = (zij / zij.sum(1, keepdim=True)).T @ R[0]
    torch.testing.assert_close(lrp_rules.zbox(lin, a, R, low, high, eps=0.0)[0], expected)
    torch.testing.assert_close(lrp_rules.flat(lin, a, R, eps=0.0)[0], torch.full((3,), 1 / 3))


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
@pytest.mark.parametrize("dims", [2, 3])
def test_method_matrix(dims: int, kind: str) -> None:
    net, x, score = (seg_setup if kind == "segmentation" else cls_setup)(dims)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    spec = get_method("lrp")
    for composite in ("epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1_flat"):
        score.monitor.start(None)
        with model_guard(net):
            result = attribute(spec, MethodContext(score, x, 1),
                               spec.resolve_params({"composite": composite}))
        assert result.shape == x.shape and bool(torch.isfinite(result).all())
        assert result.abs().sum() > 0
        assert score.monitor.count == spec.cost(None, {}) == 1
    assert spec.patchwise == "gradient"  # exact patch-wise form (issue 20)
    assert_untouched(net, state)


def test_runs_on_monai_basic_unet() -> None:
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    net = nets.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2,
                         features=(2, 2, 2, 2, 2, 2)).eval()
    x = torch.randn(1, 1, 32, 16, 16)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    spec = get_method("lrp")
    with model_guard(net):
        result = attribute(spec, MethodContext(score_of(net, x), x, 1),
                           spec.resolve_params({"composite": "epsilon"}))
    assert result.shape == x.shape and bool(torch.isfinite(result).all()) and result.abs().sum() > 0
    assert_untouched(net, state)


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x.mean())


def test_a_module_without_a_rule_is_refused_by_type_with_the_fix() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), Gate(), nn.Softmax(dim=1)).eval()
    x = torch.randn(1, 1, 6, 6)
    spec = get_method("lrp")
    with pytest.raises(MethodError) as err:
        attribute(spec, MethodContext(score_of(net, x), x, 1), spec.resolve_params({}))
    assert "Gate (1)" in err.value.problem and "Softmax (2)" in err.value.problem, err.value.problem
    assert "integrated_gradients" in err.value.fix


class SumOver(nn.Module):
    """(N, K, L) -> (N, K): a plain score function around a 1D network."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).sum(-1)


def test_lrp0_on_conv1d_and_transposed_conv1d_equals_gradient_x_input() -> None:
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1, bias=False), nn.ReLU(),
                        nn.ConvTranspose1d(3, 3, 2, stride=2, bias=False), nn.ReLU(),
                        nn.Conv1d(3, 2, 1, bias=False)).eval()
    score = SumOver(net)
    x = torch.randn(1, 2, 10)
    relevance = LRP(score, "epsilon", OPTIONS).attribute(x, target=0)
    torch.testing.assert_close(relevance, gradient_x_input(score, x, 0), rtol=1e-4, atol=1e-6)


def _forward_saved_bytes(sm: ScoreModel, run) -> int:
    """Bytes autograd saves until the score model's forward returns (the graph the backward reads)."""
    done, saved = [False], {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not done[0]:
            saved[t.data_ptr()] = t.numel() * t.element_size()
        return t

    handle = sm.register_forward_hook(lambda *a: done.__setitem__(0, True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        handle.remove()
    return sum(saved.values())


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus"])
def test_lrp_keeps_no_plain_graph_beside_its_rules(dims: int, composite: str) -> None:
    """Modules whose backward a rule replaces run without a graph of their own: LRP's forward saves
    only what its rules read, each rule module's input and output and the network's output (before,
    each module also kept its plain graph: 1.7x these bytes on this network)."""
    from esegeta_engine.methods.lrp import POOL_MODULES, RULE_MODULES

    net = chain(dims, bias=True)
    x = torch.randn(1, 1, *(8,) * dims)
    sm = score_of(net, x)
    read = {}
    handles = [m.register_forward_hook(lambda m, a, y: read.update(
        {id(m): (a[0].numel() + y.numel()) * 4})) for m in net.modules() if isinstance(m, RULE_MODULES + POOL_MODULES)]
    with torch.no_grad():
        out = net(x)
    for h in handles:
        h.remove()
    target = {}  # what the score's own graph (target on the output) saves
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: target.update({t.data_ptr(): t.numel() * t.element_size()}) or t, lambda t: t):
        sm.target(out.clone().requires_grad_(True))
    lrp = LRP(sm, composite, {**OPTIONS, "epsilon": 0.01})
    ours = _forward_saved_bytes(sm, lambda: lrp.attribute(x, target=1))
    assert 0 < ours <= sum(read.values()) + out.numel() * 4 + sum(target.values())
