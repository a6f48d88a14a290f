"""Calibrated randomisation check (issue 9, part 2): the null of two seeded full
randomisations, the footprint removal, and a verdict with a reason for every method."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from esegeta_engine.evaluation import randomised_copies, run_randomisation
from esegeta_engine.evaluation.calibration import (
    calibrated_verdict,
    footprint_design,
    footprint_spearman,
    null_seeds,
    target_region,
)
from esegeta_engine.methods import Call, MethodSpec, attribute, get_method, MethodContext
from esegeta_engine.forward.scoring import ScoreModel
from test_eval_randomisation import IDENTITY, tiny_case

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("dims", [2, 3])
def test_null_is_the_similarity_of_two_seeded_full_randomisations(dims: int) -> None:
    net, x, target = tiny_case(dims)
    sal = get_method("saliency")
    result = run_randomisation(net, lambda m: ScoreModel(m, target), x, 1, [(sal, {}, None)], seed=5,
                               footprint=False)
    assert result.null_seeds == list(null_seeds(5)) and null_seeds(5) != null_seeds(6)
    maps = []
    for s in null_seeds(5):  # rebuilt here: every layer re-initialised under that seed
        *_, (_, _, full) = randomised_copies(net, result.order, "cascading", s)
        ctx = MethodContext(ScoreModel(full, target), x, 1, seed=5)
        maps.append(attribute(sal, ctx, sal.resolve_params({})).sum(1)[0].numpy())
    expected = spearmanr(np.abs(maps[0]).ravel(), np.abs(maps[1]).ravel()).statistic
    assert result.null["saliency"]["spearman_abs"] == pytest.approx(expected, abs=1e-6)
    for scores in result.scores["saliency"].values():
        assert scores["null"] == pytest.approx(expected, abs=1e-6)
        assert scores["margin"] == pytest.approx(scores["spearman_abs"] - expected, abs=1e-9)
    other = run_randomisation(net, lambda m: ScoreModel(m, target), x, 1, [(sal, {}, None)], seed=6,
                              footprint=False)
    assert other.null["saliency"]["spearman_abs"] != pytest.approx(expected, abs=1e-6)


def test_footprint_spearman_removes_a_shared_footprint() -> None:
    """Two independent noise maps, both scaled by the blurred thin region (sigma 3, not one of the
    regressors'): raw Spearman is high, the footprint-removed one is near 0; maps that share
    structure beyond the footprint keep a high correlation."""
    rng = np.random.default_rng(0)
    region = np.zeros((32, 32), bool)
    region[15:17, 4:28] = True
    from scipy.ndimage import gaussian_filter

    near = gaussian_filter(region.astype(float), 3.0) + 1e-3
    a, b = (near * np.exp(0.3 * rng.normal(size=near.shape)) for _ in range(2))
    design = footprint_design(region)
    assert spearmanr(a.ravel(), b.ravel()).statistic > 0.9
    assert abs(footprint_spearman(a, b, design)) < 0.15
    shared = rng.normal(size=near.shape)
    c, d = near * np.exp(shared), near * np.exp(shared + 0.05 * rng.random((32, 32)))
    assert footprint_spearman(c, d, design) > 0.8
    assert math.isnan(footprint_spearman(np.ones((32, 32)), d, design))
    assert math.isnan(footprint_spearman(np.full((32, 32), np.nan), d, design))


def test_region_of_the_target() -> None:
    net, x, target = tiny_case(2)
    region = target_region(target, 1, tuple(x.shape[2:]))
    assert region.shape == (1, *x.shape[2:]) and np.array_equal(region[0], target.region[0].numpy() == 1)
    assert target_region(torch.nn.Identity(), 1, (4, 4)) is None


def test_map_equal_to_the_input_fails_and_a_constant_map_has_no_verdict() -> None:
    net, x, target = tiny_case(2)
    zero = MethodSpec("zero_map", "gradient", "Zero", "all zero (test only)", (),
                      lambda ctx, p: Call(_Zero()))
    result = run_randomisation(net, lambda m: ScoreModel(m, target), x, 1,
                               [(IDENTITY, {}, None), (zero, {}, None)])
    v = result.verdicts["input_itself"]
    assert v["verdict"] == "fail" and v["null"] == pytest.approx(1.0)
    assert "does not depend on the learned weights" in v["reason"]
    z = result.verdicts["zero_map"]
    assert z["passes"] is None and z["reason"].startswith("map is constant: no verdict")


class _Zero:
    def attribute(self, inputs: torch.Tensor, target: int | None = None) -> torch.Tensor:
        return torch.zeros_like(inputs)


def test_verdict_rules() -> None:
    ok = calibrated_verdict([0.2, 0.3], 0.1, measure="m", threshold=0.5, stages=[2, 3], constant=False)
    assert ok["verdict"] == "pass" and ok["margin"] == pytest.approx(0.15) and "null 0.10" in ok["reason"]
    bad = calibrated_verdict([0.7, 0.8], 0.1, measure="m", threshold=0.5, stages=[2, 3], constant=False)
    assert bad["verdict"] == "fail" and "stays close" in bad["reason"]
    nan = calibrated_verdict([math.nan, 0.2], 0.1, measure="m", threshold=0.5, stages=[2, 3],
                             constant=False, failed=1)
    assert nan["verdict"] == "pass" and "1 stage(s) undefined" in nan["reason"]
    none = calibrated_verdict([math.nan], math.nan, measure="m", threshold=0.5, stages=[2],
                              constant=False, failed=1)
    assert none["passes"] is None and "failed or gave non-finite" in none["reason"]


def test_nan_in_a_stage_map_is_undefined_not_fatal() -> None:
    net, x, target = tiny_case(2)
    runs = {"n": 0}

    class Sometimes:
        def attribute(self, inputs: torch.Tensor, target: int | None = None) -> torch.Tensor:
            runs["n"] += 1
            out = inputs.clone() * (1 + runs["n"] * torch.rand_like(inputs))
            if runs["n"] == 3:
                out[..., 0, 0] = float("nan")
            return out

    spec = MethodSpec("sometimes_nan", "gradient", "NaN once", "test only", (), lambda c, p: Call(Sometimes()))
    result = run_randomisation(net, lambda m: ScoreModel(m, target), x, 1, [(spec, {}, None)],
                               mode="independent")
    stage = result.stages[1]
    assert math.isnan(result.scores["sometimes_nan"][stage]["spearman_footprint"])
    assert result.verdicts["sometimes_nan"]["verdict"] in ("pass", "fail")
    assert "1 stage(s) undefined" in result.verdicts["sometimes_nan"]["reason"]


@pytest.mark.slow
def test_sample_unet_vessel_class_published_pattern() -> None:
    """On the bundled U-Net's thin vessel class the raw check fails saliency (footprint), the
    footprint-removed one passes saliency and Grad-CAM, and guided backprop stays closer to the
    trained map than saliency at every stage (Adebayo et al. 2018, Fig. 2)."""
    sample = pytest.importorskip("esegeta_engine.sample")
    from esegeta_engine.targets import ArgmaxRegionTarget

    net = sample.load_sample_unet()
    vol = sample.minmax_normalise(sample.make_phantom((32,) * 3, seed=7).volume)
    x = torch.from_numpy(vol)[None, None].float()
    target = ArgmaxRegionTarget()
    with torch.no_grad():
        target.prepare(net(x))
    assert float((target.region == 1).float().mean()) < 0.1  # a thin region
    methods = [(get_method("saliency"), {}, None), (get_method("guided_backprop"), {}, None),
               (get_method("layer_gradcam"), {}, "ups.0.block.conv2")]
    result = run_randomisation(net, lambda m: ScoreModel(m, target), x, 1, methods)
    assert result.errors == [] and result.footprint
    assert result.verdicts["saliency"]["verdict"] == "pass"
    assert result.verdicts["layer_gradcam@ups.0.block.conv2"]["verdict"] == "pass"
    skip = len(result.stages) // 3
    raw = [result.scores["saliency"][s]["spearman_abs"] for s in result.stages[skip:]]
    flipped = calibrated_verdict(raw, result.null["saliency"]["spearman_abs"], measure="spearman_abs",
                                 threshold=0.5, stages=list(range(skip + 1, len(result.stages) + 1)),
                                 constant=False)
    assert flipped["verdict"] == "fail"  # without the footprint removal
    for s in result.stages:
        assert result.scores["guided_backprop"][s]["spearman_abs"] >= result.scores["saliency"][s]["spearman_abs"]


def _regressors(region, sigmas=(1.0, 2.0, 4.0, 8.0), bins=16):
    """Every voxel's regressors, written out (intercept, region, quantile-bin indicators per scale)."""
    from scipy.ndimage import gaussian_filter
    from scipy.stats import rankdata

    r = region.astype(np.float64)
    cols = [np.ones(r.size), r.ravel()]
    for s in sigmas:
        ranks = rankdata(gaussian_filter(r, s, mode="nearest").ravel(), method="min")
        edges = np.unique(np.quantile(ranks, np.linspace(0, 1, bins + 1)[1:-1]))
        which = np.searchsorted(edges, ranks, side="right")
        cols += [(which == k).astype(np.float64) for k in range(1, int(which.max()) + 1)]
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("shape", [(40, 36), (20, 18, 14)])
def test_footprint_design_is_an_orthonormal_basis_of_every_voxels_regressors(shape) -> None:
    """Built from the distinct regressor rows (weighted by their counts), the design has orthonormal columns
    spanning exactly the regressors of every voxel — also where bins of two scales coincide (a blob: the
    first QR-with-dropped-columns version lost directions there, a residual of 0.3)."""
    rng = np.random.default_rng(1)
    for region in (rng.random(shape) > 0.9, np.zeros(shape, bool), _blob(shape)):
        design, a = footprint_design(region), _regressors(region)
        assert design.shape == (region.size, np.linalg.matrix_rank(a))
        np.testing.assert_allclose(design.T @ design, np.eye(design.shape[1]), atol=1e-10)
        np.testing.assert_allclose(design @ (design.T @ a), a, atol=1e-9)  # every regressor inside the span


def _blob(shape):
    grid = np.indices(shape).astype(float)
    centre = np.array(shape, float)[(slice(None),) + (None,) * len(shape)] / 2
    return ((grid - centre) ** 2).sum(0) < (min(shape) / 4) ** 2


def test_footprint_design_stops_at_the_cancel_check_between_its_steps() -> None:
    from esegeta_engine.errors import Cancelled

    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 2:  # the click during the first blur scale
            raise Cancelled("cancelled")

    with pytest.raises(Cancelled):
        footprint_design(_blob((20, 18, 14)), check=check)
    assert len(calls) == 2  # nothing after the check that saw the cancel
    full: list[int] = []
    footprint_design(_blob((20, 18, 14)), check=lambda: full.append(1))
    assert len(full) == 5  # before each of the four scales and before the decomposition
