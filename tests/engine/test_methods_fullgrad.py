"""FullGrad: the completeness identity of its signed terms and its saliency by hand."""

from __future__ import annotations

import pytest
import torch

from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ArgmaxRegionTarget, ClassificationTarget, RegionOfInterestTarget
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


class TokenNet(torch.nn.Module):
    """A convolution, then linear layers over tokens ``(N, voxels, features)`` as a transformer's are (more
    tokens than features, as in MONAI's UNETR), then back to the grid: piecewise linear with biases."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
        self.embed = conv(1, 3, 3, padding=1)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, *grid = x.shape
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.mlp(tokens).transpose(1, 2).reshape(n, 2, *grid)


@pytest.mark.parametrize("dims", [2, 3])
def test_fullgrad_adds_a_linear_layers_bias_along_its_last_axis(dims: int) -> None:
    """UNETR's token features ended in 'tensor sizes 8 vs 192': a linear layer's bias was broadcast along
    axis 1 (the tokens). Along the last axis the signed terms sum to the score, and the note says that
    terms without a voxel grid are spread over the volume."""
    torch.manual_seed(2)
    net = TokenNet(dims).eval()
    x = torch.randn(1, 1, *shape(dims))
    score = ScoreModel(net, RegionOfInterestTarget(torch.ones(shape(dims))))
    spec = get_method("fullgrad")
    ctx = MethodContext(score, x, 1)
    result = attribute(spec, ctx, spec.resolve_params({"postprocess": "none"}))
    expected = float(score(x)[0, 1])
    assert abs(expected) > 0.1 and float(result.sum()) == pytest.approx(expected, rel=1e-4)
    assert any("spread evenly" in n for n in ctx.extra["notes"])
    saliency = attribute(spec, MethodContext(score, x, 1), spec.resolve_params({}))
    assert torch.isfinite(saliency).all() and float(saliency.abs().max()) > 0
