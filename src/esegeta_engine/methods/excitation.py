"""Excitation backprop, contrastive excitation backprop and the linear approximation.

Excitation backprop (Zhang et al. 2016, Top-down Neural Attention by Excitation
Backprop, ECCV; IJCV 2018) propagates a *probability* from the output down to
a chosen layer. A unit ``j`` passes its marginal winning probability ``P(j)``
to its inputs ``i`` in proportion to their excitatory contributions:

    ``P(i) = sum_j P(j) * max(a_i w_ij, 0) / sum_i' max(a_i' w_i'j, 0)``

(the paper writes ``a_i w_ij^+`` for its non-negative activations; taking the
positive part of the contribution is the same there and keeps probabilities
non-negative where a layer's inputs can be negative). Biases take no share.
Activations and normalisations pass probabilities on unchanged, max pooling
sends them to the winner, average pooling is a layer of positive weights.

The top-down signal is the target: the output units get probabilities in
proportion to the (non-negative part of the) gradient of the target score, so a
classification target is a one-hot prior and a segmentation target spreads it
uniformly over the explained region. Probabilities sum to one at every layer
wherever every unit holding probability has some excitatory input.

Contrastive excitation backprop subtracts the map of the *dual* unit, whose
last-layer weights are negated (the paper's non-target signal), from the
target's map at the same layer; both come from one forward pass.

The paper's **linear approximation** (activation times gradient at a layer,
summed over channels, as TorchRay documents it) is exactly
``layer_gradient_x_activation`` with ``channel_reduce: sum``; it is registered
under its own name as that method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from captum.attr import LayerGradientXActivation
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.methods.layer import LAYER_PARAMS
from esegeta_engine.methods.lrp import LRP, check_supported, quiet_stitched_forward
from esegeta_engine.methods.lrp_rules import module_forward, parameters_of, vjp
from esegeta_engine.methods.lrp_signed import bias_term, contribution_sums, split_back
from esegeta_engine.methods.patch_layer_methods import PatchwiseGradientXActivation, is_patchwise
from esegeta_engine.methods.registry import Call, MethodContext, MethodSpec, register


def excitation_rule(module: nn.Module, a: torch.Tensor, P: torch.Tensor, negate: bool = False,
                    y: torch.Tensor | None = None) -> torch.Tensor:
    """Probabilities at ``module``'s input from ``P`` at its output (weights negated if asked).

    ``y``: the module's output in the forward pass, which gives the sums of excitatory
    contributions with one more module call (:mod:`.lrp_signed`).
    """
    f = module_forward(module)
    w, b = parameters_of(module)
    ap = a.clamp(min=0)
    if w is None:  # average pooling: positive weights, excitatory inputs are the positive ones
        with torch.no_grad():
            z = f(ap, None, None)
        s = torch.where(z > 0, P / z.clamp(min=1e-30), torch.zeros_like(P))
        return ap * vjp(f, ap, None, None, s)
    del ap
    if y is not None and (y.dtype != a.dtype or y.shape != P.shape):
        y = None
    with torch.no_grad():
        if y is not None:  # f(a) without its bias (biases take no share), of the negated weights if asked
            y = y - bias_term(module, b, y) if b is not None else y
            y = -y if negate else y
        w = -w if negate else w
        (z,) = contribution_sums(module, a, w, None, y)
        silent = z <= 0  # units without excitatory input pass nothing on
        same = P.dtype == z.dtype and P.shape == z.shape
        s = torch.div(P, z.clamp_(min=1e-30), out=z) if same else P / z.clamp_(min=1e-30)
        s.masked_fill_(silent, 0)
        del silent
        return split_back(module, a, w.clamp(min=0), w.clamp(max=0), s)


class _StartProbability(torch.autograd.Function):
    """Identity; backward turns the score's gradient into a probability over the output units."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return y.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        p = g.clamp(min=0)
        total = p.flatten(1).sum(1).reshape(-1, *([1] * (p.dim() - 1)))
        return torch.where(total > 0, p / total.clamp(min=1e-30), torch.zeros_like(p))


class _StartPositive(torch.autograd.Function):
    """Identity; backward passes the positive part of the score's gradient and records its totals
    per row (patch-wise: the normalisation over the whole output is applied at the end)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, totals: list) -> torch.Tensor:  # type: ignore[override]
        ctx.totals = totals
        return y.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        p = g.clamp(min=0)
        ctx.totals.extend(float(v) for v in p.flatten(1).double().sum(1))
        return p, None


class ExcitationBackprop(LRP):
    """Marginal winning probabilities at ``layer`` (Captum-shaped, layer method).

    Parameters
    ----------
    model : nn.Module
        The score model ``(N, C, *spatial) -> (N, K)``.
    layer : nn.Module
        Where the probabilities are read (its output, or its input).
    contrastive : bool
        Subtract the dual unit's map (contrastive excitation backprop).
    method : str
        Name used in error messages.
    """

    def __init__(self, model: nn.Module, layer: nn.Module, contrastive: bool = False,
                 method: str = "excitation_backprop", reduce: str = "sum") -> None:
        super().__init__(model, "epsilon", {}, transformer=False)
        self.reduce = reduce
        self.layer = layer
        self.contrastive = contrastive
        self.method = method
        self._dual = False
        self._totals: list[float] | None = None  # patch-wise: unnormalised start, totals recorded

    def start(self, y: torch.Tensor) -> torch.Tensor:
        if self._totals is not None:
            return _StartPositive.apply(y, self._totals)
        return _StartProbability.apply(y)

    def _patchwise(self, inputs: torch.Tensor, target: int, layer_input: bool, reduce: str) -> torch.Tensor:
        """Winning probabilities on every patch copy of the layer, added where copies overlap.

        The top-down signal at each patch output is the positive part of its blended share of the
        gradient; the rules are linear in it, so dividing by the total over the stitched output
        (the sum of every patch's share) gives the whole output's probabilities exactly.
        """
        from esegeta_engine.forward.patch_layer import patchwise_layer_map
        from esegeta_engine.methods.patch_layer_methods import reduce_channels

        maps = []
        for dual in ((False, True) if self.contrastive else (False,)):
            self._dual = dual
            self._totals = []
            z = torch.zeros(inputs.shape[0], dtype=torch.float64)

            def per_patch(a: torch.Tensor, g: torch.Tensor, items: list) -> torch.Tensor:
                rows, self._totals[:] = list(self._totals or []), []
                for (b, _), t in zip(items, rows):
                    z[b] += t
                return reduce_channels(g, reduce)

            handles = self._hook({})
            try:
                with quiet_stitched_forward(self.model):
                    out, total = patchwise_layer_map(self.model, self.layer, inputs, target, layer_input, per_patch,
                                                     "sum", self.method)
            finally:
                for h in handles:
                    h.remove()
            scale = torch.where(z > 0, 1 / z.clamp(min=1e-300), torch.zeros_like(z))
            maps.append((out * scale.to(out.dtype).reshape(-1, *([1] * (out.dim() - 1))), total * scale))
        self._dual, self._totals = False, None
        if self.contrastive:
            return maps[0][0] - maps[1][0]
        return maps[0][0]

    def propagator(self, module: nn.Module, kind: str, state: dict[str, Any],
                   options: dict[str, Any]) -> Any:
        if kind == "pass":
            return lambda a, P, y: P
        return self.quiet(lambda a, P, y: excitation_rule(
            module, a, P, negate=self._dual and state["last"] == id(module), y=y))

    def attribute(self, inputs: torch.Tensor, target: int | None = None,  # type: ignore[override]
                  attribute_to_layer_input: bool = False, **_: Any) -> torch.Tensor:
        """Return the (contrastive) winning probabilities at the layer, ``(N, C_layer, *grid)``."""
        check_supported(self.net, self.method)
        if getattr(self.model, "patchwise", False):
            return self._patchwise(inputs, target or 0, attribute_to_layer_input, self.reduce)
        captured: list[torch.Tensor] = []

        def grab_input(m: nn.Module, args: tuple[Any, ...]) -> None:
            if not self._busy:
                captured.append(args[0])

        def grab_output(m: nn.Module, args: tuple[Any, ...], y: Any) -> None:
            if not self._busy:
                captured.append(y)

        x = inputs.detach().requires_grad_(True)
        handles = self._hook({})
        if attribute_to_layer_input:
            handles.append(self.layer.register_forward_pre_hook(grab_input, prepend=True))
        else:
            handles.append(self.layer.register_forward_hook(grab_output))
        try:
            with torch.enable_grad():
                out = self.model(x)
                if len(captured) != 1:
                    raise MethodError(
                        f"{self.method}: the layer ran {len(captured)} times in one forward pass",
                        "pick a layer the model calls exactly once (see `esegeta layers MODEL`)")
                score = (out[:, target] if target is not None else out).sum()
                (P,) = torch.autograd.grad(score, captured[0], retain_graph=self.contrastive)
                if self.contrastive:
                    self._dual = True
                    (dual,) = torch.autograd.grad(score, captured[0])
                    P = P - dual
        finally:
            self._dual = False
            for h in handles:
                h.remove()
        return P.detach()


def _excitation(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    return Call(ExcitationBackprop(ctx.score_model, ctx.layer, reduce=p["channel_reduce"]),
                {"attribute_to_layer_input": p["attribute_to_layer_input"]})


def _contrastive(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    return Call(ExcitationBackprop(ctx.score_model, ctx.layer, contrastive=True,
                                   method="contrastive_excitation_backprop", reduce=p["channel_reduce"]),
                {"attribute_to_layer_input": p["attribute_to_layer_input"]})


def _linear_approximation(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    if is_patchwise(ctx):
        return Call(PatchwiseGradientXActivation(ctx, "linear_approximation", "sum",
                                                 p["attribute_to_layer_input"]))
    return Call(LayerGradientXActivation(ctx.score_model, ctx.layer),
                {"attribute_to_layer_input": p["attribute_to_layer_input"]})


_EB_REF = ("Zhang et al. 2016, Top-down Neural Attention by Excitation Backprop, ECCV "
           "(IJCV 126:1084-1102, 2018), arXiv:1608.00507")

register(MethodSpec(
    name="excitation_backprop", family="layer", output_grid="layer", title="Excitation Backprop",
    summary="probability that each layer unit wins the top-down competition for the target, "
            "passed down through excitatory (positive) contributions only",
    params=LAYER_PARAMS, build=_excitation, needs_layer=True, needs_hooks=True,
    reference=_EB_REF, patchwise="gradient", cost=lambda info, p: 1))
register(MethodSpec(
    name="contrastive_excitation_backprop", family="layer", output_grid="layer", title="Contrastive Excitation Backprop",
    summary="excitation backprop of the target minus that of its dual (last-layer weights "
            "negated): what speaks for the target and not against it",
    params=LAYER_PARAMS, build=_contrastive, needs_layer=True, needs_hooks=True,
    reference=_EB_REF, patchwise="gradient", cost=lambda info, p: 1))
register(MethodSpec(
    name="linear_approximation", family="layer", output_grid="layer", title="Linear Approximation",
    summary="layer activation times gradient summed over channels (the same map as "
            "layer_gradient_x_activation with channel_reduce: sum)",
    params=tuple(q for q in LAYER_PARAMS if q.name != "channel_reduce"),
    build=_linear_approximation, needs_layer=True, needs_hooks=True,
    reference="TorchRay's linear approximation (Fong, Patrick & Vedaldi 2019 code base), "
              "as listed by the TorchEsegeta paper (Chatterjee et al. 2022)",
    patchwise="gradient", cost=lambda info, p: 1))
