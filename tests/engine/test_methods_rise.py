"""RISE: the 2D/3D matrix, its cost, convergence on an analytic model, batching and the time limit."""

from __future__ import annotations

import pytest
import torch

import esegeta_engine.methods.rise as rise_module
from esegeta_engine.errors import MethodError
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.methods.registry import CostInfo
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ArgmaxRegionTarget
from extra_models import RegionScore, region_setup
from tiny_models import SlowSegNet, TinySegNet, assert_untouched, cls_setup, seg_setup, shape


def run(score: torch.nn.Module, x: torch.Tensor, target: int = 0, seed: int = 0, **params) -> torch.Tensor:
    spec = get_method("rise")
    return attribute(spec, MethodContext(score, x, target, seed=seed), spec.resolve_params(params))


def expected_map(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """RISE's expectation for a linear score f(x) = sum(w x) with independent voxel masks
    (cell_size 1): E[f(x M) M(v)] / p = p f(x) + (1 - p) w(v) x(v)."""
    contrib = weight * x[0, 0]
    return p * contrib.sum() + (1 - p) * contrib


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
@pytest.mark.parametrize("dims", [2, 3])
def test_matrix_and_cost(dims: int, kind: str) -> None:
    net, x, score = (seg_setup if kind == "segmentation" else cls_setup)(dims)
    target = 1 if kind == "segmentation" else 0
    state = {k: v.clone() for k, v in net.state_dict().items()}
    params = {"n_masks": 20, "batch_size": 8, "cell_size": 4}
    score.monitor.start(None)
    result = run(score, x, target, **params)
    assert result.shape == (1, 1, *shape(dims)) and result.dtype == torch.float32
    assert bool(torch.isfinite(result).all()) and bool(result.abs().sum() > 0)
    assert_untouched(net, state)
    spec = get_method("rise")
    assert spec.family == "perturbation" and spec.patchwise == "perturbation"
    assert spec.cost(CostInfo(1, 1, shape(dims)), spec.resolve_params(params)) == 3 == score.monitor.count


@pytest.mark.parametrize("dims", [2, 3])
def test_converges_to_the_scored_region(dims: int) -> None:
    region, x, score = region_setup(dims)
    weight = next(m for m in score.modules() if isinstance(m, RegionScore)).weight[2]
    expected = expected_map(x, weight, 0.5)
    errors = []
    for n in (200, 20000):
        result = run(score, x, target=2, cell_size=1, n_masks=n, batch_size=2000)[0, 0]
        errors.append(float((result - expected).norm() / (expected - expected.mean()).norm()))
    assert errors[1] < errors[0] / 4, errors  # Monte Carlo: 1/sqrt(n), 10x fewer here
    top = result.flatten().topk(int(region.sum())).indices
    assert bool(region.flatten()[top].all()), "the top voxels are the scored region"


def test_smooth_masks_find_the_region() -> None:
    region, x, score = region_setup(3)
    result = run(score, x, target=2, cell_size=2, n_masks=4000, batch_size=1000)[0, 0]
    top = result.flatten().topk(int(region.sum())).indices
    assert float(region.flatten()[top].float().mean()) >= 0.75  # chance: 1/16
    assert float(result[region].mean()) > float(result[~region].mean())


def test_masks_are_generated_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    counts: list[int] = []
    original = rise_module.rise_masks

    def recording(seed, indices, *args):  # noqa: ANN001, ANN202
        counts.append(len(indices))
        return original(seed, indices, *args)

    monkeypatch.setattr(rise_module, "rise_masks", recording)
    _, x, score = cls_setup(2)
    run(score, x, n_masks=45, batch_size=16)
    assert counts == [16, 16, 13]


def test_masks_are_smooth_shifted_and_in_range() -> None:
    masks = rise_module.rise_masks(0, range(200), (12, 10, 8), (4, 4, 4), 0.3)
    assert masks.shape == (200, 1, 12, 10, 8)
    assert float(masks.min()) >= 0 and float(masks.max()) <= 1
    assert abs(float(masks.mean()) - 0.3) < 0.05
    assert 0 < float(((masks > 0) & (masks < 1)).float().mean()) < 1  # interpolated, not binary
    assert not torch.equal(masks[0], masks[1])


def test_seeded_and_the_global_rng_untouched() -> None:
    _, x, score = cls_setup(2)
    torch.manual_seed(7)
    first = run(score, x, seed=3, n_masks=16)
    after = torch.rand(2)
    torch.manual_seed(7)
    torch.testing.assert_close(run(score, x, seed=3, n_masks=16), first)
    torch.testing.assert_close(torch.rand(2), after)
    assert not torch.equal(run(score, x, seed=4, n_masks=16), first)


def test_a_batch_of_inputs_equals_each_alone() -> None:
    torch.manual_seed(1)
    net = TinySegNet(3).eval()
    x = torch.randn(2, 1, *shape(3))
    target = ArgmaxRegionTarget()
    target.prepare(net(x).detach())
    together = run(ScoreModel(net, target), x, target=1, n_masks=10, batch_size=4, cell_size=4)
    for i in range(2):
        alone_target = ArgmaxRegionTarget()
        alone_target.prepare(net(x[i:i + 1]).detach())
        alone = run(ScoreModel(net, alone_target), x[i:i + 1], target=1, n_masks=10, batch_size=3,
                    cell_size=4)
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-4, atol=1e-4)


def test_more_masks_than_fit_the_time_limit_are_refused() -> None:
    torch.manual_seed(0)
    net = SlowSegNet(2, delay=0.05).eval()
    x = torch.randn(1, 1, *shape(2))
    target = ArgmaxRegionTarget()
    target.prepare(net(x).detach())
    score = ScoreModel(net, target)
    score.monitor.start(0.5)
    with pytest.raises(MethodError, match="1000 masks") as err:
        run(score, x, target=1, n_masks=1000, batch_size=10)
    assert "time limit of 0.5 s" in err.value.problem
    assert "n_masks" in str(err.value.fix) and "timeout_s" in str(err.value.fix)
    assert score.monitor.count == 1  # refused after the first batch, not at the deadline
    score.monitor.start(5.0)
    assert run(score, x, target=1, n_masks=20, batch_size=10).shape == (1, 1, *shape(2))


@pytest.mark.parametrize("params", [{"n_masks": 0}, {"keep_probability": 0.0}, {"cell_size": 0},
                                    {"batch_size": 0}])
def test_out_of_range_parameters(params: dict) -> None:
    (param,) = params
    with pytest.raises(MethodError, match=param):
        get_method("rise").resolve_params(params)


def test_cell_size_per_axis_must_match_the_dimensions() -> None:
    _, x, score = cls_setup(3)
    with pytest.raises(MethodError, match="cell_size"):
        run(score, x, cell_size=[2, 2], n_masks=2)


def test_refusals_in_a_run_are_recorded_and_the_other_methods_kept(tmp_path) -> None:
    """Too many RISE masks for the time limit, a bad extremal area: both fail with their message,
    the CAM and the small RISE of the same run are written."""
    import nibabel as nib
    import numpy as np

    from esegeta_engine.config import parse_config
    from esegeta_engine.pipeline import run as run_pipeline

    torch.manual_seed(0)
    torch.save(SlowSegNet(3, delay=0.02).state_dict(), tmp_path / "model.pt")
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32), np.eye(4)),
             tmp_path / "vol.nii.gz")
    cfg = parse_config({
        "model": {"path": "model.pt", "class_path": "tiny_models:SlowSegNet",
                  "kwargs": {"dims": 3, "delay": 0.02}},
        "volumes": ["vol.nii.gz"], "target": {"kind": "argmax", "classes": [1]},
        "methods": [{"name": "rise", "params": {"n_masks": 5000, "batch_size": 10}},
                    {"name": "extremal_perturbation", "params": {"areas": [0.1, 1.0]}},
                    {"name": "gradcam_pp", "layers": ["conv2"]},
                    {"name": "rise", "params": {"n_masks": 8, "batch_size": 4, "cell_size": 4}}],
        "run": {"timeout_s": 2.0}, "output": {"dir": "out"}}, base=tmp_path)
    records = run_pipeline(cfg).records
    assert [r["status"] for r in records] == ["failed", "failed", "ok", "ok"]
    assert "n_masks" in records[0]["error"] and "time limit" in records[0]["error"]
    assert "area 1 is outside (0, 1)" in records[1]["error"]
    assert len(list((tmp_path / "out").glob("vol__*.nii.gz"))) >= 2


@pytest.mark.parametrize("dims", [2, 3])
def test_the_map_does_not_depend_on_batch_size(dims: int) -> None:
    """Each mask is drawn from the seed and its index (issue 20): batch_size, a memory setting,
    changes neither the masks nor the map."""
    _, x, score = cls_setup(dims)
    maps = [run(score, x, seed=5, n_masks=40, cell_size=2, batch_size=bs) for bs in (1, 7, 16, 40)]
    for other in maps[1:]:
        torch.testing.assert_close(other, maps[0], rtol=1e-6, atol=1e-7)
    masks = rise_module.rise_masks(5, range(40), tuple(x.shape[2:]), (2,) * dims, 0.5)
    torch.testing.assert_close(rise_module.rise_masks(5, range(13, 20), tuple(x.shape[2:]), (2,) * dims, 0.5),
                               masks[13:20], rtol=0, atol=0)
