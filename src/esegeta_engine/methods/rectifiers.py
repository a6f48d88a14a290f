"""Guided backpropagation and deconvolution on every rectifying activation module.

Captum's ``GuidedBackprop`` and ``Deconvolution`` override the backward pass of
``nn.ReLU`` modules only, so on networks built with other activations (MONAI's
BasicUNet uses LeakyReLU, its UNet PReLU) they silently return the plain
gradient. The rules here act on every module of :data:`RECTIFIERS`:

========================  ==================================================  ======================
activation                guided rule: gradient into the activation's input   deconvolution rule
========================  ==================================================  ======================
ReLU                      ``1[x > 0] * max(g, 0)`` (Springenberg et al.)     ``max(g, 0)``
LeakyReLU                 ``f'(x) * max(g, 0)``: slope where ``x < 0``        ``leaky_relu(g)``
PReLU                     ``f'(x) * max(g, 0)``: learnt slope where ``x < 0`` ``prelu(g)`` (its slope)
ReLU6                     ``1[0 < x < 6] * max(g, 0)``                        ``max(g, 0)``
ELU                       ``elu'(x) * max(g, 0)``                             ``max(g, 0)``
GELU, SiLU                ``f'(x) * max(g, 0)`` (``f'`` dips below 0 for      ``max(g, 0)``
                          ``x`` below about -0.75 and -1.28)
========================  ==================================================  ======================

``g`` is the gradient arriving at the activation's output and ``f'`` the
activation's own derivative. The guided rule keeps the activation's local
derivative and passes only positive signals (for ReLU exactly Captum's rule);
the deconvolution rule ignores the forward input and rectifies the backward
signal with the module's own piecewise-linear rectifier, or with a ReLU for the
smooth and saturating ones (their curve depends on the signal's scale, a
gradient has none).

Activations a model calls as functions (``F.relu(x)``, ``x.relu()``) have no
module to hook: each run counts such calls during its forward pass and, when
there are any, attaches a note to the result (see :mod:`.notes`) saying that
the rule was applied only at the activation modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from captum.attr import GradientAttribution
from torch import nn
from torch.overrides import TorchFunctionMode

from esegeta_engine.methods.notes import add_note

Rule = Literal["guided", "deconvolution"]

RECTIFIERS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ReLU6, nn.ELU, nn.GELU, nn.SiLU)
"""Activation module types the guided and deconvolution rules act on."""

FUNCTIONAL_ACTIVATIONS = frozenset({
    "relu", "relu_", "leaky_relu", "leaky_relu_", "prelu", "relu6", "hardtanh", "hardtanh_",
    "elu", "elu_", "gelu", "silu", "mish"})
"""Names of functions that apply a rectifier without a module."""


def _deconv_signal(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function the deconvolution rule applies to the gradient at ``module``."""
    if isinstance(module, nn.LeakyReLU):
        slope = module.negative_slope
        return lambda g: F.leaky_relu(g, slope)
    if isinstance(module, nn.PReLU):
        weight = module.weight.detach()
        return lambda g: F.prelu(g, weight.to(g.dtype))
    return F.relu


class RouteBack(torch.autograd.Function):
    """Identity on ``y``; backward sends ``signal(g)`` to ``x`` (the activation's input).

    Nothing is saved for the backward pass; LRP's pass-through modules use it too.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor,  # type: ignore[override]
                signal: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.signal = signal
        return y.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return ctx.signal(g), None, None


class FunctionalCounter(TorchFunctionMode):
    """Counts rectifier functions called outside the hooked activation modules."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if self.depth == 0 and name in FUNCTIONAL_ACTIVATIONS:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def rectifier_rule(model: nn.Module, rule: Rule, counter: FunctionalCounter | None = None
                   ) -> Iterator[int]:
    """Apply ``rule`` at every rectifier module of ``model`` while the context is open.

    Yields the number of hooked modules. Hooks are removed on exit, whatever
    happens; the rules themselves live on the autograd graph built inside.
    """
    handles = []
    stash: dict[int, list[torch.Tensor]] = {}

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
        if counter is not None:
            counter.depth += 1
        if rule != "deconvolution" or not args or not isinstance(args[0], torch.Tensor):
            return None
        stash.setdefault(id(module), []).append(args[0])
        if getattr(module, "inplace", False):  # keep the input the rule sends gradients to
            return (args[0].clone(), *args[1:])
        return None

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if counter is not None:
            counter.depth -= 1
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        if rule == "guided":
            output.register_hook(lambda g: g.clamp(min=0))
            return None
        x = stash[id(module)].pop()
        return RouteBack.apply(x, output, _deconv_signal(module))

    count = 0
    try:
        for module in model.modules():
            if isinstance(module, RECTIFIERS):
                handles.append(module.register_forward_pre_hook(pre_hook))
                handles.append(module.register_forward_hook(hook))
                count += 1
        yield count
    finally:
        for h in handles:
            h.remove()


class RectifiedGradient(GradientAttribution):
    """Gradient of the target score with the guided or deconvolution rule (Captum-shaped).

    A Captum ``GradientAttribution``, so :class:`captum.attr.NoiseTunnel` can wrap it.

    Parameters
    ----------
    model : nn.Module
        The score model ``(N, C, *spatial) -> (N, K)``.
    rule : {"guided", "deconvolution"}
        Which rule the rectifier modules apply.
    notes : list of str
        Where caveats about this run go (see :mod:`.notes`).
    name : str
        Method name used in the notes.
    """

    def __init__(self, model: nn.Module, rule: Rule, notes: list[str], name: str) -> None:
        super().__init__(model)
        self.model = model
        self.rule = rule
        self.notes = notes
        self.name = name

    def _attribute(self, inputs: torch.Tensor, target: int | None = None, **_: Any) -> Any:
        if isinstance(inputs, tuple):  # how NoiseTunnel passes them
            return (self._attribute(inputs[0], target),)
        x = inputs.detach().requires_grad_(True)
        counter = FunctionalCounter()
        with torch.enable_grad(), rectifier_rule(self.model, self.rule, counter) as hooked:
            with counter:
                out = self.model(x)
            score = out[:, target] if target is not None else out
            (grad,) = torch.autograd.grad(score.sum(), x)
        self._note(hooked, counter.calls)
        return grad

    def attribute(self, inputs: torch.Tensor, target: int | None = None,  # type: ignore[override]
                  **kwargs: Any) -> Any:
        """Return the rule's map of the input's shape for class ``target``."""
        return self._attribute(inputs, target, **kwargs)

    attribute.__wrapped__ = _attribute  # type: ignore[attr-defined]  # what NoiseTunnel calls

    def has_convergence_delta(self) -> bool:
        """No convergence delta (Captum's protocol)."""
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        """The map is a gradient, not multiplied by the input."""
        return False

    def _note(self, hooked: int, functional: dict[str, int]) -> None:
        if functional:
            calls = ", ".join(f"{n} x{k}" for n, k in sorted(functional.items()))
            add_note(self.notes, (
                f"{self.name}: the model applies activations as functions ({calls}), where the "
                f"{self.rule} rule cannot act; it acted on the {hooked} activation module(s) only, so "
                "the map is partly the plain gradient (use activation modules such as nn.ReLU)"))
        elif hooked == 0:
            add_note(self.notes, (
                f"{self.name}: the model has no rectifying activation module "
                f"({', '.join(t.__name__ for t in RECTIFIERS)}), so the map equals the gradient"))


class RectifiedGuidedGradCam:
    """Guided Grad-CAM: the guided map (every rectifier) times the layer's Grad-CAM map.

    As Captum's ``GuidedGradCam`` (Selvaraju et al. 2017), with the guided part
    from :class:`RectifiedGradient`, so it is not the plain gradient on networks
    without ``nn.ReLU`` modules. Two model evaluations: Grad-CAM, then guided.
    """

    def __init__(self, model: nn.Module, layer: nn.Module, notes: list[str]) -> None:
        from captum.attr import LayerGradCam

        self.grad_cam = LayerGradCam(model, layer)
        self.guided = RectifiedGradient(model, "guided", notes, "guided_gradcam")

    def attribute(self, inputs: torch.Tensor, target: int | None = None, *,
                  interpolate_mode: str = "bilinear", attribute_to_layer_input: bool = False,
                  **_: Any) -> torch.Tensor:
        """Return guided backprop times the upsampled, rectified Grad-CAM map."""
        from esegeta_engine.errors import MethodError

        cam = self.grad_cam.attribute(inputs, target=target, relu_attributions=True,
                                      attribute_to_layer_input=attribute_to_layer_input)
        if cam.dim() != inputs.dim():
            raise MethodError(
                "guided_gradcam could not bring the layer's Grad-CAM map to the input grid",
                "pick a layer with a spatial output, such as a convolution (not a linear layer)",
            )
        cam = F.interpolate(cam, size=tuple(inputs.shape[2:]), mode=interpolate_mode,
                            **({} if interpolate_mode == "nearest" else {"align_corners": False}))
        return self.guided.attribute(inputs, target) * cam
