"""FullGrad: the completeness identity of its signed terms and its saliency by hand."""

from __future__ import annotations

import pytest
import torch

from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ArgmaxRegionTarget, ClassificationTarget
from extra_models import BiasNet
from tiny_models import LinearSeg, assert_untouched, cls_setup, seg_setup, shape

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Captum's notes on the saliency reference


def run(name: str, score: torch.nn.Module, x: torch.Tensor, target: int, **params) -> torch.Tensor:
    spec = get_method(name)
    return attribute(spec, MethodContext(score, x, target), spec.resolve_params(params))


@pytest.mark.parametrize("model", ["segnet", "classifier", "strided_bn"])
@pytest.mark.parametrize("dims", [2, 3])
def test_fullgrad_signed_terms_sum_to_the_score(dims: int, model: str) -> None:
    """f(x) = sum(x grad_x f) + sum of bias x bias-gradient, exact for ReLU networks with biases."""
    if model == "segnet":
        net, x, score = seg_setup(dims)
        t = 1
    elif model == "classifier":
        net, x, score = cls_setup(dims)
        t = 2
    else:
        torch.manual_seed(5)
        net = BiasNet(dims).eval()
        x = torch.randn(1, 1, *shape(dims))
        score = ScoreModel(net, ClassificationTarget())
        t = 0
    state = {k: v.clone() for k, v in net.state_dict().items()}
    result = run("fullgrad", score, x, t, postprocess="none")
    expected = score(x)[0, t].detach()
    assert result.shape == (1, 1, *shape(dims))
    torch.testing.assert_close(result.sum(), expected, rtol=1e-4, atol=1e-4)
    input_term = run("saliency", score, x, t, abs=False) * x
    assert abs(float(input_term.sum() - expected)) > 1e-2 * abs(float(expected)), "biases matter here"
    assert_untouched(net, state)


@pytest.mark.parametrize("dims", [2, 3])
def test_fullgrad_saliency_by_hand_on_a_1x1_convolution(dims: int) -> None:
    """One 1x1 conv, argmax-region score of class k: the input term is |w_k x| rescaled, the
    bias-gradient b_k on the region rescaled to its indicator."""
    torch.manual_seed(2)
    net = LinearSeg(dims).eval()
    x = torch.randn(1, 1, *shape(dims))
    target = ArgmaxRegionTarget()
    out = net(x).detach()
    target.prepare(out)
    k = int(out.argmax(1).flatten()[0])
    region = (out.argmax(1, keepdim=True) == k).float()
    term = (net.conv.weight[k].detach().flatten()[0] * x * region).abs()  # grad_x = w_k on the region
    term = (term - term.min()) / (term - term.min()).max()
    result = run("fullgrad", ScoreModel(net, target), x, k)
    torch.testing.assert_close(result, term + region, rtol=1e-4, atol=1e-4)
