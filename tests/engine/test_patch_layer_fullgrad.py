"""FullGrad under sliding-window execution (issue 20, part 1): the input term from the patch-wise input
gradient plus every patch copy's bias terms. Equal to the definition computed through MONAI's
``sliding_window_inference`` (all patches in one network call, each layer's copies captured there), its
signed terms sum to the stitched score, and one patch covering the volume gives the whole-volume map."""

from __future__ import annotations

import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval

from esegeta_engine.methods.fullgrad import abs_normalise, effective_bias
from test_execution_patch_layer import CASES, OVERLAP, _monai_F, _net, _ours, _setup, _up


def _reference(net, target, patch, x, raw: bool) -> torch.Tensor:
    shape = tuple(x.shape[2:])
    dims = len(shape)
    biased = [(m, b) for m in net.modules() if (b := effective_bias(m)) is not None]
    grads = {}

    def hook_for(i):
        def hook(m, a, y):
            y.register_hook(lambda g: grads.__setitem__(i, g.detach()))
        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, (m, _) in enumerate(biased)]
    try:
        xi = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(_monai_F(net, target, patch, xi)[:, 1].sum(), xi)
    finally:
        for h in handles:
            h.remove()
    term = gx * x
    out = term.sum(1, keepdim=True) if raw else abs_normalise(term).sum(1, keepdim=True)
    slices = dense_patch_slices(shape, patch, _get_scan_interval(shape, patch, dims, (OVERLAP,) * dims))
    for i, (_, bias) in enumerate(biased):
        t = grads[i] * bias.reshape(1, -1, *([1] * dims))  # every copy of layer i: (patches, C, *layer)
        if not raw:  # min-max over the whole layer: every copy
            a = t.abs()
            t = (a - a.min()) / (a.max() - a.min() + 1e-6)
        s = t.sum(1, keepdim=True)
        ups = _up(s, patch) * (float(torch.tensor(s.shape[2:]).prod()) / float(torch.tensor(patch).prod())
                              if raw else 1.0)
        for k, sl in enumerate(slices):
            out[(0, slice(None), *sl)] += ups[k]
    return out


@pytest.mark.parametrize("dims,shape,patch", CASES)
@pytest.mark.parametrize("postprocess", ["none", "abs_normalise"])
def test_patchwise_fullgrad_equals_the_definition_through_monai(dims, shape, patch, postprocess):
    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, patch)
    ours, ctx = _ours(expl, net, target, x, "fullgrad", postprocess=postprocess)
    ref = _reference(net, target, patch, x, postprocess == "none")
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    if postprocess == "none":  # ReLU, max pooling, biases: the signed terms sum to the stitched score
        with torch.no_grad():
            score = float(_monai_F(net, target, patch, x)[0, 1])
        assert abs(score) > 1 and float(ours.double().sum()) == pytest.approx(score, rel=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("postprocess", ["none", "abs_normalise"])
def test_one_patch_covering_the_volume_equals_the_whole_volume_method(dims, postprocess):
    shape = (12,) * dims if dims == 2 else (8,) * dims
    net = _net(dims)
    x, expl, target = _setup(net, dims, shape, shape, mode="sliding_window")
    ours, ctx = _ours(expl, net, target, x, "fullgrad", postprocess=postprocess)
    assert ctx.score_model.patchwise
    _, whole, _ = _setup(net, dims, shape, shape, mode="whole")
    ref, _ = _ours(whole, net, target, x, "fullgrad", postprocess=postprocess)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
