"""The lean z+ machinery (issue 20): the alpha-beta rules and excitation backprop computed from the
module's own output and one more call equal the rules written out contribution by contribution (a
dense reference built here from each module's Jacobian), on single modules and through tiny 2D and
3D networks; the cancellation guard takes the written-out sums; and the rule's convolution work is
counted (one forward-type call and two transposed calls, not four calls' worth)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from esegeta_engine.methods import lrp_rules, lrp_signed
from esegeta_engine.methods.excitation import excitation_rule
from esegeta_engine.methods.lrp import LRP
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import RegionOfInterestTarget

OPTIONS = {"epsilon": 0.01, "gamma": 0.25, "alpha": 2.0, "low": None, "high": None}


# -- the independent reference: every contribution w_ij a_j written out ---------------------------
def contributions(module: nn.Module, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, b)``: ``c[i, j] = M_ij a_j`` with ``M`` the bias-free module's matrix (the module applied
    to every basis input), ``b[i]`` the bias at every output; both over the whole batch (block diagonal)."""
    bare = copy.deepcopy(module)
    if getattr(bare, "bias", None) is not None:
        with torch.no_grad():
            bare.bias.zero_()
    n, per = a.shape[0], a[0].numel()
    with torch.no_grad():
        bias = (module(torch.zeros_like(a)) - bare(torch.zeros_like(a))).flatten()
        basis = torch.eye(per).reshape(per, *a.shape[1:])
        M1 = bare(basis).reshape(per, -1).T  # (outputs of one example, inputs of one example)
    M = torch.block_diag(*[M1] * n)
    return M * a.detach().flatten()[None, :], bias


def stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0)


def reference_alpha_beta(module: nn.Module, a: torch.Tensor, R: torch.Tensor, alpha: float,
                         eps: float) -> torch.Tensor:
    c, b = contributions(module, a)
    r = R.detach().flatten()
    pos, neg = c.clamp(min=0), c.clamp(max=0)
    out = alpha * (pos / stab(pos.sum(1) + b.clamp(min=0), eps)[:, None]).T @ r
    if alpha != 1:
        out = out - (alpha - 1) * (neg / stab(neg.sum(1) + b.clamp(max=0), eps)[:, None]).T @ r
    return out.reshape(a.shape)


def reference_excitation(module: nn.Module, a: torch.Tensor, P: torch.Tensor, negate: bool) -> torch.Tensor:
    c, _ = contributions(module, a)
    c = (-c if negate else c).clamp(min=0)
    z = c.sum(1)
    s = torch.where(z > 0, P.detach().flatten() / z.clamp(min=1e-30), torch.zeros_like(z))
    return (c.T @ s).reshape(a.shape)


def modules(dims: int) -> list[nn.Module]:
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    T = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
    torch.manual_seed(3)
    return [C(3, 4, 3, padding=1), C(4, 4, 3, stride=2, padding=1, groups=2, bias=False),
            T(3, 2, 2, stride=2), C(3, 2, 1)]


def signed_input(module: nn.Module, dims: int, nonneg: bool = False) -> torch.Tensor:
    c = module.in_channels
    a = torch.randn(2, c, *(4,) * dims)
    return a.clamp(min=0) if nonneg else torch.nn.functional.leaky_relu(a, 0.1)


GUARDS = {"lean": 0.0, "written": 1.0, "default": lrp_signed.RHO}
"""The guard's threshold: 0 takes z = (t + y) / 2 everywhere (tiny modules often fall below the default),
1 takes the written-out sums everywhere."""


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("nonneg", [False, True])
@pytest.mark.parametrize("guard", list(GUARDS))
def test_alpha_beta_equals_the_written_out_rule(dims: int, alpha: float, nonneg: bool, guard: str,
                                                monkeypatch) -> None:
    monkeypatch.setattr(lrp_signed, "RHO", GUARDS[guard])
    for module in modules(dims):
        a = signed_input(module, dims, nonneg)
        with torch.no_grad():
            y = module(a)
        R = torch.randn_like(y)
        expected = reference_alpha_beta(module, a, R, alpha, 0.01)
        for known in (y, None):  # the forward's output reused, or computed
            got = lrp_rules.alpha_beta(module, a, R, alpha, 0.01, y=known)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=str(module))


def test_alpha_beta_on_a_linear_layer_equals_the_written_out_rule() -> None:
    torch.manual_seed(5)
    lin = nn.Linear(6, 3)
    a = torch.randn(2, 6)
    R = torch.randn(2, 3)
    for alpha in (1.0, 2.0):
        torch.testing.assert_close(lrp_rules.alpha_beta(lin, a, R, alpha, 0.01, y=lin(a).detach()),
                                   reference_alpha_beta(lin, a, R, alpha, 0.01))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("guard", ["default", "written"])
def test_excitation_rule_equals_the_written_out_rule(dims: int, negate: bool, guard: str, monkeypatch) -> None:
    """(No "lean" case: without a stabiliser, a unit whose excitatory sum is exactly 0 or tiny is
    silent or not by the sign of rounding noise in (t + y) / 2; that is what the guard is for.)"""
    monkeypatch.setattr(lrp_signed, "RHO", GUARDS[guard])
    for module in modules(dims):
        a = signed_input(module, dims)
        with torch.no_grad():
            y = module(a)
        P = torch.rand_like(y)
        expected = reference_excitation(module, a, P, negate)
        for known in (y, None):
            got = excitation_rule(module, a, P, negate=negate, y=known)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7, msg=str(module))


def test_outputs_without_positive_contributions_take_the_written_out_sums(monkeypatch) -> None:
    """An output whose every contribution is negative has z+ = 0 exactly; from (t + y) / 2 it would
    be rounding noise of either sign. The guard sees |z| < RHO t and sums as written."""
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-0.5, 0.7, -0.2], [0.4, 0.6, 0.3]]))
    a = torch.tensor([[1.3, -0.9, 0.4]])  # row 0: -0.65, -0.63, -0.08 (all negative)
    R = torch.tensor([[1.0, 2.0]])
    calls = []
    original = lrp_signed.written_out
    monkeypatch.setattr(lrp_signed, "written_out", lambda *args: calls.append(args[-1]) or original(*args))
    got = lrp_rules.alpha_beta(lin, a, R, 1.0, 1e-9, y=lin(a).detach())
    assert calls == [1]
    torch.testing.assert_close(got, reference_alpha_beta(lin, a, R, 1.0, 1e-9))
    assert float(got.sum()) == pytest.approx(2.0, rel=1e-5)  # row 0's relevance is absorbed: z+ = 0


# -- through tiny networks: the whole map equals LRP with the written-out z+ rule ------------------
def leaky_net(dims: int) -> nn.Module:
    torch.manual_seed(1)
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    T = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
    P = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
    return nn.Sequential(C(1, 4, 3, padding=1), nn.LeakyReLU(0.1), P(2), C(4, 4, 3, padding=1),
                         nn.LeakyReLU(0.1), T(4, 3, 2, stride=2), nn.LeakyReLU(0.1), C(3, 2, 1)).eval()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_alpha2_beta1"])
def test_lrp_map_equals_lrp_with_the_written_out_rule(dims: int, composite: str, monkeypatch) -> None:
    net = leaky_net(dims)
    x = torch.randn(1, 1, *(8,) * dims)
    with torch.no_grad():
        grid = net(x).shape[2:]
    score = ScoreModel(net, RegionOfInterestTarget(torch.ones(grid)))
    ours = LRP(score, composite, OPTIONS).attribute(x, target=1)
    original = lrp_rules.apply_rule

    def written(rule, module, a, R, options, y=None):
        if rule in ("alpha_beta1", "alpha_beta"):
            return reference_alpha_beta(module, a, R, 1.0 if rule == "alpha_beta1" else options["alpha"],
                                        options["epsilon"])
        return original(rule, module, a, R, options, y)

    monkeypatch.setattr(lrp_rules, "apply_rule", written)
    expected = LRP(score, composite, OPTIONS).attribute(x, target=1)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


# -- the work: one forward-type call and two transposed calls of the module's size ---------------
class ConvWork(TorchDispatchMode):
    """Multiply-adds of every convolution (forward and backward-data) run inside."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default:  # (input, weight, ..., transposed, ...)
            x, w, transposed = args[0], args[1], args[6]
            self.macs += (x if transposed else out).numel() * w[0].numel()
        elif func is torch.ops.aten.convolution_backward.default:  # grad-input of a plain convolution
            self.macs += args[0].numel() * args[2][0].numel()
        return out


@pytest.mark.parametrize("dims", [2, 3])
def test_z_plus_does_three_convolutions_of_work_on_signed_inputs(dims: int, monkeypatch) -> None:
    """Written out, z+ on a signed input is four convolutions' worth (f(a+), f(a-), and two
    transposed); from the forward's output it is one plus two transposed (fails on the old code,
    which stacked a+ and a- along channels: 4x). Where the guard takes the written-out sums: 5x."""
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    torch.manual_seed(0)
    conv = C(16, 6, 3, padding=1)
    a = torch.nn.functional.leaky_relu(torch.randn(1, 16, *(6,) * dims), 0.1)
    with ConvWork() as once:
        y = conv(a).detach()
    guarded = []
    original = lrp_signed.written_out
    monkeypatch.setattr(lrp_signed, "written_out", lambda *args: guarded.append(1) or original(*args))
    R = torch.randn_like(y)
    with ConvWork() as rule:
        lean = lrp_rules.alpha_beta(conv, a, R, 1.0, 0.01, y=y)
    assert once.macs > 0 and not guarded and rule.macs == 3 * once.macs
    monkeypatch.setattr(lrp_signed, "RHO", 1.0)  # every output below the guard: sums as written
    with ConvWork() as written:
        exact = lrp_rules.alpha_beta(conv, a, R, 1.0, 0.01, y=y)
    assert guarded and written.macs == 5 * once.macs
    torch.testing.assert_close(lean, exact, rtol=1e-5, atol=1e-6)
