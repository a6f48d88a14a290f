"""AttnLRP's attention rule (Achtibat et al. 2024) as LRP's ``attention_rule: attnlrp`` (issue 20, part 6).

Checked against the paper's properties and equations written out here by hand: the softmax rule is the
first-order Taylor decomposition at the logits (``x * J^T (R / s)``) with its closed-form bias; the
uniform rule gives each factor of a product half of the relevance; a one-head attention (MONAI's SABlock,
and Swin's WindowAttention with its relative position bias and shift mask) equals the paper's chain of
equations to 1e-7. On MONAI's UNETR and SwinUNETR (2D and 3D) the option runs through the registry, names
its rules, leaves the model unchanged, differs from the held-probability rule, and patch-wise equals LRP
through MONAI's ``sliding_window_inference``. (Also cross-checked once, outside the suite, against lxt 2.1,
the paper's authors' library: max difference 1e-8 of the map's scale; see docs/execution.md.)
"""

from __future__ import annotations

import types

import pytest
import torch

from esegeta_engine.methods.lrp import LRP
from esegeta_engine.methods.lrp_attention import attention_rule
from esegeta_engine.methods.lrp_attnlrp import bilinear_rule, softmax_rule
from esegeta_engine.methods.lrp_swin import window_rule

from test_execution_patchwise_rules import MonaiFunction, _ours, _setup
from test_methods_lrp_attention import unetr
from test_methods_lrp_swin import swin
from tiny_models import assert_untouched

blocks = pytest.importorskip("monai.networks.blocks")
swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr")

D = torch.float64


def test_softmax_rule_is_the_taylor_decomposition_at_the_logits() -> None:
    torch.manual_seed(0)
    x, R = torch.randn(3, 4, 7, dtype=D) * 2, torch.randn(3, 4, 7, dtype=D)
    s = x.softmax(-1)
    ours = softmax_rule(x, s, R)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(xg.softmax(-1), xg, R / s)
    torch.testing.assert_close(ours, x * g, rtol=1e-10, atol=1e-12)
    bias = (x * R).sum(-1) - (x * s).sum(-1) * R.sum(-1)  # what the rule's bias term leaves, row by row
    torch.testing.assert_close(ours.sum(-1), bias, rtol=1e-10, atol=1e-12)
    masked = x.masked_fill(torch.eye(7, dtype=torch.bool)[:4].expand_as(x), float("-inf"))
    assert bool(torch.isfinite(softmax_rule(masked, masked.softmax(-1), R)).all())


def test_uniform_rule_gives_each_factor_of_a_product_half() -> None:
    torch.manual_seed(1)
    a, b, R = torch.randn(2, 5, 3, dtype=D), torch.randn(2, 3, 4, dtype=D), torch.randn(2, 5, 4, dtype=D)
    ra, rb = bilinear_rule(a, b, R, 0.0)
    o = a @ b
    torch.testing.assert_close(ra, torch.einsum("xji,xid,xjd->xji", a, b, R / (2 * o)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rb, torch.einsum("xji,xid,xjd->xid", a, b, R / (2 * o)), rtol=1e-10, atol=1e-12)
    assert float(ra.sum()) == pytest.approx(float(R.sum()) / 2, rel=1e-9)
    assert float(rb.sum()) == pytest.approx(float(R.sum()) / 2, rel=1e-9)


def _paper(x, Wq, Wk, Wv, scale, B, R):  # noqa: ANN001, ANN202 - one head, no output projection, no biases
    """The paper's equations for one head, written out with einsum (no code shared with the module)."""
    q, k, v = x @ Wq.T, x @ Wk.T, x @ Wv.T
    S = scale * torch.einsum("bje,bie->bji", q, k)
    L = S + B
    P = L.softmax(-1)
    o = torch.einsum("bji,bid->bjd", P, v)
    RP = torch.einsum("bji,bid,bjd->bji", P, v, R / (2 * o))
    Rv = torch.einsum("bji,bid,bjd->bid", P, v, R / (2 * o))
    RL = L * (RP - P * RP.sum(-1, keepdim=True))
    RS = S * RL / L
    Rq = torch.einsum("bje,bie,bji->bje", q, k, scale * RS / (2 * S))
    Rk = torch.einsum("bje,bie,bji->bie", q, k, scale * RS / (2 * S))
    return sum(torch.einsum("btc,ec,bte->btc", x, W, r / z) for W, r, z in ((Wq, Rq, q), (Wk, Rk, k), (Wv, Rv, v)))


def test_sablock_attnlrp_is_the_papers_chain_of_equations() -> None:
    torch.manual_seed(2)
    block = blocks.SABlock(5, 1, qkv_bias=False, include_fc=False).eval().double()
    with torch.no_grad():
        block.qkv.weight.uniform_(-0.8, 0.8)
    x, R = torch.randn(2, 6, 5, dtype=D), torch.randn(2, 6, 5, dtype=D)
    W = block.qkv.weight.detach()
    expected = _paper(x, W[:5], W[5:10], W[10:], block.scale, torch.zeros(1, dtype=D), R)
    torch.testing.assert_close(attention_rule(block, x, R, 0.0, "attnlrp"), expected, rtol=1e-7, atol=1e-8)
    assert not torch.allclose(attention_rule(block, x, R, 0.0, "held"), expected)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("shifted", [False, True])
def test_window_attnlrp_is_the_papers_chain_with_bias_and_mask(dims: int, shifted: bool) -> None:
    torch.manual_seed(3)
    block = swin_unetr.WindowAttention(5, 1, (2,) * dims, qkv_bias=False).eval().double()
    with torch.no_grad():
        block.qkv.weight.uniform_(-0.8, 0.8)
        block.proj.weight.copy_(torch.eye(5))
        block.proj.bias.zero_()
        block.relative_position_bias_table.uniform_(-1.0, 1.0)
    n = 2 ** dims
    windows = 2 * 2 ** dims  # two images of 4-token grids per axis, window 2
    x, R = torch.randn(windows, n, 5, dtype=D), torch.randn(windows, n, 5, dtype=D)
    mask = swin_unetr.compute_mask([4] * dims, (2,) * dims, (1,) * dims, "cpu").double() if shifted else None
    index = block.relative_position_index[:n, :n].reshape(-1)
    B = block.relative_position_bias_table.detach()[index].reshape(n, n)
    if mask is not None:
        B = B + mask.repeat(2, 1, 1)
    W = block.qkv.weight.detach()
    expected = _paper(x, W[:5], W[5:10], W[10:], block.scale, B, R)
    torch.testing.assert_close(window_rule(block, x, mask, R, 0.0, "attnlrp"), expected, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("arch", ["unetr", "swin_unetr"])
def test_attnlrp_runs_on_monai_transformers_through_the_registry(arch: str, dims: int) -> None:
    net = unetr(dims) if arch == "unetr" else swin(dims)
    shape = (16,) * dims if arch == "unetr" else (32,) * dims
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, expl, target = _setup(net, dims, shape, shape, mode="whole")
    ours, ctx = _ours(expl, target, x, "lrp", composite="epsilon", attention_rule="attnlrp")
    held, _ = _ours(expl, target, x, "lrp", composite="epsilon")
    assert bool(torch.isfinite(ours).all()) and float(ours.abs().max()) > 0
    assert float(((ours - held).abs() > 1e-2 * held.abs()).double().mean()) > 0.1  # queries and keys count
    assert any("AttnLRP" in n and "queries and keys get relevance" in n for n in ctx.extra["notes"])
    assert not any("forward" in m.__dict__ or "proj_out" in m.__dict__ for m in net.modules())
    assert_untouched(net, before)


@pytest.mark.parametrize("arch,shape", [("unetr", (26, 21)), ("swin_unetr", (44, 40))])
def test_patchwise_attnlrp_equals_attnlrp_through_monai(arch: str, shape: tuple) -> None:
    net, patch = (unetr(2), (16, 16)) if arch == "unetr" else (swin(2), (32, 32))
    x, expl, target = _setup(net, 2, shape, patch)
    ours, ctx = _ours(expl, target, x, "lrp", composite="epsilon", attention_rule="attnlrp")
    assert ctx.score_model.patchwise and ctx.score_model.runner.patch_evaluations > 1
    fn = MonaiFunction(net, target, patch)
    fn.form = types.SimpleNamespace(sliding=types.SimpleNamespace(patch_size=patch))
    opts = {"epsilon": 0.01, "gamma": 0.25, "alpha": 2.0, "low": None, "high": None, "attention_rule": "attnlrp"}
    ref = LRP(fn, "epsilon", opts).attribute(x, target=1)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("rule", ["held", "attnlrp"])
def test_the_trust_note_names_what_the_rule_that_ran_absorbs(rule: str) -> None:
    from esegeta_engine.evaluation.axioms import completeness_check
    from esegeta_engine.methods import get_method

    net = unetr(2)
    x, expl, target = _setup(net, 2, (16, 16), (16, 16), mode="whole")
    ours, ctx = _ours(expl, target, x, "lrp", attention_rule=rule)
    spec = get_method("lrp")
    check = completeness_check(spec, ctx, spec.resolve_params({"attention_rule": rule}), ours, threshold=0.0)
    assert check["axiom_status"] == "warning" and "relative position biases" in check["axiom_note"]
    assert ("AttnLRP's softmax rule" in check["axiom_note"]) == (rule == "attnlrp")
