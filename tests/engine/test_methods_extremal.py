"""Extremal perturbation: the 2D/3D matrix, its cost, area and score on an analytic model, bad areas."""

from __future__ import annotations

import pytest
import torch

from esegeta_engine.errors import MethodError
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.methods.extremal import ExtremalPerturbation
from esegeta_engine.methods.registry import CostInfo
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ArgmaxRegionTarget
from extra_models import region_setup
from tiny_models import TinySegNet, assert_untouched, cls_setup, seg_setup, shape

EXACT = {"cell_size": 1, "baseline": "zero", "steps": 100}


def run(score: torch.nn.Module, x: torch.Tensor, target: int = 0, **params) -> torch.Tensor:
    spec = get_method("extremal_perturbation")
    return attribute(spec, MethodContext(score, x, target), spec.resolve_params(params))


def masks(score: torch.nn.Module, x: torch.Tensor, target: int = 0, **params) -> torch.Tensor:
    """The per-area masks ``(areas, N, 1, *spatial)`` of one run."""
    spec = get_method("extremal_perturbation")
    algorithm = spec.build(MethodContext(score, x, target), spec.resolve_params(params)).algorithm
    assert isinstance(algorithm, ExtremalPerturbation)
    result = algorithm.attribute(x, target=target)
    assert algorithm.masks is not None
    torch.testing.assert_close(result, algorithm.masks.sum(0))  # the map is the sum over areas
    return algorithm.masks


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
@pytest.mark.parametrize("dims", [2, 3])
def test_matrix_and_cost(dims: int, kind: str) -> None:
    net, x, score = (seg_setup if kind == "segmentation" else cls_setup)(dims)
    target = 1 if kind == "segmentation" else 0
    state = {k: v.clone() for k, v in net.state_dict().items()}
    params = {"steps": 6, "areas": [0.1, 0.3], "cell_size": 2, "smoothing": 0.5}
    score.monitor.start(None)
    result = run(score, x, target, **params)
    assert result.shape == (1, 1, *shape(dims)) and result.dtype == torch.float32
    assert bool(torch.isfinite(result).all()) and bool(result.abs().sum() > 0)
    assert_untouched(net, state)
    spec = get_method("extremal_perturbation")
    assert spec.family == "perturbation" and spec.patchwise == "gradient"
    assert spec.cost(CostInfo(1, 1, shape(dims)), spec.resolve_params(params)) == 7 == score.monitor.count


@pytest.mark.parametrize("dims", [2, 3])
def test_preserving_mask_has_the_area_and_keeps_the_score(dims: int) -> None:
    region, x, score = region_setup(dims)
    area = float(region.float().mean())
    m = masks(score, x, areas=area, **EXACT)[0]
    assert abs(float(m.mean()) - area) < 0.02
    assert abs(float((m > 0.5).float().mean()) - area) < 0.02
    with torch.no_grad():
        kept = score(x * m)[0, 0] / score(x)[0, 0]
    assert float(kept) > 0.95
    assert float(m[0, 0][region].mean()) > 0.95  # the mask is the scored region


@pytest.mark.parametrize("dims", [2, 3])
def test_several_areas_are_each_met(dims: int) -> None:
    region, x, score = region_setup(dims)
    areas = (0.05, 0.2, 0.4)
    m = masks(score, x, areas=list(areas), **EXACT)
    for mask, area in zip(m, areas):
        assert abs(float(mask.mean()) - area) < 0.02
    with torch.no_grad():  # larger areas keep more of the score
        kept = [float(score(x * mask)[0, 0]) for mask in m]
    assert kept[0] < kept[1] <= kept[2] + 1e-3


def test_deletion_mask_removes_the_score() -> None:
    region, x, score = region_setup(3)
    area = float(region.float().mean())
    m = masks(score, x, areas=area, mode="delete", **EXACT)[0]
    assert abs(float(m.mean()) - area) < 0.02
    with torch.no_grad():
        left = score(x * (1 - m))[0, 0] / score(x)[0, 0]
    assert float(left) < 0.05


def test_a_batch_of_inputs_equals_each_alone() -> None:
    torch.manual_seed(1)
    net = TinySegNet(2).eval()
    x = torch.randn(2, 1, *shape(2))
    target = ArgmaxRegionTarget()
    target.prepare(net(x).detach())
    params = {"steps": 8, "areas": [0.1, 0.25], "cell_size": 2}
    together = run(ScoreModel(net, target), x, target=1, **params)
    for i in range(2):
        alone_target = ArgmaxRegionTarget()
        alone_target.prepare(net(x[i:i + 1]).detach())
        alone = run(ScoreModel(net, alone_target), x[i:i + 1], target=1, **params)
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("areas, problem", [(1.0, "outside (0, 1)"), (0, "outside (0, 1)"),
                                            ([0.1, 0.0], "outside (0, 1)"), (0.001, "selects 0 voxels")])
def test_bad_areas_are_refused(areas, problem: str) -> None:  # noqa: ANN001
    _, x, score = cls_setup(2)
    with pytest.raises(MethodError, match="area") as err:
        run(score, x, areas=areas, steps=1)
    assert problem in err.value.problem
    assert "between 0 and 1" in str(err.value.fix)


@pytest.mark.parametrize("areas", [1.5, -0.2, [0.1, 2], "ten", True])
def test_areas_outside_the_parameter_range_are_refused(areas) -> None:  # noqa: ANN001
    with pytest.raises(MethodError, match="areas") as err:
        get_method("extremal_perturbation").resolve_params({"areas": areas})
    assert "[0, 1]" in str(err.value.fix)


@pytest.mark.parametrize("params", [{"steps": 0}, {"mode": "keep"}, {"learning_rate": 0.0},
                                    {"cell_size": 0}, {"baseline": "noise"}])
def test_out_of_range_parameters(params: dict) -> None:
    (param,) = params
    with pytest.raises(MethodError, match=param):
        get_method("extremal_perturbation").resolve_params(params)
