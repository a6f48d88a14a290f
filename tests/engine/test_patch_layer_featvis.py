"""Feature visualisation under sliding-window execution (issue 20, part 3): the network's field of view is
one patch, so an input of the patch size is optimised; it equals the whole-volume method run on the
volume's central patch, placed at the centre, and the notes say so."""

from __future__ import annotations

import pytest
import torch

from esegeta_engine.config import ExecutionConfig, PreprocessConfig, TargetConfig
from esegeta_engine.explain import Explainer
from test_execution_patch_layer import _net, _ours

CASES = [(2, (26, 21), (12, 12)), (3, (14, 12, 11), (8, 8, 8))]


@pytest.mark.parametrize("dims,shape,patch", CASES)
@pytest.mark.parametrize("name, params", [
    ("activation_maximisation", {"channel": 2}),
    ("layer_visualisation", {"channels": 3}),
    ("deep_dream", {}),
    ("inverted_representation", {}),
])
def test_feature_visualisation_optimises_the_patch_at_the_centre(dims, shape, patch, name, params):
    from esegeta_engine.targets import RegionOfInterestTarget

    net = _net(dims)
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(3))
    target = RegionOfInterestTarget(torch.ones(shape))
    windowed = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(),
                         execution=ExecutionConfig(patch_size=list(patch), sw_batch_size=2))
    ours, ctx = _ours(windowed, net, target, x, name, steps=3, **params)
    window = tuple(slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(shape, patch))
    crop = x[(slice(None), slice(None), *window)]
    whole = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(), execution=ExecutionConfig(mode="whole"))
    ref, _ = _ours(whole, net, RegionOfInterestTarget(torch.ones(patch)), crop, name, steps=3, **params)
    assert ours.shape == (1, ref.shape[1], *shape)
    torch.testing.assert_close(ours[(slice(None), slice(None), *window)], ref, rtol=1e-4, atol=1e-5)
    outside = torch.ones(shape, dtype=torch.bool)
    outside[window] = False
    assert float(ours[..., outside].abs().max()) == 0 and float(ref.abs().max()) > 0
    assert any("patch size" in n and "field of view" in n for n in ctx.extra["notes"])
