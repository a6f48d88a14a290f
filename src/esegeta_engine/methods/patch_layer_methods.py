"""Layer methods and CAMs under sliding-window execution (the per-patch forms).

Each method here is the same definition as its whole-volume form, applied to every
patch copy of the layer with that copy's gradient ``G_p = dF/dA_p`` of the stitched
score (see :mod:`esegeta_engine.forward.patch_layer` for how copies combine):

* **CAMs** (Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM): each copy's CAM
  with its own channel weights, ``m_p = relu(sum_k weigh(A_p, G_p)_k A_pk)``, stitched
  with the sliding window's blend weights. Per-copy weights are the exact reading of
  the definition: a CAM's weights come from the activation the network computed and
  its gradient, and each patch computes its own.
* **Eigen-CAMs** need the whole layer's first principal component: :func:`stitched_layer`
  builds the stitched layer patch by patch (activations blended like the outputs,
  ``A(u) = sum_p w_p A_p(u) / W``; gradient x activation summed, ``sum_p G_p A_p``) on the
  scan's layer grid, and the component is taken there: exact by definition on that tensor.
* **Additive layer attributions** (gradient x activation, conductance, excitation
  backprop): each copy's attribution, added where copies overlap; their total over
  every copy is the method's total for the stitched function (conductance: ``F(x) -
  F(baseline)``), recorded as the map's ``attribution_sum``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from captum.attr._utils.approximation_methods import approximation_parameters

from esegeta_engine.forward.patch_layer import patchwise_layer_forward, patchwise_layer_map
from esegeta_engine.methods.behaviour import PatchwiseMode, register_patchwise_mode
from esegeta_engine.methods.notes import add_note, notes_of
from esegeta_engine.methods.registry import MethodContext

Weigh = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

STITCHED_LAYER = register_patchwise_mode(PatchwiseMode(
    "stitched_layer", True, summary="reads the whole scan's layer (Eigen-, Score-, Ablation-CAM): the stitched layer "
    "is built patch by patch, and evaluations of perturbed copies recompute only the patches they change")).name


def is_patchwise(ctx: MethodContext) -> bool:
    """True when the score model runs the network as a sliding window, or the layer lies inside a
    deployed pipeline's network, which runs it once per member (nnU-Net's folds, mirrors and patches)."""
    if getattr(ctx.score_model, "patchwise", False):
        return True
    inside = getattr(getattr(getattr(ctx.score_model, "net", None), "model", None), "runs_layer_per_member", None)
    return ctx.layer is not None and callable(inside) and bool(inside(ctx.layer))


def reduce_channels(t: torch.Tensor, how: str) -> torch.Tensor:
    """``channel_reduce`` applied per patch (sum, mean, or none)."""
    if how == "sum":
        return t.sum(dim=1, keepdim=True)
    if how == "mean":
        return t.mean(dim=1, keepdim=True)
    return t


def gradcam_weights(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM channel weights: the gradient's mean over the layer grid (Selvaraju et al.)."""
    return g.mean(dim=tuple(range(2, g.dim())), keepdim=True)


class PatchwiseCam:
    """A gradient CAM over every patch copy of the layer, blended like the outputs."""

    def __init__(self, ctx: MethodContext, name: str, weigh: Weigh, relu: bool, layer_input: bool) -> None:
        self.ctx, self.name, self.weigh, self.relu, self.layer_input = ctx, name, weigh, relu, layer_input

    def attribute(self, inputs: torch.Tensor, target: int = 0, **_: Any) -> torch.Tensor:
        """Return the input-grid map ``(N, 1, *spatial)``."""
        def per_patch(a: torch.Tensor, g: torch.Tensor, items: list) -> torch.Tensor:
            cam = (self.weigh(a, g) * a).sum(dim=1, keepdim=True)
            return cam.clamp(min=0) if self.relu else cam

        out, _ = patchwise_layer_map(self.ctx.score_model, self.ctx.layer, inputs, target, self.layer_input,
                                     per_patch, "blend", self.name, self.ctx.layer_name)
        return out


class PatchwiseGradientXActivation:
    """Layer gradient x activation over every patch copy, added where copies overlap."""

    def __init__(self, ctx: MethodContext, name: str, reduce: str, layer_input: bool) -> None:
        self.ctx, self.name, self.reduce, self.layer_input = ctx, name, reduce, layer_input

    def attribute(self, inputs: torch.Tensor, target: int = 0, **_: Any) -> torch.Tensor:
        """Return the input-grid map; the exact total goes to ``ctx.extra``."""
        out, total = patchwise_layer_map(
            self.ctx.score_model, self.ctx.layer, inputs, target, self.layer_input,
            lambda a, g, items: reduce_channels(g * a, self.reduce), "sum", self.name, self.ctx.layer_name)
        self.ctx.extra["raw_attribution_sum"] = total
        return out


class PatchwiseConductance:
    """Layer conductance (Dhamdhere et al. 2018) over every patch copy, as Captum computes it:

    ``cond_p = sum_k G_p(alpha_k) * (A_p(alpha_{k+1}) - A_p(alpha_k))`` over ``n_steps + 1`` path
    points ``b + alpha (x - b)``; one patch-wise backward per path point. Each copy's running sum and
    previous activation/gradient are kept between points (three copies of the layer's activations).
    With ``influence``: internal influence (Leino et al. 2018), ``sum_k step_k G_p(alpha_k)`` over
    ``n_steps`` points, as Captum's ``InternalInfluence``.
    """

    def __init__(self, ctx: MethodContext, params: Mapping[str, Any], baselines: torch.Tensor,
                 influence: bool = False) -> None:
        self.ctx, self.p, self.baselines, self.influence = ctx, params, baselines, influence

    def attribute(self, inputs: torch.Tensor, target: int = 0, **_: Any) -> torch.Tensor:
        """Return the input-grid map; the exact total goes to ``ctx.extra``."""
        p, ctx = self.p, self.ctx
        n_steps = int(p["n_steps"])
        steps_func, alphas_func = approximation_parameters(p["method"])
        alphas = alphas_func(n_steps if self.influence else n_steps + 1)
        steps = steps_func(n_steps)
        prev: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        acc: dict[tuple[int, int], torch.Tensor] = {}
        layer_input = p["attribute_to_layer_input"]
        reduce = p.get("channel_reduce", "sum")
        x = inputs.detach()
        base = self.baselines.to(x.dtype)
        out = total = None
        for k, alpha in enumerate(alphas):
            last = k == len(alphas) - 1

            def per_patch(a: torch.Tensor, g: torch.Tensor, items: list) -> torch.Tensor:
                maps = []
                for item, ai, gi in zip(items, a, g):
                    if self.influence:
                        acc[item] = acc.get(item, 0) + float(steps[k]) * gi
                    elif item in prev:
                        pa, pg = prev[item]
                        acc[item] = acc.get(item, 0) + pg * (ai - pa)
                    if not self.influence:
                        prev[item] = (ai, gi)
                    if last:
                        maps.append(reduce_channels(acc.pop(item, torch.zeros_like(ai))[None], reduce)[0])
                return torch.stack(maps) if last else a[:, :1]

            point = base + float(alpha) * (x - base)
            out, total = patchwise_layer_map(ctx.score_model, ctx.layer, point, target, layer_input, per_patch,
                                             "sum" if last else "none",
                                             "internal_influence" if self.influence else "layer_conductance",
                                             ctx.layer_name)
        ctx.extra["raw_attribution_sum"] = total
        return out


def stitched_layer(ctx: MethodContext, inputs: torch.Tensor, target: int, layer_input: bool, with_gradient: bool,
                   method: str) -> torch.Tensor:
    """The whole scan's layer, ``(N, C, *layer grid)``, from every patch copy (module docstring).

    ``with_gradient``: gradient x activation of each copy, summed where copies overlap (the
    gradients are each copy's share of the stitched score's); otherwise the activations,
    blended with the sliding window's weights (forward only). Where the layer grid does not
    line up with the patch grid, the copies are resampled to the input grid first (noted).
    """
    report: dict = {}
    if with_gradient:
        out, _ = patchwise_layer_map(ctx.score_model, ctx.layer, inputs, target, layer_input,
                                     lambda a, g, items: g * a, "sum", method, ctx.layer_name, on_layer_grid=True,
                                     report=report)
    else:
        out = patchwise_layer_forward(ctx.score_model, ctx.layer, inputs, layer_input, lambda a, items: a, "blend",
                                      method, ctx.layer_name, on_layer_grid=True, report=report)
    if report.get("resampled"):
        add_note(notes_of(ctx), f"{method}: the layer's grid does not line up with the patch grid (patch step "
                                "not a multiple of the layer's stride), so the copies were resampled to the "
                                "input grid and the component was taken there")
    return out
