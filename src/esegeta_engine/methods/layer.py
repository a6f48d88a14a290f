"""Layer methods: Captum layer attributions of ``ctx.layer`` (2D and 3D).

Each method attributes the class score to the activations of one module of
the user's model. :func:`esegeta_engine.methods.run.attribute` then combines
the channels (``channel_reduce``) and interpolates the map to the input grid
(``upsample``), so a layer map overlays the image like any other map.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from captum.attr import (
    InternalInfluence,
    LayerActivation,
    LayerConductance,
    LayerDeepLift,
    LayerDeepLiftShap,
    LayerGradCam,
    LayerGradientShap,
    LayerGradientXActivation,
    LayerIntegratedGradients,
)

from esegeta_engine.methods import costs
from esegeta_engine.methods._common import BASELINE_PARAM, make_baseline
from esegeta_engine.methods.gradient import (
    BASELINE_NOISE,
    IG_RULE,
    INTERNAL_BATCH,
    LAYER_INPUT,
    N_SAMPLES,
    N_STEPS,
    STDEVS,
    n_baselines_param,
    seeded,
    shap_baselines,
)
from esegeta_engine.methods.deeplift_safe import DeepLiftPlan
from esegeta_engine.methods.layer_patchwise import (
    PatchwiseLayerActivation,
    PatchwiseLayerDeepLift,
    PatchwiseLayerGradientShap,
    PatchwiseLayerIntegratedGradients,
)
from esegeta_engine.methods.notes import notes_of
from esegeta_engine.models.member_paths import MemberLayerPath, member_pipeline
from esegeta_engine.methods.patch_layer_methods import (
    PatchwiseCam,
    PatchwiseConductance,
    PatchwiseGradientXActivation,
    gradcam_weights,
    is_patchwise,
)
from esegeta_engine.methods.registry import Call, MethodContext, MethodSpec, Param, register

# The parameters every layer method has (run.py reads the first two).
LAYER_PARAMS = (
    Param("upsample", "bool", True, "interpolate the layer map to the input grid"),
    Param("channel_reduce", "str", "sum",
          "combine the layer's channels: sum, mean, or none (one map per channel)",
          choices=("sum", "mean", "none")),
    LAYER_INPUT,
)

N_STEPS_16 = Param("n_steps", "int", 16, "integration steps along the path from baseline to input",
                   minimum=1, maximum=2000)

SeededLayerGradientShap = seeded(LayerGradientShap)
SeededPatchwiseLayerGradientShap = seeded(PatchwiseLayerGradientShap)


def _kwargs(p: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    return {"attribute_to_layer_input": p["attribute_to_layer_input"], **extra}


def _path(ctx: MethodContext, p: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of the path-integral methods (IG, conductance, influence)."""
    return _kwargs(p, baselines=make_baseline(ctx.inputs, p["baseline"]), n_steps=p["n_steps"],
                   method=p["method"], internal_batch_size=p["internal_batch_size"])


def _layer_activation(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    if is_patchwise(ctx):
        return Call(PatchwiseLayerActivation(ctx, p["attribute_to_layer_input"], p["channel_reduce"]),
                    passes_target=False)
    return Call(LayerActivation(ctx.score_model, ctx.layer), _kwargs(p), passes_target=False)


def _layer_gradcam(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    if is_patchwise(ctx):
        return Call(PatchwiseCam(ctx, "layer_gradcam", gradcam_weights, p["relu_attributions"],
                                 p["attribute_to_layer_input"]))
    return Call(LayerGradCam(ctx.score_model, ctx.layer),
                _kwargs(p, relu_attributions=p["relu_attributions"]))


def _layer_conductance(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    if is_patchwise(ctx):
        base = make_baseline(ctx.inputs, p["baseline"])
        return Call(PatchwiseConductance(ctx, p, base), {"baselines": base})
    return Call(LayerConductance(ctx.score_model, ctx.layer), _path(ctx, p))


def _internal_influence(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    pipe = member_pipeline(ctx)  # inside nnU-Net's folds: a layer-space path through the whole pipeline
    if pipe is not None:
        return Call(MemberLayerPath(ctx, p, pipe, influence=True))
    if is_patchwise(ctx):
        base = make_baseline(ctx.inputs, p["baseline"])
        return Call(PatchwiseConductance(ctx, p, base, influence=True), {"baselines": base})
    return Call(InternalInfluence(ctx.score_model, ctx.layer), _path(ctx, p))


def _layer_gradient_x_activation(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    if is_patchwise(ctx):
        return Call(PatchwiseGradientXActivation(ctx, "layer_gradient_x_activation", p["channel_reduce"],
                                                 p["attribute_to_layer_input"]))
    return Call(LayerGradientXActivation(ctx.score_model, ctx.layer), _kwargs(p))


def _layer_deeplift(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    plan = DeepLiftPlan(ctx, "layer_deeplift", notes_of(ctx))
    if is_patchwise(ctx):
        base = make_baseline(ctx.inputs, p["baseline"])
        return Call(PatchwiseLayerDeepLift(ctx, plan, base, p["attribute_to_layer_input"], p["channel_reduce"]),
                    {"baselines": base})
    return Call(LayerDeepLift(plan.model, plan.layer),
                _kwargs(p, baselines=make_baseline(ctx.inputs, p["baseline"])))


def _layer_deeplift_shap(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    plan = DeepLiftPlan(ctx, "layer_deeplift_shap", notes_of(ctx))
    if is_patchwise(ctx):
        base = shap_baselines(ctx, p)
        return Call(PatchwiseLayerDeepLift(ctx, plan, base, p["attribute_to_layer_input"], p["channel_reduce"],
                                           shap=True), {"baselines": base})
    return Call(LayerDeepLiftShap(plan.model, plan.layer),
                _kwargs(p, baselines=shap_baselines(ctx, p)))


def _layer_gradient_shap(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    if is_patchwise(ctx):
        algorithm = SeededPatchwiseLayerGradientShap(ctx, p["attribute_to_layer_input"], p["channel_reduce"],
                                                     seed=ctx.seed, baselines=shap_baselines(ctx, p))
        return Call(algorithm, {"n_samples": p["n_samples"], "stdevs": p["stdevs"]})
    algorithm = SeededLayerGradientShap(ctx.score_model, ctx.layer, seed=ctx.seed,
                                        baselines=shap_baselines(ctx, p))
    return Call(algorithm, _kwargs(p, n_samples=p["n_samples"], stdevs=p["stdevs"]))


def _layer_integrated_gradients(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    pipe = member_pipeline(ctx)  # inside nnU-Net's folds: a layer-space path through the whole pipeline
    if pipe is not None:
        return Call(MemberLayerPath(ctx, p, pipe))
    if is_patchwise(ctx):
        base = make_baseline(ctx.inputs, p["baseline"])
        return Call(PatchwiseLayerIntegratedGradients(ctx, p, base), {"baselines": base})
    return Call(LayerIntegratedGradients(ctx.score_model, ctx.layer), _path(ctx, p))


def _path_points(info: Any, p: Mapping[str, Any]) -> int:
    """Conductance: Captum batches ``n_steps + 1`` path points; patch-wise, one pass per point."""
    return int(p["n_steps"]) + 1 if info.patchwise else costs.ig_like(info, p)


def _deeplift_shap_cost(info: Any, p: Mapping[str, Any]) -> int:
    """The counting pass, then one pass of every baseline row in one batch (patch-wise: one per row)."""
    if info is not None and info.patchwise:
        return 1 + int(p["n_baselines"]) * info.batch
    return 2


def _register(name: str, title: str, summary: str, params: tuple[Param, ...],
              build: Callable[[MethodContext, Mapping[str, Any]], Call], reference: str,
              **flags: Any) -> None:
    register(MethodSpec(name=name, family="layer", title=title, summary=summary,
                        params=params + LAYER_PARAMS, build=build, needs_layer=True,
                        needs_hooks=True, reference=reference, output_grid="layer", **flags))


_SHAP_REF = ("Lundberg & Lee 2017, A Unified Approach to Interpreting Model Predictions, NeurIPS, "
             "arXiv:1705.07874 (layer variant as in Captum)")
_PATH_16 = (BASELINE_PARAM, N_STEPS_16, IG_RULE, INTERNAL_BATCH)
_DISTRIBUTION = (BASELINE_PARAM, BASELINE_NOISE)

_register("layer_activation", "Layer Activation", "the layer's activations (no target class)",
          (), _layer_activation,
          "Captum LayerActivation (Kokhlikyan et al. 2020, Captum, arXiv:2009.07896)", cost=costs.one,
          patchwise="gradient")
_register("layer_gradcam", "Layer Grad-CAM",
          "activations weighted by their channel-mean gradients, summed over channels",
          (Param("relu_attributions", "bool", True, "keep only positive evidence (ReLU)"),),
          _layer_gradcam,
          "Selvaraju et al. 2017, Grad-CAM: Visual Explanations from Deep Networks via "
          "Gradient-based Localization, ICCV, arXiv:1610.02391", patchwise="gradient", cost=costs.one)
_register("layer_conductance", "Layer Conductance",
          "integrated gradients flowing through each layer unit from baseline to input",
          _PATH_16, _layer_conductance,
          "Dhamdhere, Sundararajan & Yan 2018, How Important Is a Neuron?, arXiv:1805.12233",
          axiom="completeness", patchwise="gradient", cost=_path_points)
_register("internal_influence", "Internal Influence",
          "layer gradients integrated along the path from baseline to input",
          _PATH_16, _internal_influence,
          "Leino et al. 2018, Influence-Directed Explanations for Deep Convolutional Networks, "
          "arXiv:1802.03788", cost=costs.ig_like, patchwise="gradient")
_register("layer_gradient_x_activation", "Layer Gradient x Activation",
          "layer activations times the gradient of the class score",
          (), _layer_gradient_x_activation,
          "Shrikumar et al. 2016, Not Just a Black Box, arXiv:1605.01713 (layer variant)",
          patchwise="gradient", cost=costs.one)
_register("layer_deeplift", "Layer DeepLIFT",
          "DeepLIFT contributions of the layer's units to F(x) - F(baseline)",
          (BASELINE_PARAM,), _layer_deeplift,
          "Shrikumar, Greenside & Kundaje 2017, Learning Important Features Through Propagating "
          "Activation Differences, ICML, arXiv:1704.02685", cost=lambda info, p: 2, patchwise="gradient")
_register("layer_deeplift_shap", "Layer DeepLIFT SHAP",
          "layer DeepLIFT averaged over a seeded distribution of noisy copies of the baseline",
          (*_DISTRIBUTION, n_baselines_param(2)), _layer_deeplift_shap, _SHAP_REF,
          cost=_deeplift_shap_cost, patchwise="gradient")
_register("layer_gradient_shap", "Layer Gradient SHAP",
          "expected layer gradients x activation differences at random points from noisy baselines",
          (*_DISTRIBUTION, n_baselines_param(1), N_SAMPLES, STDEVS), _layer_gradient_shap,
          _SHAP_REF, cost=costs.one, patchwise="gradient")
_register("layer_integrated_gradients", "Layer Integrated Gradients",
          "integrated gradients of the layer's activations from the baseline's to the input's",
          (BASELINE_PARAM, N_STEPS, IG_RULE, INTERNAL_BATCH), _layer_integrated_gradients,
          "Sundararajan, Taly & Yan 2017, Axiomatic Attribution for Deep Networks, ICML, "
          "arXiv:1703.01365 (layer variant as in Captum)", cost=costs.ig_like,
          patchwise="gradient")
