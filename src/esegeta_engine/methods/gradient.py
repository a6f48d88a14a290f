"""Gradient methods: Captum wrappers that explain ``ScoreModel`` (2D and 3D).

Every builder hands ``ctx.score_model`` (an ``nn.Module`` mapping the input
batch to ``(N, K)`` class scores) to the Captum class and returns a
:class:`~esegeta_engine.methods.registry.Call`; :func:`run.attribute` adds the
target class. Everything random (the SHAP baseline distributions, GradientShap
sampling) is seeded from ``ctx.seed`` without touching the global RNG state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from captum.attr import (
    GradientShap,
    InputXGradient,
    IntegratedGradients,
    Saliency,
)

from esegeta_engine.methods import costs
from esegeta_engine.methods._common import BASELINE_PARAM, make_baseline
from esegeta_engine.methods.deeplift_twopass import TwoPassDeepLift
from esegeta_engine.methods.lrp import quiet_stitched_forward
from esegeta_engine.methods.patch_layer_methods import PatchwiseCam, gradcam_weights, is_patchwise
from esegeta_engine.methods.notes import notes_of
from esegeta_engine.methods.rectifiers import RectifiedGradient, RectifiedGuidedGradCam
from esegeta_engine.methods.registry import Call, MethodContext, MethodSpec, Param, register

# Parameters shared by several methods (layer.py reuses them).
N_STEPS = Param("n_steps", "int", 32, "integration steps along the path from baseline to input",
                minimum=1, maximum=2000)
IG_RULE = Param("method", "str", "gausslegendre", "rule approximating the path integral",
                choices=("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right",
                         "riemann_middle"))
INTERNAL_BATCH = Param("internal_batch_size", "int", 8,
                       "path points per forward/backward pass (lower it to save memory)",
                       minimum=1, maximum=100000)
N_SAMPLES = Param("n_samples", "int", 8, "random (baseline, path point, noise) draws per input",
                  minimum=1, maximum=100000)
STDEVS = Param("stdevs", "float", 0.05,
               "std of the Gaussian noise added to each drawn input, in input intensity units",
               minimum=0.0, maximum=1e6)
BASELINE_NOISE = Param("baseline_noise", "float", 0.05,
                       "std of the noise added to each baseline, as a fraction of the input's std",
                       minimum=0.0, maximum=100.0)
LAYER_INPUT = Param("attribute_to_layer_input", "bool", False,
                    "use the layer's input instead of its output")


def n_baselines_param(minimum: int) -> Param:
    """Return the ``n_baselines`` parameter with lower bound ``minimum``.

    DeepLiftShap needs at least 2 baselines, GradientShap 1.
    """
    return Param("n_baselines", "int", 4,
                 "baselines in the reference distribution: the chosen baseline plus seeded noise",
                 minimum=minimum, maximum=1024)


def baseline_distribution(
    inputs: torch.Tensor, kind: str, n: int, noise: float, seed: int
) -> torch.Tensor:
    """Return ``n`` noisy copies of the ``kind`` baseline of every input.

    Copy ``j`` of input ``i`` is ``make_baseline(inputs, kind)[i] + noise *
    std(inputs[i]) * e`` with ``e`` standard Gaussian noise drawn from a
    generator seeded with ``seed`` (on the CPU, so every device gives the same
    distribution). With several inputs the copies of all of them are pooled,
    as Captum's SHAP methods share one distribution across the batch.

    Parameters
    ----------
    inputs : torch.Tensor
        ``(N, C, *spatial)``.
    kind : str
        A baseline kind of :func:`make_baseline`.
    n : int
        Copies per input.
    noise : float
        Noise std as a fraction of each input's standard deviation.
    seed : int
        Seed of the noise.

    Returns
    -------
    torch.Tensor
        ``(n * N, C, *spatial)``, copy-major (all inputs' copy 0 first).
    """
    base = make_baseline(inputs.detach(), kind).repeat(n, *([1] * (inputs.dim() - 1)))
    scale = noise * inputs.detach().flatten(1).std(dim=1, correction=0)
    scale = scale.repeat(n).reshape(-1, *([1] * (inputs.dim() - 1)))
    gen = torch.Generator().manual_seed(int(seed))
    eps = torch.randn(base.shape, generator=gen, dtype=base.dtype).to(base.device)
    return base + scale * eps


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch (CPU and ``device``) and NumPy's global RNG, restoring them on exit.

    Captum draws GradientShap samples (baseline picks, path points, input
    noise) from these global generators.

    Parameters
    ----------
    seed : int
        The seed (``ctx.seed``).
    device : torch.device
        Device of the inputs; a CUDA device's generator is seeded and restored too.
    """
    forked = [device] if device.type == "cuda" else []
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=forked, device_type="cuda"):
        torch.random.default_generator.manual_seed(int(seed))
        for dev in forked:
            with torch.cuda.device(dev):
                torch.cuda.manual_seed(int(seed))
        np.random.seed(int(seed) % 2**32)
        try:
            yield
        finally:
            np.random.set_state(np_state)


def seeded(cls: type) -> type:
    """Return a subclass of Captum sampling class ``cls`` (GradientShap and its
    layer variant) that owns its seed and its baseline distribution.

    The constructor takes ``seed=`` and ``baselines=`` keywords besides those
    of ``cls``; ``attribute`` runs under :func:`seeded_rng` and uses the bound
    baselines. Binding them (instead of passing ``baselines=`` per call) lets
    :class:`captum.attr.NoiseTunnel` wrap the method: it would otherwise try to
    expand the distribution like a per-input baseline and fail. The
    ``__wrapped__`` attribute is what ``NoiseTunnel`` calls.

    Parameters
    ----------
    cls : type
        A Captum attribution class whose ``attribute`` takes ``baselines=``.

    Returns
    -------
    type
        The subclass, named ``Seeded<cls>``.
    """

    def _attribute(self: Any, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.baselines is not None:
            kwargs.setdefault("baselines", self.baselines)
        with seeded_rng(self.seed, inputs.device):
            return cls.attribute(self, inputs, *args, **kwargs)

    def attribute(self: Any, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return _attribute(self, inputs, *args, **kwargs)

    attribute.__wrapped__ = _attribute  # type: ignore[attr-defined]

    def __init__(self: Any, *args: Any, seed: int = 0, baselines: torch.Tensor | None = None,
                 **kwargs: Any) -> None:
        cls.__init__(self, *args, **kwargs)
        self.seed = seed
        self.baselines = baselines

    return type(f"Seeded{cls.__name__}", (cls,), {"__init__": __init__, "attribute": attribute})


SeededGradientShap = seeded(GradientShap)


def shap_baselines(ctx: MethodContext, p: Mapping[str, Any]) -> torch.Tensor:
    """The baseline distribution of a SHAP method from its ``baseline``,
    ``n_baselines`` and ``baseline_noise`` parameters, seeded by ``ctx.seed``."""
    return baseline_distribution(ctx.inputs, p["baseline"], p["n_baselines"],
                                 p["baseline_noise"], ctx.seed)


def _saliency(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    return Call(Saliency(ctx.score_model), {"abs": p["abs"]})


def _integrated_gradients(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    from esegeta_engine.methods.costs import PATCHWISE_IG_BATCH

    # patch-wise: one path point at a time (patches are batched instead), so memory holds one copy
    batch = PATCHWISE_IG_BATCH if ctx.extra.get("patchwise") else p["internal_batch_size"]
    return Call(IntegratedGradients(ctx.score_model), {
        "baselines": make_baseline(ctx.inputs, p["baseline"]), "n_steps": p["n_steps"],
        "method": p["method"], "internal_batch_size": batch})


def _input_x_gradient(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    return Call(InputXGradient(ctx.score_model))


def _guided_backprop(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    return Call(RectifiedGradient(ctx.score_model, "guided", notes_of(ctx), "guided_backprop"))


def _deconvolution(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    return Call(RectifiedGradient(ctx.score_model, "deconvolution", notes_of(ctx), "deconvolution"))


def _deeplift(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    return Call(TwoPassDeepLift(ctx, "deeplift", multiply_by_inputs=p["multiply_by_inputs"]),
                {"baselines": make_baseline(ctx.inputs, p["baseline"], view=True)})  # read only


def _deeplift_shap(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    return Call(TwoPassDeepLift(ctx, "deeplift_shap", shap=True), {"baselines": shap_baselines(ctx, p)})


def _gradient_shap(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    algorithm = SeededGradientShap(ctx.score_model, seed=ctx.seed, baselines=shap_baselines(ctx, p))
    return Call(algorithm, {"n_samples": p["n_samples"], "stdevs": p["stdevs"]})


class PatchwiseGuidedGradCam:
    """Guided Grad-CAM under sliding-window execution: the guided map (patch-wise backward) times
    Grad-CAM on every patch copy of the layer, blended like the outputs (two passes)."""

    def __init__(self, ctx: MethodContext, layer_input: bool) -> None:
        self.ctx, self.layer_input = ctx, layer_input

    def attribute(self, inputs: torch.Tensor, target: int = 0, **_: Any) -> torch.Tensor:
        """Return guided backprop times the stitched Grad-CAM map."""
        cam = PatchwiseCam(self.ctx, "guided_gradcam", gradcam_weights, True, self.layer_input)
        guided = RectifiedGradient(self.ctx.score_model, "guided", notes_of(self.ctx), "guided_gradcam")
        # the guided rule's hooks act only on tensors that need a gradient, i.e. in the backward's
        # recomputation: the stitched forward needs no graph and reuses the prediction's output
        with quiet_stitched_forward(self.ctx.score_model):
            mask = guided.attribute(inputs, target)
        return mask * cam.attribute(inputs, target)


def _guided_gradcam(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    if is_patchwise(ctx):
        return Call(PatchwiseGuidedGradCam(ctx, p["attribute_to_layer_input"]))
    mode = "bilinear" if ctx.spatial_dims == 2 else "trilinear"
    return Call(RectifiedGuidedGradCam(ctx.score_model, ctx.layer, notes_of(ctx)), {
        "interpolate_mode": mode, "attribute_to_layer_input": p["attribute_to_layer_input"]})


def _register(name: str, title: str, summary: str, params: tuple[Param, ...],
              build: Callable[[MethodContext, Mapping[str, Any]], Call], reference: str,
              **flags: Any) -> None:
    register(MethodSpec(name=name, family="gradient", title=title, summary=summary,
                        params=params, build=build, reference=reference, **flags))


def _ONE(info: Any, p: Mapping[str, Any]) -> int:
    return 1


def _TWO(info: Any, p: Mapping[str, Any]) -> int:
    """DeepLIFT: the baseline's pass (it also counts module calls) and the input's pass; patch-wise,
    the input's pass and the baseline's scores, stitched from the backward's patches."""
    return 2


def _deeplift_shap_cost(info: Any, p: Mapping[str, Any]) -> int:
    """Per baseline row: its pass and the input's (whole volume); patch-wise one input pass for all
    rows, then each row's scores."""
    rows = int(p.get("n_baselines", n_baselines_param(2).default)) * (info.batch if info is not None else 1)
    if info is not None and info.patchwise:
        return 1 + rows
    return 2 * rows


_SHAP_REF = ("Lundberg & Lee 2017, A Unified Approach to Interpreting Model Predictions, NeurIPS, "
             "arXiv:1705.07874")
_DISTRIBUTION = (BASELINE_PARAM, BASELINE_NOISE)

_register("saliency", "Saliency", "gradient of the class score with respect to each voxel",
          (Param("abs", "bool", True, "take the absolute value of the gradient"),), _saliency,
          "Simonyan, Vedaldi & Zisserman 2014, Deep Inside Convolutional Networks, "
          "arXiv:1312.6034", noise_tunnel=True, patchwise="gradient", cost=costs.one)
_register("integrated_gradients", "Integrated Gradients",
          "gradients averaged on the straight path from a baseline to the input, times the change",
          (BASELINE_PARAM, N_STEPS, IG_RULE, INTERNAL_BATCH), _integrated_gradients,
          "Sundararajan, Taly & Yan 2017, Axiomatic Attribution for Deep Networks, ICML, "
          "arXiv:1703.01365", noise_tunnel=True, axiom="completeness", patchwise="gradient",
          cost=costs.ig_like)
_register("input_x_gradient", "Input x Gradient", "input times the gradient of the class score",
          (), _input_x_gradient, "Shrikumar et al. 2016, Not Just a Black Box, arXiv:1605.01713",
          noise_tunnel=True, patchwise="gradient", cost=costs.one)
_register("guided_backprop", "Guided Backpropagation",
          "gradient with negative gradients zeroed at every rectifying activation module "
          "(ReLU, LeakyReLU, PReLU, ReLU6, ELU, GELU, SiLU)",
          (), _guided_backprop,
          "Springenberg et al. 2015, Striving for Simplicity: The All Convolutional Net, "
          "arXiv:1412.6806", needs_hooks=True, noise_tunnel=True, patchwise="gradient",
          cost=_ONE)
_register("deconvolution", "Deconvolution",
          "gradient passed backwards through each activation module's rectifier applied to the "
          "gradient only",
          (), _deconvolution,
          "Zeiler & Fergus 2014, Visualizing and Understanding Convolutional Networks, "
          "arXiv:1311.2901", needs_hooks=True, noise_tunnel=True, patchwise="gradient",
          cost=_ONE)
_register("deeplift", "DeepLIFT", "contributions to F(x) - F(baseline) by the rescale rule",
          (BASELINE_PARAM, Param("multiply_by_inputs", "bool", True,
                                 "multiply by (input - baseline); false gives the multipliers")),
          _deeplift,
          "Shrikumar, Greenside & Kundaje 2017, Learning Important Features Through Propagating "
          "Activation Differences, ICML, arXiv:1704.02685", needs_hooks=True, noise_tunnel=True,
          cost=_TWO, axiom="completeness", patchwise="gradient")
_register("deeplift_shap", "DeepLIFT SHAP",
          "DeepLIFT averaged over a seeded distribution of noisy copies of the baseline",
          (*_DISTRIBUTION, n_baselines_param(2)), _deeplift_shap, _SHAP_REF, needs_hooks=True,
          cost=_deeplift_shap_cost, axiom="completeness", patchwise="gradient")
_register("gradient_shap", "Gradient SHAP",
          "expected gradients at random points between noisy baselines and the noisy input",
          (*_DISTRIBUTION, n_baselines_param(1), N_SAMPLES, STDEVS), _gradient_shap, _SHAP_REF,
          noise_tunnel=True, axiom="expected_completeness", patchwise="gradient", cost=costs.one)
_register("guided_gradcam", "Guided Grad-CAM",
          "guided backpropagation times the layer's Grad-CAM map interpolated to the input grid",
          (LAYER_INPUT,), _guided_gradcam,
          "Selvaraju et al. 2017, Grad-CAM: Visual Explanations from Deep Networks via "
          "Gradient-based Localization, ICCV, arXiv:1610.02391", needs_layer=True, needs_hooks=True,
          cost=lambda info, p: 2, patchwise="gradient")
