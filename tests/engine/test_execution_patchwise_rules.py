"""Exact patch-wise DeepLIFT, DeepLIFT SHAP and LRP under sliding-window execution (issue 20, part 1).

The stitched function is linear in its patch outputs, so each rule runs per patch with that patch's
blended share of the upstream signal. Checked against the same method run through autograd over
MONAI's ``sliding_window_inference`` (Captum's DeepLift / our LRP hooked on the network MONAI calls),
against completeness/conservation with F computed independently by MONAI, and against the
whole-volume method when one patch covers the volume.
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import DeepLift
from monai.inferers import sliding_window_inference
from torch import nn

from esegeta_engine.config import ExecutionConfig, PreprocessConfig, TargetConfig
from esegeta_engine.explain import Explainer
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.methods.lrp import LRP
from esegeta_engine.forward.scoring import EvaluationMonitor
from esegeta_engine.targets import ArgmaxRegionTarget

from tiny_models import assert_untouched

CASES = [(2, (26, 21), (12, 12)), (3, (14, 12, 11), (8, 8, 8))]
OVERLAP, SW = 0.25, 2


def _net(dims: int, bias: bool = True, bn: bool = False) -> nn.Module:
    torch.manual_seed(5)
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    B = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    layers = [C(1, 4, 3, padding=1, bias=bias)]
    if bn:
        layers.append(B(4))
    layers += [nn.ReLU(), C(4, 4, 3, padding=1, bias=bias), nn.ReLU(), C(4, 2, 1, bias=bias)]
    net = nn.Sequential(*layers).eval()
    if bn:
        layers[1].running_mean.uniform_(-0.5, 0.5)
        layers[1].running_var.uniform_(0.2, 3.0)
    return net


def _setup(net: nn.Module, dims: int, shape: tuple, patch: tuple, seed: int = 2, mode: str = "auto"):
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(seed)) + 0.5
    expl = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(),
                     execution=ExecutionConfig(mode=mode, patch_size=list(patch), overlap=OVERLAP,
                                               sw_batch_size=SW))
    target = ArgmaxRegionTarget()
    target.prepare(expl.raw_output(x))
    return x, expl, target


def _ours(expl, target, x, name: str, **params) -> tuple[torch.Tensor, MethodContext]:
    sm = expl.make_score_model(target, x, EvaluationMonitor())
    spec = get_method(name)
    ctx = MethodContext(sm, x, 1, extra={"patchwise": sm.patchwise})
    return attribute(spec, ctx, spec.resolve_params(params)), ctx


class MonaiFunction(nn.Module):
    """F(x): the target on MONAI's sliding-window output (autograd through all of it)."""

    def __init__(self, net: nn.Module, target: nn.Module, patch: tuple) -> None:
        super().__init__()
        self.net, self.target, self.patch = net, target, patch

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.target(sliding_window_inference(inp, self.patch, SW, self.net, overlap=OVERLAP,
                                                    mode="gaussian"))


class PairedMonaiFunction(MonaiFunction):
    """The same for Captum's DeepLift, which runs (inputs; baselines) as one batch and whose rules
    need the matching reference patch in the same network call: MONAI slides over input and
    baseline stacked on the channel axis, and the network sees every patch pair in one batch (Captum
    keeps one activation per module, so the whole function is one network call here)."""

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        n = inp.shape[0] // 2
        c = inp.shape[1]

        def pair(z: torch.Tensor) -> torch.Tensor:
            y = self.net(torch.cat([z[:, :c], z[:, c:]]))
            return torch.cat([y[: z.shape[0]], y[z.shape[0]:]], dim=1)

        out = sliding_window_inference(torch.cat([inp[:n], inp[n:]], dim=1), self.patch, 10_000, pair,
                                       overlap=OVERLAP, mode="gaussian")
        k = out.shape[1] // 2
        return self.target(torch.cat([out[:, :k], out[:, k:]]))


def _f(net, target, patch, x) -> float:
    with torch.no_grad():
        return float(MonaiFunction(net, target, patch)(x)[0, 1].double())


@pytest.mark.parametrize("dims,shape,patch", CASES)
def test_patchwise_deeplift_equals_deeplift_through_monai(dims, shape, patch):
    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, patch)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ours, ctx = _ours(expl, target, x, "deeplift")
    assert_untouched(net, before)
    ref = DeepLift(PairedMonaiFunction(net, target, patch)).attribute(x, torch.zeros_like(x), target=1)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    # completeness for the stitched function, F computed independently by MONAI
    delta = _f(net, target, patch, x) - _f(net, target, patch, torch.zeros_like(x))
    assert float(ours.double().sum()) == pytest.approx(delta, rel=1e-4)
    assert ctx.score_model.runner.patch_evaluations > 0


@pytest.mark.parametrize("dims,shape,patch", CASES)
def test_patchwise_deeplift_shap_is_complete_for_the_stitched_function(dims, shape, patch):
    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, patch)
    ours, ctx = _ours(expl, target, x, "deeplift_shap", n_baselines=2)
    baselines = ctx.extra["baselines"]
    f_b = sum(_f(net, target, patch, baselines[j:j + 1]) for j in range(baselines.shape[0])) / baselines.shape[0]
    assert float(ours.double().sum()) == pytest.approx(_f(net, target, patch, x) - f_b, rel=1e-4)


@pytest.mark.parametrize("dims,shape,patch", CASES)
@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus", "epsilon_gamma_box"])
def test_patchwise_lrp_equals_lrp_through_monai(dims, shape, patch, composite):
    net = _net(dims, bn=True)
    x, expl, target = _setup(net, dims, shape, patch)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ours, ctx = _ours(expl, target, x, "lrp", composite=composite)
    assert_untouched(net, before)
    options = {"epsilon": 0.01, "gamma": 0.25, "alpha": 2.0, "low": None, "high": None}
    ref = LRP(MonaiFunction(net, target, patch), composite, options).attribute(x, target=1)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert float(ref.abs().max()) > 0


@pytest.mark.parametrize("dims,shape,patch", CASES)
def test_patchwise_lrp0_conserves_the_stitched_score(dims, shape, patch):
    net = _net(dims, bias=False)
    x, expl, target = _setup(net, dims, shape, patch)
    ours, _ = _ours(expl, target, x, "lrp", composite="epsilon", epsilon=0.0)
    assert float(ours.double().sum()) == pytest.approx(_f(net, target, patch, x), rel=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name,params", [("deeplift", {}), ("lrp", {"composite": "epsilon"}),
                                         ("lrp", {"composite": "epsilon_gamma_box"})])
def test_one_patch_covering_the_volume_equals_the_whole_volume_method(dims, name, params):
    shape = (12,) * dims
    net = _net(dims, bn=True)
    x, expl, target = _setup(net, dims, shape, shape, mode="sliding_window")
    ours, ctx = _ours(expl, target, x, name, **params)
    assert ctx.score_model.patchwise
    _, whole, _ = _setup(net, dims, shape, shape, mode="whole")
    ref, rctx = _ours(whole, target, x, name, **params)
    assert not rctx.score_model.patchwise
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
