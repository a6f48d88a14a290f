"""Layer IG, layer DeepLIFT (SHAP), layer GradientSHAP and layer activation under sliding windows.

Each is the whole-volume method's definition applied to the stitched layer: the set of every
patch copy ``A_p`` of the layer, with ``G_p = dF/dA_p`` the gradient of the stitched score
(each copy's blended share ``w_p / W`` of the upstream gradient). The additive attributions
(IG, DeepLIFT, GradientSHAP) are computed per copy and added where copies overlap
(:mod:`esegeta_engine.forward.patch_layer`, ``sum``); their total over every copy is the
method's total for the stitched function, recorded as the map's ``attribution_sum``:

* **Layer IG** (Captum's ``LayerIntegratedGradients``): every copy's value is moved together
  along ``A_p(x0) + alpha (A_p(x) - A_p(x0))`` (the rest of the network sees ``x``, as in
  Captum); ``attr_p = (A_p(x) - A_p(x0)) * sum_k s_k G_p(alpha_k)``, one patch-wise pass per
  path point. Where the layer is a cut of the network, ``sum_p sum attr_p ~ F(x) - F(x0)``.
  A baseline that is one constant everywhere (zero, the default) has the same ``A(x0)`` in
  every patch, computed once; otherwise each patch batch holds the input's and the
  baseline's patches in pairs.
* **Layer DeepLIFT**: Captum's rescale rules on each patch batch of input and reference patches
  (paired), ``attr_p = (A_p(x) - A_p(x0)) * m_p``; **DeepLIFT SHAP**: the mean over the
  baseline distribution.
* **Layer GradientSHAP**: Captum's sampling (noise, baseline draws, path points from the
  seeded global generators), with each drawn point's layer gradient taken patch-wise and
  ``A_p(x_s) - A_p(b_s)`` computed for the same patches.
* **Layer activation** (no target): each copy's activation, blended like the outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from captum.attr import LayerDeepLift, LayerGradientShap, NoiseTunnel
from captum.attr._core.gradient_shap import _scale_input
from captum.attr._utils.approximation_methods import approximation_parameters
from torch import nn

from esegeta_engine.forward.patch_layer import patchwise_layer_forward, patchwise_layer_map
from esegeta_engine.methods.patch_layer_methods import reduce_channels
from esegeta_engine.methods.registry import MethodContext


def _on_layer(layer: nn.Module, layer_input: bool, edit: Any) -> Any:
    """Hook replacing the layer's output (or first input) ``a`` by ``edit(a)``."""
    if layer_input:
        return layer.register_forward_pre_hook(lambda m, args: (edit(args[0]), *args[1:]))
    return layer.register_forward_hook(lambda m, args, out: edit(out))


def layer_of_patches(sw: Any, layer: nn.Module, layer_input: bool, patches: torch.Tensor) -> torch.Tensor:
    """The layer's value on a stack of patches (one counted forward without a graph)."""
    seen: list[torch.Tensor] = []

    def keep(a: torch.Tensor) -> torch.Tensor:
        seen.append(a.detach())
        return a

    handle = _on_layer(layer, layer_input, keep)
    try:
        with torch.no_grad():
            sw.run_patches(patches)
    finally:
        handle.remove()
    return seen[0]


def patches_of(padded: torch.Tensor, grid: Any, items: list[tuple[int, int]]) -> torch.Tensor:
    """The patches ``(example, patch)`` of a padded input, stacked."""
    return torch.cat([padded[(slice(b, b + 1), slice(None), *grid.slices[p])] for b, p in items])


class _Paired:
    """Set ``paired`` on the sliding window for a block, restoring it afterwards."""

    def __init__(self, sw: Any, on: bool) -> None:
        self.sw, self.on = sw, on

    def __enter__(self) -> None:
        self.was, self.sw.paired = self.sw.paired, self.on

    def __exit__(self, *exc: Any) -> None:
        self.sw.paired = self.was


class PatchwiseLayerIntegratedGradients:
    """Layer IG over every patch copy of the layer (module docstring)."""

    def __init__(self, ctx: MethodContext, params: Mapping[str, Any], baselines: torch.Tensor) -> None:
        self.ctx, self.p, self.baselines = ctx, params, baselines

    def _constant_reference(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor | None:
        """``A(x0)`` of one patch when every patch of the (padded) baseline is the same constant."""
        sw = self.ctx.score_model.runner
        grid = sw.grid(x.shape[2:], x.device)
        padded = grid.pad_input(base)
        if not bool((padded == padded.flatten()[0]).all()):
            return None
        return layer_of_patches(sw, self.ctx.layer, self.p["attribute_to_layer_input"],
                                patches_of(padded, grid, [(0, 0)]))

    def attribute(self, inputs: torch.Tensor, target: int = 0, **_: Any) -> torch.Tensor:
        """Return the input-grid map; the total over every copy goes to ``ctx.extra``."""
        ctx, p = self.ctx, self.p
        n = inputs.shape[0]
        x = inputs.detach()
        base = self.baselines.to(x.dtype)
        reference = self._constant_reference(x, base)
        paired = reference is None
        state: dict[str, Any] = {"alpha": 0.0, "diff": None}

        def edit(a: torch.Tensor) -> torch.Tensor:
            if paired:
                h = a.shape[0] // 2
                a1, a0 = a[:h], a[h:]
            else:
                a1, a0 = a, reference
            state["diff"] = (a1 - a0).detach()
            mix = a0 + state["alpha"] * (a1 - a0)
            return torch.cat([mix, mix.detach()]) if paired else mix

        steps_func, alphas_func = approximation_parameters(p["method"])
        n_steps = int(p["n_steps"])
        batch = torch.cat([x, base]) if paired else x
        reduce = p.get("channel_reduce", "sum")
        out = total = None
        handle = _on_layer(ctx.layer, p["attribute_to_layer_input"], edit)
        try:
            with _Paired(ctx.score_model.runner, paired):
                for step, alpha in zip(steps_func(n_steps), alphas_func(n_steps)):
                    state["alpha"] = float(alpha)

                    def per_patch(a: torch.Tensor, g: torch.Tensor, items: list,
                                  step: float = float(step)) -> torch.Tensor:
                        h = state["diff"].shape[0]
                        m = reduce_channels(step * state["diff"] * g[:h], reduce)
                        return torch.cat([m, torch.zeros_like(m)]) if paired else m

                    o, t = patchwise_layer_map(ctx.score_model, ctx.layer, batch, target,
                                               p["attribute_to_layer_input"], per_patch, "sum",
                                               "layer_integrated_gradients", ctx.layer_name)
                    out = o[:n] if out is None else out + o[:n]
                    total = t[:n] if total is None else total + t[:n]
        finally:
            handle.remove()
        ctx.extra["raw_attribution_sum"] = total
        return out


class PatchwiseLayerDeepLift:
    """Layer DeepLIFT (or DeepLIFT SHAP: ``shap``, the mean over ``baselines``' rows) on every
    patch copy, with Captum's rules running on paired input/reference patch batches."""

    def __init__(self, ctx: MethodContext, plan: Any, baselines: torch.Tensor, layer_input: bool,
                 reduce: str, shap: bool = False) -> None:
        self.ctx, self.plan, self.baselines = ctx, plan, baselines
        self.layer_input, self.reduce, self.shap = layer_input, reduce, shap

    def _one(self, model: nn.Module, x: torch.Tensor, base: torch.Tensor, target: int,
             name: str) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]

        def per_patch(a: torch.Tensor, g: torch.Tensor, items: list) -> torch.Tensor:
            h = a.shape[0] // 2
            m = reduce_channels((a[:h] - a[h:]) * g[:h], self.reduce)
            return torch.cat([m, torch.zeros_like(m)])

        out, total = patchwise_layer_map(model, self.plan.layer, torch.cat([x, base]), target, self.layer_input,
                                         per_patch, "sum", name, self.ctx.layer_name)
        return out[:n], total[:n]

    def attribute(self, inputs: torch.Tensor, target: int = 0, **_: Any) -> torch.Tensor:
        """Return the input-grid map; the total over every copy goes to ``ctx.extra``."""
        model = self.plan.model
        name = "layer_deeplift_shap" if self.shap else "layer_deeplift"
        x = inputs.detach()
        base = self.baselines.to(x.dtype)
        rows = [base[j:j + 1].expand_as(x) for j in range(base.shape[0])] if self.shap else [base]
        dl = LayerDeepLift(model, self.plan.layer)
        model.apply(lambda m: dl._register_hooks(m, attribute_to_layer_input=self.layer_input))
        out = total = None
        try:
            with _Paired(model.runner, True):
                for b in rows:
                    o, t = self._one(model, x, b, target, name)
                    out = o if out is None else out + o
                    total = t if total is None else total + t
        finally:
            dl._remove_hooks([])
        assert out is not None and total is not None
        self.ctx.extra["raw_attribution_sum"] = total / len(rows)
        return out / len(rows)


class _InputBaselineXGradient:
    """One batch of GradientSHAP draws (Captum's ``LayerInputBaselineXGradient``), patch-wise."""

    multiplies_by_inputs = True

    def __init__(self, ctx: MethodContext, layer_input: bool, reduce: str) -> None:
        self.ctx, self.layer_input, self.reduce = ctx, layer_input, reduce
        self.forward_func = ctx.score_model
        self.totals: list[torch.Tensor] = []

    @staticmethod
    def has_convergence_delta() -> bool:
        return False

    def attribute(self, inputs: Any, baselines: Any = None, target: Any = 0, **_: Any) -> torch.Tensor:
        x = inputs[0] if isinstance(inputs, tuple) else inputs
        b = baselines[0] if isinstance(baselines, tuple) else baselines
        rand = torch.tensor(np.random.uniform(0.0, 1.0, x.shape[0]), device=x.device, dtype=x.dtype)
        point = _scale_input(x, b, rand)
        sw = self.ctx.score_model.runner
        grid = sw.grid(x.shape[2:], x.device)
        xp, bp = grid.pad_input(x.detach()), grid.pad_input(b.detach())

        def per_patch(a: torch.Tensor, g: torch.Tensor, items: list) -> torch.Tensor:
            diff = (layer_of_patches(sw, self.ctx.layer, self.layer_input, patches_of(xp, grid, items))
                    - layer_of_patches(sw, self.ctx.layer, self.layer_input, patches_of(bp, grid, items)))
            return reduce_channels(diff * g, self.reduce)

        out, total = patchwise_layer_map(self.ctx.score_model, self.ctx.layer, point, int(target), self.layer_input,
                                         per_patch, "sum", "layer_gradient_shap", self.ctx.layer_name)
        self.totals.append(total)
        return out

    attribute.__wrapped__ = attribute  # type: ignore[attr-defined]  # NoiseTunnel calls __wrapped__


class PatchwiseLayerGradientShap(LayerGradientShap):
    """Captum's ``LayerGradientShap`` whose inner draws run patch-wise (same random draws)."""

    def __init__(self, ctx: MethodContext, layer_input: bool, reduce: str) -> None:
        super().__init__(ctx.score_model, ctx.layer)
        self.ctx, self.inner = ctx, _InputBaselineXGradient(ctx, layer_input, reduce)

    def attribute(self, inputs: torch.Tensor, baselines: Any, n_samples: int = 5,  # type: ignore[override]
                  stdevs: float = 0.0, target: Any = 0, **_: Any) -> torch.Tensor:
        self.inner.totals = []
        nt = NoiseTunnel(self.inner)  # type: ignore[arg-type]
        out = nt.attribute.__wrapped__(nt, inputs, nt_type="smoothgrad", nt_samples=n_samples, stdevs=stdevs,
                                       draw_baseline_from_distrib=True, baselines=baselines, target=target)
        totals = torch.cat(self.inner.totals)
        self.ctx.extra["raw_attribution_sum"] = totals.view(inputs.shape[0], -1).mean(dim=1)
        return out


class PatchwiseLayerActivation:
    """Each patch copy's activation, blended like the network's outputs (no target)."""

    def __init__(self, ctx: MethodContext, layer_input: bool, reduce: str) -> None:
        self.ctx, self.layer_input, self.reduce = ctx, layer_input, reduce

    def attribute(self, inputs: torch.Tensor, **_: Any) -> torch.Tensor:
        """Return the input-grid map ``(N, C' , *spatial)``."""
        return patchwise_layer_forward(self.ctx.score_model, self.ctx.layer, inputs, self.layer_input,
                                       lambda a, items: reduce_channels(a, self.reduce), "blend",
                                       "layer_activation", self.ctx.layer_name)
