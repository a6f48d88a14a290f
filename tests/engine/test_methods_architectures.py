"""Networks nobody here wrote (issue 20, part 6): UNETR takes exactly its img_size, and an input of
another size is answered with the sliding-window fix; LRP runs on UNETR with the attention rules (and on SwinUNETR: test_methods_lrp_swin.py); excitation
backprop names the blocks it has no rule for."""

from __future__ import annotations

import pytest
import torch

from esegeta_engine.config import PreprocessConfig, TargetConfig
from esegeta_engine.errors import MethodError
from esegeta_engine.explain import Explainer
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.methods.architectures import fixed_input_size
from esegeta_engine.methods.lrp import check_supported
from esegeta_engine.forward.scoring import EvaluationMonitor
from esegeta_engine.targets import ArgmaxRegionTarget

nets = pytest.importorskip("monai.networks.nets")


def _unetr(dims: int):
    torch.manual_seed(0)
    size = (16,) * dims
    return nets.UNETR(1, 2, img_size=size, feature_size=4, hidden_size=24, mlp_dim=48, num_heads=2,
                      spatial_dims=dims).eval(), size


@pytest.mark.parametrize("dims", [2, 3])
def test_unetr_wrong_size_names_the_sliding_window_fix(dims: int) -> None:
    net, size = _unetr(dims)
    assert fixed_input_size(net) == size
    expl = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig())
    with pytest.raises(MethodError) as info:
        expl.raw_output(torch.randn(1, 1, 20, *size[1:]))
    assert f"execution.patch_size: {list(size)}" in str(info.value) and "in_channels" not in str(info.value)
    assert expl.raw_output(torch.randn(1, 1, *size)).shape[2:] == size  # its own size runs


def test_lrp_on_unetr_runs_with_the_attention_rules_and_excitation_is_refused_naming_them() -> None:
    net, size = _unetr(3)
    x = torch.randn(1, 1, *size)
    expl = Explainer(net, PreprocessConfig(spatial_dims=3), TargetConfig())
    target = ArgmaxRegionTarget()
    target.prepare(expl.raw_output(x))
    ctx = MethodContext(expl.make_score_model(target, x, EvaluationMonitor()), x, 1)
    spec = get_method("lrp")
    out = attribute(spec, ctx, spec.resolve_params({}))
    assert out.shape == x.shape and bool(torch.isfinite(out).all()) and float(out.abs().max()) > 0
    assert any("Ali et al. 2022" in n for n in ctx.extra["notes"])
    spec = get_method("excitation_backprop")
    layer = dict(net.named_modules())["decoder2"]
    with pytest.raises(MethodError, match="PatchEmbeddingBlock") as info:
        attribute(spec, MethodContext(expl.make_score_model(target, x, EvaluationMonitor()), x, 1, layer=layer),
                  spec.resolve_params({}))
    assert "ModuleList" not in str(info.value)  # an empty container computes nothing
    assert "no published rule extends c-MWP" in str(info.value)  # why: the rules exist for LRP only


def test_lrp_on_swin_unetr_has_its_rules_and_excitation_is_refused_naming_the_window_attention() -> None:
    torch.manual_seed(0)
    net = nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=3, depths=(1, 1, 1, 1),
                         num_heads=(1, 1, 1, 1)).eval()
    check_supported(net, "lrp", attention=True)  # what lrp's build runs before the model: no refusal
    with pytest.raises(MethodError, match="WindowAttention"):
        check_supported(net, "excitation_backprop")


def test_unetr_score_cam_differs_by_class_or_refuses_a_saturated_softmax() -> None:
    """UNETR's Score-CAM at its output block gave identical maps for both classes: torchcam's softmax over
    region-sum scores is one-hot on the same channel. The paper's weighting differs by class; softmax is
    refused by name."""
    net, size = _unetr(3)
    x = torch.randn(1, 1, *size, generator=torch.Generator().manual_seed(0))
    expl = Explainer(net, PreprocessConfig(spatial_dims=3), TargetConfig())
    target = ArgmaxRegionTarget()
    target.prepare(expl.raw_output(x))
    spec = get_method("score_cam")

    def run(cls: int, **params):
        ctx = MethodContext(expl.make_score_model(target, x, EvaluationMonitor()), x, cls, layer=net.out,
                            layer_name="out")
        return attribute(spec, ctx, spec.resolve_params({"relu_attributions": False, **params}))

    assert not torch.allclose(run(0), run(1))
    with pytest.raises(MethodError, match="saturated"):
        run(1, weighting="softmax")
