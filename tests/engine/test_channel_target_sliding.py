"""The channel target under sliding-window execution (issue 20, part 3): each patch's output is the
channel-k map of the layer (nearest-upsampled to the patch when the layer is strided), blended like
any network output; the score is the mean of the stitched map. Saliency equals autograd through
MONAI's ``sliding_window_inference`` of a predictor returning that map (written here independently),
and one patch covering the volume gives the whole-volume channel target."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn

from esegeta_engine.channel_target import LayerChannelTarget
from esegeta_engine.errors import TargetError
from esegeta_engine.forward.runner import ExecutionForm
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.forward.window_grid import WindowSettings
from esegeta_engine.methods import MethodContext, attribute, get_method

from tiny_models import assert_untouched

CASES = [(2, (26, 21), (12, 12)), (3, (14, 12, 11), (8, 8, 8))]
OVERLAP = 0.25


def _net(dims: int) -> nn.Module:
    torch.manual_seed(7)
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    P = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
    return nn.Sequential(C(1, 4, 3, padding=1), nn.ReLU(), P(2), C(4, 5, 3, padding=1), nn.ReLU(),
                         nn.Upsample(scale_factor=2), C(5, 2, 3, padding=1)).eval()


class _Strided(nn.Module):
    """A stride-2 layer brought back to the input's grid: takes any patch size (7 -> 4 -> 7)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.down = nn.Conv3d(1, 3, 3, stride=2, padding=1)
        self.head = nn.Conv3d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.interpolate(torch.relu(self.down(x)), size=tuple(x.shape[2:])))


def _x(shape):
    return torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(3)) + 0.3


def _score_model(net, target, patch) -> ScoreModel:
    form = ExecutionForm(WindowSettings(tuple(patch), OVERLAP, "gaussian", 2))
    return ScoreModel(net, target, form=form)


def _saliency(sm: ScoreModel, x: torch.Tensor) -> torch.Tensor:
    spec = get_method("saliency")
    return attribute(spec, MethodContext(sm, x, 0, extra={"patchwise": sm.patchwise}),
                     spec.resolve_params({"abs": False}))


def _reference(net, layer, k, softmax, patch, x):
    """Mean of MONAI's stitched channel map and its input gradient, by plain autograd."""
    def predictor(p: torch.Tensor) -> torch.Tensor:
        seen = []
        h = getattr(net, layer).register_forward_hook(lambda m, a, y: seen.append(y))
        try:
            net(p)
        finally:
            h.remove()
        a = seen[0].softmax(1) if softmax else seen[0]
        return F.interpolate(a[:, k:k + 1], size=tuple(p.shape[2:]), mode="nearest")

    xr = x.clone().requires_grad_(True)
    stitched = sliding_window_inference(xr, patch, 10_000, predictor, overlap=OVERLAP, mode="gaussian")
    score = stitched.mean()
    (g,) = torch.autograd.grad(score, xr)
    return score.detach(), g, predictor


@pytest.mark.parametrize("dims, shape, patch", CASES)
@pytest.mark.parametrize("layer, k, softmax", [("1", 2, False), ("3", 1, True)])  # stride 1; stride 2
def test_saliency_equals_autograd_through_monai(dims, shape, patch, layer, k, softmax) -> None:
    net = _net(dims)
    state = {n: v.clone() for n, v in net.state_dict().items()}
    x = _x(shape)
    target = LayerChannelTarget(layer, k, activation="softmax" if softmax else "none")
    sm = _score_model(net, target, patch)
    assert len(sm.runner.grid(shape, x.device).slices) > 1  # several patches
    ref_score, ref_grad, _ = _reference(net, layer, k, softmax, patch, x)
    torch.testing.assert_close(sm(x), ref_score.reshape(1, 1), rtol=1e-5, atol=1e-6)
    sal = _saliency(sm, x)
    assert ref_grad.abs().max() > 0
    torch.testing.assert_close(sal, ref_grad, rtol=1e-4, atol=1e-7)
    assert sm.notes == []  # the stride divides the patch: an exact replication
    assert_untouched(net, state)
    assert not any(m._forward_hooks for m in net.modules())  # no hook left between evaluations


@pytest.mark.parametrize("dims, shape, patch", CASES)
def test_occlusion_equals_captum_through_monai(dims, shape, patch) -> None:
    """A perturbation method runs unchanged (recomputing only the patches a box changes) on the stitched
    channel score: Captum's Occlusion of the MONAI-stitched channel map's mean."""
    from captum.attr import Occlusion

    from esegeta_engine.methods.behaviour import patchwise_mode

    net = _net(dims)
    x = _x(shape)
    sm = _score_model(net, LayerChannelTarget("3", 1), patch)
    _, _, predictor = _reference(net, "3", 1, False, patch, x)

    def stitched_score(inp: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            m = sliding_window_inference(inp, patch, 10_000, predictor, overlap=OVERLAP, mode="gaussian")
        return m.flatten(1).mean(1, keepdim=True)

    window = (1, *([4] * dims))
    ref = Occlusion(stitched_score).attribute(x, sliding_window_shapes=window, strides=window, target=0,
                                              baselines=0.0)
    spec = get_method("occlusion")
    ctx = MethodContext(sm, x, 0, extra={"patchwise": True})
    with patchwise_mode(spec.patchwise).around(sm.runner, x):
        ours = attribute(spec, ctx, spec.resolve_params({"window": 4}))
    assert ref.abs().max() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    n_patches = len(sm.runner.grid(shape, x.device).slices)
    n_boxes = 1
    for s in shape:
        n_boxes *= -(-s // 4)
    assert sm.runner.patch_evaluations < (n_boxes + 1) * n_patches  # only the changed patches rerun


@pytest.mark.parametrize("dims, shape, patch", CASES)
@pytest.mark.parametrize("layer", ["1", "3"])
def test_one_patch_covering_the_volume_is_the_whole_volume_target(dims, shape, patch, layer) -> None:
    net = _net(dims)
    size = tuple(patch)  # even sizes: the pooled layer's grid divides them
    x = _x(size)
    whole = ScoreModel(net, LayerChannelTarget(layer, 1))
    one = _score_model(net, LayerChannelTarget(layer, 1), size)
    assert len(one.runner.grid(size, x.device).slices) == 1
    torch.testing.assert_close(one(x), whole(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_saliency(one, x), _saliency(whole, x), rtol=1e-4, atol=1e-7)


def test_a_stride_that_does_not_divide_the_patch_is_noted_and_a_unit_is_refused() -> None:
    net = _net(2)
    sm = _score_model(net, LayerChannelTarget("3", 0), (7, 7))
    sm(_x((12, 12)))
    assert len(sm.notes) == 1 and "non-integer factor" in sm.notes[0]
    with pytest.raises(TargetError, match="no patch-wise meaning"):
        _score_model(net, LayerChannelTarget("3", 0, unit=(1, 1)), (8, 8))


@pytest.mark.parametrize("patch, noted", [(8, False), (7, True)])
def test_the_explainer_runs_the_channel_target_patch_wise(patch, noted) -> None:
    """Saliency runs under the sliding window (the stitched score's gradient), feature permutation is
    still refused; a stride that does not divide the patch is in the map's notes."""
    import numpy as np

    from esegeta_engine.config import ExecutionConfig, MethodConfig, PreprocessConfig, TargetConfig
    from esegeta_engine.explain import Explainer, MapReady
    from esegeta_engine.io import Volume
    from esegeta_engine.jobs.events import JobFailed

    net = _Strided().eval()
    vol = Volume(np.random.default_rng(0).normal(size=(12, 12, 12)).astype(np.float32), np.eye(4))
    ex = Explainer(net, PreprocessConfig(), TargetConfig(kind="channel", layer="down", channel=1),
                   execution=ExecutionConfig(patch_size=patch, overlap=OVERLAP))
    methods = [MethodConfig(name="saliency", params={"abs": False}), MethodConfig(name="feature_permutation")]
    events = list(ex.iter_explain([vol], methods, threaded=False))
    maps = [e for e in events if isinstance(e, MapReady)]
    failed = [e for e in events if isinstance(e, JobFailed)]
    assert [m.job.spec.name for m in maps] == ["saliency"] and maps[0].patch_evaluations > 0
    assert float(np.abs(maps[0].array).max()) > 0
    assert any("non-integer factor" in n for n in maps[0].notes) == noted
    assert [f.job.spec.name for f in failed] == ["feature_permutation"]
