"""Conservative LRP through MONAI's SwinUNETR (issue 20): Ali et al. 2022's rules on window attention.

Checked against: MONAI's WindowAttention output (the rule's recomputation, with and without the
shift mask, einsum and scaled_dot_product_attention paths, to 1e-6); the paper's explicit AH-rule
formula on one head; MONAI's whole SwinUNETR output with the canonizer in place (bit for bit); exact
conservation of the score on a bias-free SwinUNETR (shifted windows included; v2 stages, stochastic depth,
patch merging v2, patch norm, zero-padded windows); LRP through MONAI's
own ``sliding_window_inference``. Breaking a rule (a plain residual sum, probabilities not held, a
plain layer norm) makes conservation fail, and a block MONAI computes differently is refused by
name. 2D and 3D.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.methods import lrp_attention, lrp_swin
from esegeta_engine.methods.lrp import LRP
from esegeta_engine.methods.lrp_attention import transformer_rules
from esegeta_engine.methods.lrp_swin import window_output, window_probabilities, window_rule
from esegeta_engine.targets import RegionOfInterestTarget

from test_execution_patchwise_rules import MonaiFunction, _f, _ours, _setup
from tiny_models import assert_untouched

swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr")

OPTIONS = {"epsilon": 0.0, "gamma": 0.25, "alpha": 2.0, "low": None, "high": None}
SIZE = 32  # SwinUNETR takes multiples of 2**5; window 4 on the 16-token first stage: shifted windows


def swin(dims: int, bias_free: bool = False, **variant) -> nn.Module:
    """A tiny SwinUNETR (batch norms: folded by the canonizer); ``bias_free``: every bias and beta zero,
    so LRP-0 must conserve the score exactly (the relative position bias is inside the held softmax)."""
    torch.manual_seed(0)
    kw = {"window_size": 4, "norm_name": "batch", "depths": (2, 1, 1, 1), "num_heads": (2, 1, 1, 1),
          "mlp_ratio": 2.0, **variant}
    net = swin_unetr.SwinUNETR(1, 2, feature_size=12, spatial_dims=dims, **kw).eval()
    with torch.no_grad():
        for m in net.modules():
            for name, p in m.named_parameters(recurse=False):
                if name == "bias":
                    p.zero_() if bias_free else p.uniform_(-0.3, 0.3)
                elif name == "relative_position_bias_table":
                    p.uniform_(-1.0, 1.0)
            if isinstance(m, swin_unetr.WindowAttention):  # attention far from uniform, as after training
                m.qkv.weight.uniform_(-0.6, 0.6)
                m.proj.weight.uniform_(-0.6, 0.6)
    return net


def _windows(dims: int, shifted: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Windows of a (2 x) 8-token grid with window 4, and the shift mask MONAI computes for them."""
    window, grid = (4,) * dims, (8,) * dims
    torch.manual_seed(1)
    x = torch.randn(2 * 2 ** dims, 4 ** dims, 12)
    if not shifted:
        return x, None
    return x, swin_unetr.compute_mask(list(grid), window, (2,) * dims, x.device)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("flash", [False, True])
def test_the_rules_recomputation_equals_monais_window_attention(dims, shifted, flash) -> None:
    torch.manual_seed(2)
    block = swin_unetr.WindowAttention(12, 3, (4,) * dims, qkv_bias=True, use_flash_attention=flash).eval()
    with torch.no_grad():
        block.relative_position_bias_table.uniform_(-1.0, 1.0)
        x, mask = _windows(dims, shifted)
        ours = window_output(block, x, window_probabilities(block, x, mask))
        torch.testing.assert_close(ours, block(x, mask), rtol=0, atol=1e-6)
        if shifted:  # the mask matters: without it the output differs
            assert float((window_output(block, x, window_probabilities(block, x, None)) - ours).abs().max()) > 1e-3


def test_window_rule_is_the_papers_formula_on_one_head() -> None:
    """Values = tokens, output projection the identity: R(x_id) = sum_j x_id p_ji R(y_jd) / y_jd."""
    torch.manual_seed(3)
    block = swin_unetr.WindowAttention(4, 1, (2, 2), qkv_bias=False).eval()
    with torch.no_grad():
        block.qkv.weight[8:] = torch.eye(4)
        block.proj.weight.copy_(torch.eye(4))
        block.proj.bias.zero_()
        block.relative_position_bias_table.uniform_(-1.0, 1.0)
    x, R = torch.randn(3, 4, 4), torch.randn(3, 4, 4)
    p = window_probabilities(block, x, None)[:, 0]
    y = torch.einsum("bji,bid->bjd", p, x)
    expected = torch.einsum("bid,bji,bjd->bid", x, p, R / y)
    torch.testing.assert_close(window_rule(block, x, None, R, 0.0), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_the_canonizer_leaves_the_forward_and_the_model_unchanged(dims: int) -> None:
    net = swin(dims)
    x = torch.randn(1, 1, *(SIZE,) * dims)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        y = net(x)
        with transformer_rules(net, x, 0.01) as attention:
            assert attention == ["swinViT.layers1.0.blocks.0.attn", "swinViT.layers1.0.blocks.1.attn",
                                 "swinViT.layers2.0.blocks.0.attn", "swinViT.layers3.0.blocks.0.attn",
                                 "swinViT.layers4.0.blocks.0.attn"]
            assert "forward" in net.swinViT.layers1[0].blocks[1].__dict__ and "proj_out" in net.swinViT.__dict__
            assert torch.equal(net(x), y)  # bit for bit
    assert not any("forward" in m.__dict__ or "proj_out" in m.__dict__ for m in net.modules())
    assert_untouched(net, before)  # and after a whole LRP run: test_lrp0_on_a_bias_free_swin_unetr...


@pytest.mark.parametrize("dims", [2, 3])
def test_the_canonizer_restores_an_instance_forward_the_user_had(dims: int) -> None:
    """A forward the user set on the instance (a wrapper, a patch) is put back exactly, not removed."""
    net = swin(dims)
    block = net.swinViT.layers1[0].blocks[0]

    def own(self, x, mask_matrix):  # noqa: ANN001, ANN202
        return type(self).forward(self, x, mask_matrix)

    mine = types.MethodType(own, block)
    block.forward = mine
    x = torch.randn(1, 1, *(SIZE,) * dims)
    with torch.no_grad(), transformer_rules(net, x, 0.01):
        assert block.__dict__["forward"] is not mine  # the rule's forward for the run
    assert block.__dict__["forward"] is mine
    others = [m for m in net.modules() if m is not block]
    assert not any("forward" in m.__dict__ or "proj_out" in m.__dict__ for m in others)


def _lrp0(dims: int, **variant) -> tuple[float, float, list, list[str]]:
    net = swin(dims, bias_free=True, **variant).double()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(1, 1, *(SIZE,) * dims, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    sm = ScoreModel(net, RegionOfInterestTarget(torch.ones((SIZE,) * dims)))
    record: list = []
    notes: list[str] = []
    R = LRP(sm, "epsilon", OPTIONS, record=record, notes=notes).attribute(x, target=1)
    with torch.no_grad():
        f = float(sm(x)[0, 1])
    assert not any("forward" in m.__dict__ or "proj_out" in m.__dict__ for m in net.modules())
    assert_untouched(net, before)
    return float(R.sum()), f, record, notes


@pytest.mark.parametrize("dims", [2, 3])
def test_lrp0_on_a_bias_free_swin_unetr_conserves_the_score(dims: int) -> None:
    total, f, record, notes = _lrp0(dims)
    assert abs(f) > 1e-3
    assert total == pytest.approx(f, rel=1e-6)
    assert all(r_in == pytest.approx(r_out, rel=1e-6, abs=1e-9) for _, r_in, r_out in record)
    assert any("Ali et al. 2022" in n and "5 attention block(s)" in n and "shift mask" in n for n in notes)


BREAKAGES = {
    "residual sums not split": lambda mp: mp.setattr(lrp_attention.EpsilonSum, "apply", lambda a, b, eps: a + b),
    "probabilities not held": lambda mp: mp.setattr(lrp_swin, "window_rule",
                                                    lambda block, a, mask, R, eps, *_: _unheld(block, a, mask, R)),
    "proj_out's sigma not held": lambda mp: mp.setattr(lrp_swin, "held_layer_norm", _gradient_layer_norm),
}


VARIANTS = {"v2 (residual conv stages)": {"use_v2": True}, "stochastic depth (DropPath, eval)": {"dropout_path_rate": 0.3},
            "patch merging v2": {"downsample": "mergingv2"}, "patch norm": {"patch_norm": True},
            "window 7 (zero-padded windows)": {"window_size": 7}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lrp0_conserves_on_swin_unetr_variants(variant: str) -> None:
    total, f, record, _ = _lrp0(2, **VARIANTS[variant])
    assert abs(f) > 1e-3
    assert total == pytest.approx(f, rel=1e-6)
    assert all(r_in == pytest.approx(r_out, rel=1e-6, abs=1e-9) for _, r_in, r_out in record)


def _unheld(block: nn.Module, a: torch.Tensor, mask: torch.Tensor | None, R: torch.Tensor) -> torch.Tensor:
    """The epsilon rule on the block's gradient (softmax not held): not conservative."""
    a = a.detach().requires_grad_(True)
    with torch.enable_grad():
        z = window_output(block, a, window_probabilities(block, a, mask))
        (g,) = torch.autograd.grad(z, a, R / z.detach())
    return a.detach() * g


def _gradient_layer_norm(a: torch.Tensor, R: torch.Tensor, eps: float, norm_eps: float = 1e-5) -> torch.Tensor:
    a = a.detach().requires_grad_(True)
    with torch.enable_grad():
        z = nn.functional.layer_norm(a, [a.shape[-1]], eps=norm_eps)
        (g,) = torch.autograd.grad(z, a, R / z.detach())
    return a.detach() * g


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_breaking_a_rule_breaks_conservation(breakage: str, monkeypatch) -> None:
    BREAKAGES[breakage](monkeypatch)
    total, f, _, _ = _lrp0(2)
    assert abs(total - f) > 1e-4 * abs(f)  # a hundred times the conservation test's tolerance


@pytest.mark.parametrize("dims", [2, 3])
def test_a_block_monai_computes_differently_is_refused_by_name(dims: int, monkeypatch) -> None:
    """Another MONAI version's SwinTransformerBlock (here: a layer scale on the attention branch)."""
    original = swin_unetr.SwinTransformerBlock.forward

    def scaled(self, x, mask_matrix):  # noqa: ANN001, ANN202
        return original(self, x, mask_matrix) - 0.5 * self.forward_part1(x, mask_matrix)

    monkeypatch.setattr(swin_unetr.SwinTransformerBlock, "forward", scaled)
    net = swin(dims)
    x = torch.randn(1, 1, *(SIZE,) * dims)
    with pytest.raises(MethodError, match=r"swinViT\.layers1\.0\.blocks\.0.*another MONAI version"):
        with transformer_rules(net, x, 0.01):
            pass
    assert not any("forward" in m.__dict__ or "proj_out" in m.__dict__ for m in net.modules())


SLIDING = [(2, (44, 40)), (3, (40, SIZE, SIZE))]


@pytest.mark.parametrize("dims,shape", SLIDING)
def test_patchwise_lrp_on_swin_unetr_equals_lrp_through_monai_and_conserves(dims, shape) -> None:
    patch = (SIZE,) * dims
    net = swin(dims, bias_free=True)
    x, expl, target = _setup(net, dims, shape, patch)
    ours, ctx = _ours(expl, target, x, "lrp", composite="epsilon", epsilon=0.0)
    assert ctx.score_model.patchwise and ctx.score_model.runner.patch_evaluations > 1
    fn = MonaiFunction(net, target, patch)
    fn.form = types.SimpleNamespace(sliding=types.SimpleNamespace(patch_size=patch))  # the probe: one patch
    ref = LRP(fn, "epsilon", OPTIONS).attribute(x, target=1)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert float(ours.double().sum()) == pytest.approx(_f(net, target, patch, x), rel=1e-3)


def test_hyena_stages_are_refused_by_name() -> None:
    """A Hyena stage (it needs MONAI's optional ``nvsubquadratic``: a stand-in of MONAI's class name)."""
    from esegeta_engine.methods.lrp import check_supported

    hyena = type("HyenaTransformerBlock", (nn.Module,), {"__module__": "monai.networks.blocks.hyena_block"})
    net = swin(2)
    net.swinViT.layers1[0].blocks[0] = hyena()
    with pytest.raises(MethodError, match="Hyena stages .* no conservative rule here; its Swin stages do"):
        check_supported(net, attention=True)
