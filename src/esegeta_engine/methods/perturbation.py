"""Perturbation methods: Captum's occlusion, ablation and sampling explainers.

Every method here changes parts of the input and watches the score move, so
its cost is counted in model evaluations. All but Occlusion perturb
supervoxels from :func:`~esegeta_engine.methods._common.feature_mask` (SLIC or
a grid), shared by all input channels, so the cost grows with the number of
supervoxels, never with the number of voxels. Methods that sample run under
``ctx.seed`` without disturbing the global random state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from captum._utils.models.linear_model import LinearModel
from captum.attr import (
    FeatureAblation,
    FeaturePermutation,
    KernelShap,
    Lime,
    Occlusion,
    ShapleyValueSampling,
)
from captum.attr._core.lime import get_exp_kernel_similarity_function

from esegeta_engine.errors import MethodError
from esegeta_engine.methods import costs
from esegeta_engine.methods._common import BASELINE_PARAM, MASK_PARAMS, feature_mask, make_baseline
from esegeta_engine.methods.notes import add_note, notes_of
from esegeta_engine.methods.reach import Reached, reach_filter
from esegeta_engine.methods.registry import Attributor, Call, MethodContext, MethodSpec, Param, register

PPE_PARAM = Param("perturbations_per_eval", "int", 4,
                  "perturbed copies per model evaluation (higher: fewer, larger batches; more memory)",
                  minimum=1, maximum=4096)


def _samples_param(default: int, what: str) -> Param:
    return Param("n_samples", "int", default, what, minimum=1, maximum=1_000_000)


def _baselines(ctx: MethodContext, params: Mapping[str, Any]) -> torch.Tensor:
    return make_baseline(ctx.inputs.detach(), params["baseline"])


class Seeded:
    """Run an attributor under ``seed``, restoring the global CPU random state after.

    Captum's samplers draw from torch's global CPU generator; forking it keeps
    runs reproducible without changing the caller's random stream.
    """

    def __init__(self, algorithm: Attributor, seed: int) -> None:
        self.algorithm = algorithm
        self.seed = seed

    def attribute(self, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped ``attribute`` with the generator seeded."""
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(int(self.seed))
            return self.algorithm.attribute(inputs, *args, **kwargs)


class PerExample:
    """Explain a batch one example at a time (Captum's Lime and KernelShap).

    Each example gets a fresh algorithm from ``make(forward)`` and the same
    seed, so its map does not depend on the rest of the batch. Perturbed copies
    of example ``i`` are evaluated inside a copy of the whole batch at
    position ``i`` (input-major, as Captum stacks them), so score models that
    freeze per-input state from the unperturbed batch (target regions) see
    each copy at its own position; this costs ``N`` times the compute for
    ``N > 1`` and nothing extra for a single input.

    Parameters
    ----------
    make : callable
        ``make(forward_func) -> Captum algorithm``.
    forward : callable
        The score model ``(N, C, *spatial) -> (N, K)``.
    seed : int
        Seed for every example's sampling.
    """

    def __init__(self, make: Callable[[Callable], Attributor], forward: Callable, seed: int) -> None:
        self.make = make
        self.forward = forward
        self.seed = seed

    def _forward_at(self, inputs: torch.Tensor, i: int) -> Callable:
        n = inputs.shape[0]
        if n == 1:
            return self.forward
        base = inputs.detach()

        def forward(x: torch.Tensor) -> torch.Tensor:
            full = base.repeat(x.shape[0], *([1] * (base.dim() - 1)))
            full[i::n] = x
            return self.forward(full)[i::n]

        return forward

    def attribute(self, inputs: torch.Tensor, target: Any = None, *, baselines: torch.Tensor,
                  feature_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Attribute each example of ``inputs`` and concatenate the maps."""
        maps = []
        for i in range(inputs.shape[0]):
            algorithm = Seeded(self.make(self._forward_at(inputs, i)), self.seed)
            maps.append(algorithm.attribute(inputs[i:i + 1], target=target, baselines=baselines[i:i + 1],
                                            feature_mask=feature_mask[i:i + 1], **kwargs))
        return torch.cat(maps)


def fit_least_squares(model: LinearModel, dataloader: Any, construct_kwargs: dict, **_: Any) -> dict:
    """Weighted least squares with intercept, in closed form (a Captum ``train_fn``).

    The interpretable model of KernelSHAP (Captum's choice is scikit-learn's
    ``LinearRegression``, the same estimator) and of LIME, whatever is
    installed. Solved in float64 on the CPU, minimum-norm when the sampled
    design is rank deficient.
    """
    xs, ys, ws = [], [], []
    for batch in dataloader:
        xs.append(batch[0])
        ys.append(batch[1])
        ws.append(batch[2] if len(batch) > 2 else torch.ones(len(batch[0])))
    x = torch.cat(xs).double().cpu()
    y = torch.cat(ys).double().cpu().reshape(len(x), -1)
    root_w = torch.cat(ws).double().cpu().reshape(-1, 1).clamp_min(0).sqrt()
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(design * root_w, y * root_w, driver="gelsd").solution
    device = xs[0].device
    model._construct_model_params(weight_values=solution[:-1].T.float().to(device),
                                  bias_value=solution[-1].float().to(device), **construct_kwargs)
    return {}


def _lime_model() -> LinearModel:
    """LIME's interpretable model: weighted least squares, chosen once for every environment.

    Captum's default is scikit-learn's Lasso (alpha 1.0) when scikit-learn is
    importable, which shrinks every coefficient to zero for scores of the size
    a segmentation target gives, and something else without it. Unregularised
    weighted least squares (the kernel weights of LIME) is the estimator of
    Ribeiro et al. 2016's K-LASSO without its feature cap, keeps every
    supervoxel, and does not depend on which packages happen to be installed.
    """
    return LinearModel(train_fn=fit_least_squares)


def _spatial(value: Any, ctx: MethodContext, name: str) -> tuple[int, ...]:
    dims = ctx.spatial_dims
    sizes = value if isinstance(value, tuple) else (value,) * dims
    if len(sizes) != dims:
        raise MethodError(f"parameter '{name}' has {len(sizes)} entries for {dims} spatial axes",
                          f"give one value or {dims} values")
    return sizes


def _build_occlusion(ctx: MethodContext, params: Mapping[str, Any]) -> Call:
    """Occlusion with boxes ``(C_in, *window)`` moved by ``(C_in, *stride)``."""
    window = _spatial(params["window"], ctx, "window")
    stride = window if params["stride"] is None else _spatial(params["stride"], ctx, "stride")
    volume = tuple(ctx.inputs.shape[2:])
    if any(w > s for w, s in zip(window, volume)):
        raise MethodError(f"occlusion parameter 'window' {list(window)} is larger than the volume "
                          f"{list(volume)}", "give a window no larger than the volume on every axis")
    if any(s > w for s, w in zip(stride, window)):
        raise MethodError(f"occlusion parameter 'stride' {list(stride)} is larger than the window "
                          f"{list(window)} on some axis, which would skip voxels",
                          "give a stride no larger than the window on every axis")
    channels = ctx.inputs.shape[1]
    reach = reach_filter(ctx.score_model, ctx.inputs)
    kwargs = {"sliding_window_shapes": (channels, *window), "strides": (channels, *stride),
              "baselines": _baselines(ctx, params),
              "perturbations_per_eval": params["perturbations_per_eval"], "show_progress": False}
    if reach is not None:  # windows the target's receptive field cannot see cost no evaluation
        return Call(Reached(Occlusion(reach), reach, ctx, "occlusion", "windows"), kwargs)
    return Call(Occlusion(ctx.score_model), kwargs)


def _mask_kwargs(ctx: MethodContext, params: Mapping[str, Any]) -> dict[str, Any]:
    return {"feature_mask": feature_mask(ctx.inputs, dict(params)), "baselines": _baselines(ctx, params),
            "perturbations_per_eval": params["perturbations_per_eval"], "show_progress": False}


def _build_feature_ablation(ctx: MethodContext, params: Mapping[str, Any]) -> Call:
    """Feature Ablation of supervoxels (one evaluation per supervoxel plus one; supervoxels the
    target's receptive field cannot see cost none)."""
    reach = reach_filter(ctx.score_model, ctx.inputs)
    if reach is not None:
        return Call(Reached(FeatureAblation(reach), reach, ctx, "feature_ablation", "supervoxels"),
                    _mask_kwargs(ctx, params))
    return Call(FeatureAblation(ctx.score_model), _mask_kwargs(ctx, params))


def _build_shapley(ctx: MethodContext, params: Mapping[str, Any]) -> Call:
    """Shapley Value Sampling of supervoxels, seeded."""
    algorithm = Seeded(ShapleyValueSampling(ctx.score_model), ctx.seed)
    return Call(algorithm, {**_mask_kwargs(ctx, params), "n_samples": params["n_samples"]})


def _build_permutation(ctx: MethodContext, params: Mapping[str, Any]) -> Call:
    """Feature Permutation of supervoxels of the batch mean (Captum needs one mask), seeded."""
    mask = feature_mask(ctx.inputs.detach().mean(dim=0, keepdim=True), dict(params))
    return Call(Seeded(FeaturePermutation(ctx.score_model), ctx.seed), {
        "feature_mask": mask, "perturbations_per_eval": params["perturbations_per_eval"],
        "show_progress": False})


def _make_kernel_shap(forward: Callable) -> KernelShap:
    algorithm = KernelShap(forward)
    algorithm.interpretable_model = LinearModel(train_fn=fit_least_squares)
    return algorithm


def _build_kernel_shap(ctx: MethodContext, params: Mapping[str, Any]) -> Call:
    """KernelSHAP per example with a closed-form weighted linear fit, seeded."""
    kwargs = _mask_kwargs(ctx, params)
    fewest = min(int(m.max()) + 1 for m in kwargs["feature_mask"])
    if fewest < 2:
        raise MethodError("kernel_shap needs at least 2 supervoxels but the mask of an input has 1",
                          "raise n_segments or compactness, or use mask: grid with a smaller grid_size")
    algorithm = PerExample(_make_kernel_shap, ctx.score_model, ctx.seed)
    return Call(algorithm, {**kwargs, "n_samples": params["n_samples"]})


def _build_lime(ctx: MethodContext, params: Mapping[str, Any]) -> Call:
    """LIME per example with Captum's exponential cosine kernel, seeded."""
    similarity = get_exp_kernel_similarity_function("cosine", params["kernel_width"])

    def make(forward: Callable) -> Lime:
        return Lime(forward, interpretable_model=_lime_model(), similarity_func=similarity)

    algorithm = PerExample(make, ctx.score_model, ctx.seed)
    return Call(algorithm, {**_mask_kwargs(ctx, params), "n_samples": params["n_samples"]})


register(MethodSpec(
    name="occlusion", family="perturbation", title="Occlusion",
    summary="slide a box of baseline values over the input; each voxel gets the mean score drop "
            "of the boxes covering it",
    params=(
        Param("window", "ints", 8, "edge of the occluding box in voxels (one or one per spatial axis)",
              minimum=1, maximum=4096),
        Param("stride", "ints", None,
              "step between boxes in voxels, at most the window (default: the window)",
              minimum=1, maximum=4096),
        BASELINE_PARAM, PPE_PARAM),
    build=_build_occlusion, reference="Zeiler & Fergus 2014; captum.attr.Occlusion",
    patchwise="perturbation", cost=costs.occlusion))

register(MethodSpec(
    name="feature_ablation", family="perturbation", title="Feature Ablation",
    summary="replace one supervoxel at a time by the baseline; each voxel gets its supervoxel's score drop",
    params=(*MASK_PARAMS, BASELINE_PARAM, PPE_PARAM),
    build=_build_feature_ablation, reference="captum.attr.FeatureAblation",
    patchwise="perturbation", cost=costs.ablation))

register(MethodSpec(
    name="shapley_value_sampling", family="perturbation", title="Shapley Value Sampling",
    summary="Shapley values of supervoxels estimated from random orderings (exact for additive models)",
    params=(*MASK_PARAMS, BASELINE_PARAM,
            _samples_param(8, "random supervoxel orderings (each costs one evaluation per supervoxel)"),
            PPE_PARAM),
    build=_build_shapley, reference="Castro et al. 2009; captum.attr.ShapleyValueSampling",
    patchwise="perturbation", cost=costs.shapley))

register(MethodSpec(
    name="feature_permutation", family="perturbation", title="Feature Permutation",
    summary="shuffle each supervoxel across the batch; only meaningful over a batch of several inputs "
            "(several volumes or patches of the same shape given together)",
    params=(*MASK_PARAMS, PPE_PARAM),
    build=_build_permutation, needs_batch=True,
    reference="Breiman 2001; Fisher et al. 2019; captum.attr.FeaturePermutation", cost=costs.ablation))

register(MethodSpec(
    name="kernel_shap", family="perturbation", title="KernelSHAP",
    summary="Shapley values of supervoxels from a weighted linear fit to random coalitions",
    params=(*MASK_PARAMS, BASELINE_PARAM,
            _samples_param(128, "random coalitions evaluated per input (more: closer to Shapley values)"),
            PPE_PARAM),
    build=_build_kernel_shap, reference="Lundberg & Lee 2017; captum.attr.KernelShap",
    patchwise="perturbation", cost=costs.sampled))

register(MethodSpec(
    name="lime", family="perturbation", title="LIME",
    summary="coefficients of a local linear model fitted to the scores of random supervoxel subsets",
    params=(*MASK_PARAMS, BASELINE_PARAM,
            _samples_param(128, "random supervoxel subsets evaluated per input"),
            Param("kernel_width", "float", 1.0,
                  "width of the exponential kernel on cosine distance weighting samples (larger: flatter)",
                  minimum=1e-3, maximum=1000.0),
            PPE_PARAM),
    build=_build_lime, reference="Ribeiro et al. 2016; captum.attr.Lime",
    patchwise="perturbation", cost=costs.sampled))
