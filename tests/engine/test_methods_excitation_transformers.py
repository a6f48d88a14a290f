"""Excitation backprop on transformers (issue 20, part 6): refused in one line that says why, before any
model evaluation, on MONAI's UNETR and SwinUNETR, 2D and 3D.

Why it stays refused: the marginal winning probability of Zhang et al. 2016 is defined for non-negative
activations sent through excitatory connections, and no published rule extends it to attention or layer
norms. The premise the refusal states is checked on the networks themselves: every token a LayerNorm
hands to the attention has negative entries.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esegeta_engine.config import PreprocessConfig, TargetConfig
from esegeta_engine.errors import MethodError
from esegeta_engine.explain import Explainer
from esegeta_engine.forward.scoring import EvaluationMonitor
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.targets import ArgmaxRegionTarget

nets = pytest.importorskip("monai.networks.nets")


def _unetr(dims: int) -> tuple[nn.Module, tuple[int, ...], str]:
    torch.manual_seed(0)
    size = (16,) * dims
    return nets.UNETR(1, 2, img_size=size, feature_size=4, hidden_size=24, mlp_dim=48, num_heads=2,
                      spatial_dims=dims).eval(), size, "decoder2"


def _swin(dims: int) -> tuple[nn.Module, tuple[int, ...], str]:
    torch.manual_seed(0)
    return nets.SwinUNETR(1, 2, feature_size=12, spatial_dims=dims, window_size=4, norm_name="batch",
                          depths=(2, 1, 1, 1), num_heads=(1, 1, 1, 1), mlp_ratio=1.0).eval(), (32,) * dims, "decoder2"


NETWORKS = {"unetr": _unetr, "swin_unetr": _swin}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("arch", list(NETWORKS))
@pytest.mark.parametrize("method", ["excitation_backprop", "contrastive_excitation_backprop"])
def test_excitation_on_a_transformer_is_refused_saying_why_before_any_evaluation(arch, dims, method) -> None:
    net, size, layer = NETWORKS[arch](dims)
    x = torch.randn(1, 1, *size, generator=torch.Generator().manual_seed(1))
    expl = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig())
    target = ArgmaxRegionTarget()
    target.prepare(expl.raw_output(x))
    monitor = EvaluationMonitor()
    ctx = MethodContext(expl.make_score_model(target, x, monitor), x, 1, layer=dict(net.named_modules())[layer])
    spec = get_method(method)
    with pytest.raises(MethodError) as info:
        attribute(spec, ctx, spec.resolve_params({}))
    text = info.value.problem  # one line; the fix follows on its own
    assert "\n" not in text and text.startswith(f"{method} has no rule for module type(s)")
    assert ("WindowAttention" if arch == "swin_unetr" else "PatchEmbeddingBlock") in text
    assert "non-negative activations" in text and "LayerNorm centres every token" in text
    assert "no published rule extends c-MWP" in text and "use lrp" in text
    assert monitor.count == 0


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("arch", list(NETWORKS))
def test_every_token_a_layer_norm_hands_to_attention_has_negative_entries(arch, dims) -> None:
    """The refusal's premise, on the networks: winning probabilities would meet signed activations at
    every attention input (LayerNorm centres each token across its channels)."""
    net, size, _ = NETWORKS[arch](dims)
    seen: list[torch.Tensor] = []
    norms = [m for n, m in net.named_modules() if isinstance(m, nn.LayerNorm) and n.endswith("norm1")]
    handles = [m.register_forward_hook(lambda m, a, y: seen.append(y.detach())) for m in norms]
    try:
        with torch.no_grad():
            net(torch.randn(1, 1, *size))
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(norms) > 0
    assert all(bool((y.amin(dim=-1) < 0).all()) for y in seen)
