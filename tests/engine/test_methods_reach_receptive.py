"""Receptive-field skipping (methods/reach.py, issue 20 part 4): occlusion windows, feature-ablation
supervoxels and RISE masks that leave the input unchanged wherever an ROI target's output can look
cost no evaluation. Whole-volume and sliding-window execution, 2D and 3D: the map is identical to the
method without skipping, with fewer counted model evaluations, and the record says what was saved."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import esegeta_engine.methods.perturbation as perturbation
import esegeta_engine.methods.reach as reach
import esegeta_engine.methods.rise as rise
from esegeta_engine.config import ExecutionConfig, PreprocessConfig, TargetConfig
from esegeta_engine.explain import Explainer
from esegeta_engine.forward.receptive import ReceptiveFieldUnknown
from esegeta_engine.forward.scoring import EvaluationMonitor
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.targets import RegionOfInterestTarget


def _net(dims: int, depth: int = 2) -> nn.Module:
    torch.manual_seed(3)
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    B = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    layers: list[nn.Module] = [C(1, 3, 3, padding=1), B(3), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [C(3, 3, 3, padding=1), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers, C(3, 2, 1)).eval()


def _run(net, dims, shape, box, method, params, skip: bool, monkeypatch, execution=None):
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(4))
    roi = torch.zeros(shape, dtype=torch.bool)
    roi[box] = True
    target = RegionOfInterestTarget(roi.float())
    expl = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(), execution=execution)
    with monkeypatch.context() as m:
        if not skip:
            m.setattr(perturbation, "reach_filter", lambda *a: None)
            m.setattr(rise, "reach_filter", lambda *a: None)
        monitor = EvaluationMonitor()
        sm = expl.make_score_model(target, x, monitor, support=roi)
        if execution is not None:
            sm.runner.set_base(x)
        ctx = MethodContext(sm, x, 1, extra={"patchwise": execution is not None})
        spec = get_method(method)
        out = attribute(spec, ctx, spec.resolve_params(params))
    return out, monitor.count, ctx


WHOLE = [(2, (24, 20), (slice(10, 12), slice(9, 11))), (3, (12, 12, 10), (slice(5, 6), slice(6, 7), slice(4, 6)))]


@pytest.mark.parametrize("dims,shape,box", WHOLE)
@pytest.mark.parametrize("method,params,what", [
    ("occlusion", {"window": 2, "perturbations_per_eval": 1}, "windows"),
    ("feature_ablation", {"mask": "grid", "grid_size": 3, "perturbations_per_eval": 1}, "supervoxels")])
def test_whole_volume_skipping_keeps_the_map_and_saves_evaluations(dims, shape, box, method, params, what,
                                                                   monkeypatch):
    net = _net(dims)
    ours, count, ctx = _run(net, dims, shape, box, method, params, True, monkeypatch)
    plain, plain_count, _ = _run(net, dims, shape, box, method, params, False, monkeypatch)
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    record = ctx.extra["receptive_field"]
    assert record["bound"] == "receptive field (linearised probe)" and record["unit"] == what
    assert record["skipped"] > 0 and count == plain_count - record["skipped"]  # one evaluation per copy
    assert record["evaluations_saved"] == record["skipped"]
    assert 0 < record["reach_voxels"] < x_voxels(shape)
    assert any("cost no evaluation" in n for n in ctx.extra["notes"])


def x_voxels(shape) -> int:
    return int(torch.tensor(shape).prod())


@pytest.mark.parametrize("dims,shape,box", WHOLE)
def test_rise_masks_that_keep_every_visible_voxel_are_not_evaluated(dims, shape, box, monkeypatch):
    net = _net(dims, depth=1)
    params = {"n_masks": 24, "cell_size": 6, "keep_probability": 0.9, "batch_size": 1}
    ours, count, ctx = _run(net, dims, shape, box, "rise", params, True, monkeypatch)
    plain, plain_count, _ = _run(net, dims, shape, box, "rise", params, False, monkeypatch)
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    record = ctx.extra["receptive_field"]
    assert record["skipped"] > 0
    assert count == plain_count - record["skipped"] + 1  # the unperturbed score, which RISE never asks for
    assert record["evaluations_saved"] == record["skipped"] - 1


SLIDING = [(2, (30, 26), (10, 10), (slice(12, 14), slice(11, 13))),
           (3, (14, 14, 12), (8, 8, 8), (slice(6, 7), slice(6, 8), slice(5, 6)))]


@pytest.mark.parametrize("dims,shape,patch,box", SLIDING)
def test_sliding_window_probe_skips_more_than_the_patch_bound(dims, shape, patch, box, monkeypatch):
    net = _net(dims)
    execution = ExecutionConfig(patch_size=list(patch), overlap=0.25)
    params = {"window": 2, "perturbations_per_eval": 1}
    probed, count, ctx = _run(net, dims, shape, box, "occlusion", params, True, monkeypatch, execution)

    def unknown(*a, **k):
        raise ReceptiveFieldUnknown("test")

    monkeypatch.setattr(reach, "dependency", unknown)  # the coarser bound: the patches the ROI reads
    coarse, coarse_count, coarse_ctx = _run(net, dims, shape, box, "occlusion", params, True, monkeypatch,
                                            execution)
    torch.testing.assert_close(probed, coarse, rtol=0, atol=0)
    fine, rough = ctx.extra["receptive_field"], coarse_ctx.extra["receptive_field"]
    assert rough["bound"].startswith("patches the target reads (probe: test)")
    assert fine["skipped"] > rough["skipped"] and count == coarse_count - (fine["skipped"] - rough["skipped"])
    assert fine["reach_voxels"] < rough["reach_voxels"]


def test_the_saving_reaches_the_map_record():
    import numpy as np

    from esegeta_engine.config import MethodConfig
    from esegeta_engine.explain import MapReady
    from esegeta_engine.io import Volume

    net = _net(3)
    shape = (12, 12, 10)
    roi = np.zeros(shape, bool)
    roi[5:7, 5:7, 4:6] = True
    vol = Volume(np.random.default_rng(0).normal(size=shape).astype(np.float32), np.eye(4), None)
    expl = Explainer(net, PreprocessConfig(), TargetConfig(kind="roi", classes=[1]))
    events = list(expl.iter_explain([vol], [MethodConfig(name="occlusion", params={"window": 2})], roi_mask=roi,
                                    threaded=False))
    (ready,) = [e for e in events if isinstance(e, MapReady)]
    record = ready.execution["receptive_field"]
    assert record["skipped"] > 0 and record["unit"] == "windows" and record["probe_passes"] == 1
    assert any("cost no evaluation" in n for n in ready.notes)
