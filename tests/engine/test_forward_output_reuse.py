"""The patch-wise backward reuses the prediction's stitched output (forward/sliding.py).

LRP and excitation backprop keep their hooks silent in the stitched forward, so for an input equal
to the one the prediction ran on the stitched output is taken from the prediction instead of
running every patch once more. Counted: one patch pass fewer per patch; the map is identical; an
in-place change of a parameter (a randomisation, a fold) invalidates the remembered output.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esegeta_engine.config import ExecutionConfig, PreprocessConfig, TargetConfig
from esegeta_engine.explain import Explainer
from esegeta_engine.forward import sliding
from esegeta_engine.forward.scoring import EvaluationMonitor
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.targets import ArgmaxRegionTarget

CASES = [(2, (26, 21), (12, 12)), (3, (14, 12, 11), (8, 8, 8))]


def _net(dims: int) -> nn.Module:
    torch.manual_seed(3)
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    return nn.Sequential(C(1, 4, 3, padding=1), nn.LeakyReLU(0.1), C(4, 2, 3, padding=1)).eval()


def _lrp(net: nn.Module, dims: int, shape: tuple, patch: tuple, forget: bool,
         name: str = "lrp") -> tuple[torch.Tensor, int, int]:
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(1))
    expl = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(),
                     execution=ExecutionConfig(patch_size=list(patch), overlap=0.25))
    target = ArgmaxRegionTarget()
    target.prepare(expl.raw_output(x))
    if forget:
        sliding._LAST_OUTPUT.clear()
    monitor = EvaluationMonitor()
    sm = expl.make_score_model(target, x, monitor)
    spec = get_method(name)
    layer = {"layer": net[1], "layer_name": "1"} if spec.needs_layer else {}
    out = attribute(spec, MethodContext(sm, x, 1, extra={"patchwise": True}, **layer), spec.resolve_params({}))
    return out, monitor.patches, len(sm.runner.grid(shape, x.device))


@pytest.mark.parametrize("dims,shape,patch", CASES)
@pytest.mark.parametrize("name", ["lrp", "layer_gradcam", "layer_gradient_x_activation"])
def test_reused_output_gives_the_same_map_with_one_pass_fewer(dims, shape, patch, name):
    """The patch-wise layer methods read the layer only in the recomputation too (no other hooks)."""
    net = _net(dims)
    reused, n_reused, patches = _lrp(net, dims, shape, patch, forget=False, name=name)
    fresh, n_fresh, _ = _lrp(net, dims, shape, patch, forget=True, name=name)
    assert patches > 1
    assert n_fresh == 2 * patches and n_reused == patches  # stitched forward + recomputation vs recomputation
    torch.testing.assert_close(reused, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("dims,shape,patch", CASES)
def test_changed_parameters_are_not_answered_from_the_old_output(dims, shape, patch):
    net = _net(dims)
    x = torch.randn(1, 1, *shape)
    sw = sliding.SlidingWindow(net, sliding.WindowSettings(patch))
    with torch.no_grad():
        sw(x)
        assert sw.remembered_output(x) is not None
        assert sw.remembered_output(x + 1) is None  # another input
        net[0].weight.mul_(2.0)  # in place, as a randomisation or a fold does
    assert sw.remembered_output(x) is None


@pytest.mark.parametrize("dims,shape,patch", CASES)
def test_the_cache_keeps_a_digest_of_the_input_not_a_copy(dims, shape, patch):
    """An equal input (another tensor) is answered; a change that bypasses torch's version counter
    (numpy memory shared with the tensor) is seen."""
    net = _net(dims)
    data = torch.randn(1, 1, *shape).numpy()
    x = torch.from_numpy(data)
    sw = sliding.SlidingWindow(net, sliding.WindowSettings(patch))
    with torch.no_grad():
        out = sw(x)
    assert not any(isinstance(v, torch.Tensor) and v.shape == x.shape for v in sliding._LAST_OUTPUT[0])
    assert torch.equal(sw.remembered_output(x.clone()), out)
    data[(0, 0, *(s // 2 for s in shape))] += 1.0  # no in-place torch op: the version counter stays
    assert sw.remembered_output(x) is None


@pytest.mark.parametrize("dims,shape,patch", [*CASES, (3, (6, 12, 11), (8, 8, 8))])
def test_patchwise_backward_equals_the_whole_buffer_form_bit_for_bit(dims, shape, patch):
    """The upstream gradient is divided by the count map per patch instead of in a second whole-volume
    buffer: the input gradient is bit-identical to the whole-buffer form written out here (a volume
    smaller than the patch on one axis is padded: the padded path too)."""
    net = _net(dims)
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(4))
    g_out = torch.randn(1, 2, *shape, generator=torch.Generator().manual_seed(5))
    sw = sliding.SlidingWindow(net, sliding.WindowSettings(patch))
    xr = x.clone().requires_grad_(True)
    (ours,) = torch.autograd.grad(sw(xr), xr, g_out)
    grid = sw.grid(shape, x.device)
    up = torch.zeros((1, 2, *grid.padded))
    up[(slice(None), slice(None), *(slice(o, o + s) for o, s in zip(grid.offset, grid.spatial)))] = g_out
    up = up / grid.count
    xp = grid.pad_input(x)
    gpad = torch.zeros_like(xp)
    for sl in grid.slices:
        patch_in = xp[(slice(None), slice(None), *sl)].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(net(patch_in), patch_in, up[(slice(None), slice(None), *sl)] * grid.weight)
        gpad[(slice(None), slice(None), *sl)] += g
    ref = grid.crop(gpad)
    assert torch.equal(ours, ref)
    if not any(grid.pad):  # the whole scan: the backward reads the upstream gradient in place, no copy
        assert sliding._padded_upstream(g_out, grid).data_ptr() == g_out.data_ptr()
