"""Layer methods inside nnU-Net's fold networks (and a bundle's windowed network, :mod:`.member_bundle`)
that move or only read the layer: activation, layer IG, internal influence.

The input stays fixed (nnU-Net's crop box, normalisation and resampling are recomputed from it), so
a path runs in **layer space**: every member's copy ``A_k`` of the layer (fold x mirrored copy x
patch, :mod:`.member_layer`) is replaced by ``alpha A_k`` at once and the *whole* deployed pipeline
is evaluated there — its score is nonlinear across members (softmax of the fold- and mirror-averaged
logits), so each path point is one full pipeline pass (every network call, forward and the
patch-wise backward), counted in the plan's expected evaluations (``n_steps`` passes).

``layer_activation``
    each member's ``A_k`` (no gradient: one forward of every member, no graph), placed on the
    network grid and blended like the CAMs (``blend``: the outputs' Gaussian weights, divided by
    mirrored copies x folds). With several folds, channel ``c`` of different folds is a different
    learned feature: the per-channel maps (``channel_reduce: none``) average unrelated features.
``layer_integrated_gradients``
    baseline: the **zero activation** of every member's copy (not the layer's value on a baseline
    input, Captum's default; the ``baseline`` parameter must stay ``zero``).
    ``attr_k = A_k * sum_s w_s G_k(alpha_s)`` with ``G_k(alpha) = dF/dA_k`` at the point where every
    copy holds ``alpha A_k``; summed over copies where they overlap (``sum``). Completeness:
    ``sum_k sum attr_k ~ F(every copy = A_k) - F(every copy = 0)`` through the deployed pipeline.
``internal_influence``
    the same path, ``sum_s w_s G_k(alpha_s)`` without the ``A_k`` factor (Leino et al. 2018).

Layer conductance on a layer-space path is layer IG of the layer itself (``A(alpha_{s+1}) -
A(alpha_s) = (alpha_{s+1} - alpha_s) A``), so it is refused with that pointer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from captum.attr._utils.approximation_methods import approximation_parameters
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.models.member_layer import NnUNetLayerTap, scan_maps

LayerOnly = Callable[[torch.Tensor, list[tuple[int, int]]], torch.Tensor]

PATH_METHODS = ("layer_integrated_gradients", "internal_influence")


def member_pipeline(ctx: Any) -> Any | None:
    """The deployed pipeline (nnU-Net's folds, a bundle's sliding window) that runs ``ctx.layer`` once per
    member (None: not such a layer)."""
    pipe = getattr(getattr(ctx.score_model, "net", None), "model", None)
    inside = getattr(pipe, "runs_layer_per_member", None)
    if ctx.layer is None or not callable(inside) or not inside(ctx.layer):
        return None
    return pipe


def nnunet_layer_forward(pipe: Any, score_model: nn.Module, layer: nn.Module, inputs: torch.Tensor,
                         layer_input: bool, per_copy: LayerOnly, combine: str, method: str,
                         name: str) -> torch.Tensor:
    """An activation-only layer map over every member of an nnU-Net pipeline, on the scan's grid.

    Each member (fold, patch, mirrored copy) runs once without a graph; its copy of the layer is
    flipped back and placed like the gradient methods' (:class:`NnUNetLayerTap`). One pipeline pass
    of network calls, no stitched output.
    """
    x = inputs.detach()
    ens = pipe.ensemble
    with torch.no_grad():
        infos = [pipe._prepare(x[i]) for i in range(x.shape[0])]
    data = [info.pop("data") for info in infos]
    pipe._last = infos
    tap = NnUNetLayerTap(pipe, layer, layer_input, lambda a, g, items: per_copy(a, items), combine, method, name)
    tap.copy.forward_only = True
    for info, d in zip(infos, data):
        plan = info["plan"]
        padded = plan.pad(d)
        with tap.attached(plan), torch.no_grad():
            for f, net in enumerate(ens.networks):
                for p, sl in enumerate(plan.slicers):
                    for axes in ens.copy_axes:
                        ens.predict_copy(net, padded[sl][None], axes)
                        tap.member(f, p, axes)
    monitor = getattr(score_model, "monitor", None)
    if monitor is not None:  # one pass over the volume: one model evaluation, as the cost functions count
        monitor.evaluated(x.shape[0])
    return scan_maps(pipe, tap, inputs)


class MemberLayerPath:
    """Layer IG (or internal influence) on a layer-space path inside a pipeline's network (module docstring):
    nnU-Net's folds (every fold x mirrored copy x patch) or a bundle's sliding window (every patch)."""

    def __init__(self, ctx: Any, params: Mapping[str, Any], pipe: Any, influence: bool = False) -> None:
        self.ctx, self.p, self.pipe, self.influence = ctx, params, pipe, influence
        self.name = "internal_influence" if influence else "layer_integrated_gradients"
        if params.get("baseline", "zero") != "zero":
            raise MethodError(
                f"{self.name} on layer {ctx.layer_name!r} inside a deployed pipeline's network integrates from the "
                f"zero activation of every copy of the layer (the input fixed), not from an input baseline "
                f"({params['baseline']!r}: it would move the pipeline's preprocessing, e.g. nnU-Net's crop box)",
                "leave baseline at zero, or explain the layer 'network_input' with an input baseline")

    def attribute(self, inputs: torch.Tensor, target: int = 0, **_: Any) -> torch.Tensor:
        """Return the scan-grid map; the total over every copy goes to ``ctx.extra``."""
        ctx, p = self.ctx, self.p
        layer_input = p["attribute_to_layer_input"]
        reduce = p.get("channel_reduce", "sum")
        steps_func, alphas_func = approximation_parameters(p["method"])
        n_steps = int(p["n_steps"])
        out = total = None
        for w, alpha in zip(steps_func(n_steps), alphas_func(n_steps)):
            def per_copy(a: torch.Tensor, g: torch.Tensor, items: list, w: float = float(w)) -> torch.Tensor:
                m = w * g if self.influence else w * a * g
                if reduce == "sum":
                    return m.sum(dim=1, keepdim=True)
                return m.mean(dim=1, keepdim=True) if reduce == "mean" else m

            o, t = self.pipe.member_layer_map(ctx.score_model, ctx.layer, inputs, target, layer_input, per_copy,
                                              "sum", self.name, ctx.layer_name or type(ctx.layer).__name__,
                                              scale=float(alpha))
            out = o if out is None else out + o
            total = t if total is None else total + t
        ctx.extra["raw_attribution_sum"] = total
        return out
