"""Perturbation methods: the 2D/3D method matrix and analytic checks on linear models."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from esegeta_engine.errors import MethodError
from esegeta_engine.methods import MethodContext, attribute, get_method, list_methods
from esegeta_engine.methods._common import feature_mask
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ArgmaxRegionTarget, ClassificationTarget

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import LinearScore, TinyClassifier, TinySegNet  # noqa: E402

METHODS = ("occlusion", "feature_ablation", "shapley_value_sampling", "feature_permutation",
           "kernel_shap", "lime")
MASKED = METHODS[1:]
GRID = {"mask": "grid", "grid_size": 4}
SIZE = 8


def shape(dims: int) -> tuple[int, ...]:
    return (SIZE,) * dims


def seg_context(dims: int, n: int = 1, seed: int = 0) -> MethodContext:
    """TinySegNet + frozen argmax region, explaining class 1 (present, not everywhere, in every input)."""
    torch.manual_seed(seed)
    net = TinySegNet(dims).eval()
    x = torch.rand(n, 1, *shape(dims))
    with torch.no_grad():  # shift the class-1 logit so that about half the voxels are class 1
        out = net(x)
        diff = (out[:, 1] - out[:, 0]).flatten().sort().values
        half = len(diff) // 2
        net.head.bias[1] -= (diff[half - 1] + diff[half]) / 2
        out = net(x)
    assert (out[:, 1] - out[:, 0]).abs().min() > 1e-5, "no argmax ties (batch-size rounding)"
    fraction = (out.argmax(1) == 1).flatten(1).float().mean(1)
    assert ((fraction > 0) & (fraction < 1)).all(), "class 1 must be present, and not everywhere"
    target = ArgmaxRegionTarget()
    target.prepare(out)
    return MethodContext(ScoreModel(net, target), x, target=1, seed=0)


def cls_context(dims: int, n: int = 1, seed: int = 0) -> MethodContext:
    torch.manual_seed(seed)
    net = TinyClassifier(dims).eval()
    x = torch.rand(n, 1, *shape(dims))
    return MethodContext(ScoreModel(net, ClassificationTarget()), x, target=0, seed=0)


def linear_context(dims: int, n: int = 1, target: int = 1,
                   seed: int = 0) -> tuple[MethodContext, LinearScore]:
    torch.manual_seed(seed + 100)
    model = LinearScore((1, *shape(dims)), seed=seed).eval()
    x = torch.rand(n, 1, *shape(dims)) + 0.5
    return MethodContext(ScoreModel(model, ClassificationTarget()), x, target=target, seed=0), model


def run(ctx: MethodContext, name: str, **given) -> torch.Tensor:
    spec = get_method(name)
    with torch.no_grad():
        return attribute(spec, ctx, spec.resolve_params(given))


def matrix_params(name: str) -> dict:
    if name == "occlusion":
        return {"window": 4, "stride": 2}
    params = dict(GRID)
    if name == "shapley_value_sampling":
        params["n_samples"] = 2
    if name in ("kernel_shap", "lime"):
        params["n_samples"] = 32
    return params


def group_sums(contrib: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-voxel sum of ``contrib`` over its group; ``contrib`` (N, 1, *s), mask (N or 1, 1, *s)."""
    mask = mask.expand_as(contrib)
    out = torch.zeros_like(contrib)
    for i in range(contrib.shape[0]):
        for g in mask[i].unique():
            sel = mask[i] == g
            out[i][sel] = contrib[i][sel].sum()
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


# --- registry --------------------------------------------------------------------------------


def test_all_registered_with_typed_params() -> None:
    specs = {s.name: s for s in list_methods("perturbation")}
    assert set(METHODS) <= set(specs)
    for name in METHODS:
        spec = specs[name]
        assert spec.summary and spec.reference
        for p in spec.params:
            assert p.help and "\n" not in p.help
        spec.resolve_params({})  # defaults validate
        assert spec.param("perturbations_per_eval").minimum == 1
    for name in MASKED:
        assert {"mask", "n_segments", "compactness", "grid_size"} <= {p.name for p in specs[name].params}
    assert specs["feature_permutation"].needs_batch
    assert "batch" in specs["feature_permutation"].summary
    assert specs["kernel_shap"].param("n_samples").default == 128
    assert specs["shapley_value_sampling"].param("n_samples").default == 8


# --- method matrix ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", METHODS)
def test_matrix(name: str, dims: int, kind: str) -> None:
    n = 3 if name == "feature_permutation" else 1
    ctx = (seg_context if kind == "segmentation" else cls_context)(dims, n=n)
    attr = run(ctx, name, **matrix_params(name))
    assert attr.shape == ctx.inputs.shape
    assert torch.isfinite(attr).all()
    assert attr.abs().sum() > 0


@pytest.mark.parametrize("name", MASKED)
def test_slic_mask_3d(name: str) -> None:
    ctx = seg_context(3, n=2 if name == "feature_permutation" else 1)
    params = {"mask": "slic", "n_segments": 8, "compactness": 1.0}
    if name != "feature_ablation" and name != "feature_permutation":
        params["n_samples"] = 16
    attr = run(ctx, name, **params)
    assert attr.shape == ctx.inputs.shape
    assert torch.isfinite(attr).all() and attr.abs().sum() > 0


def test_kernel_shap_needs_two_supervoxels() -> None:
    with pytest.raises(MethodError, match="2 supervoxels"):
        run(cls_context(2), "kernel_shap", mask="grid", grid_size=8)


def test_feature_permutation_needs_a_batch() -> None:
    with pytest.raises(MethodError, match="feature_permutation"):
        run(seg_context(2, n=1), "feature_permutation", **GRID)


# --- occlusion -------------------------------------------------------------------------------


@pytest.mark.parametrize("dims,window", [(2, (4, 2)), (3, (2, 4, 4)), (3, 4)])
def test_occlusion_equals_window_sums(dims: int, window) -> None:
    ctx, model = linear_context(dims)
    attr = run(ctx, "occlusion", window=window, baseline="zero", perturbations_per_eval=3)
    win = window if isinstance(window, tuple) else (window,) * dims
    contrib = model.weight[ctx.target].detach() * ctx.inputs
    pool = F.avg_pool2d if dims == 2 else F.avg_pool3d
    sums = pool(contrib, win, stride=win) * torch.tensor(win).prod()
    for axis, w in enumerate(win):
        sums = sums.repeat_interleave(w, dim=2 + axis)
    torch.testing.assert_close(attr, sums, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_occlusion_overlapping_windows_average(dims: int) -> None:
    ctx, model = linear_context(dims)
    window, stride = 4, 2
    attr = run(ctx, "occlusion", window=window, stride=stride, baseline="zero")
    contrib = (model.weight[ctx.target].detach() * ctx.inputs)[0, 0]
    total = torch.zeros_like(contrib)
    count = torch.zeros_like(contrib)
    for start in itertools.product(range(0, SIZE - window + 1, stride), repeat=dims):
        box = tuple(slice(s, s + window) for s in start)
        total[box] += contrib[box].sum()
        count[box] += 1
    assert (count > 0).all()
    torch.testing.assert_close(attr[0, 0], total / count, atol=1e-4, rtol=1e-4)


def test_occlusion_baseline_is_the_replacement_value() -> None:
    ctx, model = linear_context(2)
    attr = run(ctx, "occlusion", window=8, baseline="mean")
    x = ctx.inputs
    expected = (model.weight[ctx.target].detach() * (x - x.mean())).sum()
    torch.testing.assert_close(attr, expected.expand_as(x), atol=1e-4, rtol=1e-4)


def test_occlusion_window_larger_than_volume() -> None:
    ctx, _ = linear_context(3)
    with pytest.raises(MethodError, match="window") as err:
        run(ctx, "occlusion", window=[4, 4, 9])
    assert "8, 8, 8" in str(err.value)
    with pytest.raises(MethodError, match="window"):
        run(ctx, "occlusion", window=[4, 4])
    with pytest.raises(MethodError, match="stride"):
        run(ctx, "occlusion", window=2, stride=3)


# --- supervoxel methods on linear models -----------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("baseline", ["zero", "mean"])
def test_feature_ablation_equals_group_sums(dims: int, baseline: str) -> None:
    ctx, model = linear_context(dims, n=2)
    attr = run(ctx, "feature_ablation", baseline=baseline, **GRID)
    x = ctx.inputs
    ref = torch.zeros_like(x) if baseline == "zero" else x.mean(dim=(1, 2, 3, 4)[:dims + 1], keepdim=True)
    contrib = model.weight[ctx.target].detach() * (x - ref)
    torch.testing.assert_close(attr, group_sums(contrib, feature_mask(x, GRID)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mask", ["grid", "slic"])
def test_feature_ablation_evaluations_bounded_by_supervoxels(mask: str) -> None:
    ctx, _ = linear_context(3)
    params = {**GRID, "mask": mask, "n_segments": 12}
    n_groups = int(feature_mask(ctx.inputs, params).max()) + 1
    assert n_groups < ctx.inputs[0].numel() / 10
    ctx.score_model.monitor.start(None)
    run(ctx, "feature_ablation", perturbations_per_eval=1, **params)
    assert ctx.score_model.monitor.count == n_groups + 1


@pytest.mark.parametrize("dims", [2, 3])
def test_shapley_sampling_exact_on_additive_model(dims: int) -> None:
    ctx, model = linear_context(dims)
    attr = run(ctx, "shapley_value_sampling", n_samples=3, **GRID)
    contrib = model.weight[ctx.target].detach() * ctx.inputs
    torch.testing.assert_close(attr, group_sums(contrib, feature_mask(ctx.inputs, GRID)),
                               atol=1e-4, rtol=1e-4)


def test_kernel_shap_approximates_group_sums() -> None:
    ctx, model = linear_context(2, n=2)  # 8x8 with 4x4 blocks: 4 groups
    attr = run(ctx, "kernel_shap", n_samples=64, **GRID)
    expected = group_sums(model.weight[ctx.target].detach() * ctx.inputs, feature_mask(ctx.inputs, GRID))
    assert torch.allclose(attr, expected, atol=0.05 * float(expected.abs().max()), rtol=0.05)
    corr = torch.corrcoef(torch.stack([attr.flatten(), expected.flatten()]))[0, 1]
    assert corr > 0.99


def test_lime_rank_correlates_with_group_sums() -> None:
    ctx, model = linear_context(2)
    params = {"mask": "grid", "grid_size": 2}  # 16 groups
    attr = run(ctx, "lime", n_samples=128, **params)
    mask = feature_mask(ctx.inputs, params)[0, 0]
    expected = group_sums(model.weight[ctx.target].detach() * ctx.inputs, mask[None, None])[0, 0]
    first = torch.stack([(mask == g).nonzero()[0] for g in range(int(mask.max()) + 1)])
    pick = tuple(first.T)
    assert spearman(attr[0, 0][pick], expected[pick]) > 0.8


def test_per_example_methods_do_not_depend_on_the_batch() -> None:
    batch = seg_context(2, n=2)
    for name in ("kernel_shap", "lime"):
        together = run(batch, name, n_samples=24, **GRID)
        for i in range(2):
            net = batch.score_model.net.model
            target = ArgmaxRegionTarget()
            target.prepare(net(batch.inputs[i:i + 1]).detach())
            alone = MethodContext(ScoreModel(net, target), batch.inputs[i:i + 1], target=1, seed=0)
            torch.testing.assert_close(together[i:i + 1], run(alone, name, n_samples=24, **GRID))


def test_feature_permutation_two_inputs_is_exact() -> None:
    ctx, model = linear_context(2, n=2)
    attr = run(ctx, "feature_permutation", **GRID)
    x = ctx.inputs
    w = model.weight[ctx.target].detach()
    expected = group_sums(w * (x - x.flip(0)), feature_mask(x, GRID))  # the only shuffle of two swaps them
    torch.testing.assert_close(attr, expected, atol=1e-4, rtol=1e-4)


def test_feature_permutation_three_inputs_matches_a_permutation() -> None:
    ctx, model = linear_context(2, n=3)
    with torch.no_grad():
        model.weight[ctx.target, :, :4, :4] = 0  # group 0 has zero weight
    attr = run(ctx, "feature_permutation", perturbations_per_eval=2, **GRID)
    x = ctx.inputs
    mask = feature_mask(x, GRID)[0, 0]
    sums = (model.weight[ctx.target].detach() * x)[:, 0]
    assert (attr[:, :, :4, :4] == 0).all()
    identity = (0, 1, 2)
    for g in range(int(mask.max()) + 1):
        s = sums[:, mask == g].sum(-1)
        got = attr[:, 0][:, mask == g][:, 0]
        assert any(torch.allclose(got, s - s[list(p)], atol=1e-4)
                   for p in itertools.permutations(range(3)) if p != identity)


@pytest.mark.parametrize("name", ["shapley_value_sampling", "feature_permutation", "kernel_shap", "lime"])
def test_sampling_is_seeded_and_leaves_global_rng_alone(name: str) -> None:
    ctx = cls_context(2, n=3 if name == "feature_permutation" else 1)
    params = {**GRID, "grid_size": 2}
    if name != "feature_permutation":
        params["n_samples"] = 8
    torch.manual_seed(123)
    first = run(ctx, name, **params)
    after = torch.rand(3)
    torch.manual_seed(123)
    second = run(ctx, name, **params)
    torch.manual_seed(123)
    torch.testing.assert_close(after, torch.rand(3))
    torch.testing.assert_close(first, second)
