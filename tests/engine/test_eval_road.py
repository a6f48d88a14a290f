"""ROAD and region perturbation against closed forms on linear models, 2D and 3D, and the patch reuse."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from esegeta_engine.evaluation.road import noisy_linear_imputation, region_perturbation, road, supervoxels

from tiny_models import LinearScore

SHAPES = {2: (6, 7), 3: (5, 4, 6)}


def dense_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Independent: one equation per removed voxel, written voxel by voxel, solved densely."""
    spatial = removed.shape
    nd = len(spatial)
    unknown = [tuple(int(i) for i in v) for v in np.argwhere(removed)]
    where = {v: i for i, v in enumerate(unknown)}
    out = image.astype(np.float64).copy()
    for ch in range(image.shape[0]):
        a = np.eye(len(unknown))
        b = np.zeros(len(unknown))
        for i, v in enumerate(unknown):
            nbs = []
            for off in itertools.product((-1, 0, 1), repeat=nd):
                nz = sum(o != 0 for o in off)
                if nz not in (1, 2):
                    continue
                u = tuple(p + o for p, o in zip(v, off))
                if all(0 <= p < s for p, s in zip(u, spatial)):
                    nbs.append((u, 1.0 if nz == 1 else 0.5))
            total = sum(w for _, w in nbs)
            for u, w in nbs:
                if u in where:
                    a[i, where[u]] -= w / total
                else:
                    b[i] += w / total * image[ch][u]
        sol = np.linalg.solve(a, b)
        for i, v in enumerate(unknown):
            out[ch][v] = sol[i]
    return out


@pytest.mark.parametrize("dims", [2, 3])
def test_imputation_equals_an_independent_dense_solve(dims):
    rng = np.random.default_rng(dims)
    image = rng.normal(size=(2, *SHAPES[dims]))
    removed = rng.random(SHAPES[dims]) < 0.4
    got = noisy_linear_imputation(image, removed, noise=0.0)
    assert np.allclose(got, dense_imputation(image, removed), atol=1e-9)
    assert np.array_equal(got[:, ~removed], image[:, ~removed])


@pytest.mark.parametrize("dims", [2, 3])
def test_imputation_reproduces_a_linear_ramp_inside(dims):
    grids = np.meshgrid(*[np.arange(s, dtype=float) for s in SHAPES[dims]], indexing="ij")
    ramp = sum((k + 1) * g for k, g in enumerate(grids))[None]
    removed = np.zeros(SHAPES[dims], bool)
    removed[(slice(1, -1),) * dims] = True  # the whole interior: neighbours are symmetric there
    assert np.allclose(noisy_linear_imputation(ramp, removed, noise=0.0), ramp, atol=1e-9)


@pytest.mark.parametrize("dims", [2, 3])
def test_road_equals_its_closed_form_on_a_linear_model(dims):
    model = LinearScore(SHAPES[dims], classes=2, seed=dims).eval()
    x = torch.randn(1, 1, *SHAPES[dims], generator=torch.Generator().manual_seed(5))
    w = model.weight.detach()[1]
    attr = (w * x[0, 0])[None, None]
    pcts = (0.2, 0.5, 0.8)
    res = road(model, x, attr, 1, percentages=pcts, noise=0.0)
    f = lambda img: float((w.double() * torch.from_numpy(img[0])).sum() + model.bias[1])  # noqa: E731
    image = x[0].double().numpy()
    order = np.argsort(-attr.reshape(-1).numpy(), kind="stable")
    n = order.size
    for direction, ranked in (("morf", order), ("lerf", order[::-1])):
        expected = []
        for p in pcts:
            removed = np.zeros(n, bool)
            removed[ranked[: int(round(p * n))]] = True
            expected.append(f(dense_imputation(image, removed.reshape(SHAPES[dims]))))
        assert np.allclose(res[f"road_curve_{direction}"], expected, atol=1e-4)
    base = float(model(x)[0, 1])
    assert np.isclose(res["road_score"], base, atol=1e-5)
    assert np.isclose(res["road_morf"], np.mean(res["road_curve_morf"]) / base)
    assert res["road_curve_morf"] != res["road_curve_lerf"]


@pytest.mark.parametrize("dims", [2, 3])
def test_region_perturbation_equals_its_closed_form_on_a_linear_model(dims):
    shape = {2: (8, 6), 3: (4, 6, 4)}[dims]
    model = LinearScore(shape, classes=2, seed=dims).eval()
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(2))
    w = model.weight.detach()[0]
    attr = (w * x[0, 0])[None, None]
    res = region_perturbation(model, x, attr, 0, region=2, steps=5, perturbation="zero")
    # closed form: zeroing block j lowers f by sum over the block of w * x; blocks ranked by that sum
    labels = supervoxels(shape, 2)
    block = np.array([float(attr[0, 0].numpy()[labels == j].sum()) for j in range(labels.max() + 1)])
    top = np.sort(block)[::-1][:5]
    drops = np.concatenate([[0.0], np.cumsum(top)])
    assert np.allclose([res["region_curve"][0] - v for v in res["region_curve"]], drops, atol=1e-4)
    assert np.isclose(res["region_aopc"], drops.mean(), atol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_perturbed_copies_reuse_the_unperturbed_patches(dims):
    from esegeta_engine.config import ExecutionConfig
    from esegeta_engine.explain import Explainer
    from esegeta_engine.targets import ArgmaxRegionTarget

    from tiny_models import TinySegNet

    torch.manual_seed(0)
    net = TinySegNet(dims).eval()
    shape = {2: (24, 20), 3: (16, 12, 12)}[dims]
    x = torch.randn(1, 1, *shape)
    target = ArgmaxRegionTarget()
    ex = Explainer(net, execution=ExecutionConfig(patch_size=[8] * dims, mode="sliding_window"))
    target.prepare(ex.raw_output(x))
    attr = torch.zeros_like(x)
    attr[(0, 0, *(slice(0, 4),) * dims)] = 1.0  # the relevance sits in one corner
    sm = ex.make_score_model(target, x)
    res = region_perturbation(sm, x, attr, 1, region=4, steps=3)
    reused = sm.runner.patch_evaluations
    full = ex.make_score_model(target, x)
    full.runner.set_base(None)
    copies_scores = [float(full(c)[0, 1]) for c in _copies(x, res, shape)]
    assert np.allclose(res["region_curve"], copies_scores, atol=1e-5)
    n_patches = len(full.runner.grid(shape, x.device))
    assert full.runner.patch_evaluations == n_patches * 4
    assert reused < full.runner.patch_evaluations


def _copies(x, res, shape):
    """The region-perturbation copies rebuilt from the ranked ids with the same seeded noise."""
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(supervoxels(shape, res["region_size"]))
    lo, hi = float(x.min()), float(x.max())
    cur = x.clone()
    out = [x]
    for rid in res["region_ranked"]:
        inside = labels == rid
        cur = cur.clone()
        cur[0][:, inside] = torch.from_numpy(rng.uniform(lo, hi, size=(1, int(inside.sum())))).float()
        out.append(cur)
    return out
