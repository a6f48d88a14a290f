"""Conservative LRP through MONAI's ViT blocks (issue 20): Ali et al. 2022's LN- and AH-rules.

Checked against: MONAI's SABlock output (the rule's recomputation, einsum and
scaled_dot_product_attention paths, to 1e-6); the paper's explicit AH-rule formula on a one-head
block; the bias shares the rules predict in closed form (LayerNorm: beta; attention: the value
and output biases, since attention rows sum to one); exact conservation of the whole UNETR's score
when every bias is zero; LRP through MONAI's own ``sliding_window_inference``; and plain LRP on a
network without attention. 2D and 3D.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.methods.lrp import LRP
from esegeta_engine.methods.lrp_attention import (attention_output, attention_probabilities, attention_rule,
                                                  layer_norm_rule, transformer_rules)
from esegeta_engine.targets import RegionOfInterestTarget

from test_execution_patchwise_rules import MonaiFunction, _f, _net, _ours, _setup
from tiny_models import assert_untouched

nets = pytest.importorskip("monai.networks.nets")
blocks = pytest.importorskip("monai.networks.blocks")

OPTIONS = {"epsilon": 0.0, "gamma": 0.25, "alpha": 2.0, "low": None, "high": None}


def unetr(dims: int, bias_free: bool = False, size: int = 16, res_block: bool = False) -> nn.Module:
    """A tiny UNETR; ``bias_free``: batch norms (folded by the canonizer), residual decoder blocks only with
    ``res_block``, and every bias, beta and position embedding zero, so LRP-0 must conserve the score exactly."""
    torch.manual_seed(0)
    kw = {"res_block": res_block, "norm_name": "batch"} if bias_free else {}
    net = nets.UNETR(1, 2, img_size=(size,) * dims, feature_size=4, hidden_size=24, mlp_dim=48, num_heads=2,
                     spatial_dims=dims, qkv_bias=True, **kw).eval()
    with torch.no_grad():
        for m in net.modules():
            for name, p in m.named_parameters(recurse=False):
                if name in ("bias", "position_embeddings"):
                    p.zero_() if bias_free else p.uniform_(-0.3, 0.3)
    return net


@pytest.mark.parametrize("tokens", [(4, 4), (2, 3, 2)])  # the token grids of a 2D and a 3D image
@pytest.mark.parametrize("combined,flash,fc,causal", [(True, False, True, False), (False, False, True, False),
                                                      (True, True, True, False), (True, False, False, False),
                                                      (True, False, True, True)])
def test_the_rules_recomputation_equals_monais_sablock(tokens, combined, flash, fc, causal) -> None:
    n = int(torch.tensor(tokens).prod())
    torch.manual_seed(1)
    block = blocks.SABlock(12, 3, qkv_bias=True, use_combined_linear=combined, use_flash_attention=flash,
                           include_fc=fc, causal=causal, sequence_length=n if causal else None).eval()
    x = torch.randn(2, n, 12)
    with torch.no_grad():
        ours = attention_output(block, x, attention_probabilities(block, x))
        torch.testing.assert_close(ours, block(x), rtol=0, atol=1e-6)


def test_attention_rule_is_the_papers_formula_on_one_head() -> None:
    """Values = tokens, no output projection: R(x_id) = sum_j x_id p_ji R(y_jd) / y_jd."""
    torch.manual_seed(2)
    block = blocks.SABlock(4, 1, qkv_bias=False, include_fc=False).eval()
    with torch.no_grad():
        block.qkv.weight[8:] = torch.eye(4)  # the value projection is the identity
    x, R = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    p = attention_probabilities(block, x)[:, 0]  # (1, 5, 5)
    y = torch.einsum("bji,bid->bjd", p, x)
    expected = torch.einsum("bid,bji,bjd->bid", x, p, R / y)
    torch.testing.assert_close(attention_rule(block, x, R, 0.0), expected, rtol=1e-5, atol=1e-6)


def test_the_rules_absorb_exactly_the_bias_shares_they_predict() -> None:
    torch.manual_seed(3)
    norm = nn.LayerNorm(6).eval()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-0.5, 0.5)
    a, R = torch.randn(2, 7, 6, dtype=torch.float64), torch.randn(2, 7, 6, dtype=torch.float64)
    norm.double()
    y = norm(a).detach()
    beta = norm.bias.detach()
    assert float(layer_norm_rule(norm, a, R, 0.0).sum()) == pytest.approx(float((R * (y - beta) / y).sum()), rel=1e-9)
    block = blocks.SABlock(6, 2, qkv_bias=True).eval().double()
    y = block(a).detach()
    bv = block.qkv.bias[12:].detach()  # attention rows sum to one: the value bias reaches y unchanged
    c = nn.functional.linear(bv, block.out_proj.weight, block.out_proj.bias).detach()
    assert float(attention_rule(block, a, R, 0.0).sum()) == pytest.approx(float((R * (y - c) / y).sum()), rel=1e-9)


@pytest.mark.parametrize("dims", [2, 3])
def test_the_canonizer_leaves_the_forward_and_the_model_unchanged(dims: int) -> None:
    net = unetr(dims)
    x = torch.randn(1, 1, *(16,) * dims)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        y = net(x)
        with transformer_rules(net, x, 0.01) as attention:
            assert len(attention) == 12
            assert "forward" in net.vit.blocks[0].__dict__
            torch.testing.assert_close(net(x), y, rtol=0, atol=1e-6)
    assert not any("forward" in m.__dict__ for m in net.modules())
    sm = ScoreModel(net, RegionOfInterestTarget(torch.ones((16,) * dims)))
    LRP(sm, "epsilon_plus", {**OPTIONS, "epsilon": 0.01}).attribute(x, target=1)
    assert not any("forward" in m.__dict__ for m in net.modules())
    assert_untouched(net, before)


@pytest.mark.parametrize("dims", [2, 3])
def test_the_canonizer_restores_a_transformer_blocks_instance_forward_the_user_had(dims: int) -> None:
    """A forward the user set on a ViT block's instance is put back exactly, not removed."""
    import types

    net = unetr(dims)
    block = net.vit.blocks[0]

    def own(self, x):  # noqa: ANN001, ANN202
        return type(self).forward(self, x)

    mine = types.MethodType(own, block)
    block.forward = mine
    x = torch.randn(1, 1, *(16,) * dims)
    with torch.no_grad(), transformer_rules(net, x, 0.01):
        assert block.__dict__["forward"] is not mine  # the rule's forward for the run
    assert block.__dict__["forward"] is mine
    assert not any("forward" in m.__dict__ for m in net.modules() if m is not block)


@pytest.mark.parametrize("dims", [2, 3])
def test_lrp0_on_a_bias_free_unetr_conserves_the_score(dims: int) -> None:
    net = unetr(dims, bias_free=True).double()
    x = torch.randn(1, 1, *(16,) * dims, dtype=torch.float64)
    sm = ScoreModel(net, RegionOfInterestTarget(torch.ones((16,) * dims)))
    record: list = []
    notes: list[str] = []
    R = LRP(sm, "epsilon", OPTIONS, record=record, notes=notes).attribute(x, target=1)
    with torch.no_grad():
        f = float(sm(x)[0, 1])
    assert float(R.sum()) == pytest.approx(f, rel=1e-6)
    assert abs(f) > 1e-3
    assert all(r_in == pytest.approx(r_out, rel=1e-6, abs=1e-9) for _, r_in, r_out in record)
    assert any("Ali et al. 2022" in n and "12 attention block(s)" in n for n in notes)
    assert not any("LayerNorm" in n for n in notes)  # it has its rule now


@pytest.mark.parametrize("dims", [2, 3])
def test_lrp0_conserves_through_unetrs_residual_conv_blocks(dims: int) -> None:
    """MONAI's UnetResBlock sums (``out += residual``) split by the epsilon rule in transformer networks."""
    net = unetr(dims, bias_free=True, res_block=True).double()
    x = torch.randn(1, 1, *(16,) * dims, dtype=torch.float64)
    sm = ScoreModel(net, RegionOfInterestTarget(torch.ones((16,) * dims)))
    R = LRP(sm, "epsilon", OPTIONS).attribute(x, target=1)
    with torch.no_grad():
        f = float(sm(x)[0, 1])
    assert float(R.sum()) == pytest.approx(f, rel=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_lrp_without_attention_is_plain_lrp(dims: int) -> None:
    net = _net(dims, bn=True)
    x = torch.randn(1, 1, *(10,) * dims)
    sm = ScoreModel(net, RegionOfInterestTarget(torch.ones((10,) * dims)))
    with transformer_rules(net, x, 0.01) as attention:
        assert attention == [] and not any("forward" in m.__dict__ for m in net.modules())
    opts = {**OPTIONS, "epsilon": 0.01}
    ours = LRP(sm, "epsilon_plus", opts).attribute(x, target=1)
    plain = LRP(sm, "epsilon_plus", opts, transformer=False).attribute(x, target=1)
    assert torch.equal(ours, plain) and float(ours.abs().max()) > 0


SLIDING = [(2, (26, 21)), (3, (22, 18, 17))]


@pytest.mark.parametrize("dims,shape", SLIDING)
def test_patchwise_lrp_on_unetr_equals_lrp_through_monai_and_conserves(dims, shape) -> None:
    patch = (16,) * dims
    net = unetr(dims, bias_free=True)
    x, expl, target = _setup(net, dims, shape, patch)
    ours, ctx = _ours(expl, target, x, "lrp", composite="epsilon", epsilon=0.0)
    assert ctx.score_model.patchwise and ctx.score_model.runner.patch_evaluations > 1
    fn = MonaiFunction(net, target, patch)
    fn.form = types.SimpleNamespace(sliding=types.SimpleNamespace(patch_size=patch))  # the probe: one patch
    ref = LRP(fn, "epsilon", OPTIONS).attribute(x, target=1)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert float(ours.double().sum()) == pytest.approx(_f(net, target, patch, x), rel=1e-3)


@pytest.mark.parametrize("dims", [2, 3])
def test_one_patch_of_unetr_equals_the_whole_volume_lrp(dims: int) -> None:
    shape = (16,) * dims
    net = unetr(dims)
    x, expl, target = _setup(net, dims, shape, shape, mode="sliding_window")
    ours, ctx = _ours(expl, target, x, "lrp")
    assert ctx.score_model.patchwise
    _, whole, _ = _setup(net, dims, shape, shape, mode="whole")
    ref, rctx = _ours(whole, target, x, "lrp")
    assert not rctx.score_model.patchwise
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
