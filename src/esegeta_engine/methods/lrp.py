"""Layer-wise Relevance Propagation (Bach et al. 2015) for 2D and 3D networks.

One forward pass of ``ctx.score_model`` with hooks; the backward pass then
carries *relevance* instead of gradients:

* at the network output (before the target), relevance starts as
  ``output * d score / d output``: for targets that sum a class's outputs over
  a region (every segmentation target) it is the class's output inside the
  region, and its total is the target score;
* convolutions, transposed convolutions and linear layers redistribute it by
  the rule their composite assigns (:mod:`.lrp_rules`); average pooling by the
  epsilon rule;
* eval-mode batch norms right after a convolution are folded into it for the
  run (:mod:`.canonize`: the same function, and the rules see the real weights);
* activations (ReLU, LeakyReLU, PReLU, ReLU6, ELU, GELU, SiLU, Sigmoid, Tanh, Softplus, Mish,
  Hardswish) and the normalisations that cannot be folded (InstanceNorm, GroupNorm) pass it on
  unchanged (``R_in = R_out``); those normalisations are named in the map's notes;
* LayerNorm and MONAI's ViT blocks (UNETR's attention, residual sums and position
  embedding) and Swin blocks (SwinUNETR: :mod:`.lrp_swin`) take the conservative rules of
  Ali et al. 2022 (:mod:`.lrp_attention`);
* max pooling, upsampling, flattening, padding and dropout route it like the gradient
  does (winner-takes-all for max pooling; a sum for upsampling), which conserves it.

Any other module type has no rule and is refused before the model runs.

Under sliding-window execution LRP runs patch by patch, exactly: relevance starts at each
patch's output as ``y_p * w_p / W * dF/dY`` (its blended share; the hooks sit on the network
inside the window, and the patch-wise backward of :mod:`esegeta_engine.forward.sliding`
recomputes one patch batch at a time), and the patch maps add where patches lie, so
``sum R = sum_p sum y_p w_p / W dF/dY``: conservation holds for the stitched score.
Operations a model performs without modules (residual additions, concatenation, functional
activations) are differentiated as usual: a residual sum passes the relevance to both
branches, so totals are conserved layer by layer only along plain chains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.methods import lrp_attention, lrp_rules
from esegeta_engine.methods.canonize import describe_unfolded, fold_batch_norm, unfolded_norms
from esegeta_engine.methods.lrp_context import (network_of, probe_input, quiet_stitched_forward,
                                               sliding_window_of, user_model)
from esegeta_engine.methods.notes import add_note, notes_of
from esegeta_engine.methods.rectifiers import RouteBack
from esegeta_engine.methods.registry import Call, MethodContext, MethodSpec, Param, register

RULE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear)
POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ReLU6, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Mish, nn.Hardswish, nn.CELU, nn.SELU,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, nn.GroupNorm)
NORM_RULE_MODULES: tuple[type[nn.Module], ...] = (nn.LayerNorm,)
"""Normalisations with their own rule (:func:`.lrp_attention.layer_norm_rule`; excitation passes them)."""
# modules whose backward a rule replaces: they run without a graph of their own (their saved tensors)
GRAPH_FREE: tuple[type[nn.Module], ...] = RULE_MODULES + POOL_MODULES + PASS_MODULES + NORM_RULE_MODULES
GRADIENT_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.PixelShuffle,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad2d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d)


def inside_attention(net: nn.Module) -> set[int]:
    """Ids of the modules inside an attention block with a rule (the block's rule replaces theirs)."""
    return {id(c) for m in net.modules() if lrp_attention.has_rule(m) for c in m.modules() if c is not m}


def check_supported(net: nn.Module, method: str = "lrp", attention: bool = False) -> None:
    """Raise :class:`MethodError` naming every module type ``method`` has no rule for.

    ``attention``: MONAI's ViT blocks (UNETR) take the conservative rules of :mod:`.lrp_attention`.
    """
    known = RULE_MODULES + POOL_MODULES + PASS_MODULES + GRADIENT_MODULES + NORM_RULE_MODULES
    model = user_model(net)
    skip = inside_attention(model) if attention else set()
    bad: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if (m._modules and not m._parameters) or isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            continue  # a container: its children are checked (an empty ModuleList computes nothing)
        if attention and (id(m) in skip or lrp_attention.has_rule(m) or lrp_attention.routes_exactly(m)
                          or lrp_attention.monai_type(m, lrp_attention.SWAPPED)):
            continue
        if not isinstance(m, known):
            bad.setdefault(type(m).__name__, []).append(name or "(model)")
    why = lrp_attention.unsupported(model) if attention else None
    if bad or why:
        listed = "; ".join(f"{t} ({', '.join(ns[:2])}{' ...' if len(ns) > 2 else ''})"
                           for t, ns in sorted(bad.items())) or "the transformer blocks"
        listed += lrp_attention.refusal_hint(list(bad), why, attention, method)
        raise MethodError(
            f"{method} has no rule for module type(s) {listed}",
            "use a gradient method (integrated_gradients, input_x_gradient) for this model, or "
            "build it from supported modules: convolutions, linear layers, norms, pooling, "
            "upsampling and activation modules")


class _Relay(torch.autograd.Function):
    """Identity on ``y``; backward sends ``fn(a, R, y)`` to ``a`` (the module's input).

    ``y`` (the module's output) gets no gradient, so autograd never runs the module's own
    backward: the rule's transposed product is the only backward work per module.
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, y: torch.Tensor,  # type: ignore[override]
                fn: Any) -> torch.Tensor:
        ctx.save_for_backward(a, y)
        ctx.fn = fn
        return y.clone()

    @staticmethod
    def backward(ctx: Any, R: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        a, y = ctx.saved_tensors
        with torch.enable_grad():
            return ctx.fn(a, R, y), None, None


class _Start(torch.autograd.Function):
    """Identity; backward turns the score's gradient ``g`` at the output into ``y * g``."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(y)
        return y.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return y * g


class LRP:
    """LRP attribution with a named composite (Captum-shaped).

    Parameters
    ----------
    model : nn.Module
        The score model ``(N, C, *spatial) -> (N, K)``.
    composite : str
        A key of :data:`~esegeta_engine.methods.lrp_rules.COMPOSITES`.
    options : mapping
        ``epsilon``, ``gamma``, ``alpha`` and the z-box bounds ``low``/``high`` (None: the input's
        minimum and maximum).
    record : list, optional
        If given, every rule module appends ``(name, sum R_in, sum R_out)`` during the backward
        pass (for conservation checks).
    notes : list of str, optional
        Where the note naming normalisations passed through unchanged goes (see :mod:`.notes`).
    canonize : bool
        Fold eval-mode batch norms into the convolutions before them for the run (default).
    transformer : bool
        Give MONAI's ViT blocks and layer norms the conservative rules of :mod:`.lrp_attention`
        (default); False refuses attention blocks and passes layer norms through.
    """

    def __init__(self, model: nn.Module, composite: str, options: Mapping[str, Any],
                 record: list[tuple[str, float, float]] | None = None,
                 notes: list[str] | None = None, canonize: bool = True, transformer: bool = True) -> None:
        self.model = model
        self.net = network_of(model)
        self.rules = lrp_rules.COMPOSITES[composite]
        self.options = dict(options)
        self.record = record
        self.notes = notes if notes is not None else []
        self.canonize = canonize
        self.transformer = transformer
        self._busy = False  # set while a rule re-runs a module (its hooks stay quiet)

    def attribute(self, inputs: torch.Tensor, target: int | None = None, **_: Any) -> torch.Tensor:
        """Return the relevance of every input voxel for class ``target`` (input's shape)."""
        check_supported(self.net, attention=self.transformer)
        options = dict(self.options)
        dims = tuple(range(1, inputs.dim()))
        if options.get("low") is None:
            options["low"] = inputs.detach().amin(dim=dims, keepdim=True)
        else:
            options["low"] = torch.full_like(inputs[:1, :1], float(options["low"]))
        if options.get("high") is None:
            options["high"] = inputs.detach().amax(dim=dims, keepdim=True)
        else:
            options["high"] = torch.full_like(inputs[:1, :1], float(options["high"]))
        x = inputs.detach().requires_grad_(True)
        probe = probe_input(self.model, inputs)
        canon = fold_batch_norm(self.net, probe) if self.canonize else contextlib.nullcontext([])
        rules = (lrp_attention.transformer_rules(user_model(self.net), probe, options["epsilon"],
                                                 options.get("attention_rule", "held"))
                 if self.transformer else contextlib.nullcontext([]))
        with canon as folded, rules as attention, quiet_stitched_forward(self.model):
            unfolded = unfolded_norms(user_model(self.net), folded)
            if self.transformer:
                unfolded.pop("LayerNorm", None)  # it has its rule
            if unfolded:
                add_note(self.notes, describe_unfolded("lrp", unfolded))
            if attention:
                add_note(self.notes, lrp_attention.describe(attention, options["epsilon"],
                                                            options.get("attention_rule", "held")))
            handles = self._hook(options)
            try:
                with torch.enable_grad():
                    out = self.model(x)
                    score = out[:, target] if target is not None else out
                    (relevance,) = torch.autograd.grad(score.sum(), x)
            finally:
                for h in handles:
                    h.remove()
        return relevance.detach()

    def _hook(self, options: dict[str, Any]) -> list[Any]:
        names = {id(m): n for n, m in user_model(self.net).named_modules()}
        state: dict[str, Any] = {"first": None, "last": None, "stash": {}, "grad": []}

        sliding = sliding_window_of(self.model)

        def pre(module: nn.Module, args: tuple[Any, ...]) -> Any:
            if sliding is not None and not sliding.recomputing:
                return None  # the stitched forward: its graph is not used, the backward recomputes
            if self._busy or not args or not isinstance(args[0], torch.Tensor):
                return None
            state["stash"].setdefault(id(module), []).append(args[0])
            if isinstance(module, GRAPH_FREE):  # the rule replaces its backward: no graph of its own
                state["grad"].append(torch.is_grad_enabled())  # post restores it
                torch.set_grad_enabled(False)
            if getattr(module, "inplace", False):
                return (args[0].clone(), *args[1:])
            return None

        def post(module: nn.Module, args: tuple[Any, ...], y: Any) -> Any:
            if (sliding is not None and not sliding.recomputing) or self._busy:
                return None
            if isinstance(module, GRAPH_FREE) and state["grad"]:
                torch.set_grad_enabled(state["grad"].pop())
            stack = state["stash"].get(id(module))
            if not isinstance(y, torch.Tensor) or not stack:
                return None
            a = stack.pop()
            kind = "pass"
            if isinstance(module, RULE_MODULES):
                if state["first"] is None:
                    state["first"] = id(module)
                state["last"] = id(module)
                kind = "first" if state["first"] == id(module) else (
                    "dense" if isinstance(module, nn.Linear) else "conv")
            elif isinstance(module, POOL_MODULES):
                kind = "pool"
            elif isinstance(module, NORM_RULE_MODULES):
                kind = "layer_norm" if self.transformer else "pass"
            elif lrp_attention.is_attention(module):
                kind = "attention"
            fn = self._recorded(names.get(id(module), ""), self.propagator(module, kind, state, options))
            if kind == "pass":  # needs no saved input: keeps activation memory as the gradient's
                return RouteBack.apply(a, y, lambda R: fn(None, R, None))
            return _Relay.apply(a, y, fn)

        handles = [self.net.register_forward_hook(lambda m, a, y: self.start(y))]
        skip = inside_attention(self.net)
        for m in self.net.modules():
            if id(m) in skip:
                continue  # the attention block's rule replaces its parts'
            if isinstance(m, RULE_MODULES + POOL_MODULES + PASS_MODULES + NORM_RULE_MODULES) or \
                    lrp_attention.is_attention(m):
                handles.append(m.register_forward_pre_hook(pre))
                handles.append(m.register_forward_hook(post))
        return handles

    def start(self, y: torch.Tensor) -> torch.Tensor:
        """Where relevance starts: the network output (see :class:`_Start`)."""
        return _Start.apply(y)

    def propagator(self, module: nn.Module, kind: str, state: dict[str, Any],
                   options: dict[str, Any]) -> Any:
        """``fn(a, R, y) -> R_in`` for ``module`` of ``kind`` (first, conv, dense, pool or pass);
        ``y`` is the module's output in the forward pass."""
        if kind == "pass":
            return lambda a, R, y: R
        eps = options["epsilon"]
        if kind == "layer_norm":
            return self.quiet(lambda a, R, y: lrp_attention.layer_norm_rule(module, a, R, eps))
        if kind == "attention":
            rule = options.get("attention_rule", "held")
            return self.quiet(lambda a, R, y: lrp_attention.attention_rule(module, a, R, eps, rule))
        rule = "epsilon" if kind == "pool" else self.rules[kind]
        return self.quiet(lambda a, R, y: lrp_rules.apply_rule(rule, module, a, R, options, y))

    def quiet(self, fn: Any) -> Any:
        """``fn`` run with this object's hooks silent (rules re-run their module)."""
        def wrapped(a: torch.Tensor, R: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
            self._busy = True
            try:
                return fn(a, R, y)
            finally:
                self._busy = False
        return wrapped

    def _recorded(self, name: str, fn: Any) -> Any:
        if self.record is None:
            return fn

        def wrapped(a: torch.Tensor, R: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
            out = fn(a, R, y)
            self.record.append((name, float(out.detach().sum()), float(R.detach().sum())))
            return out
        return wrapped


def _build(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
    check_supported(network_of(ctx.score_model), attention=True)
    options = {"epsilon": p["epsilon"], "gamma": p["gamma"], "alpha": p["alpha"],
               "low": p["low"], "high": p["high"], "attention_rule": p["attention_rule"]}
    return Call(LRP(ctx.score_model, p["composite"], options, notes=notes_of(ctx)))


register(MethodSpec(
    name="lrp", family="gradient", title="Layer-wise Relevance Propagation",
    summary="the target score redistributed layer by layer back to the voxels by LRP rules "
            "(epsilon, gamma, alpha-beta, z-box, flat) chosen by a named composite",
    params=(
        Param("composite", "str", "epsilon_plus",
              "rules per layer kind (first layer / convolutions / dense): "
              "epsilon: all epsilon; epsilon_plus: z+ for convolutions; epsilon_plus_flat and "
              "epsilon_alpha2_beta1_flat: flat first layer; epsilon_gamma_box: z-box first layer, "
              "gamma convolutions; epsilon_alpha2_beta1; gamma; alpha_beta; zbox_epsilon",
              choices=tuple(lrp_rules.COMPOSITES)),
        Param("epsilon", "float", 0.01, "stabiliser of the epsilon rule (0: LRP-0)",
              minimum=0.0, maximum=1e6),
        Param("gamma", "float", 0.25, "weight of positive parameters in the gamma rule",
              minimum=0.0, maximum=1e6),
        Param("alpha", "float", 2.0, "alpha of the alpha-beta rule (beta = alpha - 1)",
              minimum=1.0, maximum=1e3),
        Param("low", "float", None, "lowest input value for the z-box rule (default: input minimum)"),
        Param("high", "float", None, "highest input value for the z-box rule (default: input maximum)"),
        Param("attention_rule", "str", "held",
              "transformer attention (UNETR, SwinUNETR): held: softmax probabilities held constant, relevance "
              "through the values only (Ali et al. 2022); attnlrp: AttnLRP's softmax and uniform product rules, "
              "relevance to queries and keys too (Achtibat et al. 2024)", choices=("held", "attnlrp")),
    ),
    build=_build, needs_hooks=True, patchwise="gradient", cost=lambda info, p: 1, axiom="conservation",
    reference="Bach et al. 2015, On Pixel-Wise Explanations for Non-Linear Classifier Decisions "
              "by Layer-Wise Relevance Propagation, PLoS ONE; Montavon et al. 2019, Layer-Wise "
              "Relevance Propagation: An Overview"))
